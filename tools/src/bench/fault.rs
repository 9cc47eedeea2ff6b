//! `tsubame bench fault`: the demand path alone (guest fault -> request -> page -> install),
//! against the limits measured in the same run: the loopback TCP round trip, a host thread's
//! local userfaultfd fault, and a guest whose pages an in-process handler serves (the local
//! floor). The guest-side bar: stall per demand-faulted page <= local floor + 1.5 x round trip.
//! The engine's latency over the network is also set against its latency for the local
//! floor's faults (reading the page from a file instead of asking a server), so what the
//! network adds stands next to the round trip.
//!
//! The guest runs a sequential workload over its working set: after the first pass every step
//! touches the next page, so with no background push (`prepage=none`) every step is one demand
//! fault, and the guest's time per step minus its time per step with the page local is the
//! stall per page.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use super::raw;
use super::tsubame::{self, MigrationSetup};

/// Measure the demand path (fault -> request -> page -> install) against the physical limits.
///
/// Example: tsubame bench fault --mem 1G --ws 700M --pages 5000 --json fault.json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct FaultBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// Working set of the sequential workload (all of it is written before migrating).
    #[arg(long, default_value = "700M", value_parser = crate::run::parse_mem)]
    pub ws: u64,
    /// Demand-faulted pages to time in each guest measurement.
    #[arg(long, default_value_t = 5000)]
    pub pages: u64,
    /// Also write the results here as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Steps skipped after the restore/switchover before timing (the guest's first faults also
/// bring in its code, page tables and version table).
const SKIP: u64 = 500;

#[allow(clippy::cast_precision_loss)]
pub fn bench_fault(a: &FaultBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let dir = std::env::temp_dir().join(format!("tsubame-bench-fault-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let workload = format!("seq:ws={}M,write=1.0,seed=3", a.ws >> 20);
    let ws_pages = a.ws / 4096;
    println!(
        "demand-path benchmark: {workload} on {} MiB, {} timed faults per guest measurement",
        a.mem >> 20,
        a.pages
    );

    let cpu_at_start = tsubame_qemu_peer::hoststat::CpuTimes::now();
    let lo = raw::loopback(20_000, 1 << 30).context("measuring loopback TCP")?;
    println!(
        "  loopback TCP: 4 KiB round trip p50 {:.1} µs, p99 {:.1} µs (both ends spinning: p50 \
         {:.1} µs, p99 {:.1} µs); {:.2} GB/s",
        lo.rtt_p50_us,
        lo.rtt_p99_us,
        lo.spinning_rtt_p50_us,
        lo.spinning_rtt_p99_us,
        lo.throughput_gb_per_s
    );
    let host = raw::host_floor(20_000).context("measuring the host-thread floor")?;
    println!(
        "  local uffd, host thread: {:.1} µs per page (engine p50 {:.1} µs, p99 {:.1} µs)",
        host.host_thread_us_per_page, host.host_engine_p50_us, host.host_engine_p99_us
    );
    let guest = raw::guest_floor(a.mem, &workload, &dir, SKIP, a.pages)
        .context("measuring the guest's local floor")?;
    let local_step_us = 1e6 / guest.local_steps_per_s;
    let floor_us = guest.faulting_step_us - local_step_us;
    println!(
        "  local uffd, guest: {floor_us:.1} µs stall per page ({:.1} µs per step, {local_step_us:.2} µs with the page local); \
         engine p50 {:.1} µs, p99 {:.1} µs",
        guest.faulting_step_us, guest.engine_p50_us, guest.engine_p99_us
    );
    let setup = MigrationSetup {
        mem_bytes: a.mem,
        vcpus: 1,
        workload: workload.clone(),
        steps: 0,
        migrate_at_steps: ws_pages + 1000,
        baseline_from_steps: ws_pages,
        prepage: "none".into(),
        precopy_rounds: 0,
        delay_ms: 0.0,
        rate_bits: None,
        checkpoint_ms: None,
        report_every: 0,
        split: None,
    };
    let (net_step_us, engine) = tsubame::demand_stall(&setup, &dir, SKIP, a.pages)
        .context("measuring Tsubame's demand path")?;
    let stall_us = net_step_us - local_step_us;
    let bar = floor_us + 1.5 * lo.rtt_p50_us;
    let p50 = engine["demand_p50_us"].as_f64().unwrap_or(0.0);
    let p99 = engine["demand_p99_us"].as_f64().unwrap_or(0.0);
    println!(
        "  Tsubame over loopback, guest: {stall_us:.1} µs stall per page ({net_step_us:.1} µs per step); \
         bar (floor + 1.5 x RTT) {bar:.1} µs: {}",
        if stall_us <= bar { "met" } else { "missed" }
    );
    println!(
        "  Tsubame over loopback, engine: fault read -> installed p50 {p50:.1} µs, p99 {p99:.1} µs \
         over {} faults (bars 40 / 200 µs); p50 = local engine p50 + {:.1} µs, against a \
         round trip of {:.1} µs",
        engine["faults"],
        p50 - guest.engine_p50_us,
        lo.rtt_p50_us
    );
    let steal_pct = tsubame_qemu_peer::hoststat::steal_pct_since(cpu_at_start);
    if let Some(s) = steal_pct {
        println!("  CPU time taken by the hypervisor (steal) during these measurements: {s:.1} %");
    }
    let result = json!({
        "benchmark": "fault",
        "machine": super::machine_info(),
        "config": {"mem_bytes": a.mem, "workload": workload, "timed_pages": a.pages},
        "loopback": lo,
        "local_floor": host,
        "guest_local_steps_per_s": guest.local_steps_per_s,
        "guest_floor": guest,
        "guest_floor_stall_us": floor_us,
        "guest_network_stall_us": stall_us,
        "guest_stall_bar_us": bar,
        "engine": engine,
        "steal_pct": steal_pct,
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  results written to {}", path.display());
    }
    Ok(0)
}
