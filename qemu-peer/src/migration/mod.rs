//! One QEMU migration of the built-in guest, measured: the QEMU side of `tsubame bench migrate`.
//!
//! [`QemuMigration::start`] writes the guest image (the built-in guest with a
//! [`qemu_config_block`] for one vCPU, without exit bells so that QEMU keeps running when the
//! guest is done) and starts two QEMU processes on it, each with a QMP socket: the source boots
//! the guest, the destination waits with `-incoming defer`. Both get the migration capabilities
//! of the [`MigrationMode`] (plus `events`, so that QEMU reports every state change), the source
//! gets its bandwidth and downtime parameters, and the destination listens
//! (`migrate-incoming`). [`QemuMigration::run`] then:
//!
//! 1. waits until the guest runs its workload ([`MigrateAt`]; booting takes ~4 s here, SeaBIOS
//!    being emulated at CPL0), sampling its progress;
//! 2. issues `migrate` to the connect URI (which may be a link-emulating proxy in front of the
//!    destination's listen address), and for postcopy `migrate-start-postcopy`, at once or after
//!    [`QemuMigrationConfig::postcopy_after`] of precopy;
//! 3. samples the guest's step counter (mailbox slot of CPU 0) every few milliseconds on
//!    whichever QEMU runs the guest: the source until its `STOP` event, the destination from its
//!    `RESUME` event on;
//! 4. once both sides report `completed`, reads `query-migrate` on both (statistics, blocktime);
//! 5. lets the destination guest finish its steps and digests its memory (`pmemsave` to a file,
//!    hashed with [`digest_ranges`] in the layout [`GuestMemory::digest`] uses).
//!
//! Times in the result are seconds relative to the `migrate` command (samples taken while
//! waiting for the guest are negative). Event times are QEMU's own timestamps (wall clock, µs),
//! so "STOP on the source → RESUME on the destination" is measured by QEMU, not by our polling.
//!
//! **Progress probes.** HMP `xp` through QMP `human-monitor-command` ([`ProgressProbe::Hmp`])
//! costs 1.0–1.3 ms per sample here (a QMP round trip, a temporary HMP monitor, the big QEMU
//! lock), which limits sampling to a few hundred per second and takes CPU from a 2-core machine
//! during the migration. The default, [`ProgressProbe::ProcMem`], asks HMP once for the host
//! address of the mailbox (`gpa2hva`) and then reads it with `pread` on `/proc/PID/mem`: 3 µs on
//! an idle machine, 15–45 µs measured by this loop on the busy 2-core one, and no work for QEMU.
//! Both read the same counters; the result says which was used and what a sample cost on average.
//! A destination is read only after its `RESUME` event: a read of its RAM between QEMU's
//! postcopy discard and its userfaultfd registration maps a zero page, and QEMU's
//! `postcopy_place_page` then fails with EEXIST and the migration with it (seen here).
//!
//! **What QEMU 7.2 does here** (measured with this module, 1 GiB guest, 700 MiB touched):
//! - Its default `max-bandwidth` is 128 MiB/s (not the 32 MiB/s of older QEMUs); this module
//!   sets [`UNLIMITED_BANDWIDTH`]. `max-postcopy-bandwidth` 0 means unlimited.
//! - Units: `total-time`, `downtime`, `setup-time`, `postcopy-blocktime` and
//!   `postcopy-vcpu-blocktime` in ms; `ram.*` in bytes or pages; `ram.mbps` in megabits/s.
//! - In postcopy its `downtime` (1–2 ms) ends when the source has sent the device state; the
//!   guest runs again on the destination 9–20 ms after it stopped (`STOP` → `RESUME`), which
//!   is [`QemuMigrationResult::downtime_observed_ms`].
//! - `postcopy-preempt` exists (7.1+) and works over TCP.
//! - After postcopy the destination's RAM is all 4 KiB pages (QEMU places pages with THP off:
//!   0 kB `AnonHugePages` against 729 MB after precopy), so a random-access workload runs at
//!   about half speed for seconds after the migration completed, until khugepaged catches up:
//!   [`QemuMigrationResult::time_to_full_speed`] shows it.
//!
//! **Digests** (all in the format of [`GuestMemory::digest`], see [`digest_ranges`]). Measured
//! with memory dumps here: two QEMU boots of the same guest, run to the same step, differ in 5
//! pages, all SeaBIOS's and all boot-timing dependent: the BIOS tick count at 0x46c, SeaBIOS
//! variables at 0xe8000, and its temporary allocations in the 128 KiB below 16 MiB under the top
//! of low RAM. A Tsubame VM differs from QEMU further in what the firmware and QEMU's multiboot
//! loader write (the first MiB, the multiboot command line on the page after the image, the
//! last 128 KiB of RAM); the guest's own memory matches byte for byte. Hence three digests:
//! - [`MemoryDigests::ram`]: all of RAM, exactly [`GuestMemory::digest`]; equal only for the
//!   same boot, so not an oracle between runs;
//! - [`MemoryDigests::ram_without_firmware`]: all RAM except the first MiB and SeaBIOS's scratch
//!   zone ([`ranges_without_firmware`]): the oracle between QEMU runs, migrated or not;
//! - [`MemoryDigests::workload`]: what the workload alone determines ([`workload_ranges`]: the
//!   mailbox, the guest's page tables, its version table, its working set): the oracle between
//!   QEMU and a Tsubame VM ([`workload_digest`]).
//!
//! **Where things are.** This module holds the settings ([`QemuMigrationConfig`],
//! [`MigrationMode`], ...) and the error type; its submodules, whose public items it
//! re-exports: `qmp` (the QMP client and the HMP output parsers), `vm` (one QEMU process of a
//! run and its directory), `run` ([`QemuMigration`] and [`run_unmigrated`]), `results` (what a
//! run reports, and the step-rate helpers) and `digest` (the memory ranges and their digests).
//!
//! [`qemu_config_block`]: crate::guest::qemu_config_block
//! [`GuestMemory::digest`]: tsubame_vmm::memory::GuestMemory::digest

mod digest;
mod qmp;
mod results;
mod run;
mod vm;

pub use digest::{
    digest_ranges, ranges_without_firmware, workload_digest, workload_ranges, MemoryDigests,
    FIRMWARE_LOW_END, PAGE_TABLES_BYTES, PAGE_TABLES_GPA, SEABIOS_SCRATCH_BELOW_TOP,
    SEABIOS_SCRATCH_BYTES,
};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use results::{
    step_rate, time_to_full_speed, time_to_rate, EventRecord, ProgressSample, QemuMigrationResult,
    RamStats, UnmigratedRun, BASELINE_WINDOW_S, FULL_SPEED_FRACTION, FULL_SPEED_WINDOW_S,
};
pub use run::{run_unmigrated, QemuMigration};

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::guest::{QemuConfigError, QemuError, QEMU_BINARY};
use tsubame_vmm::guest::{ImageError, WorkloadSpec};
use tsubame_vmm::memory::MemoryError;

/// `max-bandwidth` for "unlimited": QEMU 7.2's default is 128 MiB/s (older ones: 32 MiB/s).
pub const UNLIMITED_BANDWIDTH: u64 = i64::MAX.unsigned_abs();

/// Which kind of migration QEMU performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Plain precopy: QEMU copies and re-copies dirty pages until the rest fits in
    /// `downtime-limit`, then stops the source and sends the rest.
    Precopy,
    /// Postcopy (`postcopy-ram`, `postcopy-blocktime`): after `migrate-start-postcopy` the
    /// destination runs and faults missing pages in from the source.
    Postcopy,
    /// Postcopy with `postcopy-preempt`: page requests travel on their own channel instead of
    /// queueing behind the background stream (QEMU 7.1+).
    PostcopyPreempt,
}

impl MigrationMode {
    /// The QEMU migration capabilities this mode turns on, on both sides (besides `events`).
    pub fn capabilities(self) -> &'static [&'static str] {
        match self {
            Self::Precopy => &[],
            Self::Postcopy => &["postcopy-ram", "postcopy-blocktime"],
            Self::PostcopyPreempt => &["postcopy-ram", "postcopy-blocktime", "postcopy-preempt"],
        }
    }

    /// Whether this mode switches to postcopy.
    pub fn is_postcopy(self) -> bool {
        self != Self::Precopy
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::PostcopyPreempt => "postcopy-preempt",
        })
    }
}

impl FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Self::Precopy),
            "postcopy" => Ok(Self::Postcopy),
            "postcopy-preempt" => Ok(Self::PostcopyPreempt),
            _ => Err(format!(
                "unknown QEMU migration mode '{s}': use precopy, postcopy or postcopy-preempt"
            )),
        }
    }
}

/// When to issue `migrate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrateAt {
    /// Once the guest has done at least this many steps.
    Steps(u64),
    /// This long after the guest's workload started (its first step was seen).
    Running(Duration),
}

/// How the guest's progress counters are read from QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgressProbe {
    /// `/proc/PID/mem` at the mailbox's host address (HMP `gpa2hva`, asked once): ~3 µs per
    /// sample, no QEMU involvement. Falls back to [`ProgressProbe::Hmp`] if that is impossible.
    ProcMem,
    /// HMP `xp /2gx` through QMP `human-monitor-command`: ~1 ms of QEMU's main thread each.
    Hmp,
}

/// Which side of the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Source,
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::Destination => "destination",
        })
    }
}

/// What to migrate and how; [`QemuMigrationConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct QemuMigrationConfig {
    /// `qemu-system-x86_64`; `None` looks it up on `PATH`
    /// ([`find_qemu`](crate::guest::find_qemu)).
    pub qemu_binary: Option<PathBuf>,
    /// Guest RAM (`-m`), a multiple of 8 KiB.
    pub mem_bytes: u64,
    pub workload: WorkloadSpec,
    /// Steps of the guest's one vCPU; 0 runs forever (then there is no final digest).
    pub steps: u64,
    /// Steps between the guest's serial progress lines; 0 = never.
    pub report_every: u64,
    pub mode: MigrationMode,
    pub migrate_at: MigrateAt,
    /// Postcopy modes: precopy time between `migrate` and `migrate-start-postcopy` (zero: at
    /// once). If precopy converges first, the migration completes without a postcopy phase.
    pub postcopy_after: Duration,
    /// Bytes/s for `max-bandwidth` (and `max-postcopy-bandwidth`); `None` = unlimited.
    pub max_bandwidth: Option<u64>,
    /// `downtime-limit` in ms for precopy's convergence; `None` keeps QEMU's 300 ms.
    pub downtime_limit_ms: Option<u64>,
    /// Where the destination listens: `tcp:HOST:PORT` (port 0: any free port).
    pub listen: String,
    /// Where the source connects (`tcp:HOST:PORT`), e.g. a proxy that forwards to `listen`;
    /// `None` connects to the destination's actual listen address.
    pub connect: Option<String>,
    /// Interval of the progress samples.
    pub sample_every: Duration,
    pub probe: ProgressProbe,
    /// After the migration, let the guest finish its steps and digest the destination's memory.
    pub digest: bool,
    /// After the migration, keep sampling the destination at least this long (also without
    /// `digest`).
    pub observe_after: Duration,
    /// Where the image, QMP sockets, serial output and memory dumps go (must exist).
    pub work_dir: PathBuf,
    /// Upper bound for the whole run (boot, migration, finishing, digest).
    pub timeout: Duration,
}

impl QemuMigrationConfig {
    /// Postcopy at once, when the guest has done a third of its steps (or 1 s after it started
    /// when it runs forever), unlimited bandwidth, QEMU's downtime limit, listening on a free
    /// loopback port, samples every 5 ms through `/proc/PID/mem`, digest when `steps` > 0.
    pub fn new(mem_bytes: u64, workload: WorkloadSpec, steps: u64, work_dir: PathBuf) -> Self {
        Self {
            qemu_binary: None,
            mem_bytes,
            workload,
            steps,
            report_every: 0,
            mode: MigrationMode::Postcopy,
            migrate_at: if steps > 0 {
                MigrateAt::Steps(steps / 3)
            } else {
                MigrateAt::Running(Duration::from_secs(1))
            },
            postcopy_after: Duration::ZERO,
            max_bandwidth: None,
            downtime_limit_ms: None,
            listen: "tcp:127.0.0.1:0".into(),
            connect: None,
            sample_every: Duration::from_millis(5),
            probe: ProgressProbe::ProcMem,
            digest: steps > 0,
            observe_after: Duration::from_secs(1),
            work_dir,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Errors of a QEMU migration run.
#[derive(Debug, thiserror::Error)]
pub enum QemuMigrationError {
    #[error(
        "{QEMU_BINARY} is not on PATH: run scripts/setup.sh (or apt-get install -y \
         qemu-system-x86), or set qemu_binary"
    )]
    NoQemu,
    #[error("bad QEMU migration settings: {0}")]
    Config(String),
    #[error(transparent)]
    GuestConfig(#[from] QemuConfigError),
    #[error("building the guest image: {0}")]
    Image(#[from] ImageError),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error("QEMU ({side}): {source}")]
    Qmp {
        side: Side,
        #[source]
        source: QmpError,
    },
    #[error("QEMU ({side}) exited unexpectedly ({status}); its stderr:\n{stderr}")]
    Exited {
        side: Side,
        status: String,
        stderr: String,
    },
    #[error(
        "this QEMU ({version}) has no migration capability `{capability}`, which mode {mode} \
         needs; use another mode or a newer QEMU"
    )]
    Unsupported {
        version: String,
        capability: String,
        mode: MigrationMode,
    },
    #[error("QEMU migration failed ({side} status {status}): {desc}")]
    MigrationFailed {
        side: Side,
        status: String,
        desc: String,
    },
    #[error(
        "the guest ({side}) found a bad page: {kind} at gfn {gfn:#x} (expected version \
         {expected}, found {found})"
    )]
    GuestVerify {
        side: Side,
        kind: &'static str,
        gfn: u64,
        expected: u64,
        found: u64,
    },
    #[error(
        "the guest finished all {steps} steps before the migration began; raise steps or \
         migrate earlier"
    )]
    FinishedTooEarly { steps: u64 },
    #[error("timed out after {after:?} while {what}")]
    Timeout { what: String, after: Duration },
    #[error("reading the guest's memory dump: {0}")]
    Dump(#[from] MemoryError),
}

type Result<T, E = QemuMigrationError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            MigrationMode::Precopy,
            MigrationMode::Postcopy,
            MigrationMode::PostcopyPreempt,
        ] {
            assert_eq!(mode.to_string().parse::<MigrationMode>(), Ok(mode));
            assert_eq!(serde_json::to_value(mode).unwrap(), json!(mode.to_string()));
        }
        assert!("postcopy-fast".parse::<MigrationMode>().is_err());
        assert!(MigrationMode::PostcopyPreempt
            .capabilities()
            .contains(&"postcopy-preempt"));
        assert!(!MigrationMode::Precopy.is_postcopy());
    }
}
