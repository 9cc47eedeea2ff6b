//! Several hosts on one machine: each host a network namespace of its own, all joined by one
//! bridge that lives in a namespace of its own too (the *switch*), so that a connection from
//! one host to another leaves through the host's veth, crosses the bridge and enters the other's
//! veth: a real network path, not loopback.
//!
//! ```text
//!   tsb-NAME-PID-src        tsb-NAME-PID-switch          tsb-NAME-PID-dst
//!   eth0 10.77.0.1 ──veth── p0 ─┐            ┌─ p1 ──veth── eth0 10.77.0.2
//!                               └── br0 ─────┘
//! ```
//!
//! Names carry the network's name and this process's id, so parallel tests and drills (and
//! other people's runs on the same machine) never collide; a [`Network`] first removes
//! namespaces of the same name left by a run whose process is gone (it crashed before its
//! `Drop` ran), and removes its own on `Drop`, which also runs when a test panics. Removing a
//! namespace removes its veth ends and their peers with it. Processes start inside a host with
//! [`Host::command`] (`ip netns exec`, which execs the program: the child is the program
//! itself, so killing it kills the program). Unix sockets are paths in the file system, which
//! every namespace shares: a control socket works from outside the host.
//!
//! Used by the multi-host tests (`tests/`) and by `tsubame drill` (the network scenarios).
//! Needs root and `ip` (iproute2; `scripts/setup.sh` installs it).

use std::path::Path;
use std::process::Command;

/// What went wrong making, changing or removing a network.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running `ip` failed (install iproute2: scripts/setup.sh): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("ip {args} failed: {stderr} (network namespaces need root)")]
    Ip { args: String, stderr: String },
    #[error("bad network name '{name}' or roles {roles:?}: a name without '/', at most 249 roles, none called 'switch'")]
    BadName { name: String, roles: Vec<String> },
}

/// Where `ip netns` keeps its namespaces' names.
const NETNS_DIR: &str = "/run/netns";
/// The hosts' subnet: host `i` (from 0) is `10.77.0.(i + 1)`. Every network has its own
/// namespaces, so every network may use the same addresses.
const SUBNET: &str = "10.77.0";

/// One host of a [`Network`]: a network namespace with one address.
#[derive(Debug)]
pub struct Host {
    pub role: String,
    pub netns: String,
    pub ip: String,
    /// Its port on the switch.
    port: String,
}

impl Host {
    /// Starts a raw TCP prober on this host that exits as soon as `ip` answers a SYN (port 9:
    /// a reset counts as an answer), trying every 10 ms with 50 ms per try: the physical
    /// limit a redial loop can be compared to once a network comes back (ARP included).
    pub fn probe_until_reaches(&self, ip: &str) -> Result<std::process::Child, NetnsError> {
        let script = format!(
            "while true; do timeout 0.05 bash -c 'exec 3<>/dev/tcp/{ip}/9' 2>/dev/null; \
             [ $? -ne 124 ] && break; sleep 0.01; done"
        );
        self.command("bash")
            .args(["-c", &script])
            .spawn()
            .map_err(NetnsError::Spawn)
    }

    /// `program` to be run on this host (`ip netns exec NETNS program`); add its arguments.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }
}

/// Hosts joined by a bridge, removed on drop (module docs).
#[derive(Debug)]
pub struct Network {
    hosts: Vec<Host>,
    /// Every namespace made so far, the switch first: what `Drop` removes, also after a
    /// failure half-way through [`Network::new`].
    made: Vec<String>,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The namespace names under `prefix` (`tsb-NAME-`) whose process (the number after the
/// prefix) no longer runs, or is this one (a reused pid).
fn leftovers(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            let Some(pid) = n
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                return false;
            };
            pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
        })
        .collect()
}

impl Network {
    /// Makes one host per role (`roles`: e.g. `["src", "ms", "dst"]`) for the network `name`, in
    /// that order, host `i` at `10.77.0.(i + 1)`, every link up.
    pub fn new(name: &str, roles: &[&str]) -> Result<Self, NetnsError> {
        if name.is_empty() || name.contains('/') || roles.contains(&"switch") || roles.len() >= 250
        {
            return Err(NetnsError::BadName {
                name: name.into(),
                roles: roles.iter().map(ToString::to_string).collect(),
            });
        }
        let prefix = format!("tsb-{name}-");
        for stale in leftovers(&prefix) {
            ip(&["netns", "del", &stale])?;
        }
        let ours = format!("{prefix}{}-", std::process::id());
        let mut net = Self {
            hosts: Vec::new(),
            made: Vec::new(),
        };
        let switch = format!("{ours}switch");
        ip(&["netns", "add", &switch])?;
        net.made.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, role) in roles.iter().enumerate() {
            let netns = format!("{ours}{role}");
            ip(&["netns", "add", &netns])?;
            net.made.push(netns.clone());
            let port = format!("p{i}");
            let ip_addr = format!("{SUBNET}.{}", i + 1);
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            // Both ends made where they belong: no name in the test's own namespace.
            ip(&[
                "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip_addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            net.hosts.push(Host {
                role: (*role).to_string(),
                netns,
                ip: ip_addr,
                port,
            });
        }
        Ok(net)
    }

    /// The host of `role`.
    pub fn host(&self, role: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host '{role}' in this network"))
    }

    /// Unplugs the host of `role` from the switch (its port goes down): what it sends is lost
    /// and nothing reaches it, and nobody is told (no reset, no close), as when a cable or a
    /// switch port fails. [`Self::plug`] puts it back.
    pub fn unplug(&self, role: &str) -> Result<(), NetnsError> {
        self.port(role, "down")
    }

    /// Plugs the host of `role` back in (see [`Self::unplug`]).
    pub fn plug(&self, role: &str) -> Result<(), NetnsError> {
        self.port(role, "up")
    }

    fn port(&self, role: &str, state: &str) -> Result<(), NetnsError> {
        // The switch is made first, or there is no network.
        ip(&[
            "-n",
            &self.made[0],
            "link",
            "set",
            &self.host(role).port,
            state,
        ])
    }

    /// The namespaces of this network, the switch first.
    pub fn namespaces(&self) -> &[String] {
        &self.made
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for netns in self.made.iter().rev() {
            if let Err(e) = ip(&["netns", "del", netns]) {
                eprintln!("tsubame-netns: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(netns: &str) -> bool {
        Path::new(NETNS_DIR).join(netns).exists()
    }

    #[test]
    fn hosts_get_their_addresses_and_everything_goes_on_drop() {
        let names = {
            let net = Network::new("unit-drop", &["a", "b"]).unwrap();
            assert_eq!(net.host("a").ip, "10.77.0.1");
            assert_eq!(net.host("b").ip, "10.77.0.2");
            let out = Command::new("ip")
                .args([
                    "-n",
                    &net.host("b").netns,
                    "-4",
                    "-o",
                    "addr",
                    "show",
                    "eth0",
                ])
                .output()
                .unwrap();
            let addr = String::from_utf8_lossy(&out.stdout);
            assert!(addr.contains("10.77.0.2/24"), "{addr}");
            net.namespaces().to_vec()
        };
        assert_eq!(names.len(), 3);
        for n in &names {
            assert!(!exists(n), "{n} left behind");
        }
    }

    #[test]
    fn a_panicking_test_leaves_nothing_and_a_crashed_run_is_cleaned_up() {
        let mut names = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let net = Network::new("unit-panic", &["a"]).unwrap();
            names = net.namespaces().to_vec();
            panic!("the test fails");
        }));
        assert!(r.is_err());
        assert!(
            !names.is_empty() && names.iter().all(|n| !exists(n)),
            "{names:?}"
        );

        // A run that crashed (its pid is gone) left a namespace; the next run removes it, and
        // leaves another test's, and a live process's, alone.
        let dead = format!("tsb-unit-crash-{}-a", u32::MAX - 1);
        let other = format!("tsb-unit-crash-other-{}-a", u32::MAX - 1);
        let live = "tsb-unit-crash-1-a".to_string(); // pid 1 always runs
        for n in [&dead, &other, &live] {
            ip(&["netns", "add", n]).unwrap();
        }
        let net = Network::new("unit-crash", &["a"]).unwrap();
        let (dead_left, kept) = (exists(&dead), exists(&other) && exists(&live));
        for n in [&other, &live] {
            ip(&["netns", "del", n]).unwrap();
        }
        drop(net);
        assert!(
            !dead_left && kept,
            "the dead run's left: {dead_left}, the others kept: {kept}"
        );
    }
}
