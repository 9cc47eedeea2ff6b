//! The QEMU side of `tsubame bench migrate`: one QEMU migration of the same built-in guest
//! (`tsubame_qemu_peer::migration`), optionally through `linkem`, turned into the
//! figures Tsubame's runs report so that the two compare row by row. The full QEMU result
//! (events, RAM statistics, blocktime) goes into the run's JSON file as well.
//!
//! How the figures map: downtime is QEMU's source `STOP` to destination `RESUME` (QEMU's own
//! `downtime` in postcopy ends when the device state is sent); total time runs from the
//! switchover (`STOP`) to the destination's `completed`, and with the precopy before it from
//! the `migrate` command; demand faults are `postcopy-requests`; QEMU has no per-fault latency,
//! so its blocktime per request stands in (`blocktime_per_request_us`).

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tsubame_qemu_peer::migration::{
    MigrateAt, MigrationMode, QemuMigration, QemuMigrationConfig, QemuMigrationResult,
};

use super::tsubame::{time_to_full_speed, MigrationResult, MigrationSetup};
use crate::linkem::{self, LinkParams};

/// Runs one QEMU migration of `setup`'s guest in `mode`.
#[allow(clippy::cast_precision_loss)]
pub fn migrate(
    setup: &MigrationSetup,
    mode: MigrationMode,
    dir: &Path,
) -> Result<(MigrationResult, QemuMigrationResult)> {
    // A free port for the destination, so that a link emulator can stand in front of it.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let mut cfg = QemuMigrationConfig::new(
        setup.mem_bytes,
        setup.workload.parse()?,
        setup.steps,
        dir.to_path_buf(),
    );
    cfg.mode = mode;
    cfg.migrate_at = MigrateAt::Steps(setup.migrate_at_steps);
    cfg.listen = format!("tcp:{listen}");
    cfg.sample_every = Duration::from_millis(2);
    cfg.observe_after = Duration::from_millis(300);
    cfg.timeout = Duration::from_secs(600);
    let _link = if setup.delay_ms > 0.0 || setup.rate_bits.is_some() {
        let (addr, handle) = linkem::spawn(
            "127.0.0.1:0".parse().expect("address"),
            listen.parse().expect("address"),
            LinkParams {
                delay: Duration::from_secs_f64(setup.delay_ms / 1e3),
                rate: setup.rate_bits,
                buffer: None,
            },
        )?;
        cfg.connect = Some(format!("tcp:{addr}"));
        Some(handle)
    } else {
        None
    };
    let q = QemuMigration::start(&cfg)
        .context("starting QEMU (scripts/setup.sh installs qemu-system-x86)")?
        .run()?;
    let series = q.series();
    // The same baseline as Tsubame's runs: the guest's speed over the part of its second pass
    // before the migration.
    let sample_at = |steps: u64| series.iter().find(|s| s.1 >= steps).copied();
    let baseline = match (
        sample_at(setup.baseline_from_steps),
        series.iter().rev().find(|s| s.1 <= setup.migrate_at_steps),
    ) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0),
        _ => q.baseline_rate.unwrap_or(0.0),
    };
    let switchover = q.switchover.unwrap_or(0.0);
    let done = q
        .destination_completed
        .or(q.source_completed)
        .unwrap_or(switchover);
    let requests = q.ram.postcopy_requests.unwrap_or(0);
    let blocktime_ms = q.postcopy_blocktime_ms.unwrap_or(0) as f64;
    let total_ms = (done - switchover).max(0.0) * 1e3;
    let transferred = q.ram.transferred.unwrap_or(0);
    let downtime_us = q.downtime_observed_ms.unwrap_or(f64::NAN) * 1e3;
    let result = MigrationResult {
        precopy_ms: switchover * 1e3,
        downtime_source_us: q.downtime_ms.map_or(f64::NAN, |d| d as f64 * 1e3),
        downtime_destination_us: f64::NAN,
        downtime_us,
        total_ms,
        total_with_precopy_ms: done * 1e3,
        push_ms: done * 1e3,
        push_gb_per_s: if done > 0.0 {
            transferred as f64 / done / 1e9
        } else {
            0.0
        },
        bytes_sent: transferred,
        pages_precopy: 0,
        pages_demand: requests,
        pages_pushed: q.ram.normal.unwrap_or(0),
        pages_duplicate: 0,
        zero_pages: q.ram.duplicate.unwrap_or(0),
        faults: requests,
        demand_requests: requests,
        demand_p50_us: f64::NAN,
        demand_p99_us: f64::NAN,
        demand_max_us: f64::NAN,
        demand_cdf: Vec::new(),
        blocktime_per_request_us: if requests > 0 {
            Some(blocktime_ms * 1e3 / requests as f64)
        } else {
            None
        },
        baseline_steps_per_s: baseline,
        time_to_full_speed_ms: time_to_full_speed(&series, switchover, baseline, 0.05, 0.9)
            .map(|s| s * 1e3),
        progress: series,
        switchover_s: switchover,
        steal_pct: q.steal_pct,
        digest: q.digests.map(|d| d.workload.to_string()),
        consolidation: None,
    };
    Ok((result, q))
}
