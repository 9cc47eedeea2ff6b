//! `tsubame bench memserver`: remote paging (`tsubame run --local-mem --memserver`) against a
//! memserver on loopback, all in one run so that the ratios compare like with like:
//!
//! 1. **Fault back**: a guest writing its pages in turn (`seq`, write=1.0) over twice its
//!    local limit, so that after its first pass every step faults on a page only the memserver
//!    holds. The engine's fault read -> installed distribution over the timed steps alone (the
//!    difference of two `query-memory` snapshots, so the first pass's zero fills are left
//!    out), and the guest's time per step, next to the raw 4 KiB request/response TCP round
//!    trip measured in the same run. Each of those steps also takes a write-protect fault and
//!    has one page written back by the evictor: the guest-side figure includes both.
//! 2. **Speed with the hot set fitting**: the same guest (hot/cold) run all local and with
//!    half its RAM as the local limit, alternating, `--reps` times; medians of the wall time.
//! 3. **Write-back**: a guest writing uniformly over twice its limit; `query-memory`'s
//!    write-back rate (bytes written back per second of copy-out until acknowledged).
//! 4. **Memserver metadata**: `query-usage`'s metadata bytes over its page data bytes after
//!    those evictions.
//! 5. **Losing a memserver with `--replicas 2`**: the write-back guest over two memservers,
//!    each page stored at both; one is killed once pages were evicted. The guest's speed in
//!    the second before and after, the pages handed to the other memserver, whether the VM
//!    had to pause (and how long), and the slowest fault of the run (the stall of the faults
//!    that waited through the switch); the write-back rate with two copies per page.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tsubame_vmm::control::ControlClient;

use super::plot::{self, Chart, Series};
use super::raw;
use super::tsubame::{f, n, start_memserver, wait_steps, SECRET};
use crate::host::Host;

/// Measure remote paging against a memserver on loopback: fault-back latency, guest speed
/// under a local limit, write-back throughput, memserver metadata.
///
/// Example: tsubame bench memserver --reps 3 --out bench-results
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MemserverBenchArgs {
    /// Alternating all-local / paged runs of the speed comparison.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Small guests and short runs (seconds): a smoke test, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Workload of the speed comparison (guest RAM 512M, local limit 256M; with --quick 128M
    /// and 64M, working set scaled down by 4).
    #[arg(
        long,
        default_value = "hotcold:ws=384M,hot=0.25,hotaccess=0.99,write=0.3,seed=7"
    )]
    pub speed_workload: tsubame_vmm::guest::WorkloadSpec,
    /// Steps of each speed run.
    #[arg(long, default_value_t = 2_000_000)]
    pub speed_steps: u64,
    /// Where the JSON and the figure go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// Sizes of one bench run.
struct Sizes {
    /// Guest RAM, local limit and working set of the fault-back and write-back guests.
    mem: u64,
    local: u64,
    ws: u64,
    /// Timed fault-back steps.
    faults: u64,
    /// Length of the write-back run.
    writeback: Duration,
    /// Guest RAM and local limit of the speed comparison.
    speed_mem: u64,
    speed_local: u64,
    round_trips: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                mem: 64 << 20,
                local: 16 << 20,
                ws: 32 << 20,
                faults: 1000,
                writeback: Duration::from_secs(1),
                speed_mem: 128 << 20,
                speed_local: 64 << 20,
                round_trips: 2000,
            }
        } else {
            Self {
                mem: 256 << 20,
                local: 64 << 20,
                ws: 128 << 20,
                faults: 20_000,
                writeback: Duration::from_secs(4),
                speed_mem: 512 << 20,
                speed_local: 256 << 20,
                round_trips: 20_000,
            }
        }
    }
}

/// Steps after the first pass before timing.
const SKIP: u64 = 1000;

/// A memserver process with a control socket.
struct Memserver {
    _process: Host,
    uri: String,
    control: PathBuf,
}

fn memserver_with_control(dir: &Path, tag: &str) -> Result<Memserver> {
    let control = dir.join(format!("{tag}-memserver.sock"));
    let _ = std::fs::remove_file(&control);
    let (process, uri) = start_memserver(Some(&control), &[])?;
    Ok(Memserver {
        _process: process,
        uri,
        control,
    })
}

/// The arguments of a `tsubame run` of `workload` in `mem`, with `local` resident over
/// `memserver` if given.
fn run_args(mem: u64, local: Option<(u64, &str)>, workload: &str, steps: u64) -> Vec<String> {
    let mut args: Vec<String> = [
        "--mem",
        &format!("{}M", mem >> 20),
        "--workload",
        workload,
        "--steps",
        &steps.to_string(),
        "--serial",
        "none",
        "--quiet",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    if let Some((bytes, uri)) = local {
        for a in [
            "--local-mem",
            &format!("{}M", bytes >> 20),
            "--memserver",
            uri,
            "--secret",
            SECRET,
        ] {
            args.push(a.to_string());
        }
    }
    args
}

/// A paged VM running `workload` forever, with its control socket.
fn start_paged(
    dir: &Path,
    tag: &str,
    s: &Sizes,
    memserver: &Memserver,
    workload: &str,
) -> Result<(Host, ControlClient)> {
    let sock = dir.join(format!("{tag}-vm.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut args = run_args(s.mem, Some((s.local, &memserver.uri)), workload, 0);
    args.extend([
        "--control".into(),
        sock.display().to_string(),
        "--hold".into(),
    ]);
    let mut vm = Host::start("paged VM", &args)?;
    vm.echo = false;
    vm.wait_line("control socket ready")?;
    let ctl = ControlClient::connect(&sock).context("connecting to the paged VM")?;
    Ok((vm, ctl))
}

fn steps(ctl: &mut ControlClient) -> Result<u64> {
    Ok(n(&ctl.execute("query-progress", json!({}))?["steps"]))
}

/// Latency points (µs at a histogram bucket's upper edge, latencies at or below) of the
/// faults recorded between two `query-memory` snapshots: the difference of their cumulative
/// distributions (the buckets are the same in both).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn window_counts(before: &Value, after: &Value) -> Vec<(f64, u64)> {
    let points = |v: &Value| -> Vec<(f64, u64)> {
        let count = n(&v["demand_faults"]) as f64;
        v["demand_cdf"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| (f(&p[0]), (f(&p[1]) * count).round() as u64))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a, b) = (points(before), points(after));
    b.iter()
        .map(|&(us, cum)| {
            let earlier = a.iter().take_while(|p| p.0 <= us).last().map_or(0, |p| p.1);
            (us, cum.saturating_sub(earlier))
        })
        .collect()
}

/// The share-`p` latency (µs) of cumulative counts (upper bucket edge).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn percentile(counts: &[(f64, u64)], p: f64) -> Option<f64> {
    let total = counts.last()?.1;
    let rank = ((p * total as f64).ceil() as u64).max(1);
    counts.iter().find(|c| c.1 >= rank).map(|c| c.0)
}

/// Fault back: the engine's distribution over the timed steps, and the guest's time per step.
#[allow(clippy::cast_precision_loss)]
fn fault_back(dir: &Path, s: &Sizes) -> Result<Value> {
    let memserver = memserver_with_control(dir, "fault")?;
    let workload = format!("seq:ws={}M,write=1.0,seed=3", s.ws >> 20);
    let (_vm, mut ctl) = start_paged(dir, "fault", s, &memserver, &workload)?;
    wait_steps(&mut ctl, s.ws / 4096 + SKIP)?;
    let before = ctl.execute("query-memory", json!({}))?;
    let (t0, s0) = (Instant::now(), steps(&mut ctl)?);
    wait_steps(&mut ctl, s0 + s.faults)?;
    let (t1, s1) = (Instant::now(), steps(&mut ctl)?);
    let after = ctl.execute("query-memory", json!({}))?;
    if let Some(e) = after["error"].as_str() {
        bail!("remote paging stopped: {e}");
    }
    let counts = window_counts(&before, &after);
    let faults = counts.last().map_or(0, |c| c.1);
    let faults_back = n(&after["faults_back"]) - n(&before["faults_back"]);
    let _ = ctl.execute("quit", json!({}));
    Ok(json!({
        "workload": workload,
        "mem_bytes": s.mem,
        "local_bytes": s.local,
        "steps": s1 - s0,
        "faults": faults,
        "faults_back": faults_back,
        "write_faults": n(&after["write_faults"]) - n(&before["write_faults"]),
        "pages_written_back": n(&after["pages_written_back"]) - n(&before["pages_written_back"]),
        "p50_us": percentile(&counts, 0.5),
        "p90_us": percentile(&counts, 0.9),
        "p99_us": percentile(&counts, 0.99),
        "cdf": counts.iter().map(|&(us, c)| (us, c as f64 / faults.max(1) as f64)).collect::<Vec<_>>(),
        "guest_us_per_step": (t1 - t0).as_secs_f64() * 1e6 / (s1 - s0).max(1) as f64,
        "whole_run": {"p50_us": after["demand_p50_us"], "p99_us": after["demand_p99_us"],
                      "max_us": after["demand_max_us"]},
    }))
}

/// Write-back: a guest writing uniformly over twice its limit for a while; then the
/// memserver's usage.
#[allow(clippy::cast_precision_loss)]
fn write_back(dir: &Path, s: &Sizes) -> Result<(Value, Value)> {
    let memserver = memserver_with_control(dir, "writeback")?;
    let workload = format!("uniform:ws={}M,write=1.0,seed=5", s.ws >> 20);
    let (_vm, mut ctl) = start_paged(dir, "writeback", s, &memserver, &workload)?;
    let t0 = Instant::now();
    std::thread::sleep(s.writeback);
    let m = ctl.execute("query-memory", json!({}))?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = m["error"].as_str() {
        bail!("remote paging stopped: {e}");
    }
    let usage = ControlClient::connect(&memserver.control)
        .and_then(|mut c| c.execute("query-usage", json!({})))
        .context("asking the memserver for its usage")?;
    let _ = ctl.execute("quit", json!({}));
    let written = n(&m["pages_written_back"]);
    let writeback = json!({
        "workload": workload,
        "mem_bytes": s.mem,
        "local_bytes": s.local,
        "seconds": secs,
        "pages_written_back": written,
        "clean_drops": m["clean_drops"],
        "faults_back": m["faults_back"],
        "eviction_passes": m["eviction_passes"],
        "eviction_ms": m["eviction_ms"],
        "writeback_gb_per_s": m["writeback_gbps"],
        "written_back_gb_per_s_of_wall_time": (written * 4096) as f64 / secs / 1e9,
    });
    let data = n(&usage["data_bytes"]);
    let meta = n(&usage["metadata_bytes"]);
    let metadata = json!({
        "data_bytes": data,
        "metadata_bytes": meta,
        "metadata_share": (data > 0).then(|| meta as f64 / data as f64),
        "usage": usage,
    });
    Ok((writeback, metadata))
}

/// Losing one of two memservers under a VM with `--replicas 2` (see the module docs).
#[allow(clippy::cast_precision_loss)]
fn lose_a_replica(dir: &Path, s: &Sizes) -> Result<Value> {
    let first = memserver_with_control(dir, "replica0")?;
    let second = memserver_with_control(dir, "replica1")?;
    let uris = format!("{},{}", first.uri, second.uri);
    let workload = format!("uniform:ws={}M,write=0.5,seed=11", s.ws >> 20);
    let sock = dir.join("replicas-vm.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args = run_args(s.mem, Some((s.local, &uris)), &workload, 0);
    for a in ["--vcpus", "2", "--replicas", "2", "--control"] {
        args.push(a.into());
    }
    args.extend([sock.display().to_string(), "--hold".into()]);
    let mut vm = Host::start("replicated VM", &args)?;
    vm.echo = false;
    vm.wait_line("control socket ready")?;
    let mut ctl = ControlClient::connect(&sock).context("connecting to the replicated VM")?;
    // Until a fair share of the working set lives at the memservers.
    let t0 = Instant::now();
    while n(&ctl.execute("query-memory", json!({}))?["evicted_pages"]) < s.ws / 4096 / 4 {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the replicated VM evicted too little in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rate = |ctl: &mut ControlClient| -> Result<f64> {
        let (t, s0) = (Instant::now(), steps(ctl)?);
        std::thread::sleep(Duration::from_secs(1));
        Ok((steps(ctl)? - s0) as f64 / t.elapsed().as_secs_f64())
    };
    let before = rate(&mut ctl)?;
    let m0 = ctl.execute("query-memory", json!({}))?;
    drop(first); // kills the memserver process
    let killed = Instant::now();
    let mut handed_over = None;
    while handed_over.is_none() && killed.elapsed() < Duration::from_secs(10) {
        let m = ctl.execute("query-memory", json!({}))?;
        if n(&m["failed_over_pages"]) > 0 {
            handed_over = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = rate(&mut ctl)?;
    let m1 = ctl.execute("query-memory", json!({}))?;
    let status = ctl.execute("query-status", json!({}))?;
    let _ = ctl.execute("quit", json!({}));
    drop(second);
    Ok(json!({
        "workload": workload,
        "mem_bytes": s.mem,
        "local_bytes": s.local,
        "evicted_pages_at_the_kill": m0["evicted_pages"],
        "failed_over_pages": m1["failed_over_pages"],
        "kill_to_failed_over_ms": handed_over.map(|d| d.as_secs_f64() * 1e3),
        "steps_per_s_before": before,
        "steps_per_s_after": after,
        "holds": status["memory_hold"]["holds"],
        "longest_hold_ms": status["memory_hold"]["longest_hold_ms"],
        "slowest_fault_us": m1["demand_max_us"],
        "writeback_gb_per_s_two_copies": m0["writeback_gbps"],
        "status_after": status["status"],
    }))
}

/// One speed run to its end: wall time of its steps (`elapsed_s` of the summary; no verify
/// pass at the end, and the digest after it is not counted), and its remote-paging statistics
/// (null when all local) without their latency distribution.
fn speed_run(
    dir: &Path,
    mem: u64,
    local: Option<u64>,
    a: &MemserverBenchArgs,
) -> Result<(f64, Value)> {
    let memserver = match local {
        Some(_) => Some(memserver_with_control(dir, "speed")?),
        None => None,
    };
    let workload = a.speed_workload.to_string();
    let mut args = run_args(
        mem,
        local.zip(memserver.as_ref().map(|m| m.uri.as_str())),
        &workload,
        a.speed_steps,
    );
    args.extend(["--no-verify-at-end".into(), "--json".into()]);
    let mut vm = Host::start("speed VM", &args)?;
    vm.echo = false;
    let summary: Value =
        serde_json::from_str(&vm.finish()?).context("parsing the speed run's summary")?;
    if summary["status"] != "finished" {
        bail!("the speed run did not finish: {summary}");
    }
    if let Some(e) = summary["remote_paging"]["error"].as_str() {
        bail!("remote paging stopped: {e}");
    }
    let mut paging = summary["remote_paging"].clone();
    if let Some(m) = paging.as_object_mut() {
        m.remove("demand_cdf");
    }
    Ok((f(&summary["elapsed_s"]), paging))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        l if l % 2 == 1 => s[l / 2],
        l => (s[l / 2 - 1] + s[l / 2]) / 2.0,
    }
}

#[allow(clippy::cast_precision_loss)]
pub fn bench_memserver(a: &MemserverBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let started = Instant::now();
    let s = Sizes::new(a.quick);
    let mut a_scaled = MemserverBenchArgs {
        reps: a.reps.max(1),
        quick: a.quick,
        speed_workload: a.speed_workload.clone(),
        speed_steps: a.speed_steps,
        out: a.out.clone(),
    };
    if a.quick {
        a_scaled.speed_workload.ws_bytes /= 4;
        a_scaled.speed_steps = a.speed_steps.min(200_000);
        a_scaled.reps = 1;
    }
    let a = &a_scaled;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dir = std::env::temp_dir().join(format!("tsubame-bench-memserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "remote paging benchmark: a memserver on loopback{}",
        if a.quick {
            " (quick: not a measurement)"
        } else {
            ""
        }
    );
    let cpu_at_start = tsubame_qemu_peer::hoststat::CpuTimes::now();

    let lo = raw::loopback(s.round_trips, 256 << 20).context("measuring loopback TCP")?;
    println!(
        "  loopback TCP: 4 KiB round trip p50 {:.1} µs, p99 {:.1} µs (both ends spinning: p50 \
         {:.1} µs, p99 {:.1} µs)",
        lo.rtt_p50_us, lo.rtt_p99_us, lo.spinning_rtt_p50_us, lo.spinning_rtt_p99_us
    );
    let fault = fault_back(&dir, &s).context("measuring faults back from the memserver")?;
    println!(
        "  fault back ({}, {} MiB local of {} MiB): engine p50 {:.1} µs, p99 {:.1} µs over {} \
         faults; guest {:.1} µs per step (fault back + write fault + one page written back)",
        fault["workload"].as_str().unwrap_or_default(),
        s.local >> 20,
        s.mem >> 20,
        f(&fault["p50_us"]),
        f(&fault["p99_us"]),
        fault["faults"],
        f(&fault["guest_us_per_step"]),
    );

    let mut local_s = Vec::new();
    let mut paged_s = Vec::new();
    let mut paged_paging = Vec::new();
    for rep in 0..a.reps {
        // Alternate which goes first, so that a drift of the machine hits both alike.
        let order = if rep % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for paged in order {
            let local = paged.then_some(s.speed_local);
            let (secs, paging) = speed_run(&dir, s.speed_mem, local, a)
                .with_context(|| format!("speed run {} (paged: {paged})", rep + 1))?;
            println!(
                "  speed rep {}: {} {secs:.2} s{}",
                rep + 1,
                if paged { "paged    " } else { "all local" },
                if paged {
                    format!(
                        " ({} faults back, {} pages written back, {} zero-fill faults)",
                        paging["faults_back"],
                        paging["pages_written_back"],
                        paging["zero_fill_faults"]
                    )
                } else {
                    String::new()
                }
            );
            if paged {
                paged_s.push(secs);
                paged_paging.push(paging);
            } else {
                local_s.push(secs);
            }
        }
    }
    let (local_med, paged_med) = (median(&local_s), median(&paged_s));
    let slowdown = paged_med / local_med - 1.0;
    // What each fault back cost the guest, if the whole difference were theirs.
    let faults_back = median(
        &paged_paging
            .iter()
            .map(|p| f(&p["faults_back"]))
            .collect::<Vec<_>>(),
    );
    let us_per_fault_back =
        (faults_back > 0.0).then(|| (paged_med - local_med) * 1e6 / faults_back);
    println!(
        "  speed: medians {local_med:.2} s all local, {paged_med:.2} s paged; {faults_back:.0} \
         faults back per paged run, {} µs of the difference per fault back",
        us_per_fault_back.map_or("-".into(), |u| format!("{u:.0}"))
    );

    let (writeback, metadata) = write_back(&dir, &s).context("measuring write-back")?;
    let replicas = lose_a_replica(&dir, &s).context("losing a memserver with two replicas")?;
    println!(
        "  two replicas, one memserver killed: {} pages handed to the other in {} ms, VM \
         paused {} times, slowest fault {:.1} ms; {:.0} steps/s before, {:.0} after; \
         write-back with two copies {:.2} GB/s",
        replicas["failed_over_pages"],
        replicas["kill_to_failed_over_ms"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.1}")),
        replicas["holds"],
        f(&replicas["slowest_fault_us"]) / 1e3,
        f(&replicas["steps_per_s_before"]),
        f(&replicas["steps_per_s_after"]),
        f(&replicas["writeback_gb_per_s_two_copies"]),
    );
    let steal_pct = tsubame_qemu_peer::hoststat::steal_pct_since(cpu_at_start);
    let _ = std::fs::remove_dir_all(&dir);

    let p50 = f(&fault["p50_us"]);
    let p99 = f(&fault["p99_us"]);
    let wb = f(&writeback["writeback_gb_per_s"]);
    let meta = f(&metadata["metadata_share"]);
    let bars = [
        ("fault back p50 (µs)", p50, "<= 30", p50 <= 30.0),
        ("fault back p99 (µs)", p99, "<= 150", p99 <= 150.0),
        (
            "paged / all-local time - 1 (%)",
            slowdown * 100.0,
            "<= 5",
            slowdown <= 0.05,
        ),
        ("write-back (GB/s)", wb, ">= 1", wb >= 1.0),
        (
            "memserver metadata / data (%)",
            meta * 100.0,
            "<= 1",
            meta <= 0.01,
        ),
    ];
    let result = json!({
        "benchmark": "memserver",
        "machine": super::machine_info(),
        "quick": a.quick,
        "loopback": lo,
        "fault_back": fault,
        "speed": {
            "workload": a.speed_workload.to_string(),
            "mem_bytes": s.speed_mem,
            "local_bytes": s.speed_local,
            "steps": a.speed_steps,
            "all_local_s": local_s,
            "paged_s": paged_s,
            "all_local_median_s": local_med,
            "paged_median_s": paged_med,
            "slowdown": slowdown,
            "paged_remote_paging": paged_paging,
            "median_faults_back": faults_back,
            "difference_us_per_fault_back": us_per_fault_back,
        },
        "writeback": writeback,
        "metadata": metadata,
        "replicas": replicas,
        "bars": bars.iter().map(|b| json!({"measure": b.0, "value": b.1, "bar": b.2, "met": b.3}))
            .collect::<Vec<_>>(),
        "steal_pct": steal_pct,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = a.out.join("memserver.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let cdf: Vec<(f64, f64)> = fault["cdf"]
        .as_array()
        .map(|v| v.iter().map(|p| (f(&p[0]), f(&p[1]))).collect())
        .unwrap_or_default();
    let figures = plot::line_chart(
        &a.out.join("memserver-fault-cdf"),
        &Chart {
            title: "Faults back from a memserver over loopback".into(),
            x_label: "fault read -> installed (µs)".into(),
            y_label: "share of faults".into(),
            series: vec![Series {
                label: "fault back".into(),
                points: cdf,
            }],
            marks: vec![(lo.rtt_p50_us, "raw 4 KiB TCP round trip p50".into())],
        },
    )?;

    println!();
    println!("  {:<34} {:>10}  {:>8}", "measure", "value", "bar");
    for (name, value, bar, met) in &bars {
        println!(
            "  {name:<34} {value:>10.2}  {bar:>8}  {}",
            if *met { "met" } else { "missed" }
        );
    }
    println!(
        "  (raw 4 KiB TCP round trip p50 {:.1} µs, p99 {:.1} µs; both ends spinning p50 {:.1} \
         µs, p99 {:.1} µs; steal {})",
        lo.rtt_p50_us,
        lo.rtt_p99_us,
        lo.spinning_rtt_p50_us,
        lo.spinning_rtt_p99_us,
        steal_pct.map_or("-".into(), |s| format!("{s:.1} %"))
    );
    println!("  results written to {}", path.display());
    for fig in figures {
        println!("  figure: {}", fig.display());
    }
    println!("  bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_difference_of_two_distributions() {
        // 10 faults at 1..2 µs before; then 10 more at 1..2 µs and 80 at 8..16 µs.
        let before = json!({"demand_faults": 10, "demand_cdf": [[2.0, 1.0]]});
        let after = json!({"demand_faults": 100, "demand_cdf": [[2.0, 0.2], [16.0, 1.0]]});
        let w = window_counts(&before, &after);
        assert_eq!(w, vec![(2.0, 10), (16.0, 90)]);
        assert_eq!(percentile(&w, 0.1), Some(2.0));
        assert_eq!(percentile(&w, 0.5), Some(16.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
    }
}
