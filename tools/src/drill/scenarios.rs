//! The scenarios: what each drill starts, the fault it injects, and what it checks.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use tsubame_netns::Network;

use super::proc::{ctl_at, Proc, Scratch};
use super::{Ctx, Knobs, Report, Rng};

/// How long any one process may take to say it is ready.
const READY: Duration = Duration::from_secs(60);
/// How long a guest may take to finish once the fault is over (generous: a 2-core host).
const FINISH: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Netcut,
    Blackhole,
    Reset,
    KillSource,
    KillDestination,
    KillMemserver,
    Switch,
    Cancel,
    Wan,
}

impl Scenario {
    pub const ALL: [Self; 9] = [
        Self::Netcut,
        Self::Blackhole,
        Self::Reset,
        Self::KillSource,
        Self::KillDestination,
        Self::KillMemserver,
        Self::Switch,
        Self::Cancel,
        Self::Wan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Netcut => "netcut",
            Self::Blackhole => "blackhole",
            Self::Reset => "reset",
            Self::KillSource => "kill-source",
            Self::KillDestination => "kill-destination",
            Self::KillMemserver => "kill-memserver",
            Self::Switch => "switch",
            Self::Cancel => "cancel",
            Self::Wan => "wan",
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The named drill's moment and fault.
    pub fn default_knobs(self) -> Knobs {
        let (after_ms, param) = match self {
            Self::Netcut => (500, 2000),
            Self::Blackhole => (500, 4000),
            Self::Reset | Self::KillSource => (500, 0),
            Self::KillDestination => (300, 0),
            Self::KillMemserver => (300, 0),
            Self::Switch => (0, 50),
            Self::Cancel => (300, 30),
            // 0: both 16 ms and 64 ms.
            Self::Wan => (0, 0),
        };
        Knobs { after_ms, param }
    }

    /// A random moment and fault size for the campaign.
    pub fn random_knobs(self, rng: &mut Rng) -> Knobs {
        let (after_ms, param) = match self {
            Self::Netcut => (rng.range(50, 1500), rng.range(300, 4000)),
            // Long enough that the destination gives the silent link up: 0.5 s of quiet, then
            // its probe unanswered for 2 s, each seen within 0.2 s (about 3 s in all).
            Self::Blackhole => (rng.range(50, 1500), rng.range(4000, 6000)),
            Self::Reset | Self::KillSource => (rng.range(0, 2000), 0),
            Self::KillDestination => (rng.range(0, 1000), 0),
            Self::KillMemserver => (rng.range(0, 2000), 0),
            Self::Switch => (0, rng.range(5, 95)),
            Self::Cancel => (rng.range(0, 800), rng.range(5, 95)),
            Self::Wan => (0, rng.range(1, 64)),
        };
        Knobs { after_ms, param }
    }
}

pub fn run(ctx: &Ctx, sc: Scenario, k: Knobs, r: &mut Report) -> Result<()> {
    match sc {
        Scenario::Netcut | Scenario::Blackhole | Scenario::Reset => link_fault(ctx, sc, k, r),
        Scenario::KillSource => kill_source(ctx, k, r),
        Scenario::KillDestination => kill_destination(ctx, k, r),
        Scenario::KillMemserver => kill_memserver(ctx, k, r),
        Scenario::Switch => switch(ctx, k, r),
        Scenario::Cancel => cancel(ctx, k, r),
        Scenario::Wan => wan(ctx, k, r),
    }
}

/// A guest: `--mem --vcpus --workload --steps`.
fn guest(mem_mib: u64, vcpus: u32, workload: &str, steps: u64) -> Vec<String> {
    vec![
        "--mem".into(),
        format!("{mem_mib}M"),
        "--vcpus".into(),
        vcpus.to_string(),
        "--workload".into(),
        workload.into(),
        "--steps".into(),
        steps.to_string(),
    ]
}

fn mem_of(guest: &[String]) -> String {
    guest[1].clone()
}

/// The postcopy drills' guest and the push's cap (bytes/s): the push lasts about 4 s
/// (quick) or 6 s, and the guest runs a few seconds longer than that.
fn postcopy_guest(ctx: &Ctx) -> (Vec<String>, u64) {
    if ctx.quick {
        (
            guest(128, 2, "uniform:ws=64M,write=0.2,seed=16", 3_000_000),
            16 << 20,
        )
    } else {
        (
            guest(512, 2, "uniform:ws=384M,write=0.2,seed=16", 10_000_000),
            64 << 20,
        )
    }
}

/// The cancellable drills' guest (a checkpoint copies what was written since the last one).
fn cancellable_guest(ctx: &Ctx) -> Vec<String> {
    // Long enough to outlast both cancels: a precopy round capped at 32 MiB/s takes 2 s of
    // the quick guest's 64 MiB, and a cancel at 95 % of it came after a 4 M-step guest had
    // finished at the source (campaign seed 463).
    if ctx.quick {
        guest(64, 1, "uniform:ws=32M,write=0.3,seed=81", 12_000_000)
    } else {
        guest(256, 2, "uniform:ws=128M,write=0.3,seed=81", 8_000_000)
    }
}

fn run_args(extra: &[&str]) -> Vec<String> {
    ["run", "--serial", "none", "--quiet", "--json"]
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect()
}

/// Where a drill's processes run: the network scenarios put the source and the destination
/// on two hosts of a [`Network`] (network namespaces joined by veth and a bridge: a real
/// network path, see `tsubame_netns`), so that a fault can take the whole path down, redials
/// included; the other scenarios, and every scenario with `--loopback`, run on loopback.
struct Hosts {
    net: Option<Network>,
}

impl Hosts {
    /// Loopback.
    fn here() -> Self {
        Self { net: None }
    }

    /// A source host and a destination host for the drill `name`, if the drills use network
    /// namespaces here (see [`Ctx::netns`]).
    fn for_network(ctx: &Ctx, name: &str) -> Result<Self> {
        if !ctx.netns {
            return Ok(Self::here());
        }
        let net = Network::new(&format!("drill-{name}"), &["src", "dst"])
            .context("making the drill's network (or run the drills with --loopback)")?;
        Ok(Self { net: Some(net) })
    }

    /// The host of `role` (`src` or `dst`), or None on loopback.
    fn host(&self, role: &str) -> Option<&tsubame_netns::Host> {
        self.net.as_ref().map(|n| n.host(role))
    }

    /// What the report says of where it ran.
    fn describe(&self) -> &'static str {
        if self.net.is_some() {
            "network namespaces joined by veth"
        } else {
            "loopback"
        }
    }
}

/// `tsubame run --incoming` on an ephemeral loopback port, with a control socket
/// (`NAME.sock`, ready once the VM arrived); returns it and its `tcp:HOST:PORT`.
fn destination(ctx: &Ctx, dir: &Scratch, name: &str, mem: &str) -> Result<(Proc, String)> {
    destination_at(ctx, None, dir, name, mem)
}

/// [`destination`] on `host` (listening on its address), or on loopback.
fn destination_at(
    ctx: &Ctx,
    host: Option<&tsubame_netns::Host>,
    dir: &Scratch,
    name: &str,
    mem: &str,
) -> Result<(Proc, String)> {
    let sock = dir.path(&format!("{}.sock", name.replace(' ', "-")));
    let listen = format!("tcp:{}:0", host.map_or("127.0.0.1", |h| h.ip.as_str()));
    let args = run_args(&["--incoming", &listen, "--mem", mem, "--control", &sock]);
    let p = Proc::spawn_at(host, name, &args, &ctx.secret)?;
    let line = p.wait_line("waiting for an incoming migration on", READY)?;
    let uri = line.rsplit(' ').next().unwrap_or_default().to_string();
    Ok((p, uri))
}

/// `tsubame linkem` in front of `target` (`tcp:HOST:PORT`), on `host` (the target's) or on
/// loopback; returns it and the `tcp:HOST:PORT` to dial instead.
fn linkem(
    ctx: &Ctx,
    host: Option<&tsubame_netns::Host>,
    dir: &Scratch,
    target: &str,
    delay: &str,
    rate: Option<&str>,
) -> Result<(Proc, String)> {
    let listen = format!("{}:0", host.map_or("127.0.0.1", |h| h.ip.as_str()));
    let mut args: Vec<String> = [
        "linkem",
        "--listen",
        &listen,
        "--connect",
        target.trim_start_matches("tcp:"),
        "--delay",
        delay,
        "--control",
        &dir.path("link.sock"),
    ]
    .map(String::from)
    .to_vec();
    if let Some(rate) = rate {
        args.extend(["--rate".into(), rate.into()]);
    }
    let p = Proc::spawn_at(host, "linkem", &args, &ctx.secret)?;
    let line = p.wait_line("forwarding", READY)?;
    let via = line
        .split("forwarding ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .context("linkem's address")?;
    Ok((p, format!("tcp:{via}")))
}

/// The source: `guest` running, controlled on `src.sock`; no `--hold`, so it exits once
/// its migration completed (printing `{"migration": ...}`), or when its guest finished here.
fn source(ctx: &Ctx, dir: &Scratch, guest: &[String]) -> Result<Proc> {
    source_at(ctx, None, dir, guest)
}

/// [`source`] on `host`, or here.
fn source_at(
    ctx: &Ctx,
    host: Option<&tsubame_netns::Host>,
    dir: &Scratch,
    guest: &[String],
) -> Result<Proc> {
    let sock = dir.path("src.sock");
    let mut args = run_args(&["--control", &sock]);
    args.extend_from_slice(guest);
    let p = Proc::spawn_at(host, "source", &args, &ctx.secret)?;
    p.wait_line("control socket ready", READY)?;
    Ok(p)
}

/// Waits until the guest has done `steps` steps (all vCPUs).
fn wait_steps(p: &Proc, steps: u64) -> Result<()> {
    let w = p.ctl(
        "wait",
        json!({"for": "steps", "steps": steps, "timeout_ms": 60_000}),
    )?;
    ensure!(
        w["outcome"] == "reached",
        "the guest never got to {steps} steps at the {}: {w}",
        p.name
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// A destination's `query-migrate` has left postcopy: returns it once `phase` is one of
/// `phases` (None if the process exited first).
fn poll_phase(p: &mut Proc, phases: &[&str], timeout: Duration) -> Result<Option<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(q) = p.ctl("query-migrate", json!({})) {
            if phases.iter().any(|ph| q["phase"] == *ph) {
                return Ok(Some(q));
            }
        } else if p.has_exited() {
            return Ok(None);
        }
        ensure!(
            Instant::now() < deadline,
            "the {}'s migration never got to {phases:?} within {timeout:?}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks a destination's summary once its guest finished there: status, every page
/// present, no fetch error; returns the digest.
fn finished_at(summary: &Value, what: &str) -> Result<Value> {
    ensure!(
        summary["status"] == "finished",
        "the guest did not finish at the {what}: status {} {}",
        summary["status"],
        summary["progress"]["verify_error"]
    );
    let p = &summary["demand_paging"];
    if !p.is_null() {
        ensure!(
            p["present_pages"] == p["total_pages"],
            "the {what} lacks pages at the end (digest {}, digest error {}, migration {}): {p}",
            summary["digest"],
            summary["digest_error"],
            summary["migration"]
        );
        ensure!(
            p["fetch_error"].is_null(),
            "the {what} could not fetch a page: {}",
            p["fetch_error"]
        );
    }
    Ok(summary["digest"].clone())
}

/// netcut, blackhole, reset: postcopy through a linkem, a fault on the link mid-postcopy.
#[allow(clippy::too_many_lines)]
fn link_fault(ctx: &Ctx, sc: Scenario, k: Knobs, r: &mut Report) -> Result<()> {
    let (g, bw) = postcopy_guest(ctx);
    let (reference, _) = ctx.reference(&g)?;
    let dir = Scratch::new(sc.name())?;
    let hosts = Hosts::for_network(ctx, sc.name())?;
    let (src_host, dst_host) = (hosts.host("src"), hosts.host("dst"));
    let (mut dest, uri) = destination_at(ctx, dst_host, &dir, "destination", &mem_of(&g))?;
    let (link, via) = linkem(ctx, dst_host, &dir, &uri, "0ms", None)?;
    let mut src = source_at(ctx, src_host, &dir, &g)?;
    wait_steps(&src, 100_000)?;
    let t0 = Instant::now();
    let m = src.ctl(
        "migrate",
        json!({"uri": via, "secret": ctx.secret, "max_bandwidth": bw}),
    )?;
    ensure!(
        m["phase"] == "postcopy",
        "the migration did not switch over: {m}"
    );
    r.at_risk = true;
    let switchover = Instant::now();
    r.timing("switchover_ms", ms(switchover - t0));
    dest.wait_line("control socket ready", READY)?;
    sleep_until(switchover + Duration::from_millis(k.after_ms));
    let before = dest.ctl("query-migrate", json!({}))?;
    if before["phase"] == "completed" {
        r.at_risk = false;
        bail!(
            "the migration completed {} ms after the switchover, before the fault: nothing to \
             rehearse (a later moment than the push lasts)",
            k.after_ms
        );
    }
    let fault = Instant::now();
    r.timing("fault_after_switchover_ms", ms(fault - switchover));
    match sc {
        // A cable pulled: every path to the destination's host, redials included.
        Scenario::Netcut if hosts.net.is_some() => {
            let net = hosts.net.as_ref().expect("a network");
            net.unplug("dst")?;
            std::thread::sleep(Duration::from_millis(k.param));
            net.plug("dst")?;
        }
        // On loopback: the migration's connections stall (a redial goes around linkem).
        Scenario::Netcut => {
            link.ctl("cut", json!({"ms": k.param}))?;
        }
        Scenario::Blackhole => {
            link.ctl("blackhole", json!({}))?;
            std::thread::sleep(Duration::from_millis(k.param));
            link.ctl("restore", json!({}))?;
        }
        _ => {
            link.ctl("reset", json!({}))?;
        }
    }
    // Completed: the source owns no page any more (every page here).
    let done = poll_phase(&mut dest, &["completed", "failed"], FINISH)?;
    if let Some(q) = &done {
        ensure!(
            q["phase"] == "completed",
            "the destination's migration failed: {}",
            q["error"]
        );
        r.timing("fault_to_completed_ms", ms(fault.elapsed()));
    }
    let source_summary = src.json_summary(FINISH)?;
    let sm = &source_summary["migration"];
    ensure!(
        sm["phase"] == "completed",
        "the source's migration did not complete: {} {}",
        sm["phase"],
        sm["error"]
    );
    let summary = dest.json_summary(FINISH)?;
    r.timing("total_ms", ms(t0.elapsed()));
    if let Some(t) = sm["total_ms"].as_f64() {
        r.timing("switchover_to_every_page_ms", t);
    }
    if !r.timings.contains_key("fault_to_completed_ms") {
        // The destination exits as soon as its guest finished with every page: the source's
        // count (switchover -> every page there) says when.
        if let Some(t) = sm["total_ms"].as_f64() {
            r.timing("fault_to_completed_ms", t - ms(fault - switchover));
        }
    }
    let digest = finished_at(&summary, "destination").with_context(|| {
        format!(
            "the destination's log:{}\n  the source's log:{}",
            dest.stderr_tail(),
            src.stderr_tail()
        )
    })?;
    let link_stats = summary["demand_paging"]["owners"][0]["link"].clone();
    let recovery = sm["recovery"].clone();
    r.details = json!({"network": hosts.describe(), "link": link_stats, "recovery": recovery});
    let outages = link_stats["outages"].as_u64().unwrap_or(0);
    let redials = link_stats["redials"].as_u64().unwrap_or(0);
    let longest = link_stats["longest_outage_ms"].as_f64();
    if let Some(l) = longest {
        r.timing("longest_outage_ms", l);
    }
    let equal = r.digest_check(&digest, &reference);
    r.guest_lost = !equal;
    let resumed_needed = matches!(sc, Scenario::Blackhole | Scenario::Reset);
    // The link counts as down from when the destination gives it up (a reset at once, a
    // silence after a fault waited 2 s) until it dialled back.
    let outage = longest.map_or_else(
        || "link never given up".to_string(),
        |l| format!("down {l:.0} ms"),
    );
    r.key = format!(
        "{outage}, {redials} redials, done {:.1} s after the fault",
        r.timings
            .get("fault_to_completed_ms")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
            / 1e3
    );
    let what = match sc {
        Scenario::Netcut => format!("a {} ms cut", k.param),
        Scenario::Blackhole => format!("{} ms of silence", k.param),
        _ => "a reset of every connection".into(),
    };
    r.passed = equal && (!resumed_needed || redials >= 1);
    let dest_log = if r.passed {
        String::new()
    } else {
        format!("\n  the destination's log:\n{}", dest.stderr_tail())
    };
    r.why = if !equal {
        format!("after {what} the guest's memory differs from the reference run's{dest_log}")
    } else if resumed_needed && redials == 0 {
        format!(
            "after {what} the session was never resumed ({outages} outages, 0 redials): the \
             fault went unnoticed (neither a fault nor the heartbeat's probe waited 2 s on the \
             link){dest_log}"
        )
    } else {
        format!(
            "{what} {} ms after the switchover: {outages} outages, {redials} redials (source: {} \
             resumed), the guest finished at the destination with the reference digest",
            k.after_ms, recovery["resumed"]
        )
    };
    Ok(())
}

/// kill -9 of the source mid-postcopy: the destination must say so clearly, and never run
/// its guest on a bad page.
fn kill_source(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let (g, bw) = postcopy_guest(ctx);
    let dir = Scratch::new("kill-source")?;
    let (mut dest, uri) = destination(ctx, &dir, "destination", &mem_of(&g))?;
    let mut src = source(ctx, &dir, &g)?;
    wait_steps(&src, 100_000)?;
    // Half the rate of the other drills: the push must outlast the moment of the kill.
    let m = src.ctl(
        "migrate",
        json!({"uri": uri, "secret": ctx.secret, "max_bandwidth": bw / 2}),
    )?;
    ensure!(
        m["phase"] == "postcopy",
        "the migration did not switch over: {m}"
    );
    let switchover = Instant::now();
    r.at_risk = true;
    dest.wait_line("control socket ready", READY)?;
    sleep_until(switchover + Duration::from_millis(k.after_ms));
    let before = dest.ctl("query-migrate", json!({}))?;
    if before["phase"] == "completed" {
        r.at_risk = false;
        bail!(
            "the migration completed before the kill ({} ms after the switchover): nothing to \
             rehearse",
            k.after_ms
        );
    }
    let killed = Instant::now();
    src.kill9()?;
    r.timing("kill_after_switchover_ms", ms(killed - switchover));
    // From here on the guest is lost by design: plain postcopy splits it between two hosts.
    r.at_risk = false;
    r.lost_by_design = true;
    r.digest = "none: the guest is lost by design (plain postcopy)".into();
    let q = poll_phase(
        &mut dest,
        &["failed", "completed"],
        Duration::from_secs(120),
    )?
    .context("the destination exited instead of reporting the lost source")?;
    let reported = ms(killed.elapsed());
    r.timing("kill_to_reported_ms", reported);
    let error = q["error"].as_str().unwrap_or_default().to_string();
    if q["phase"] == "completed" {
        // Every page arrived before the kill mattered: nothing lost after all (and the
        // destination may exit as soon as its guest finished).
        r.lost_by_design = false;
        r.passed = true;
        r.why = "every page had arrived before the source died: nothing lost".into();
        return Ok(());
    }
    match lost_source_checks(&mut dest, &q, &error)? {
        LostSource::BadPage(why) => {
            r.guest_lost = true;
            r.lost_by_design = false;
            r.why = why;
            return Ok(());
        }
        LostSource::Finished(summary) => {
            // Its guest needed no page only the source held: it finished, and the process
            // exited (its digest cannot be taken: those pages are gone).
            r.details = json!({"error": error, "summary_status": summary["status"],
                               "digest_error": summary["digest_error"]});
            r.key = format!("reported {reported:.0} ms after the kill; the guest finished");
            r.passed = true;
            r.why = format!(
                "the destination reported '{error}' {reported:.0} ms after the kill; its guest \
                 then finished without needing a page only the source held, and saw no bad page"
            );
            return Ok(());
        }
        LostSource::Stuck {
            progress,
            status,
            w,
        } => {
            r.details = json!({
                "error": error,
                "present_pages": q["demand_paging"]["present_pages"],
                "total_pages": q["demand_paging"]["total_pages"],
                "status": status["status"],
                "steps": progress["steps"],
            });
            r.key = format!("reported {:.0} ms after the kill", reported);
            r.passed = true;
            r.why = format!(
                "the destination reported '{error}' {reported:.0} ms after the kill, and its \
                 VM stuck; its guest saw no bad page (wait for finished: {}). The guest is lost \
                 by design: plain postcopy splits it between the hosts (cancellable=on survives \
                 this)",
                w["outcome"]
            );
        }
    }
    Ok(())
}

/// What a destination that lost its source shows.
enum LostSource {
    /// Its guest read a page it must not have.
    BadPage(String),
    /// Its guest finished anyway (it needed no page only the source held): its summary.
    Finished(Value),
    /// Stuck, as it should be: what it said.
    Stuck {
        progress: Value,
        status: Value,
        w: Value,
    },
}

/// The kill-source drill's checks once the destination reported the lost source: no bad
/// page, the lost source named, and the VM `stuck` with the reason; or its guest finished
/// (the process then exits, which the checks must not take for a failure).
fn lost_source_checks(dest: &mut Proc, q: &Value, error: &str) -> Result<LostSource> {
    let asked = (|| -> Result<(Value, Value, Value)> {
        let progress = dest.ctl("query-progress", json!({}))?;
        let status = dest.ctl("query-status", json!({}))?;
        let w = dest.ctl("wait", json!({"for": "finished", "timeout_ms": 500}))?;
        Ok((progress, status, w))
    })();
    let (progress, status, w) = match asked {
        Ok(a) => a,
        Err(_) if dest.has_exited() => return finished_anyway(dest),
        Err(e) => return Err(e),
    };
    let bad_page = !progress["verify_error"].is_null() || status["status"] == "guest-error";
    if bad_page {
        return Ok(LostSource::BadPage(format!(
            "the destination's guest saw a bad page: {} (status {})",
            progress["verify_error"], status["status"]
        )));
    }
    ensure!(
        error.contains("lost the migration source"),
        "the destination's migration failed, but not saying it lost the source: {error} ({q})"
    );
    // And the VM says it is stuck, with the reason (set as the redial gives up).
    let stuck_by = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = match dest.ctl("query-status", json!({})) {
            Ok(s) => s,
            Err(_) if dest.has_exited() => return finished_anyway(dest),
            Err(e) => return Err(e),
        };
        if s["status"] == "stuck" || Instant::now() > stuck_by {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(
        status["status"] == "stuck"
            && status["stuck"]
                .as_str()
                .is_some_and(|w| w.contains("gone for good")),
        "the destination lost its source but its VM does not say it is stuck: {status}"
    );
    Ok(LostSource::Stuck {
        progress,
        status,
        w,
    })
}

/// A destination that exited after losing its source: fine if its guest finished with no bad
/// page (campaign seed 309: the guest was done with what it needed).
fn finished_anyway(dest: &mut Proc) -> Result<LostSource> {
    let (_, out) = dest.wait_exit(Duration::from_secs(30))?;
    let summary: Value = serde_json::from_str(&out).with_context(|| {
        format!(
            "the destination exited after losing its source, without a summary: {out}{}",
            dest.stderr_tail()
        )
    })?;
    if summary["status"] != "finished" || !summary["progress"]["verify_error"].is_null() {
        return Ok(LostSource::BadPage(format!(
            "the destination exited after losing its source with status {} ({})",
            summary["status"], summary["progress"]["verify_error"]
        )));
    }
    Ok(LostSource::Finished(summary))
}

/// Starts a cancellable migration (checkpoints every 50 ms, the push slowed so postcopy
/// lasts seconds) to a new destination; returns it once the VM runs there.
fn migrate_cancellable(
    ctx: &Ctx,
    dir: &Scratch,
    src: &Proc,
    mem: &str,
    name: &str,
) -> Result<(Proc, Instant)> {
    let (dest, uri) = destination(ctx, dir, name, mem)?;
    let m = src.ctl(
        "migrate",
        json!({"uri": uri, "secret": ctx.secret, "cancellable": "on", "checkpoint_ms": 50,
               "max_bandwidth": 8 << 20}),
    )?;
    ensure!(
        m["phase"] == "postcopy",
        "the migration did not switch over: {m}"
    );
    Ok((dest, Instant::now()))
}

/// The source ran the guest to its end after taking it back: its digest.
fn finished_at_source(src: &mut Proc, reference: &str, r: &mut Report) -> Result<bool> {
    let s = src.json_summary(FINISH)?;
    let digest = finished_at(&s, "source")?;
    let equal = r.digest_check(&digest, reference);
    r.guest_lost = !equal;
    Ok(equal)
}

/// kill -9 of a cancellable migration's destination after the switchover.
fn kill_destination(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let g = cancellable_guest(ctx);
    let (reference, _) = ctx.reference(&g)?;
    let dir = Scratch::new("kill-destination")?;
    let mut src = source(ctx, &dir, &g)?;
    wait_steps(&src, 200_000)?;
    let (mut dest, switchover) = migrate_cancellable(ctx, &dir, &src, &mem_of(&g), "destination")?;
    r.at_risk = true;
    sleep_until(switchover + Duration::from_millis(k.after_ms));
    dest.kill9()?;
    let killed = Instant::now();
    r.timing("kill_after_switchover_ms", ms(killed - switchover));
    let q = poll_phase(
        &mut src,
        &["cancelled", "completed", "failed"],
        Duration::from_secs(120),
    )?
    .context("the source exited before taking the VM back")?;
    ensure!(
        q["phase"] == "cancelled",
        "the source did not take the VM back: phase {} {}",
        q["phase"],
        q["error"]
    );
    let resumed = ms(killed.elapsed());
    r.timing("kill_to_running_at_source_ms", resumed);
    let c = q["checkpoints"].clone();
    r.details = json!({"checkpoints": c});
    let equal = finished_at_source(&mut src, &reference, r)?;
    r.key = format!(
        "running at the source {resumed:.0} ms after the kill (checkpoint {})",
        c["epoch"]
    );
    r.passed = equal;
    r.why = if equal {
        format!(
            "destination killed {} ms after the switchover; the source took the VM back by \
             itself from checkpoint {} ({}) and the guest finished there with the reference \
             digest",
            k.after_ms, c["epoch"], c["reason"]
        )
    } else {
        "the guest finished at the source with a digest that differs from the reference".into()
    };
    Ok(())
}

/// Remote paging over two memservers with two replicas; one killed mid-run.
fn kill_memserver(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let (g, local) = if ctx.quick {
        (
            guest(128, 2, "uniform:ws=64M,write=0.5,seed=23", 40_000),
            "24M",
        )
    } else {
        (
            guest(256, 2, "uniform:ws=192M,write=0.5,seed=23", 100_000),
            "64M",
        )
    };
    let (reference, _) = ctx.reference(&g)?;
    let dir = Scratch::new("kill-memserver")?;
    let memserver = |name: &str| -> Result<(Proc, String)> {
        let args = ["memserver", "--listen", "tcp:127.0.0.1:0"].map(String::from);
        let p = Proc::spawn(name, &args, &ctx.secret)?;
        let line = p.wait_line("memserver listening on", READY)?;
        Ok((p, line.rsplit(' ').next().unwrap_or_default().to_string()))
    };
    let (mut ms0, uri0) = memserver("memserver A")?;
    let (_ms1, uri1) = memserver("memserver B")?;
    let sock = dir.path("vm.sock");
    let uris = format!("{uri0},{uri1}");
    let mut args = run_args(&[
        "--control",
        &sock,
        "--local-mem",
        local,
        "--memserver",
        &uris,
        "--replicas",
        "2",
    ]);
    args.extend_from_slice(&g);
    let t0 = Instant::now();
    let mut vm = Proc::spawn("VM", &args, &ctx.secret)?;
    vm.wait_line("control socket ready", READY)?;
    r.at_risk = true;
    // Pages evicted to both memservers first.
    let deadline = Instant::now() + Duration::from_secs(120);
    let evicting = loop {
        let s = vm.ctl("query-status", json!({}))?;
        if s["remote_paging"]["evicted_pages"].as_u64().unwrap_or(0) > 1000 {
            break Instant::now();
        }
        // (Paused for a moment as it starts, or held: not an end. Campaign seed 449 failed
        // here at once when this asked for "running".)
        let ended =
            ["finished", "guest-error", "stuck"].contains(&s["status"].as_str().unwrap_or(""));
        ensure!(
            Instant::now() < deadline && !ended,
            "the VM evicted nothing (status {}): {}",
            s["status"],
            s["remote_paging"]
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    sleep_until(evicting + Duration::from_millis(k.after_ms));
    let s = vm.ctl("query-status", json!({}));
    let at_kill = s
        .as_ref()
        .map_or(Value::Null, |s| s["remote_paging"].clone());
    if s.as_ref().map_or(true, |s| s["status"] != "running") {
        r.at_risk = false;
        bail!(
            "the guest was no longer running {} ms after the first evictions: nothing to \
             rehearse (give it more steps)",
            k.after_ms
        );
    }
    ms0.kill9()?;
    r.timing("kill_after_start_ms", ms(t0.elapsed()));
    let summary = vm.json_summary(FINISH)?;
    r.timing("run_ms", summary["elapsed_s"].as_f64().unwrap_or(0.0) * 1e3);
    let digest = finished_at(&summary, "VM")?;
    let rp = &summary["remote_paging"];
    let failed_over = rp["failed_over_pages"].as_u64().unwrap_or(0);
    r.details = json!({
        "evicted_at_kill": at_kill["evicted_pages"],
        "failed_over_pages": failed_over,
        "memserver_a": rp["memservers"][0],
        "memory_hold": summary["memory_hold"],
    });
    let equal = r.digest_check(&digest, &reference);
    r.guest_lost = !equal;
    r.key = format!(
        "{failed_over} pages failed over, run {:.1} s",
        summary["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    r.passed = equal && failed_over > 0 && rp["memservers"][0]["pages_owned"] == 0;
    r.why = if !equal {
        "the guest's memory differs from the reference run's".into()
    } else if failed_over == 0 || rp["memservers"][0]["pages_owned"] != 0 {
        format!(
            "the guest finished with the reference digest, but the killed memserver's pages \
             were not all failed over: {rp}"
        )
    } else {
        format!(
            "memserver A killed {} ms after the first evictions; {failed_over} of its pages \
             were fetched from the other replica and the VM finished with the reference digest",
            k.after_ms
        )
    };
    Ok(())
}

/// Polls the source until precopy round 1 has sent `percent` % of the pages.
#[allow(clippy::cast_precision_loss)]
fn wait_round1(src: &Proc, percent: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = src.ctl("query-migrate", json!({}))?;
        let (sent, total) = (
            q["pages_precopy"].as_u64().unwrap_or(0),
            q["total_pages"].as_u64().unwrap_or(0),
        );
        if q["phase"] == "precopy" && total > 0 && sent * 100 >= percent * total {
            ensure!(
                q["precopy_round"].as_u64() == Some(1),
                "round 1 ended before {percent} % of its pages were seen sent: {q}"
            );
            return Ok(q);
        }
        ensure!(
            q["phase"] == "precopy" || q["phase"] == "none",
            "the migration left its precopy rounds before {percent} % of round 1: {}",
            q["phase"]
        );
        ensure!(
            Instant::now() < deadline,
            "round 1 never got to {percent} %: {q}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `migrate` on its own thread (it returns at the switchover, after the precopy rounds).
fn migrate_in_background(
    src: &Proc,
    args: Value,
) -> Result<std::thread::JoinHandle<Result<Value>>> {
    let sock = src.socket.clone().context("the source's socket")?;
    Ok(std::thread::spawn(move || ctl_at(&sock, "migrate", args)))
}

/// migrate-switch at `param` % of precopy round 1.
fn switch(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let (g, rate) = if ctx.quick {
        (
            guest(128, 2, "hotcold:ws=96M,write=0.05,seed=5", 10_000_000),
            64u64 << 20,
        )
    } else {
        (
            guest(512, 2, "hotcold:ws=384M,write=0.05,seed=5", 16_000_000),
            128 << 20,
        )
    };
    let (reference, _) = ctx.reference(&g)?;
    let dir = Scratch::new("switch")?;
    let (_old, old_uri) = destination(ctx, &dir, "old destination", &mem_of(&g))?;
    let (mut new, new_uri) = destination(ctx, &dir, "new destination", &mem_of(&g))?;
    let mut src = source(ctx, &dir, &g)?;
    wait_steps(&src, 200_000)?;
    let t0 = Instant::now();
    let migration = migrate_in_background(
        &src,
        json!({"uri": old_uri, "secret": ctx.secret, "precopy_rounds": 2, "max_bandwidth": rate}),
    )?;
    r.at_risk = true;
    wait_round1(&src, k.param)?;
    let at = Instant::now();
    let sw = src.ctl(
        "migrate-switch",
        json!({"uri": new_uri, "secret": ctx.secret}),
    )?;
    r.timing("switch_at_ms", ms(at - t0));
    r.timing("switch_command_ms", ms(at.elapsed()));
    let migrated = migration
        .join()
        .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))??;
    ensure!(
        migrated["destination"] == new_uri.as_str(),
        "the switchover did not go to the new destination: {}",
        migrated["destination"]
    );
    let sm = src.json_summary(FINISH)?;
    if sm["migration"]["phase"] != "completed" {
        r.details = json!({"switch": sw, "migrate": migrated, "source": sm});
        // The guest finished at the source (while the rounds went on): not lost if its
        // digest is the reference's, but nothing was rehearsed.
        r.at_risk = sm["status"] != "finished" || sm["digest"].as_str() != Some(&reference);
        bail!(
            "the source's migration did not complete: phase {} (error {}), the source exited \
             with its guest {} (digest {})",
            sm["migration"]["phase"],
            sm["migration"]["error"],
            sm["status"],
            if sm["digest"].as_str() == Some(reference.as_str()) {
                "equal to the reference"
            } else {
                "not the reference's"
            }
        );
    }
    let summary = new.json_summary(FINISH)?;
    r.timing("total_ms", ms(t0.elapsed()));
    let digest = finished_at(&summary, "new destination")?;
    let equal = r.digest_check(&digest, &reference);
    r.guest_lost = !equal;
    r.details = json!({"switch": sw, "source_switch": sm["migration"]["switch"]});
    r.key = format!(
        "switch took {} ms, {} pages at the old one",
        sw["switch_ms"]
            .as_f64()
            .map_or("?".into(), |v| format!("{v:.0}")),
        sw["pages_at_old"]
    );
    r.passed = equal;
    r.why = if equal {
        format!(
            "switched at {} % of precopy round 1 ({} pages held by the old destination, {} \
             forwarded); the new destination finished with the reference digest",
            k.param, sw["pages_at_old"], sm["migration"]["switch"]["pages_forwarded"]
        )
    } else {
        "the new destination's memory differs from the reference run's".into()
    };
    Ok(())
}

/// migrate-cancel during precopy round 1, then a cancellable migration cancelled after its
/// switchover.
#[allow(clippy::too_many_lines)]
fn cancel(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let g = cancellable_guest(ctx);
    let (reference, _) = ctx.reference(&g)?;
    let mem = mem_of(&g);
    let dir = Scratch::new("cancel")?;
    let (_first, first_uri) = destination(ctx, &dir, "first destination", &mem)?;
    let mut src = source(ctx, &dir, &g)?;
    wait_steps(&src, 200_000)?;
    r.at_risk = true;
    // 1. Before the switchover: the VM keeps running here.
    let migration = migrate_in_background(
        &src,
        json!({"uri": first_uri, "secret": ctx.secret, "precopy_rounds": 2,
               "max_bandwidth": 32 << 20}),
    )?;
    wait_round1(&src, k.param)?;
    let c0 = Instant::now();
    src.ctl("migrate-cancel", json!({}))?;
    let refused = migration
        .join()
        .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))?;
    r.timing("precopy_cancel_ms", ms(c0.elapsed()));
    let e = match refused {
        Ok(m) => bail!("the migration went on after migrate-cancel: {m}"),
        Err(e) => format!("{e:#}"),
    };
    let s1 = src.ctl("query-progress", json!({}))?["steps"].as_u64();
    std::thread::sleep(Duration::from_millis(200));
    let status = src.ctl("query-status", json!({}))?;
    let s2 = src.ctl("query-progress", json!({}))?["steps"].as_u64();
    ensure!(
        status["status"] == "running" && s2 > s1,
        "the VM did not keep running at the source after migrate-cancel: {} ({s1:?} -> {s2:?} \
         steps)",
        status["status"]
    );
    // 2. After the switchover of a cancellable migration.
    let (mut dest, switchover) = migrate_cancellable(ctx, &dir, &src, &mem, "destination")?;
    sleep_until(switchover + Duration::from_millis(k.after_ms));
    let c1 = Instant::now();
    let by_itself = match src.ctl("migrate-cancel", json!({})) {
        Ok(_) => false,
        // On a starved host the lease may have run out first: the source then took the VM
        // back by itself (the cancel finds nothing to cancel).
        Err(e) if src.ctl("query-migrate", json!({}))?["phase"] == "cancelled" => {
            log::info!("migrate-cancel: {e:#}");
            true
        }
        Err(e) => return Err(e),
    };
    let cancel_ms = ms(c1.elapsed());
    r.timing("cancel_to_running_at_source_ms", cancel_ms);
    let q = src.ctl("query-migrate", json!({}))?;
    ensure!(
        q["phase"] == "cancelled",
        "after migrate-cancel the source's migration is {}",
        q["phase"]
    );
    let fenced = dest.json_summary(Duration::from_secs(120))?;
    ensure!(
        fenced["status"] == "fenced",
        "the cancelled destination did not stop for good: {}",
        fenced["status"]
    );
    let c = q["checkpoints"].clone();
    r.details = json!({"precopy_cancel_error": e, "checkpoints": c});
    let equal = finished_at_source(&mut src, &reference, r)?;
    r.key = format!(
        "cancel -> running at the source in {cancel_ms:.0} ms (checkpoint {})",
        c["epoch"]
    );
    r.passed = equal;
    r.why = if !equal {
        "the guest finished at the source with a digest that differs from the reference".into()
    } else {
        format!(
            "cancelled at {} % of precopy round 1 (the VM ran on at the source), then {} {} ms \
             after a cancellable switchover (back from checkpoint {}); the guest finished at the \
             source with the reference digest",
            k.param,
            if by_itself {
                "the lease ran out (the source took the VM back by itself)"
            } else {
                "cancelled"
            },
            k.after_ms,
            c["epoch"]
        )
    };
    Ok(())
}

/// Migrations over an emulated WAN: 16 ms and 64 ms one-way, 1 Gbit/s (or one random
/// delay).
fn wan(ctx: &Ctx, k: Knobs, r: &mut Report) -> Result<()> {
    let (g, _) = postcopy_guest(ctx);
    let (reference, _) = ctx.reference(&g)?;
    let delays = if k.param == 0 {
        vec![16, 64]
    } else {
        vec![k.param]
    };
    let mut keys = Vec::new();
    let mut details = serde_json::Map::new();
    let mut network = "loopback";
    r.digest = "equal".into();
    for delay in delays {
        let dir = Scratch::new(&format!("wan-{delay}"))?;
        let hosts = Hosts::for_network(ctx, &format!("wan{delay}"))?;
        let (src_host, dst_host) = (hosts.host("src"), hosts.host("dst"));
        network = hosts.describe();
        let (mut dest, uri) = destination_at(ctx, dst_host, &dir, "destination", &mem_of(&g))?;
        let delay_arg = format!("{delay}ms");
        let (_link, via) = linkem(ctx, dst_host, &dir, &uri, &delay_arg, Some("1Gbit"))?;
        let mut src = source_at(ctx, src_host, &dir, &g)?;
        wait_steps(&src, 100_000)?;
        let t0 = Instant::now();
        let m = src.ctl("migrate", json!({"uri": via, "secret": ctx.secret}))?;
        ensure!(
            m["phase"] == "postcopy",
            "the migration did not switch over: {m}"
        );
        r.at_risk = true;
        let switchover = ms(t0.elapsed());
        let sm = src.json_summary(FINISH)?;
        let mig = &sm["migration"];
        ensure!(
            mig["phase"] == "completed",
            "the source's migration over {delay} ms did not complete: {} {}",
            mig["phase"],
            mig["error"]
        );
        let total = mig["total_ms"].as_f64().unwrap_or(f64::NAN) + switchover;
        r.timing(&format!("{delay}ms_switchover_ms"), switchover);
        r.timing(&format!("{delay}ms_total_ms"), total);
        let summary = dest.json_summary(FINISH)?;
        let digest = finished_at(&summary, "destination")?;
        let p = &summary["demand_paging"];
        details.insert(
            format!("{delay}ms"),
            json!({"downtime_us": mig["downtime_us"], "pages_demand": mig["pages_demand"],
                   "pages_pushed": mig["pages_pushed"], "fault_p50_us": p["latency_p50_us"],
                   "fault_p99_us": p["latency_p99_us"]}),
        );
        keys.push(format!("{delay} ms: {:.2} s", total / 1e3));
        if digest.as_str() != Some(reference.as_str()) {
            r.digest_check(&digest, &reference);
            r.guest_lost = true;
            r.details = Value::Object(details);
            r.why = format!("over {delay} ms the guest's memory differs from the reference run's");
            return Ok(());
        }
    }
    details.insert("network".into(), json!(network));
    r.details = Value::Object(details);
    r.key = format!("total {}", keys.join(", "));
    r.passed = true;
    r.why = format!(
        "migrated over 1 Gbit/s with {} one-way delay; the guest finished at the destination \
         with the reference digest",
        keys.join(" and ")
    );
    Ok(())
}
