//! QEMU migrates the built-in guest, measured by `tsubame_qemu_peer::migration`: postcopy
//! and precopy both complete, the guest finishes on the destination, and the destination's
//! memory is what a QEMU run that never migrated leaves (all RAM but the firmware's), and in the
//! workload's memory what a Tsubame VM leaves. A migration to nowhere fails with QEMU's reason.
//!
//! QEMU is the peer Tsubame's migration is measured against; CI installs it (scripts/setup.sh).
//! These tests skip, saying why, only when `qemu-system-x86_64` is not installed. They never
//! assert on timings: the machine is shared.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use tsubame_qemu_peer::guest::find_qemu;
use tsubame_qemu_peer::migration::{
    run_unmigrated, workload_digest, MigrateAt, MigrationMode, QemuMigration, QemuMigrationConfig,
    QemuMigrationError, QemuMigrationResult, Side, UnmigratedRun,
};
use tsubame_tests::scratch_dir;
use tsubame_vmm::{Digest, SerialOutput, Vm, VmConfig, WaitOutcome};

const MEM_BYTES: u64 = 256 << 20;
const WORKLOAD: &str = "hotcold:ws=64M,write=0.3,seed=7";
/// ~2-3 s of workload here after a ~4 s boot.
const STEPS: u64 = 4_000_000;
const TIMEOUT: Duration = Duration::from_secs(120);

/// The QEMU binary, or `None` after saying why the test skips.
fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let qemu = find_qemu();
    if qemu.is_none() {
        eprintln!(
            "SKIPPED {test}: qemu-system-x86_64 is not installed (run scripts/setup.sh or \
             apt-get install -y qemu-system-x86)"
        );
    }
    qemu
}

fn config(qemu: PathBuf, dir: &Path, mode: MigrationMode) -> Result<QemuMigrationConfig> {
    let mut cfg = QemuMigrationConfig::new(MEM_BYTES, WORKLOAD.parse()?, STEPS, dir.into());
    cfg.qemu_binary = Some(qemu);
    cfg.mode = mode;
    cfg.migrate_at = MigrateAt::Steps(STEPS / 3);
    cfg.timeout = TIMEOUT;
    Ok(cfg)
}

/// What the migrated guests are compared with.
struct Reference {
    qemu: UnmigratedRun,
    /// The workload digest of a Tsubame VM that ran the same workload in this process.
    tsubame_workload: Digest,
}

/// Runs the references once for all tests: QEMU without migration and a Tsubame VM, side by
/// side.
fn reference(qemu: &Path) -> Result<&'static Reference> {
    static REFERENCE: OnceLock<Result<Reference, String>> = OnceLock::new();
    REFERENCE
        .get_or_init(|| {
            let make = || -> Result<Reference> {
                let dir = scratch_dir("qmig-ref")?;
                let cfg = config(qemu.into(), &dir, MigrationMode::Postcopy)?;
                let (qemu_run, tsubame) = std::thread::scope(|s| {
                    let q = s.spawn(|| run_unmigrated(&cfg));
                    let t = s.spawn(tsubame_workload_digest);
                    (q.join(), t.join())
                });
                let qemu_run = qemu_run
                    .map_err(|_| anyhow!("the QEMU reference run panicked"))?
                    .context("running the guest in QEMU without migrating it")?;
                let tsubame_workload = tsubame
                    .map_err(|_| anyhow!("the Tsubame reference run panicked"))?
                    .context("running the guest in a Tsubame VM")?;
                eprintln!(
                    "reference: QEMU {} ran {} steps ({:.0} steps/s, boot {:.1?} s), digests \
                     {:?}; Tsubame workload digest {tsubame_workload}",
                    qemu_run.qemu_version,
                    qemu_run.final_steps,
                    qemu_run.rate.unwrap_or(0.0),
                    qemu_run.boot_s.unwrap_or(0.0),
                    qemu_run.digests
                );
                std::fs::remove_dir_all(&dir)?;
                Ok(Reference {
                    qemu: qemu_run,
                    tsubame_workload,
                })
            };
            make().map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// The same workload in a Tsubame VM (one vCPU, same config block as under QEMU).
fn tsubame_workload_digest() -> Result<Digest> {
    let cfg = VmConfig {
        mem_bytes: MEM_BYTES,
        vcpus: 1,
        workload: WORKLOAD.parse()?,
        steps: STEPS,
        report_every: 0,
        verify_at_end: true,
        serial: SerialOutput::Discard,
    };
    let vm = Vm::new(&cfg)?;
    vm.resume()?;
    ensure!(
        vm.wait_finished(TIMEOUT) == WaitOutcome::Reached,
        "the Tsubame VM did not finish: {:?}",
        vm.status()
    );
    vm.pause()?;
    Ok(workload_digest(vm.memory())?)
}

/// The result without its samples and raw answers, for the log.
fn summary(r: &QemuMigrationResult) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        for key in ["samples", "events", "source_query", "destination_query"] {
            o.remove(key);
        }
    }
    let on = |side| r.samples.iter().filter(|s| s.side == side).count();
    format!(
        "{v}\n{} samples on the source, {} on the destination",
        on(Side::Source),
        on(Side::Destination)
    )
}

fn migrate_and_check(test: &str, mode: MigrationMode) -> Result<Option<QemuMigrationResult>> {
    let Some(qemu) = qemu_or_skip(test) else {
        return Ok(None);
    };
    let reference = reference(&qemu)?;
    let dir = scratch_dir(test)?;
    let cfg = config(qemu, &dir, mode)?;
    let result = QemuMigration::start(&cfg)
        .context("starting the source and destination QEMUs")?
        .run()
        .with_context(|| format!("migrating the guest between two QEMUs ({mode})"))?;
    eprintln!("{test}: {}", summary(&result));

    ensure!(
        result.source_completed.is_some() && result.destination_completed.is_some(),
        "both sides should report completed: {:?}",
        result.events
    );
    ensure!(
        result.switchover.is_some() && result.resumed.is_some(),
        "no STOP on the source or RESUME on the destination: {:?}",
        result.events
    );
    ensure!(
        result.final_steps == STEPS,
        "the guest should finish its {STEPS} steps on the destination, not {}",
        result.final_steps
    );
    ensure!(
        result.steps_at_migrate >= STEPS / 3 && result.steps_at_migrate < STEPS,
        "migrated at {} steps",
        result.steps_at_migrate
    );
    let before = result
        .samples
        .iter()
        .filter(|s| s.side == Side::Source && s.t <= 0.0 && s.steps > 0)
        .count();
    let after = result
        .samples
        .iter()
        .filter(|s| s.side == Side::Destination && s.t > 0.0)
        .count();
    ensure!(
        before > 0 && after > 0,
        "progress samples on both sides: {before} on the source, {after} on the destination"
    );
    ensure!(
        result.samples.windows(2).all(|w| w[0].steps <= w[1].steps),
        "the guest's steps never go back across the migration"
    );
    ensure!(result.ram.transferred.unwrap_or(0) > 0, "nothing was sent");

    let digests = result.digests.context("the run should digest")?;
    ensure!(
        digests.ram_without_firmware == reference.qemu.digests.ram_without_firmware,
        "the migrated guest's memory differs from a QEMU run that never migrated: {} vs {}",
        digests.ram_without_firmware,
        reference.qemu.digests.ram_without_firmware
    );
    ensure!(
        digests.workload == reference.qemu.digests.workload,
        "the workload's memory differs from a QEMU run that never migrated"
    );
    ensure!(
        digests.workload == reference.tsubame_workload,
        "the workload's memory differs from a Tsubame VM's: {} vs {}",
        digests.workload,
        reference.tsubame_workload
    );

    let left: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    ensure!(left.is_empty(), "files left behind: {left:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(Some(result))
}

#[test]
fn qemu_postcopy_migration_keeps_the_guest_deterministic() -> Result<()> {
    let Some(result) = migrate_and_check("qmig-postcopy", MigrationMode::Postcopy)? else {
        return Ok(());
    };
    ensure!(result.postcopy_started, "QEMU never entered postcopy");
    ensure!(
        result.postcopy_blocktime_ms.is_some() || result.ram.postcopy_requests.unwrap_or(0) > 0,
        "no sign of a postcopy phase (blocktime, page requests): {}",
        result.destination_query
    );
    ensure!(
        result.postcopy_requested.is_some(),
        "migrate-start-postcopy"
    );
    Ok(())
}

#[test]
fn qemu_precopy_migration_keeps_the_guest_deterministic() -> Result<()> {
    let Some(result) = migrate_and_check("qmig-precopy", MigrationMode::Precopy)? else {
        return Ok(());
    };
    ensure!(!result.postcopy_started && result.postcopy_requested.is_none());
    ensure!(
        result.ram.postcopy_requests.unwrap_or(0) == 0,
        "precopy has no page requests"
    );
    Ok(())
}

#[test]
fn qemu_migration_to_nowhere_fails_with_qemus_reason() -> Result<()> {
    let Some(qemu) = qemu_or_skip("qmig-nowhere") else {
        return Ok(());
    };
    let dir = scratch_dir("qmig-nowhere")?;
    let mut cfg = config(qemu, &dir, MigrationMode::Postcopy)?;
    // Nothing listens on port 1 (only root could, and nothing does here).
    cfg.connect = Some("tcp:127.0.0.1:1".into());
    cfg.migrate_at = MigrateAt::Steps(1);
    let err = QemuMigration::start(&cfg)?
        .run()
        .expect_err("a migration to a closed port cannot succeed");
    eprintln!("migration to nowhere: {err}");
    match &err {
        QemuMigrationError::MigrationFailed { side, desc, .. } => {
            ensure!(*side == Side::Source, "{err}");
            ensure!(!desc.is_empty(), "{err}");
        }
        QemuMigrationError::Qmp { side, .. } => ensure!(*side == Side::Source, "{err}"),
        other => return Err(anyhow!("unexpected error: {other}")),
    }
    let left: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    ensure!(left.is_empty(), "files left behind: {left:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn missing_qemu_is_explained() {
    let dir = std::env::temp_dir();
    let mut cfg =
        QemuMigrationConfig::new(MEM_BYTES, WORKLOAD.parse().expect("workload"), STEPS, dir);
    cfg.qemu_binary = Some("/nonexistent/qemu-system-x86_64".into());
    let err = QemuMigration::start(&cfg).expect_err("no such QEMU");
    let text = err.to_string();
    assert!(text.contains("apt-get install"), "{text}");
}
