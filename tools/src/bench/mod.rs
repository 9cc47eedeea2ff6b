//! `tsubame bench`: measurements printed as a table and written as JSON.
//!
//! - `bench guest`: the guest workload against the same work done natively.
//! - `bench fault`: the demand path alone (fault -> request -> page -> install), against the
//!   physical limits measured in the same run.
//! - `bench migrate`: whole migrations of one guest, each configuration, side by side.
//! - `bench checkpoint`: cancellable postcopy: checkpoint pauses, guest slowdown against the
//!   dirty-tracking floor, output delay, cancel and kill recovery, total time against plain
//!   postcopy.
//! - `bench memserver`: remote paging under a local limit against a memserver: fault-back
//!   latency against the raw round trip, guest speed, write-back, memserver metadata.
//! - `bench switch`: `migrate-switch` during the precopy rounds: switch time, pages the source
//!   still sends, time to completion against cancelling and migrating again, both senders.

use serde_json::json;

mod checkpoint;
mod fault;
mod guest;
mod memserver;
mod migrate;
mod plot;
mod qemu;
mod raw;
mod switch;
mod tsubame;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    Guest(guest::GuestBenchArgs),
    Checkpoint(checkpoint::CheckpointBenchArgs),
    Fault(fault::FaultBenchArgs),
    Migrate(migrate::MigrateBenchArgs),
    Memserver(memserver::MemserverBenchArgs),
    Switch(switch::SwitchBenchArgs),
}

pub fn bench(cmd: BenchCommand) -> anyhow::Result<i32> {
    match cmd {
        BenchCommand::Guest(a) => guest::bench_guest(&a),
        BenchCommand::Checkpoint(a) => checkpoint::bench_checkpoint(&a),
        BenchCommand::Fault(a) => fault::bench_fault(&a),
        BenchCommand::Migrate(a) => migrate::bench_migrate(&a),
        BenchCommand::Memserver(a) => memserver::bench_memserver(&a),
        BenchCommand::Switch(a) => switch::bench_switch(&a),
    }
}

pub fn machine_info() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "tsubame": env!("CARGO_PKG_VERSION"),
    })
}
