//! `tsubame bench checkpoint`: what cancellable postcopy costs, measured in one run.
//!
//! 1. **Pause and guest speed**, per dirty-set size (a uniform workload whose working set is
//!    the size: every interval it rewrites up to all of it). One VM alone in this process: its
//!    speed untouched (the baseline), then with only KVM's dirty log read every interval (the
//!    *tracking floor*: the write faults and re-protection any dirty tracking costs). Then
//!    pairs of processes, as `bench migrate` runs them, migrate postcopy without a push (pages
//!    come on demand, so the migration stays open as long as we measure): the guest's speed
//!    at the destination once its working set is there, cancellable and plain (the
//!    reference), alternating, two of each. Reported: pause p50/p99,
//!    dirty pages per checkpoint, the slowdown with checkpoints against plain postcopy and
//!    its ratio to the tracking floor, how long output was held, and `migrate-cancel` ->
//!    the VM running at the source.
//! 2. **Destination killed** (separate processes): `kill -9` at random moments of a
//!    cancellable migration; time from the kill to the VM running at the source.
//! 3. **Total time**: the benchmark guest (1 GiB by default) migrated postcopy plain and
//!    cancellable, alternating, as in `tsubame bench migrate`.
//!
//! Results go to `--out` as JSON (one file) and figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tsubame_vmm::control::ControlClient;
use tsubame_vmm::migration::source::MigratableVm;
use tsubame_vmm::{SerialOutput, Vm, VmConfig, WaitOutcome};

use super::tsubame::{self as runs, MigrationSetup, SECRET};
use super::{machine_info, plot};

/// Measure cancellable postcopy: checkpoint pauses, guest slowdown against the tracking
/// floor, output delay, cancel and kill recovery times, total time against plain postcopy.
///
/// Example: tsubame bench checkpoint --dirty 4M,16M --kills 10 --total-reps 3
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CheckpointBenchArgs {
    /// Guest RAM of the pause and speed runs.
    #[arg(long, default_value = "256M", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// Dirty-set sizes, comma-separated: the working set of each run (the guest can dirty at
    /// most this much per interval).
    #[arg(long, value_delimiter = ',', default_value = "1M,4M,16M", value_parser = tsubame_vmm::guest::parse_size)]
    pub dirty: Vec<u64>,
    /// Checkpoint interval (ms).
    #[arg(long, default_value_t = 100)]
    pub interval: u32,
    /// Length of each speed measurement (s).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Destination kills (0: skip).
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// Plain/cancellable pairs of the total-time comparison (0: skip).
    #[arg(long, default_value_t = 3)]
    pub total_reps: u32,
    /// Guest RAM and working set of the total-time comparison.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub total_mem: u64,
    #[arg(long, default_value = "700M", value_parser = tsubame_vmm::guest::parse_size)]
    pub total_ws: u64,
    /// Where the JSON and the figures go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// One dirty-set size.
#[derive(Debug, Default, Serialize)]
struct DirtyRun {
    dirty_bytes: u64,
    baseline_steps_per_s: f64,
    /// Dirty log read every interval, nothing else.
    tracking_steps_per_s: f64,
    tracking_slowdown: f64,
    /// Distinct pages the guest wrote per interval while tracked, and the time reading the
    /// log took per page.
    pages_per_interval: f64,
    dirty_log_us_per_page: f64,
    /// At the destination, working set local: plain postcopy, and cancellable.
    plain_steps_per_s: f64,
    cancellable_steps_per_s: f64,
    checkpoint_slowdown: f64,
    /// checkpoint_slowdown / tracking_slowdown (the goal: at most 1.2).
    slowdown_vs_floor: Option<f64>,
    /// The destination's checkpoint statistics at the end.
    checkpoints: Value,
    /// `migrate-cancel` at the source -> the VM running there.
    cancel_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Value,
    interval_ms: u32,
    mem_bytes: u64,
    dirty: Vec<DirtyRun>,
    /// Destination killed -> the VM running at the source (ms), per kill.
    kill_to_running_ms: Vec<f64>,
    /// (plain, cancellable) total migration times (ms), per pair.
    total_ms: Vec<(f64, f64)>,
}

#[allow(clippy::cast_precision_loss)]
fn rate(vm: &Vm, window: Duration) -> f64 {
    let (t0, s0) = (Instant::now(), vm.progress().steps);
    std::thread::sleep(window);
    (vm.progress().steps - s0) as f64 / t0.elapsed().as_secs_f64()
}

fn workload(dirty: u64) -> String {
    format!("uniform:ws={}K,write=0.3,seed=9", dirty >> 10)
}

fn source_vm(a: &CheckpointBenchArgs, dirty: u64) -> Result<Arc<Vm>> {
    let vm = Vm::new(&VmConfig {
        mem_bytes: a.mem,
        vcpus: 1,
        workload: workload(dirty).parse()?,
        steps: 0,
        // Output to hold: a line every 50 000 steps (about 30 per second).
        report_every: 50_000,
        verify_at_end: false,
        serial: SerialOutput::Discard,
    })?;
    vm.resume()?;
    // Every page of the working set written once.
    if vm.wait_steps(4 * (dirty >> 12), Duration::from_secs(60)) != WaitOutcome::Reached {
        bail!("the guest did not start");
    }
    Ok(Arc::new(vm))
}

/// A pair of processes, as `tsubame bench migrate` starts them: a source of `mem_bytes`
/// running the workload of `dirty` (a serial line every `report_every` steps), a destination
/// waiting. The migration itself is the caller's.
fn pair(
    mem_bytes: u64,
    dirty: u64,
    report_every: u64,
    tag: &str,
    dir: &Path,
) -> Result<runs::Pair> {
    let setup = MigrationSetup {
        mem_bytes,
        vcpus: 1,
        workload: workload(dirty),
        steps: 0,
        migrate_at_steps: 0,
        baseline_from_steps: 0,
        prepage: "none".into(),
        precopy_rounds: 0,
        delay_ms: 0.0,
        rate_bits: None,
        checkpoint_ms: None,
        report_every,
        split: None,
    };
    runs::start_pair(&setup, dir, tag)
}

fn steps(ctl: &mut ControlClient) -> Result<u64> {
    Ok(ctl.execute("query-progress", json!({}))?["steps"]
        .as_u64()
        .unwrap_or(0))
}

/// One migration between processes, postcopy without a push (so it stays open while we
/// measure), cancellable if `checkpoint_ms`: the guest's speed at the destination once its
/// working set is there, the destination's checkpoint statistics, and (cancellable)
/// `migrate-cancel` -> the VM running at the source.
#[allow(clippy::cast_precision_loss)]
fn process_run(
    a: &CheckpointBenchArgs,
    dirty: u64,
    checkpoint_ms: Option<u32>,
    tag: &str,
    dir: &Path,
) -> Result<(f64, Value, Option<f64>)> {
    // Output to hold: a line every 50 000 steps (about 30 per second).
    let p = pair(a.mem, dirty, 50_000, tag, dir)?;
    let mut src = ControlClient::connect(&p.source_sock)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut args = json!({"uri": p.uri, "secret": SECRET, "prepage": "none"});
    if let Some(ms) = checkpoint_ms {
        args["cancellable"] = json!("on");
        args["checkpoint_ms"] = json!(ms);
    }
    src.execute("migrate", args)?;
    let mut dst = runs::connect_retry(&p.dest_sock)?;
    std::thread::sleep(Duration::from_millis(1000)); // the working set arrives on demand
    let (t0, s0) = (Instant::now(), steps(&mut dst)?);
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let speed = (steps(&mut dst)? - s0) as f64 / t0.elapsed().as_secs_f64();
    let checkpoints = dst.execute("query-migrate", json!({}))?["checkpoints"].clone();
    let cancel_ms = if checkpoint_ms.is_some() {
        let t = Instant::now();
        src.execute("migrate-cancel", json!({}))?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        let m = src.execute("query-migrate", json!({}))?;
        if m["phase"] != "cancelled" {
            bail!("the VM does not run at the source after the cancel: {m}");
        }
        Some(took)
    } else {
        None
    };
    let _ = src.execute("quit", json!({}));
    let _ = dst.execute("quit", json!({}));
    Ok((speed, checkpoints, cancel_ms))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[allow(clippy::cast_precision_loss)]
fn dirty_run(a: &CheckpointBenchArgs, dirty: u64, dir: &Path) -> Result<DirtyRun> {
    let window = Duration::from_secs_f64(a.seconds);
    let interval = Duration::from_millis(u64::from(a.interval));
    let mut r = DirtyRun {
        dirty_bytes: dirty,
        ..DirtyRun::default()
    };
    // The tracking floor: one VM alone in this process, untracked, tracked, untracked.
    {
        let vm = source_vm(a, dirty)?;
        let before = rate(&vm, window);
        vm.set_dirty_logging(true)?;
        vm.take_dirty_pages()?;
        let (t0, s0) = (Instant::now(), vm.progress().steps);
        let (mut pages, mut reading, mut reads) = (0usize, Duration::ZERO, 0u32);
        while t0.elapsed() < window {
            std::thread::sleep(interval);
            let t = Instant::now();
            pages += vm.take_dirty_pages()?.len();
            reading += t.elapsed();
            reads += 1;
        }
        r.tracking_steps_per_s = (vm.progress().steps - s0) as f64 / t0.elapsed().as_secs_f64();
        vm.set_dirty_logging(false)?;
        // This host's speed drifts: the baseline is the mean of before and after.
        r.baseline_steps_per_s = (before + rate(&vm, window)) / 2.0;
        r.tracking_slowdown = 1.0 - r.tracking_steps_per_s / r.baseline_steps_per_s;
        r.pages_per_interval = pages as f64 / f64::from(reads.max(1));
        r.dirty_log_us_per_page = reading.as_secs_f64() * 1e6 / pages.max(1) as f64;
    }
    // Plain and cancellable postcopy between processes, alternating.
    let (mut plain, mut cancellable) = (Vec::new(), Vec::new());
    for rep in 0..2 {
        let tag = format!("d{}-{rep}", dirty >> 10);
        plain.push(process_run(a, dirty, None, &format!("{tag}p"), dir)?.0);
        let (speed, c, cancel) = process_run(a, dirty, Some(a.interval), &format!("{tag}c"), dir)?;
        cancellable.push(speed);
        r.checkpoints = c;
        r.cancel_ms = cancel.unwrap_or(f64::NAN);
    }
    r.plain_steps_per_s = median(&mut plain);
    r.cancellable_steps_per_s = median(&mut cancellable);
    r.checkpoint_slowdown = 1.0 - r.cancellable_steps_per_s / r.plain_steps_per_s;
    r.slowdown_vs_floor =
        (r.tracking_slowdown > 0.0).then(|| r.checkpoint_slowdown / r.tracking_slowdown);
    Ok(r)
}

/// Kills the destination of a cancellable migration `after` the switchover; returns the time
/// from the kill to the VM running at the source.
fn kill_run(interval: u32, after: Duration, tag: &str, dir: &std::path::Path) -> Result<f64> {
    let mut pair = pair(64 << 20, 16 << 20, 0, tag, dir)?;
    let mut ctl = ControlClient::connect(&pair.source_sock)?;
    std::thread::sleep(Duration::from_millis(300));
    ctl.execute(
        "migrate",
        json!({"uri": pair.uri, "secret": SECRET, "prepage": "none",
               "cancellable": "on", "checkpoint_ms": interval}),
    )?;
    std::thread::sleep(after);
    pair.destination.kill()?;
    let killed = Instant::now();
    loop {
        let m = ctl.execute("query-migrate", json!({}))?;
        if m["phase"] == "cancelled" {
            break;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("the source did not resume the VM: {m}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = killed.elapsed().as_secs_f64() * 1e3;
    let _ = ctl.execute("quit", json!({}));
    Ok(took)
}

#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
pub fn bench_checkpoint(a: &CheckpointBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    std::fs::create_dir_all(&a.out)?;
    let dir = std::env::temp_dir().join(format!("tsubame-bench-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut report = Report {
        machine: machine_info(),
        interval_ms: a.interval,
        mem_bytes: a.mem,
        dirty: Vec::new(),
        kill_to_running_ms: Vec::new(),
        total_ms: Vec::new(),
    };
    println!(
        "checkpoints every {} ms, {} MiB guest, 1 vCPU",
        a.interval,
        a.mem >> 20
    );
    for &d in &a.dirty {
        let r = dirty_run(a, d, &dir).with_context(|| format!("dirty set {} KiB", d >> 10))?;
        let c = &r.checkpoints;
        println!(
            "  dirty {:>5} KiB: pause p50 {} µs p99 {} µs ({:.0} pages/interval), slowdown {:.1} % \
             (tracking floor {:.1} %, ratio {}), output held p50 {:.1} max {:.1} ms, cancel -> running {:.1} ms",
            d >> 10,
            c["pause_p50_us"],
            c["pause_p99_us"],
            r.pages_per_interval,
            r.checkpoint_slowdown * 100.0,
            r.tracking_slowdown * 100.0,
            r.slowdown_vs_floor
                .map_or_else(|| "-".into(), |x| format!("{x:.2}")),
            c["output_delay_p50_ms"].as_f64().unwrap_or(f64::NAN),
            c["output_delay_max_ms"].as_f64().unwrap_or(f64::NAN),
            r.cancel_ms,
        );
        report.dirty.push(r);
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for k in 0..a.kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(50 + seed % 550);
        let ms = kill_run(a.interval, after, &format!("kill{k}"), &dir)?;
        println!(
            "  kill {k}: {after:?} after the switchover, running at the source {ms:.0} ms later"
        );
        report.kill_to_running_ms.push(ms);
    }
    if a.kills > 0 {
        let k = &report.kill_to_running_ms;
        println!(
            "  destination killed -> running at the source: p50 {:.0} ms, max {:.0} ms",
            median(&mut k.clone()),
            k.iter().copied().fold(f64::NAN, f64::max)
        );
    }
    for rep in 0..a.total_reps {
        let mut pair = (0.0, 0.0);
        for (i, ms) in [None, Some(a.interval)].into_iter().enumerate() {
            let setup = MigrationSetup {
                mem_bytes: a.total_mem,
                vcpus: 1,
                workload: format!("uniform:ws={}M,write=0.3,seed=7", a.total_ws >> 20),
                steps: 0,
                migrate_at_steps: 2 * (a.total_ws >> 12),
                baseline_from_steps: a.total_ws >> 12,
                prepage: "address".into(),
                precopy_rounds: 0,
                delay_ms: 0.0,
                rate_bits: None,
                checkpoint_ms: ms,
                report_every: 0,
                split: None,
            };
            let r = runs::migrate(&setup, &dir, &format!("total{rep}-{i}"))?;
            if i == 0 {
                pair.0 = r.total_ms;
            } else {
                pair.1 = r.total_ms;
            }
        }
        println!(
            "  total, {} MiB guest: plain {:.0} ms, cancellable {:.0} ms ({:.2}x)",
            a.total_mem >> 20,
            pair.0,
            pair.1,
            pair.1 / pair.0
        );
        report.total_ms.push(pair);
    }

    let json_path = a.out.join("checkpoint.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let mut written = vec![json_path];
    let mib = |r: &DirtyRun| r.dirty_bytes as f64 / f64::from(1 << 20);
    let pause = |key: &'static str| plot::Series {
        label: format!("pause {}", &key[6..9]),
        points: report
            .dirty
            .iter()
            .map(|r| (mib(r), r.checkpoints[key].as_f64().unwrap_or(0.0) / 1e3))
            .collect(),
    };
    written.extend(plot::line_chart(
        &a.out.join("checkpoint-pause"),
        &plot::Chart {
            title: format!("Checkpoint pause, every {} ms", a.interval),
            x_label: "dirty set (MiB)".into(),
            y_label: "guest paused (ms)".into(),
            series: vec![pause("pause_p50_us"), pause("pause_p99_us")],
            marks: Vec::new(),
        },
    )?);
    written.extend(plot::line_chart(
        &a.out.join("checkpoint-slowdown"),
        &plot::Chart {
            title: "Guest slowdown: checkpoints against plain postcopy".into(),
            x_label: "dirty set (MiB)".into(),
            y_label: "slowdown (%)".into(),
            series: vec![
                plot::Series {
                    label: "checkpoints".into(),
                    points: report
                        .dirty
                        .iter()
                        .map(|r| (mib(r), r.checkpoint_slowdown * 100.0))
                        .collect(),
                },
                plot::Series {
                    label: "dirty tracking alone".into(),
                    points: report
                        .dirty
                        .iter()
                        .map(|r| (mib(r), r.tracking_slowdown * 100.0))
                        .collect(),
                },
            ],
            marks: Vec::new(),
        },
    )?);
    let _ = std::fs::remove_dir_all(&dir);
    println!("  results in {}", a.out.display());
    for p in written {
        println!("    {}", p.display());
    }
    Ok(0)
}
