//! One Tsubame migration as the benchmarks run it: a destination and a source `tsubame run`
//! process on this machine (optionally through `linkem`), the guest's progress sampled from
//! the mailbox through the control sockets every few milliseconds, the source's and the
//! destination's `query-migrate`, and the final digest.
//!
//! Progress samples come from the source until the switchover and from the destination after
//! it; times are seconds from the `migrate` command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tsubame_qemu_peer::hoststat::{self, CpuTimes};
use tsubame_qemu_peer::migration as qemu_migration;
use tsubame_vmm::control::ControlClient;

use crate::host::Host;
use crate::linkem::{self, LinkParams};

pub(crate) const SECRET: &str = "tsubame-bench";

/// What to migrate and how.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationSetup {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub workload: String,
    /// Steps per vCPU; 0 = forever (the run then ends when the migration does).
    pub steps: u64,
    /// Migrate once the guest has done this many steps (all vCPUs together).
    pub migrate_at_steps: u64,
    /// The guest's speed before migrating (its baseline) is measured from this step on, up to
    /// `migrate_at_steps` (pages local).
    pub baseline_from_steps: u64,
    pub prepage: String,
    pub precopy_rounds: u32,
    /// One-way delay of the emulated link (0: plain loopback).
    pub delay_ms: f64,
    /// Link rate in bit/s (None: unlimited).
    pub rate_bits: Option<u64>,
    /// Cancellable postcopy with reverse checkpoints this often (ms).
    pub checkpoint_ms: Option<u32>,
    /// The guest prints a serial line every this many steps (0: never).
    pub report_every: u64,
    /// Hand this share of the memory to a memserver (a third process) on the way.
    pub split: Option<f64>,
}

/// The measured result of one migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationResult {
    /// `migrate` -> vCPUs paused (precopy rounds, profiling).
    pub precopy_ms: f64,
    /// vCPUs paused -> state sent (source); state received -> VM assembled (destination).
    pub downtime_source_us: f64,
    pub downtime_destination_us: f64,
    /// vCPUs paused at the source -> resumed at the destination (wall clock, same host).
    pub downtime_us: f64,
    /// Switchover -> every page at the destination.
    pub total_ms: f64,
    /// `migrate` -> every page at the destination.
    pub total_with_precopy_ms: f64,
    /// Switchover -> the push sent its last page.
    pub push_ms: f64,
    /// Page data the push sent / `push_ms`.
    pub push_gb_per_s: f64,
    pub bytes_sent: u64,
    pub pages_precopy: u64,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    pub pages_duplicate: u64,
    pub zero_pages: u64,
    /// Engine side: fault event read -> page installed.
    pub faults: u64,
    pub demand_requests: u64,
    pub demand_p50_us: f64,
    pub demand_p99_us: f64,
    pub demand_max_us: f64,
    /// (µs, share) points of the engine's latency distribution.
    pub demand_cdf: Vec<(f64, f64)>,
    /// QEMU only: its postcopy blocktime divided by its page requests.
    pub blocktime_per_request_us: Option<f64>,
    /// Guest steps/s before the migration (the source, pages local).
    pub baseline_steps_per_s: f64,
    /// Switchover -> the guest runs at 90% of its baseline again (50 ms windows).
    pub time_to_full_speed_ms: Option<f64>,
    /// (seconds since `migrate`, negative before it; total steps) samples.
    pub progress: Vec<(f64, u64)>,
    /// Seconds since `migrate` of the switchover (state sent).
    pub switchover_s: f64,
    /// CPU time the hypervisor took from this machine from `migrate` until every page was
    /// at the destination, in percent (see `tsubame_qemu_peer::hoststat`): a noisy run shows here.
    pub steal_pct: Option<f64>,
    pub digest: Option<String>,
    /// A split: the destination's consolidation once the source was done (every page
    /// brought back from the memservers, the guest running): ms and GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<Value>,
}

/// Two `tsubame run` processes and a link between them.
pub(crate) struct Pair {
    pub source: Host,
    pub destination: Host,
    pub source_sock: PathBuf,
    pub dest_sock: PathBuf,
    pub uri: String,
    _link: Option<linkem::LinkHandle>,
}

pub(crate) fn start_pair(setup: &MigrationSetup, dir: &Path, tag: &str) -> Result<Pair> {
    let dest_sock = dir.join(format!("{tag}-dst.sock"));
    let source_sock = dir.join(format!("{tag}-src.sock"));
    let _ = std::fs::remove_file(&dest_sock);
    let _ = std::fs::remove_file(&source_sock);
    let s = |v: &str| v.to_string();
    let mut destination = Host::start(
        "destination",
        &[
            s("--incoming"),
            s("tcp:127.0.0.1:0"),
            // Told the VM's size, the destination prepares its memory while it waits.
            s("--mem"),
            format!("{}M", setup.mem_bytes >> 20),
            s("--secret"),
            s(SECRET),
            s("--serial"),
            s("none"),
            s("--quiet"),
            s("--json"),
            s("--control"),
            dest_sock.display().to_string(),
        ],
    )?;
    destination.echo = false;
    let listen = destination
        .wait_line("waiting for an incoming migration on")?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim_start_matches("tcp:")
        .parse::<SocketAddr>()
        .context("parsing the destination's address")?;
    let (uri, link) = if setup.delay_ms > 0.0 || setup.rate_bits.is_some() {
        let (addr, handle) = linkem::spawn(
            "127.0.0.1:0".parse().expect("address"),
            listen,
            LinkParams {
                delay: Duration::from_secs_f64(setup.delay_ms / 1e3),
                rate: setup.rate_bits,
                buffer: None,
            },
        )?;
        (format!("tcp:{addr}"), Some(handle))
    } else {
        (format!("tcp:{listen}"), None)
    };
    let mut source = Host::start(
        "source",
        &[
            s("--mem"),
            format!("{}M", setup.mem_bytes >> 20),
            s("--vcpus"),
            setup.vcpus.to_string(),
            s("--workload"),
            setup.workload.clone(),
            s("--steps"),
            setup.steps.to_string(),
            s("--report-every"),
            setup.report_every.to_string(),
            s("--control"),
            source_sock.display().to_string(),
            s("--secret"),
            s(SECRET),
            s("--serial"),
            s("none"),
            s("--quiet"),
            s("--hold"),
        ],
    )?;
    source.echo = false;
    source.wait_line("control socket ready")?;
    Ok(Pair {
        source,
        destination,
        source_sock,
        dest_sock,
        uri,
        _link: link,
    })
}

/// Samples the guest's total steps every `every` from the source, then (after `switch`) from
/// the destination, until stopped or the destination goes away.
struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    side: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(source: PathBuf, destination: PathBuf, every: Duration) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let side = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, which, quit) = (samples.clone(), side.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut client: Option<(u8, ControlClient)> = None;
            while !quit.load(Ordering::Acquire) {
                let want = which.load(Ordering::Acquire);
                if client.as_ref().map(|c| c.0) != Some(want) {
                    let path = if want == 0 { &source } else { &destination };
                    client = ControlClient::connect(path).ok().map(|c| (want, c));
                }
                if let Some((_, c)) = client.as_mut() {
                    match c.execute("query-progress", json!({})) {
                        Ok(p) if p["memory_pending"] != true => {
                            if let Some(steps) = p["steps"].as_u64() {
                                out.lock().expect("samples").push((Instant::now(), steps));
                            }
                        }
                        Ok(_) => {}
                        Err(_) => client = None, // gone (or not there yet): reconnect
                    }
                }
                std::thread::sleep(every);
            }
        });
        Self {
            samples,
            side,
            stop,
            thread: Some(thread),
        }
    }

    fn switch_to_destination(&self) {
        self.side.store(1, Ordering::Release);
    }

    fn steps_now(&self) -> Option<(Instant, u64)> {
        self.samples.lock().expect("samples").last().copied()
    }

    fn finish(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().expect("samples"))
    }
}

/// The first time after `switchover` (seconds, same clock as the samples) at which the guest
/// runs at `share` of `baseline` steps/s over a `window`, as seconds after the switchover: the
/// same measure for Tsubame's runs and QEMU's.
pub fn time_to_full_speed(
    samples: &[(f64, u64)],
    switchover: f64,
    baseline: f64,
    window: f64,
    share: f64,
) -> Option<f64> {
    qemu_migration::time_to_rate(samples, switchover, share * baseline, window)
}

pub(crate) fn wait_steps(ctl: &mut ControlClient, steps: u64) -> Result<()> {
    let w = ctl.execute(
        "wait",
        json!({"for": "steps", "steps": steps, "timeout_ms": 600_000}),
    )?;
    if w["outcome"] != "reached" {
        bail!("the guest did not reach {steps} steps: {w}");
    }
    Ok(())
}

pub(crate) fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

pub(crate) fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Starts a memserver for a split of `share` of `mem_bytes`, preparing that much memory, and
/// waits until it is prepared; returns it and its address.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn start_prepared_memserver(
    dir: &Path,
    tag: &str,
    share: f64,
    mem_bytes: u64,
) -> Result<(Host, String)> {
    let sock = dir.join(format!("{tag}-ms.sock"));
    let _ = std::fs::remove_file(&sock);
    let bytes = (mem_bytes as f64 * share) as u64;
    let (ms, uri) = start_memserver(
        Some(&sock),
        &["--prepare".into(), format!("{}K", bytes >> 10)],
    )?;
    let mut c = connect_retry(&sock)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while n(&c.execute("query-usage", json!({}))?["prepared_bytes"]) < bytes {
        if Instant::now() > deadline {
            bail!("the memserver did not prepare {bytes} bytes within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((ms, uri))
}

/// Runs one migration to its end: the guest finishes at the destination (with `steps` > 0) and
/// the result carries its digest.
#[allow(clippy::cast_precision_loss)]
pub fn migrate(setup: &MigrationSetup, dir: &Path, tag: &str) -> Result<MigrationResult> {
    // A split's memserver prepares the memory for its share before the VM starts, as the
    // destination prepares its staging pool while it waits.
    let (_memserver, split) = match setup.split {
        Some(share) => {
            let (ms, uri) = start_prepared_memserver(dir, tag, share, setup.mem_bytes)?;
            (Some(ms), Some((uri, share)))
        }
        None => (None, None),
    };
    let pair = start_pair(setup, dir, tag)?;
    let mut ctl = ControlClient::connect(&pair.source_sock)?;
    let sampler = Sampler::start(
        pair.source_sock.clone(),
        pair.dest_sock.clone(),
        Duration::from_millis(2),
    );
    // The baseline: the guest's rate just before migrating.
    wait_steps(&mut ctl, setup.baseline_from_steps)?;
    let before = sampler.steps_now();
    wait_steps(&mut ctl, setup.migrate_at_steps)?;
    let after = sampler.steps_now();
    let baseline = match (before, after) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (b.1.saturating_sub(a.1)) as f64 / (b.0 - a.0).as_secs_f64()
        }
        _ => 0.0,
    };
    let t0 = Instant::now();
    let cpu_at_migrate = CpuTimes::now();
    let mut args = json!({"uri": pair.uri, "secret": SECRET, "prepage": setup.prepage,
               "precopy_rounds": setup.precopy_rounds});
    if let Some(ms) = setup.checkpoint_ms {
        args["cancellable"] = json!("on");
        args["checkpoint_ms"] = json!(ms);
    }
    if let Some((uri, share)) = &split {
        args["split"] = json!(format!("{uri}:{share}"));
    }
    let m = ctl.execute("migrate", args)?;
    let switched = t0.elapsed().as_secs_f64();
    sampler.switch_to_destination();
    let _ = m;
    let src = loop {
        let q = ctl.execute("query-migrate", json!({}))?;
        if q["phase"] != "postcopy" {
            break q;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let steal_pct = hoststat::steal_pct_since(cpu_at_migrate);
    if src["phase"] != "completed" {
        let (mut source, mut destination) = (pair.source, pair.destination);
        bail!(
            "the migration failed: {}\n  {}\n  {}",
            src["error"],
            source.log_tail(10, Duration::ZERO),
            destination.log_tail(20, Duration::from_secs(2))
        );
    }
    // A split VM runs with part of its memory at the memserver: bring it all back.
    let consolidation = match setup.split {
        Some(_) => Some(
            ControlClient::connect(&pair.dest_sock)
                .and_then(|mut c| c.execute("consolidate", json!({"wait": true})))
                .context("consolidating the split VM at the destination")?,
        ),
        None => None,
    };
    // Keep sampling a little after the last page arrived: the guest at full speed.
    std::thread::sleep(Duration::from_millis(300));
    let dest_status = ControlClient::connect(&pair.dest_sock)
        .and_then(|mut c| c.execute("query-migrate", json!({})))
        .ok();
    let _ = ctl.execute("quit", json!({}));
    drop(ctl);
    let summary: Value = if setup.steps > 0 {
        serde_json::from_str(&pair.destination.finish()?)
            .context("parsing the destination's summary")?
    } else {
        let _ =
            ControlClient::connect(&pair.dest_sock).and_then(|mut c| c.execute("quit", json!({})));
        serde_json::from_str(&pair.destination.finish()?).unwrap_or(Value::Null)
    };
    let _ = pair.source.finish();
    let samples: Vec<(f64, u64)> = sampler
        .finish()
        .into_iter()
        .map(|(t, s)| {
            let secs = if t >= t0 {
                (t - t0).as_secs_f64()
            } else {
                -(t0 - t).as_secs_f64()
            };
            (secs, s)
        })
        .collect();
    // The destination's view: from its control socket, or from its exit summary if the guest
    // finished (and the process exited) first.
    let dest_view = dest_status.unwrap_or_else(|| summary["migration"].clone());
    let paging = &dest_view["demand_paging"];
    let dest_us = f(&dest_view["state_to_running_us"]);
    let push_ms = f(&src["push_ms"]);
    let total_ms = f(&src["total_ms"]);
    let precopy_ms = f(&src["precopy_ms"]);
    let downtime_source_us = f(&src["downtime_us"]);
    // The whole downtime, the state's trip over the link included.
    #[allow(clippy::cast_precision_loss)]
    let downtime_us = crate::demo::whole_downtime_us(&src, paging)
        .map_or(downtime_source_us + dest_us, |us| us as f64);
    Ok(MigrationResult {
        precopy_ms,
        downtime_source_us,
        downtime_destination_us: dest_us,
        downtime_us,
        total_ms,
        total_with_precopy_ms: precopy_ms + total_ms,
        push_ms,
        push_gb_per_s: if push_ms > 0.0 {
            f(&src["bytes_pushed"]) / push_ms / 1e6
        } else {
            0.0
        },
        bytes_sent: n(&src["bytes_sent"]),
        pages_precopy: n(&src["pages_precopy"]),
        pages_demand: n(&src["pages_demand"]),
        pages_pushed: n(&src["pages_pushed"]),
        pages_duplicate: n(&src["pages_duplicate"]),
        zero_pages: n(&src["zero_pages"]),
        faults: n(&paging["faults"]),
        demand_requests: n(&paging["demand_requests"]),
        demand_p50_us: f(&paging["demand_p50_us"]),
        demand_p99_us: f(&paging["demand_p99_us"]),
        demand_max_us: f(&paging["demand_max_us"]),
        demand_cdf: serde_json::from_value(paging["demand_cdf"].clone()).unwrap_or_default(),
        blocktime_per_request_us: None,
        baseline_steps_per_s: baseline,
        time_to_full_speed_ms: time_to_full_speed(&samples, switched, baseline, 0.05, 0.9)
            .map(|s| s * 1e3),
        progress: samples,
        switchover_s: switched,
        steal_pct,
        digest: summary["digest"].as_str().map(String::from),
        consolidation,
    })
}

/// The demand path as the guest sees it: migrates with no background push (`prepage=none`)
/// and measures how long the guest takes for `pages` steps that each fault on a remote page
/// (a sequential workload past its first pass), after `skip` warm-up steps. Returns the
/// guest-visible microseconds per step and the destination's engine statistics.
#[allow(clippy::cast_precision_loss)]
pub fn demand_stall(
    setup: &MigrationSetup,
    dir: &Path,
    skip: u64,
    pages: u64,
) -> Result<(f64, Value)> {
    let pair = start_pair(setup, dir, "stall")?;
    let mut ctl = ControlClient::connect(&pair.source_sock)?;
    wait_steps(&mut ctl, setup.migrate_at_steps)?;
    ctl.execute(
        "migrate",
        json!({"uri": pair.uri, "secret": SECRET, "prepage": "none"}),
    )?;
    let mut dest = connect_retry(&pair.dest_sock)?;
    let steps = |c: &mut ControlClient| -> Result<Option<u64>> {
        let p = c.execute("query-progress", json!({}))?;
        Ok((p["memory_pending"] != true).then(|| n(&p["steps"])))
    };
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (t_a, s_a, t_b, s_b) = loop {
        if Instant::now() > deadline {
            bail!("the guest made no progress at the destination");
        }
        if let Some(s) = steps(&mut dest)? {
            let now = Instant::now();
            match first {
                None => first = Some((s, None)),
                Some((s0, None)) if s >= s0 + skip => first = Some((s0, Some((now, s)))),
                Some((_, Some((ta, sa)))) if s >= sa + pages => break (ta, sa, now, s),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let engine = dest.execute("query-migrate", json!({}))?;
    let per_step_us = (t_b - t_a).as_secs_f64() * 1e6 / (s_b - s_a) as f64;
    drop(pair);
    Ok((per_step_us, engine["demand_paging"].clone()))
}

/// A `tsubame memserver` on loopback (with a control socket at `control` if given), and the
/// URI it listens on.
pub(crate) fn start_memserver(control: Option<&Path>, extra: &[String]) -> Result<(Host, String)> {
    let mut args: Vec<String> = ["--listen", "tcp:127.0.0.1:0", "--secret", SECRET]
        .map(String::from)
        .to_vec();
    if let Some(path) = control {
        args.extend(["--control".into(), path.display().to_string()]);
    }
    args.extend_from_slice(extra);
    let mut ms = Host::command("memserver", "memserver", &args)?;
    ms.echo = false;
    let uri = ms
        .wait_line("memserver listening on")?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((ms, uri))
}

pub(crate) fn connect_retry(path: &Path) -> Result<ControlClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ControlClient::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the destination's control socket never appeared")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_speed_is_the_first_window_at_the_baseline() {
        // 1000 steps/s, a stall from 1.0 to 1.5 s, then 1000 steps/s again.
        let mut samples = Vec::new();
        let mut steps = 0;
        for i in 0..300u32 {
            let t = f64::from(i) * 0.01;
            if !(1.0..1.5).contains(&t) {
                steps += 10;
            }
            samples.push((t, steps));
        }
        let t = time_to_full_speed(&samples, 1.0, 1000.0, 0.05, 0.9).unwrap();
        assert!((0.49..=0.51).contains(&t), "{t}");
        assert!(time_to_full_speed(&samples, 1.0, 5000.0, 0.05, 0.9).is_none());
        assert_eq!(
            qemu_migration::step_rate(&samples, 0.0, 0.5).map(f64::round),
            Some(1000.0)
        );
    }
}
