//! Helpers for Tsubame's end-to-end tests: find the `tsubame` binary, make scratch directories,
//! start VM processes (on this host, or in a network namespace of [`netns`]) and talk to their
//! control sockets.

pub use tsubame_netns as netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tsubame_vmm::control::ControlClient;

/// The `tsubame` binary: `$TSUBAME_BIN`, or the one cargo built next to this test.
pub fn tsubame_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TSUBAME_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join("tsubame");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (which builds it) or set TSUBAME_BIN",
        bin.display()
    );
    bin
}

/// A fresh directory under the system temp dir, unique to this process and moment, kept after
/// the test (QEMU's logs stay there to read).
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("tsubame-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tsubame-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a scratch directory");
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Each thread of process `pid`: its name, state, user and system CPU ticks and what it
/// waits in (from `/proc`; sampled twice, a second apart, so that a spinning thread shows).
fn threads_of(pid: u32) -> String {
    let sample = || -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .map(|t| {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                let stat = read("stat");
                // After the name's closing parenthesis: state (1st), utime (12th), stime (13th).
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
                let f = |i: usize| fields.get(i).copied().unwrap_or("?");
                format!(
                    "{} {} {} {} {}",
                    read("comm").trim(),
                    f(0),
                    f(11),
                    f(12),
                    read("wchan")
                )
            })
            .collect()
    };
    let first = sample();
    std::thread::sleep(Duration::from_secs(1));
    format!("{}\n1 s later:\n{}", first.join("\n"), sample().join("\n"))
}

/// Runs `tsubame ARGS` to completion (at most [`EXIT_PATIENCE`]; see [`output_within`]).
pub fn tsubame(args: &[&str]) -> Output {
    output_within(Command::new(tsubame_bin()).args(args), EXIT_PATIENCE)
        .unwrap_or_else(|e| panic!("tsubame {}: {e:#}", args.join(" ")))
}

/// Runs `cmd` to completion like [`Command::output`], but kills it and fails, with what it
/// wrote so far, if it has not exited within `patience`: a hung process fails its test
/// instead of hanging the suite.
pub fn output_within(cmd: &mut Command, patience: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting it")?;
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    let Some(status) = exited_within(&mut child, patience)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "had not exited after {patience:?}, killed it; its stderr:\n{}",
            String::from_utf8_lossy(&join(err))
        );
    };
    Ok(Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

/// Reads `r` to its end on a thread of its own (a child's pipe, so that the child never
/// blocks on a full one).
fn drain(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Waits up to `patience` for `child` to exit: its status, or `None` if it is still running.
fn exited_within(
    child: &mut Child,
    patience: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if t0.elapsed() > patience {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a VM to the end in one process (`tsubame run ... --json`) and returns its summary.
pub fn run_to_end(args: &[&str]) -> Result<Value> {
    let mut all = vec!["run", "--serial", "none", "--quiet", "--json"];
    all.extend_from_slice(args);
    let out = tsubame(&all);
    if !out.status.success() {
        bail!(
            "tsubame {} failed: {}\n{}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the run summary")
}

/// Where a process runs: its network namespace (`None`: the test's own) and the address it
/// listens on there.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub netns: Option<&'a str>,
    pub ip: &'a str,
}

impl<'a> Place<'a> {
    /// A host of a [`netns::Network`]: its namespace and address.
    pub fn of(host: &'a netns::Host) -> Self {
        Self {
            netns: Some(&host.netns),
            ip: &host.ip,
        }
    }
}

/// How long a test waits for a VM process to exit before it kills it and fails
/// ([`VmProcess::wait`]): far longer than any test's VM runs, short of hanging CI.
pub const EXIT_PATIENCE: Duration = Duration::from_secs(240);

/// How long a control command may take to answer ([`VmProcess::ctl`]).
pub const CTL_PATIENCE: Duration = Duration::from_secs(120);

/// The test's own network namespace, listening on loopback.
pub const LOOPBACK: Place<'static> = Place {
    netns: None,
    ip: "127.0.0.1",
};

/// A `tsubame` process (`run` with a control socket, or another command).
#[derive(Debug)]
pub struct VmProcess {
    pub child: Child,
    pub socket: PathBuf,
    stderr: Arc<(Mutex<String>, Condvar)>,
}

impl VmProcess {
    /// Starts `tsubame run --control SOCKET ARGS` and waits until its control socket is ready.
    pub fn start(socket: &Path, args: &[&str]) -> Result<Self> {
        Self::start_at(LOOPBACK, socket, args)
    }

    /// [`Self::start`] at `place`.
    pub fn start_at(place: Place<'_>, socket: &Path, args: &[&str]) -> Result<Self> {
        let sock = socket.to_str().context("socket path")?;
        let (p, _) = Self::start_until_at(
            place,
            &[&["--control", sock], args].concat(),
            "control socket ready",
        )?;
        Ok(p)
    }

    /// Starts `tsubame run --quiet ARGS` (with `--serial none` unless `ARGS` say where serial
    /// output goes) and waits for a stderr line containing `marker`, which it returns.
    pub fn start_until(args: &[&str], marker: &str) -> Result<(Self, String)> {
        Self::start_until_at(LOOPBACK, args, marker)
    }

    /// [`Self::start_until`] at `place`.
    pub fn start_until_at(place: Place<'_>, args: &[&str], marker: &str) -> Result<(Self, String)> {
        let serial: &[&str] = if args.contains(&"--serial") {
            &[]
        } else {
            &["--serial", "none"]
        };
        Self::command_until_at(place, &[&["run", "--quiet"], serial, args].concat(), marker)
    }

    /// Starts a migration destination (`tsubame run --incoming` on an ephemeral port, with
    /// `secret` and `extra` arguments, summary as JSON); returns it and its `tcp:HOST:PORT`.
    pub fn destination(secret: &str, extra: &[&str]) -> Result<(Self, String)> {
        Self::destination_at(LOOPBACK, secret, extra)
    }

    /// [`Self::destination`] at `place`, listening on its address.
    pub fn destination_at(
        place: Place<'_>,
        secret: &str,
        extra: &[&str],
    ) -> Result<(Self, String)> {
        let listen = format!("tcp:{}:0", place.ip);
        let args = [
            &["--incoming", &listen, "--secret", secret, "--json"],
            extra,
        ]
        .concat();
        let (p, line) = Self::start_until_at(place, &args, "waiting for an incoming migration on")?;
        let uri = line.rsplit(' ').next().unwrap_or_default().to_string();
        Ok((p, uri))
    }

    /// Starts a 64 MiB VM that runs a small workload until told to quit, controlled on
    /// `socket`: a source for tests where the migration is refused.
    pub fn idle(socket: &Path) -> Result<Self> {
        Self::start(
            socket,
            &[
                "--mem",
                "64M",
                "--workload",
                "uniform:ws=8M",
                "--steps",
                "0",
                "--hold",
            ],
        )
    }

    /// Starts `tsubame memserver --listen tcp:127.0.0.1:0 --secret SECRET EXTRA`; returns it
    /// and its `tcp:HOST:PORT`.
    pub fn memserver(secret: &str, extra: &[&str]) -> Result<(Self, String)> {
        Self::memserver_at(LOOPBACK, secret, extra)
    }

    /// [`Self::memserver`] at `place`, listening on its address.
    pub fn memserver_at(place: Place<'_>, secret: &str, extra: &[&str]) -> Result<(Self, String)> {
        let listen = format!("tcp:{}:0", place.ip);
        let (p, line) = Self::command_until_at(
            place,
            &[
                &["memserver", "--listen", &listen, "--secret", secret],
                extra,
            ]
            .concat(),
            "memserver listening on",
        )?;
        let uri = line.rsplit(' ').next().unwrap_or_default().to_string();
        Ok((p, uri))
    }

    /// Starts `tsubame linkem` on an ephemeral loopback port forwarding to `target`
    /// (`HOST:PORT`) with no delay, its control socket at `control` (for `drop`, `restore`,
    /// `cut`...); returns it and the `HOST:PORT` to dial instead of `target`.
    pub fn linkem(target: &str, control: &Path) -> Result<(Self, String)> {
        let control = control.to_str().context("socket path")?;
        let (p, line) = Self::command_until(
            &[
                "linkem",
                "--listen",
                "127.0.0.1:0",
                "--connect",
                target,
                "--delay",
                "0ms",
                "--control",
                control,
            ],
            "forwarding",
        )?;
        let via = line
            .split("forwarding ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .context("linkem's address")?
            .to_string();
        Ok((p, via))
    }

    /// Starts `tsubame ARGS` (any command) and waits for a stderr line containing `marker`,
    /// which it returns.
    pub fn command_until(args: &[&str], marker: &str) -> Result<(Self, String)> {
        Self::command_until_at(LOOPBACK, args, marker)
    }

    /// [`Self::command_until`] at `place` (in its network namespace: `ip netns exec`, which
    /// execs `tsubame`, so the child is the `tsubame` process itself).
    pub fn command_until_at(
        place: Place<'_>,
        args: &[&str],
        marker: &str,
    ) -> Result<(Self, String)> {
        let socket = args
            .iter()
            .position(|a| *a == "--control")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut command = match place.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tsubame_bin());
                c
            }
            None => Command::new(tsubame_bin()),
        };
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting tsubame {}", args.join(" ")))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let mut seen = String::new();
        let found = loop {
            match lines.next() {
                Some(Ok(l)) if l.contains(marker) => break l,
                Some(Ok(l)) => {
                    seen.push_str(&l);
                    seen.push('\n');
                }
                _ => bail!("tsubame exited before printing '{marker}':\n{seen}"),
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        let stderr = Arc::new((Mutex::new(seen), Condvar::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let mut s = sink.0.lock().expect("stderr buffer");
                s.push_str(&l);
                s.push('\n');
                sink.1.notify_all();
            }
        });
        Ok((
            Self {
                child,
                socket,
                stderr,
            },
            found,
        ))
    }

    /// Runs one control command and returns its `return` value.
    pub fn ctl(&self, command: &str, args: Value) -> Result<Value> {
        let mut c = ControlClient::connect(&self.socket)?;
        // A VM that stopped answering fails the test instead of hanging it.
        c.set_timeout(Some(CTL_PATIENCE))?;
        Ok(c.execute(command, args)?)
    }

    /// Polls `query-status` until `done` holds (at most 30 s; `what` names the wait in the
    /// panic); returns the last one.
    pub fn status_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let s = self.ctl("query-status", serde_json::json!({})).unwrap();
            if done(&s) {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "never {what}: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.0.lock().expect("stderr buffer").clone()
    }

    /// Waits until the process has written `marker` to stderr.
    pub fn wait_for_stderr(&self, marker: &str, timeout: Duration) -> Result<()> {
        let (lock, cv) = &*self.stderr;
        let guard = lock.lock().expect("stderr buffer");
        let (guard, t) = cv
            .wait_timeout_while(guard, timeout, |s| !s.contains(marker))
            .expect("stderr buffer");
        if t.timed_out() {
            bail!("no '{marker}' on stderr within {timeout:?}:\n{}", *guard);
        }
        Ok(())
    }

    /// Waits for the process to exit and returns its stdout. A process that has not exited
    /// within [`EXIT_PATIENCE`] is killed and the wait fails with what it wrote to stderr, so
    /// that a hung VM fails its test instead of hanging the suite.
    pub fn wait(mut self) -> Result<(std::process::ExitStatus, String)> {
        let reader = self.child.stdout.take().map(drain);
        let Some(status) = exited_within(&mut self.child, EXIT_PATIENCE)? else {
            // What it was doing, for whoever reads the failure: its status and threads.
            let status = ControlClient::connect(&self.socket)
                .and_then(|mut c| {
                    c.set_timeout(Some(Duration::from_secs(5)))?;
                    c.execute("query-status", serde_json::json!({}))
                })
                .map_or_else(|e| format!("(no status: {e})"), |v| v.to_string());
            let threads = threads_of(self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!(
                "tsubame had not exited after {EXIT_PATIENCE:?}, killed it.\nits status: \
                 {status}\nits threads (name, state, user and system ticks, wait \
                 channel):\n{threads}\nits stderr:\n{}",
                self.stderr()
            );
        };
        let out = match reader {
            Some(r) => String::from_utf8(r.join().expect("stdout reader"))
                .context("its stdout is not UTF-8")?,
            None => String::new(),
        };
        Ok((status, out))
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
