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

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use crate::guest::{
    find_qemu, qemu_config_block, qemu_layout, QemuConfigError, QemuError, QemuGuest, RunningQemu,
    QEMU_BINARY,
};
use tsubame_vmm::guest::{
    abi, image_with_config, read_config, ImageError, WorkloadSpec, GUEST_IMAGE,
};
use tsubame_vmm::memory::{
    Digest, Gpa, GuestMemory, MemoryError, MemoryLayout, RegionLayout, PAGE_SIZE,
};

/// Where the guest's boot code builds its page tables (`TSB_PT_GPA` in `vmm/guest/abi.h`).
pub const PAGE_TABLES_GPA: u64 = 0x20_0000;
/// Bytes reserved for them (`TSB_PT_PAGES` pages).
pub const PAGE_TABLES_BYTES: u64 = 256 * PAGE_SIZE;

/// Below this address the firmware (SeaBIOS: IVT, BDA, EBDA, ROM shadows) owns memory.
pub const FIRMWARE_LOW_END: u64 = 1 << 20;
/// SeaBIOS's temporary allocations (measured under QEMU 7.2 with 256 MiB to 1 GiB): the
/// [`SEABIOS_SCRATCH_BYTES`] that end this far below the top of low RAM.
pub const SEABIOS_SCRATCH_BELOW_TOP: u64 = 16 << 20;
pub const SEABIOS_SCRATCH_BYTES: u64 = 128 << 10;

/// The share of the pre-migration step rate that counts as "full speed".
pub const FULL_SPEED_FRACTION: f64 = 0.9;
/// The window (seconds) over which [`time_to_full_speed`] measures the step rate.
pub const FULL_SPEED_WINDOW_S: f64 = 0.1;
/// How much of the run before `migrate` (seconds) gives the baseline step rate.
pub const BASELINE_WINDOW_S: f64 = 1.0;

/// Bytes of one mailbox slot, the most [`QemuVm::read_mailbox`] reads.
const SLOT_BYTES: usize = 64;
const _: () = assert!(SLOT_BYTES as u64 == abi::MAILBOX_SLOT_SIZE);

/// `max-bandwidth` for "unlimited": QEMU 7.2's default is 128 MiB/s (older ones: 32 MiB/s).
pub const UNLIMITED_BANDWIDTH: u64 = i64::MAX.unsigned_abs();

/// How long QEMU may take to create its QMP socket and greet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ordinary QMP command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the guest's progress is read while it boots (nothing to measure yet).
const BOOT_POLL: Duration = Duration::from_millis(20);
/// How often the source's `query-migrate` is read during the migration, besides the events.
const STATUS_POLL: Duration = Duration::from_millis(200);

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
    /// `qemu-system-x86_64`; `None` looks it up on `PATH` ([`find_qemu`]).
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

/// Errors of a QMP connection.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU's QMP socket {path} did not greet: {why}")]
    Greeting { path: PathBuf, why: String },
    #[error("cannot send `{command}` to QEMU: {source}")]
    Send {
        command: String,
        source: std::io::Error,
    },
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU answered `{command}` with something unexpected: {what}")]
    Protocol { command: String, what: String },
    #[error("QEMU did not answer `{command}` within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QEMU closed its QMP socket before answering `{command}` (did it exit?)")]
    Closed { command: String },
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

/// A QMP event, with QEMU's timestamp.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// QEMU's timestamp: seconds since the Unix epoch (µs resolution).
    pub timestamp: f64,
}

#[derive(Debug)]
enum ReaderMsg {
    Reply(Value),
    Bad(String),
}

/// A minimal QMP client: JSON lines over a unix socket. A reader thread ("qmp-reader") splits
/// what QEMU sends into replies and asynchronous events, so that events are kept even while no
/// command is outstanding.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    replies: mpsc::Receiver<ReaderMsg>,
    events: mpsc::Receiver<QmpEvent>,
    reader: Option<JoinHandle<()>>,
    greeting: Value,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying while it does not exist yet and `alive`
    /// says QEMU still runs, up to `timeout`), reads the greeting and negotiates capabilities.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline
                        && alive() =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.into(),
                        source,
                    })
                }
            }
        };
        let greeting_err = |why: String| QmpError::Greeting {
            path: path.into(),
            why,
        };
        let read_half = stream
            .try_clone()
            .map_err(|e| greeting_err(e.to_string()))?;
        read_half
            .set_read_timeout(Some(timeout))
            .map_err(|e| greeting_err(e.to_string()))?;
        let mut reader = BufReader::new(read_half);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| greeting_err(e.to_string()))?;
        let greeting: Value =
            serde_json::from_str(&line).map_err(|e| greeting_err(format!("{e}: {line:?}")))?;
        if greeting.get("QMP").is_none() {
            return Err(greeting_err(format!("not a QMP greeting: {line:?}")));
        }
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| greeting_err(e.to_string()))?;
        let (reply_tx, replies) = mpsc::channel();
        let (event_tx, events) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_qmp(reader, &reply_tx, &event_tx))
            .map_err(|e| greeting_err(format!("cannot start the reader thread: {e}")))?;
        let mut qmp = Self {
            stream,
            replies,
            events,
            reader: Some(reader),
            greeting,
            next_id: 1,
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's greeting (`{"QMP": {"version": ..., "capabilities": ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version from the greeting, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn qemu_version(&self) -> String {
        let v = &self.greeting["QMP"]["version"];
        let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
        let package = v["package"].as_str().unwrap_or("").trim();
        let mut s = format!("{}.{}.{}", n("major"), n("minor"), n("micro"));
        if !package.is_empty() {
            s.push_str(&format!(" ({package})"));
        }
        s
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`Qmp::execute`] with its own timeout (e.g. for `pmemsave` of a large guest).
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (&self.stream)
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Send {
                command: command.into(),
                source,
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.replies.recv_timeout(left) {
                Ok(ReaderMsg::Reply(v)) => v,
                Ok(ReaderMsg::Bad(what)) => {
                    return Err(QmpError::Protocol {
                        command: command.into(),
                        what,
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(QmpError::Timeout {
                        command: command.into(),
                        after: timeout,
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(QmpError::Closed {
                        command: command.into(),
                    })
                }
            };
            if reply.get("id") != Some(&json!(id)) {
                continue; // the late answer to a command that timed out
            }
            if let Some(error) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: error["class"].as_str().unwrap_or("?").into(),
                    desc: error["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        out.as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol {
                command: format!("human-monitor-command {command_line}"),
                what: out.to_string(),
            })
    }

    /// Events received since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.try_iter().collect()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // The reader thread sees end of file and ends.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_qmp(
    reader: BufReader<UnixStream>,
    replies: &mpsc::Sender<ReaderMsg>,
    events: &mpsc::Sender<QmpEvent>,
) {
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let sent = match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.get("event").is_some() => {
                let ts = &v["timestamp"];
                let timestamp = ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                events
                    .send(QmpEvent {
                        event: v["event"].as_str().unwrap_or("").into(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                        timestamp,
                    })
                    .is_ok()
            }
            Ok(v) => replies.send(ReaderMsg::Reply(v)).is_ok(),
            Err(e) => replies
                .send(ReaderMsg::Bad(format!("{e}: {line:?}")))
                .is_ok(),
        };
        if !sent {
            break;
        }
    }
}

/// Parses the values of HMP `xp /Ngx` output (`0000000000102040: 0x0000000000000001 0x...`).
fn parse_xp(out: &str) -> Option<Vec<u64>> {
    let mut values = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let (_, rest) = line.split_once(':')?;
        for word in rest.split_whitespace() {
            values.push(u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()?);
        }
    }
    Some(values)
}

/// Parses HMP `gpa2hva` output (`Host virtual address for 0x102000 (pc.ram) is 0x7f...`).
fn parse_gpa2hva(out: &str) -> Option<u64> {
    let (_, hva) = out.trim().rsplit_once(" is 0x")?;
    u64::from_str_radix(hva, 16).ok()
}

/// One reading of the guest's step counter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ProgressSample {
    /// Seconds since the `migrate` command (negative before it).
    pub t: f64,
    /// Steps of the guest's vCPU (mailbox slot of CPU 0).
    pub steps: u64,
    /// The QEMU it was read from.
    pub side: Side,
}

/// A QMP event of either QEMU, as the result keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    /// Seconds since the `migrate` command, from QEMU's timestamp.
    pub t: f64,
    pub side: Side,
    pub event: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// RAM statistics of the source's `query-migrate` (QEMU's units).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RamStats {
    /// Bytes sent (`ram.transferred`), page headers included.
    pub transferred: Option<u64>,
    /// Guest RAM size (`ram.total`).
    pub total: Option<u64>,
    /// Pages sent with their data (`ram.normal`).
    pub normal: Option<u64>,
    /// Pages sent as "all zero" markers (`ram.duplicate`).
    pub duplicate: Option<u64>,
    pub normal_bytes: Option<u64>,
    /// Pages the destination asked for after a fault (`ram.postcopy-requests`).
    pub postcopy_requests: Option<u64>,
    /// Bytes sent before the stop, while stopped, and in postcopy (QEMU 7.0+).
    pub precopy_bytes: Option<u64>,
    pub downtime_bytes: Option<u64>,
    pub postcopy_bytes: Option<u64>,
    /// Dirty-bitmap syncs (`ram.dirty-sync-count`): precopy rounds + 1.
    pub dirty_sync_count: Option<u64>,
    /// Throughput of the last period in megabits/s (`ram.mbps`).
    pub mbps: Option<f64>,
}

impl RamStats {
    fn from_query(q: &Value) -> Self {
        let ram = &q["ram"];
        let u = |k: &str| ram[k].as_u64();
        Self {
            transferred: u("transferred"),
            total: u("total"),
            normal: u("normal"),
            duplicate: u("duplicate"),
            normal_bytes: u("normal-bytes"),
            postcopy_requests: u("postcopy-requests"),
            precopy_bytes: u("precopy-bytes"),
            downtime_bytes: u("downtime-bytes"),
            postcopy_bytes: u("postcopy-bytes"),
            dirty_sync_count: u("dirty-sync-count"),
            mbps: ram["mbps"].as_f64(),
        }
    }
}

/// Digests of a QEMU guest's memory after it finished (see the module docs for which to
/// compare with what).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryDigests {
    /// All RAM, exactly as [`GuestMemory::digest`] hashes it. Differs between two boots.
    #[serde(serialize_with = "serialize_digest")]
    pub ram: Digest,
    /// RAM except the firmware's ([`ranges_without_firmware`]): the same in every QEMU run of
    /// the same guest and steps, migrated or not.
    #[serde(serialize_with = "serialize_digest")]
    pub ram_without_firmware: Digest,
    /// Only [`workload_ranges`]: the same as a Tsubame VM's ([`workload_digest`]).
    #[serde(serialize_with = "serialize_digest")]
    pub workload: Digest,
}

fn serialize_digest<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

/// What one QEMU migration did and cost. Times are seconds since the `migrate` command unless
/// named `_ms` (QEMU's own milliseconds).
#[derive(Clone, Debug, Serialize)]
pub struct QemuMigrationResult {
    pub qemu_version: String,
    pub mode: MigrationMode,
    pub mem_bytes: u64,
    pub workload: String,
    /// The guest's step target (0 = forever).
    pub steps: u64,
    /// The destination's actual listen address and where the source connected.
    pub listen_uri: String,
    pub connect_uri: String,
    /// `max-bandwidth` and `downtime-limit` in effect on the source.
    pub max_bandwidth: Option<u64>,
    pub downtime_limit_ms: Option<u64>,
    /// From starting the source QEMU to the guest's first step.
    pub boot_s: Option<f64>,
    /// Guest steps when `migrate` was issued.
    pub steps_at_migrate: u64,
    /// Guest steps/s over the last [`BASELINE_WINDOW_S`] before `migrate`.
    pub baseline_rate: Option<f64>,
    /// When `migrate-start-postcopy` was issued (our clock); `None` for precopy.
    pub postcopy_requested: Option<f64>,
    /// Whether QEMU entered postcopy (its `postcopy-active` state).
    pub postcopy_started: bool,
    /// The source's `postcopy-active` event.
    pub postcopy_active: Option<f64>,
    /// The source's `STOP` event: the guest stops running there (the switchover).
    pub switchover: Option<f64>,
    /// The destination's `RESUME` event: the guest runs there.
    pub resumed: Option<f64>,
    /// Downtime as the events tell it: source `STOP` → destination `RESUME`, in ms.
    pub downtime_observed_ms: Option<f64>,
    /// The source's `completed` event (all memory sent), and the destination's.
    pub source_completed: Option<f64>,
    pub destination_completed: Option<f64>,
    /// CPU time the hypervisor took from this machine from `migrate` until both sides
    /// completed, in percent (see [`crate::hoststat`]).
    pub steal_pct: Option<f64>,
    /// QEMU's own figures from the source's `query-migrate`: `total-time`, `downtime` (for
    /// postcopy only the time to send the device state, not until the destination runs),
    /// `setup-time`.
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub ram: RamStats,
    /// From the destination's `query-migrate` (ms; postcopy with `postcopy-blocktime` only):
    /// time when all vCPUs were blocked on missing pages, and per vCPU.
    pub postcopy_blocktime_ms: Option<u64>,
    pub postcopy_vcpu_blocktime_ms: Option<Vec<u64>>,
    /// First time after the switchover from which the guest ran at [`FULL_SPEED_FRACTION`] of
    /// its baseline rate ([`time_to_full_speed`]), seconds after `switchover`.
    pub time_to_full_speed: Option<f64>,
    pub probe: ProgressProbe,
    /// Mean cost of one progress sample, µs.
    pub sample_cost_us: f64,
    /// Samples skipped because the destination's mailbox page had not arrived yet.
    pub unreadable_samples: u64,
    pub samples: Vec<ProgressSample>,
    pub events: Vec<EventRecord>,
    /// Guest steps at the end (its target if it finished).
    pub final_steps: u64,
    /// The destination's memory once the guest finished; `None` without `digest`.
    pub digests: Option<MemoryDigests>,
    /// The raw `query-migrate` answers after completion.
    pub source_query: Value,
    pub destination_query: Value,
}

impl QemuMigrationResult {
    /// `(t, steps)` of all samples, the input of [`time_to_full_speed`].
    pub fn series(&self) -> Vec<(f64, u64)> {
        self.samples.iter().map(|s| (s.t, s.steps)).collect()
    }
}

/// A QEMU run of the same guest that never migrated: the reference of the digests.
#[derive(Clone, Debug, Serialize)]
pub struct UnmigratedRun {
    pub qemu_version: String,
    /// From starting QEMU to the guest's first step, and to its last.
    pub boot_s: Option<f64>,
    pub run_s: f64,
    /// Steps/s over the whole workload.
    pub rate: Option<f64>,
    pub final_steps: u64,
    pub digests: MemoryDigests,
}

/// The step rate (steps/s) between the first and the last sample in `[from, to]`; `None`
/// with fewer than two samples there or no time between them.
pub fn step_rate(samples: &[(f64, u64)], from: f64, to: f64) -> Option<f64> {
    let mut inside = samples.iter().filter(|(t, _)| (from..=to).contains(t));
    let first = inside.next()?;
    let last = inside.next_back()?;
    let dt = last.0 - first.0;
    (dt > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / dt)
}

/// Seconds from `switchover` to the first sample at or after it from which the guest's step
/// rate over the next [`FULL_SPEED_WINDOW_S`] reaches [`FULL_SPEED_FRACTION`] of
/// `baseline_rate`; `None` if that never happens in `samples` (time-ordered `(seconds,
/// steps)`, any clock as long as `switchover` uses the same). Works on Tsubame's samples too.
pub fn time_to_full_speed(
    samples: &[(f64, u64)],
    switchover: f64,
    baseline_rate: f64,
) -> Option<f64> {
    time_to_rate(
        samples,
        switchover,
        baseline_rate * FULL_SPEED_FRACTION,
        FULL_SPEED_WINDOW_S,
    )
}

/// [`time_to_full_speed`] with an explicit target rate and window: the window starts at a
/// sample and ends at the first sample at least `window` seconds later.
pub fn time_to_rate(samples: &[(f64, u64)], from: f64, rate: f64, window: f64) -> Option<f64> {
    let start = samples.iter().position(|&(t, _)| t >= from)?;
    for i in start..samples.len() {
        let (t0, s0) = samples[i];
        let (t1, s1) = *samples[i + 1..].iter().find(|&&(t, _)| t - t0 >= window)?;
        let r = s1.saturating_sub(s0) as f64 / (t1 - t0);
        if r >= rate {
            return Some(t0 - from);
        }
    }
    None
}

/// The parts of guest memory that only the workload determines: the mailbox, the guest's page
/// tables, its version table and its working set, in address order. Tsubame and QEMU leave
/// them the same after the same steps.
pub fn workload_ranges(block: &abi::ConfigBlock) -> Vec<RegionLayout> {
    let table_bytes = (block.working_set_pages() * 4).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut ranges = vec![
        RegionLayout {
            gpa: Gpa(abi::MAILBOX_GPA),
            size: PAGE_SIZE,
        },
        RegionLayout {
            gpa: Gpa(PAGE_TABLES_GPA),
            size: PAGE_TABLES_BYTES,
        },
        RegionLayout {
            gpa: Gpa(block.vtable_gpa),
            size: table_bytes,
        },
    ];
    ranges.extend(block.ranges.iter().map(|r| RegionLayout {
        gpa: Gpa(r.base),
        size: r.pages * PAGE_SIZE,
    }));
    ranges
}

/// All RAM of `layout` except what QEMU's firmware writes with boot-timing-dependent content:
/// the first MiB and SeaBIOS's scratch zone ([`SEABIOS_SCRATCH_BYTES`] ending
/// [`SEABIOS_SCRATCH_BELOW_TOP`] below the end of the first region; kept when the region is
/// too small to hold it there).
pub fn ranges_without_firmware(layout: &MemoryLayout) -> Vec<RegionLayout> {
    let mut ranges = Vec::new();
    for (i, r) in layout.regions.iter().enumerate() {
        let (gpa, end) = (r.gpa.0, r.end().0);
        let start = gpa.max(FIRMWARE_LOW_END);
        if start >= end {
            continue;
        }
        let scratch_end = end.saturating_sub(SEABIOS_SCRATCH_BELOW_TOP);
        let scratch_start = scratch_end.saturating_sub(SEABIOS_SCRATCH_BYTES);
        if i == 0 && scratch_start >= start {
            ranges.push(RegionLayout {
                gpa: Gpa(start),
                size: scratch_start - start,
            });
            ranges.push(RegionLayout {
                gpa: Gpa(scratch_end),
                size: end - scratch_end,
            });
        } else {
            ranges.push(RegionLayout {
                gpa: Gpa(start),
                size: end - start,
            });
        }
    }
    ranges.retain(|r| r.size > 0);
    ranges
}

/// XXH3-128 over `ranges` as [`GuestMemory::digest`] hashes its regions (each range's gpa and
/// size, little-endian, then its bytes); `read(gpa, buf)` fills `buf` from guest memory. Over
/// a layout's regions it equals [`GuestMemory::digest`].
pub fn digest_ranges<E>(
    ranges: &[RegionLayout],
    mut read: impl FnMut(Gpa, &mut [u8]) -> Result<(), E>,
) -> Result<Digest, E> {
    const CHUNK: usize = 256 << 10;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; CHUNK];
    for r in ranges {
        hasher.update(&r.gpa.0.to_le_bytes());
        hasher.update(&r.size.to_le_bytes());
        let mut off = 0u64;
        while off < r.size {
            let n = CHUNK.min(usize::try_from(r.size - off).unwrap_or(CHUNK));
            read(r.gpa + off, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(Digest(hasher.digest128()))
}

/// [`MemoryDigests::workload`] of a Tsubame VM's memory (pause its vCPUs first), reading the
/// config block from the memory itself.
pub fn workload_digest(memory: &GuestMemory) -> Result<Digest, MemoryError> {
    let block = read_config(memory).ok_or(MemoryError::OutOfBounds {
        gpa: Gpa(abi::CONFIG_GPA),
        len: abi::CONFIG_SIZE as u64,
    })?;
    digest_ranges(&workload_ranges(&block), |gpa, buf| memory.read(gpa, buf))
}

/// A unique prefix for the files of one run (several runs may share a work dir).
fn run_tag() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "qmig-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `tcp:HOST:PORT` → `HOST:PORT`.
fn tcp_address<'a>(what: &str, uri: &'a str) -> Result<&'a str> {
    uri.strip_prefix("tcp:")
        .filter(|rest| rest.rsplit_once(':').is_some())
        .ok_or_else(|| {
            QemuMigrationError::Config(format!(
                "{what} '{uri}' is not a tcp:HOST:PORT URI (e.g. tcp:127.0.0.1:4444)"
            ))
        })
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The name of the image in a run's directory. QEMU's multiboot loader writes the `-kernel`
/// argument into guest memory (as the multiboot command line, on the page after the image), so
/// every run starts QEMU in its own directory with this same relative name: a different path
/// would make the memory of otherwise identical runs differ.
const IMAGE_NAME: &str = "guest.elf";

/// What both kinds of runs share: the QEMU binary, the config block, and the run's own
/// directory under the work dir with the image in it (removed on drop, with everything the run
/// put there: QMP sockets, serial output, memory dumps).
#[derive(Debug)]
struct Prepared {
    qemu: PathBuf,
    block: abi::ConfigBlock,
    layout: MemoryLayout,
    dir: PathBuf,
}

impl Prepared {
    fn new(config: &QemuMigrationConfig) -> Result<Self> {
        let qemu = match &config.qemu_binary {
            Some(path) => path.clone(),
            None => find_qemu().ok_or(QemuMigrationError::NoQemu)?,
        };
        let layout = qemu_layout(config.mem_bytes)?;
        // No exit bells: QEMU must keep running when the guest is done, to be digested.
        let block = qemu_config_block(
            &config.workload,
            config.mem_bytes,
            config.steps,
            config.report_every,
            false,
        )?;
        let image = image_with_config(GUEST_IMAGE, &block)?;
        let dir = config.work_dir.join(run_tag());
        std::fs::create_dir(&dir).map_err(|source| QemuMigrationError::File {
            what: "cannot create the run directory",
            path: dir.clone(),
            source,
        })?;
        let prep = Self {
            qemu,
            block,
            layout,
            dir,
        };
        let path = prep.dir.join(IMAGE_NAME);
        std::fs::write(&path, image).map_err(|source| QemuMigrationError::File {
            what: "cannot write the guest image",
            path,
            source,
        })?;
        Ok(prep)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How [`QemuVm`] reads the mailbox.
#[derive(Debug)]
enum Mailbox {
    /// QEMU's memory and the host address of the mailbox page in it.
    ProcMem {
        mem: File,
        hva: u64,
    },
    Hmp,
}

/// One QEMU process with its QMP connection; killed (and its socket removed) on drop.
#[derive(Debug)]
struct QemuVm {
    side: Side,
    qmp: Qmp,
    process: RunningQemu,
    qmp_path: PathBuf,
    serial: PathBuf,
    mailbox: Mailbox,
    started: Instant,
    /// Progress reads: count and total time, and reads that found the mailbox unreadable.
    probes: u64,
    probe_time: Duration,
    unreadable: u64,
}

impl QemuVm {
    fn spawn(
        prep: &Prepared,
        config: &QemuMigrationConfig,
        side: Side,
        incoming: bool,
    ) -> Result<Self> {
        let name = match side {
            Side::Source => "src",
            Side::Destination => "dst",
        };
        let qmp_path = prep.dir.join(format!("{name}.qmp"));
        // sun_path holds 108 bytes including the terminating NUL.
        if qmp_path.as_os_str().len() > 107 {
            return Err(QemuMigrationError::Config(format!(
                "work dir {} is too long for a unix socket path; use a shorter one",
                config.work_dir.display()
            )));
        }
        let _ = std::fs::remove_file(&qmp_path);
        let serial = prep.dir.join(format!("{name}-serial.txt"));
        let socket = qmp_path.to_str().ok_or_else(|| {
            QemuMigrationError::Config(format!(
                "work dir {} is not UTF-8",
                config.work_dir.display()
            ))
        })?;
        // QEMU's option syntax: a comma inside a value is written twice.
        let mut extra_args = vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", socket.replace(',', ",,")),
        ];
        if incoming {
            extra_args.extend(["-incoming".into(), "defer".into()]);
        }
        let guest = QemuGuest {
            qemu_binary: prep.qemu.clone(),
            mem_bytes: config.mem_bytes,
            image: IMAGE_NAME.into(),
            serial: serial.clone(),
            exit_on_done: false,
            extra_args,
        };
        let started = Instant::now();
        let mut process = RunningQemu::spawn(guest.command().current_dir(&prep.dir), &prep.qemu)?;
        let qmp = match Qmp::connect(&qmp_path, CONNECT_TIMEOUT, || !process.has_exited()) {
            Ok(qmp) => qmp,
            Err(source) => {
                let exited = process.has_exited();
                let _ = process.stop();
                let stderr = process.take_stderr();
                return Err(if exited {
                    QemuMigrationError::Exited {
                        side,
                        status: "while starting".into(),
                        stderr,
                    }
                } else {
                    QemuMigrationError::Qmp { side, source }
                });
            }
        };
        let mut vm = Self {
            side,
            qmp,
            process,
            qmp_path,
            serial,
            mailbox: Mailbox::Hmp,
            started,
            probes: 0,
            probe_time: Duration::ZERO,
            unreadable: 0,
        };
        if config.probe == ProgressProbe::ProcMem {
            match vm.open_proc_mem() {
                Ok(mailbox) => vm.mailbox = mailbox,
                Err(why) => log::warn!(
                    "QEMU ({side}): reading the mailbox through HMP xp ({why}); each sample \
                     costs ~1 ms of QEMU's main thread"
                ),
            }
        }
        Ok(vm)
    }

    fn open_proc_mem(&mut self) -> Result<Mailbox, String> {
        let out = self
            .qmp
            .hmp(&format!("gpa2hva {:#x}", abi::MAILBOX_GPA))
            .map_err(|e| e.to_string())?;
        let hva = parse_gpa2hva(&out).ok_or_else(|| format!("gpa2hva said {out:?}"))?;
        let path = format!("/proc/{}/mem", self.process.pid());
        let mem = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let mut probe = [0u8; 8];
        mem.read_exact_at(&mut probe, hva)
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        Ok(Mailbox::ProcMem { mem, hva })
    }

    /// Turns a QMP error into the better explanation when QEMU has exited.
    fn qmp_error(&mut self, source: QmpError) -> QemuMigrationError {
        if matches!(source, QmpError::Closed { .. } | QmpError::Send { .. })
            || self.process.has_exited()
        {
            return self.exited_error();
        }
        QemuMigrationError::Qmp {
            side: self.side,
            source,
        }
    }

    /// QEMU is gone (or is made so): its exit status and stderr.
    fn exited_error(&mut self) -> QemuMigrationError {
        // Give an exiting QEMU a moment to finish, then make sure it is gone.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.process.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = if self.process.has_exited() {
            self.process
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string())
        } else {
            let _ = self.process.stop();
            "killed: it stopped answering".into()
        };
        QemuMigrationError::Exited {
            side: self.side,
            status,
            stderr: self.process.take_stderr(),
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.qmp
            .execute(command, arguments)
            .map_err(|e| self.qmp_error(e))
    }

    fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.qmp
            .execute_within(command, arguments, timeout)
            .map_err(|e| self.qmp_error(e))
    }

    /// Reads `N` consecutive u64 of the mailbox page from `gpa` on.
    ///
    /// `None` when QEMU's memory cannot be read there right now: on a postcopy destination,
    /// until the mailbox page has arrived, a `/proc/PID/mem` read fails (the kernel does not
    /// wait on userfaultfd for a remote access) and leaves the page missing, which is what we
    /// need. (Reading it between QEMU's postcopy discard and its userfaultfd registration, i.e.
    /// before the destination's `RESUME`, would instead map a zero page there and make QEMU's
    /// `postcopy_place_page` fail with EEXIST: seen here. Nothing reads a destination before
    /// its `RESUME`.)
    fn read_mailbox<const N: usize>(&mut self, gpa: u64) -> Result<Option<[u64; N]>> {
        debug_assert!(
            gpa >= abi::MAILBOX_GPA
                && gpa + 8 * N as u64 <= abi::MAILBOX_GPA + PAGE_SIZE
                && 8 * N as u64 <= abi::MAILBOX_SLOT_SIZE
        );
        let start = Instant::now();
        let mut out = [0u64; N];
        match &self.mailbox {
            Mailbox::ProcMem { mem, hva } => {
                // One mailbox slot at most (checked above): no allocation per sample.
                let mut slot = [0u8; SLOT_BYTES];
                let buf = &mut slot[..8 * N];
                if mem
                    .read_exact_at(buf, hva + (gpa - abi::MAILBOX_GPA))
                    .is_err()
                {
                    if self.process.has_exited() {
                        return Err(self.exited_error());
                    }
                    self.unreadable += 1;
                    return Ok(None);
                }
                for (v, b) in out.iter_mut().zip(buf.chunks_exact(8)) {
                    *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                }
            }
            Mailbox::Hmp => {
                let line = format!("xp /{N}gx {gpa:#x}");
                let text = self.qmp.hmp(&line).map_err(|e| self.qmp_error(e))?;
                let values = parse_xp(&text).filter(|v| v.len() == N).ok_or_else(|| {
                    QemuMigrationError::Qmp {
                        side: self.side,
                        source: QmpError::Protocol {
                            command: line.clone(),
                            what: text.clone(),
                        },
                    }
                })?;
                out.copy_from_slice(&values);
            }
        }
        self.probes += 1;
        self.probe_time += start.elapsed();
        Ok(Some(out))
    }

    /// `(state, steps)` of CPU 0 and the midpoint of the read; `None` if the mailbox cannot be
    /// read yet ([`QemuVm::read_mailbox`]).
    fn progress(&mut self) -> Result<Option<(u64, u64, Instant)>> {
        let before = Instant::now();
        let Some([state, steps]) =
            self.read_mailbox::<2>(abi::mailbox_slot_field(0, abi::slot::STATE))?
        else {
            return Ok(None);
        };
        let after = Instant::now();
        let mid = before + (after - before) / 2;
        if state == abi::state::ERROR {
            return Err(self.verify_error());
        }
        Ok(Some((state, steps, mid)))
    }

    fn verify_error(&mut self) -> QemuMigrationError {
        // The slot's fields in order, as abi::slot numbers them.
        const _: () = assert!(abi::slot::ERR_KIND == 4 && abi::slot::ERR_FOUND == 7);
        match self.read_mailbox::<8>(abi::mailbox_slot_field(0, abi::slot::STATE)) {
            Ok(Some([_, _, _, _, kind, gfn, expected, found])) => QemuMigrationError::GuestVerify {
                side: self.side,
                kind: abi::verify_error_name(kind),
                gfn,
                expected,
                found,
            },
            Ok(None) => QemuMigrationError::GuestVerify {
                side: self.side,
                kind: "unknown (the mailbox became unreadable)",
                gfn: 0,
                expected: 0,
                found: 0,
            },
            Err(e) => e,
        }
    }

    /// What the guest wrote to its serial port in this QEMU.
    fn serial_text(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<()> {
        if self.process.has_exited() {
            return Err(self.exited_error());
        }
        Ok(())
    }

    /// Names of the migration capabilities this QEMU knows.
    fn capabilities(&mut self) -> Result<Vec<String>> {
        let caps = self.execute("query-migrate-capabilities", None)?;
        Ok(caps
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["capability"].as_str().map(str::to_owned))
            .collect())
    }

    /// Stops the guest and digests its memory: one `pmemsave` file per region of `layout`,
    /// removed once hashed.
    fn digest(&mut self, prep: &Prepared) -> Result<MemoryDigests> {
        self.execute("stop", None)?;
        let mut dumps = Vec::new();
        let result: Result<MemoryDigests> = (|| {
            for (i, region) in prep.layout.regions.iter().enumerate() {
                let path = prep.dir.join(format!("{}-ram{i}.bin", self.side));
                dumps.push(path.clone());
                let filename = path.to_str().ok_or_else(|| {
                    QemuMigrationError::Config(format!("{} is not UTF-8", path.display()))
                })?;
                // ~1 s per GiB here; allow for a slow disk.
                let timeout = COMMAND_TIMEOUT + Duration::from_secs(10 * (region.size >> 30));
                self.execute_within(
                    "pmemsave",
                    Some(json!({ "val": region.gpa, "size": region.size, "filename": filename })),
                    timeout,
                )?;
            }
            let files = dumps
                .iter()
                .map(|p| {
                    File::open(p).map_err(|source| QemuMigrationError::File {
                        what: "cannot open the memory dump",
                        path: p.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let read = |gpa: Gpa, buf: &mut [u8]| -> Result<(), MemoryError> {
                let len = buf.len() as u64;
                let (region, file) = prep
                    .layout
                    .regions
                    .iter()
                    .zip(&files)
                    .find(|(r, _)| gpa >= r.gpa && gpa + len <= r.end())
                    .ok_or(MemoryError::OutOfBounds { gpa, len })?;
                file.read_exact_at(buf, gpa - region.gpa)
                    .map_err(|_| MemoryError::OutOfBounds { gpa, len })
            };
            Ok(MemoryDigests {
                ram: digest_ranges(&prep.layout.regions, read)?,
                ram_without_firmware: digest_ranges(&ranges_without_firmware(&prep.layout), read)?,
                workload: digest_ranges(&workload_ranges(&prep.block), read)?,
            })
        })();
        for path in &dumps {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn probe_kind(&self) -> ProgressProbe {
        match self.mailbox {
            Mailbox::ProcMem { .. } => ProgressProbe::ProcMem,
            Mailbox::Hmp => ProgressProbe::Hmp,
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.process.stop();
        let _ = std::fs::remove_file(&self.qmp_path);
        let _ = std::fs::remove_file(&self.serial);
    }
}

/// Waits until the guest's serial output (of `vms`, in order, since a line can begin on the
/// source and end on the destination) holds its complete `cpu 0 done after N steps` line. The
/// guest marks itself done in its mailbox *before* printing that line, and stopping it in the
/// middle of the line leaves its stack (the digits `put_dec` formats) different from a run
/// stopped after it: a race seen here as a flaky whole-RAM digest.
fn wait_for_done_line(vms: &[&QemuVm], deadline: Instant, timeout: Duration) -> Result<()> {
    loop {
        let text: String = vms.iter().map(|vm| vm.serial_text()).collect();
        let done = text
            .split_inclusive('\n')
            .any(|line| line.starts_with("cpu 0 done after ") && line.ends_with('\n'));
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: format!("waiting for the guest's last serial line; it wrote: {text:?}"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest's progress while it runs on the source before the migration.
struct Warmup {
    /// `(when, steps)` once it has taken its first step.
    samples: Vec<(Instant, u64)>,
    first_step: Option<Instant>,
}

/// Samples the source's progress until `ready(steps, first_step)` says the guest may migrate.
fn wait_for_workload(
    vm: &mut QemuVm,
    config: &QemuMigrationConfig,
    deadline: Instant,
    mut ready: impl FnMut(u64, Option<Instant>) -> bool,
) -> Result<Warmup> {
    let mut samples = Vec::new();
    let mut first_step = None;
    loop {
        vm.check_alive()?;
        let (state, steps, at) = vm
            .progress()?
            .unwrap_or((abi::state::BOOTING, 0, Instant::now()));
        if steps > 0 {
            first_step.get_or_insert(at);
            samples.push((at, steps));
        }
        if ready(steps, first_step) {
            return Ok(Warmup {
                samples,
                first_step,
            });
        }
        if state == abi::state::DONE {
            return Err(QemuMigrationError::FinishedTooEarly {
                steps: config.steps,
            });
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: format!("waiting for the guest's workload (at {steps} steps)"),
                after: config.timeout,
            });
        }
        std::thread::sleep(if steps == 0 {
            BOOT_POLL
        } else {
            config.sample_every
        });
    }
}

/// Two QEMU processes ready to migrate the built-in guest: the source booting it, the
/// destination listening. Dropping it kills both.
#[derive(Debug)]
pub struct QemuMigration {
    config: QemuMigrationConfig,
    // Field order is drop order: both QEMUs go before the image they run.
    src: QemuVm,
    dst: QemuVm,
    prep: Prepared,
    qemu_version: String,
    listen_uri: String,
    connect_uri: String,
}

impl QemuMigration {
    /// Starts both QEMUs: the source boots the guest at once; the destination gets the mode's
    /// capabilities and listens on `config.listen`. Fails with
    /// [`QemuMigrationError::Unsupported`] if this QEMU lacks a capability the mode needs.
    pub fn start(config: &QemuMigrationConfig) -> Result<Self> {
        validate(config)?;
        let listen_addr = tcp_address("listen address", &config.listen)?;
        if let Some(connect) = &config.connect {
            tcp_address("connect address", connect)?;
        }
        let prep = Prepared::new(config)?;
        let mut src = QemuVm::spawn(&prep, config, Side::Source, false)?;
        let mut dst = QemuVm::spawn(&prep, config, Side::Destination, true)?;
        let qemu_version = src.qmp.qemu_version();

        let mut caps = vec!["events"];
        caps.extend(config.mode.capabilities());
        for vm in [&mut src, &mut dst] {
            let known = vm.capabilities()?;
            if let Some(missing) = caps.iter().find(|c| !known.iter().any(|k| k == *c)) {
                return Err(QemuMigrationError::Unsupported {
                    version: qemu_version,
                    capability: (*missing).into(),
                    mode: config.mode,
                });
            }
            let list: Vec<Value> = caps
                .iter()
                .map(|c| json!({ "capability": c, "state": true }))
                .collect();
            vm.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": list })),
            )?;
        }
        let bandwidth = config.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
        let mut params = json!({ "max-bandwidth": bandwidth });
        if config.mode.is_postcopy() {
            // 0 is QEMU's "unlimited" here.
            params["max-postcopy-bandwidth"] = json!(config.max_bandwidth.unwrap_or(0));
        }
        if let Some(ms) = config.downtime_limit_ms {
            params["downtime-limit"] = json!(ms);
        }
        src.execute("migrate-set-parameters", Some(params))?;

        dst.execute("migrate-incoming", Some(json!({ "uri": config.listen })))?;
        let listen_uri = actual_listen_uri(&mut dst, listen_addr)?;
        let connect_uri = config.connect.clone().unwrap_or_else(|| listen_uri.clone());
        Ok(Self {
            config: config.clone(),
            src,
            dst,
            prep,
            qemu_version,
            listen_uri,
            connect_uri,
        })
    }

    /// Where the destination listens (`tcp:HOST:PORT`, with the port it got for port 0).
    pub fn listen_uri(&self) -> &str {
        &self.listen_uri
    }

    /// QEMU's version, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// Waits for the guest's workload, migrates, measures, lets the guest finish and digests
    /// the destination's memory; kills both QEMUs at the end.
    pub fn run(mut self) -> Result<QemuMigrationResult> {
        let config = self.config.clone();
        let deadline = self.src.started + config.timeout;

        // 1. The guest boots and starts its workload.
        let Warmup {
            samples: pre,
            first_step,
        } = wait_for_workload(
            &mut self.src,
            &config,
            deadline,
            |steps, first| match config.migrate_at {
                MigrateAt::Steps(n) => steps >= n.max(1),
                MigrateAt::Running(d) => first.is_some_and(|t| t.elapsed() >= d),
            },
        )?;

        // 2. Migrate. Times are relative to this instant (and its wall-clock twin, for QEMU's
        // event timestamps).
        let t0 = Instant::now();
        let t0_unix = now_unix();
        let cpu_at_migrate = crate::hoststat::CpuTimes::now();
        let rel = |at: Instant| {
            if at >= t0 {
                (at - t0).as_secs_f64()
            } else {
                -(t0 - at).as_secs_f64()
            }
        };
        let mut samples: Vec<ProgressSample> = pre
            .iter()
            .map(|&(at, steps)| ProgressSample {
                t: rel(at),
                steps,
                side: Side::Source,
            })
            .collect();
        let steps_at_migrate = pre.last().map_or(0, |&(_, s)| s);
        let boot_s = first_step.map(|t| (t - self.src.started).as_secs_f64());
        self.src
            .execute("migrate", Some(json!({ "uri": self.connect_uri })))?;

        let mut events = Vec::new();
        let mut postcopy_requested = None;
        let mut src_status = String::from("setup");
        let mut dst_status = String::from("setup");
        let mut switchover = None;
        let mut resumed = None;
        let mut last_status_poll = Instant::now();
        let mut next_sample = Instant::now();
        // 3. Until both sides completed and the destination runs.
        loop {
            for (side, vm) in [
                (Side::Source, &mut self.src),
                (Side::Destination, &mut self.dst),
            ] {
                for e in vm.qmp.take_events() {
                    let t = e.timestamp - t0_unix;
                    match (side, e.event.as_str()) {
                        (Side::Source, "STOP") => {
                            switchover.get_or_insert(t);
                        }
                        (Side::Destination, "RESUME") => {
                            resumed.get_or_insert(t);
                        }
                        (_, "MIGRATION") => {
                            let status = e.data["status"].as_str().unwrap_or("").to_owned();
                            match side {
                                Side::Source => src_status = status,
                                Side::Destination => dst_status = status,
                            }
                        }
                        _ => {}
                    }
                    events.push(EventRecord {
                        t,
                        side,
                        event: e.event,
                        data: e.data,
                    });
                }
            }
            for (side, status) in [
                (Side::Source, &src_status),
                (Side::Destination, &dst_status),
            ] {
                if matches!(
                    status.as_str(),
                    "failed" | "cancelled" | "postcopy-paused" | "postcopy-recover"
                ) {
                    let vm = match side {
                        Side::Source => &mut self.src,
                        Side::Destination => &mut self.dst,
                    };
                    let q = vm.execute("query-migrate", None).unwrap_or_default();
                    return Err(QemuMigrationError::MigrationFailed {
                        side,
                        status: status.clone(),
                        desc: q["error-desc"]
                            .as_str()
                            .unwrap_or("QEMU gave no error-desc; see its stderr")
                            .into(),
                    });
                }
            }
            self.src.check_alive()?;
            self.dst.check_alive()?;
            if src_status == "completed" && dst_status == "completed" && resumed.is_some() {
                break;
            }
            if config.mode.is_postcopy()
                && postcopy_requested.is_none()
                && t0.elapsed() >= config.postcopy_after
                && !matches!(src_status.as_str(), "completed" | "device")
                && switchover.is_none()
            {
                let at = Instant::now();
                self.src.execute("migrate-start-postcopy", None)?;
                postcopy_requested = Some(rel(at));
            }
            if last_status_poll.elapsed() >= STATUS_POLL {
                // Events say it all; this only catches a QEMU that stopped reporting.
                last_status_poll = Instant::now();
                let q = self.src.execute("query-migrate", None)?;
                if let Some(s) = q["status"].as_str() {
                    if s == "failed" {
                        src_status = s.into();
                        continue;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(QemuMigrationError::Timeout {
                    what: format!(
                        "migrating (source {src_status}, destination {dst_status}, resumed: {})",
                        resumed.is_some()
                    ),
                    after: config.timeout,
                });
            }
            if Instant::now() >= next_sample {
                // A slow probe (HMP) makes the samples sparser, never bunched.
                next_sample = (next_sample + config.sample_every).max(Instant::now());
                let running = if resumed.is_some() {
                    Some((Side::Destination, &mut self.dst))
                } else if switchover.is_none() {
                    Some((Side::Source, &mut self.src))
                } else {
                    None // nobody runs the guest: the downtime
                };
                if let Some((side, vm)) = running {
                    if let Some((_, steps, at)) = vm.progress()? {
                        samples.push(ProgressSample {
                            t: rel(at),
                            steps,
                            side,
                        });
                    }
                }
            }
            let wake = next_sample.min(Instant::now() + config.sample_every);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }

        // 4. Statistics.
        let steal_pct = crate::hoststat::steal_pct_since(cpu_at_migrate);
        let source_query = self.src.execute("query-migrate", None)?;
        let destination_query = self.dst.execute("query-migrate", None)?;
        let params = self.src.execute("query-migrate-parameters", None)?;
        let completed_at = |side: Side| {
            events
                .iter()
                .find(|e| {
                    e.side == side && e.event == "MIGRATION" && e.data["status"] == "completed"
                })
                .map(|e| e.t)
        };
        let source_completed = completed_at(Side::Source);
        let destination_completed = completed_at(Side::Destination);
        let postcopy_active = events
            .iter()
            .find(|e| {
                e.side == Side::Source
                    && e.event == "MIGRATION"
                    && e.data["status"] == "postcopy-active"
            })
            .map(|e| e.t);

        // 5. The destination runs on: observe it, and let it finish.
        let observe_until = Instant::now() + config.observe_after;
        let mut final_steps = samples.last().map_or(0, |s| s.steps);
        loop {
            if let Some((state, steps, at)) = self.dst.progress()? {
                final_steps = steps;
                samples.push(ProgressSample {
                    t: rel(at),
                    steps,
                    side: Side::Destination,
                });
                // Nothing changes once the guest is done.
                if state == abi::state::DONE || (!config.digest && Instant::now() >= observe_until)
                {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(QemuMigrationError::Timeout {
                    what: format!(
                        "waiting for the guest to finish on the destination ({final_steps} of \
                         {} steps; {} unreadable samples)",
                        config.steps, self.dst.unreadable
                    ),
                    after: config.timeout,
                });
            }
            self.dst.check_alive()?;
            std::thread::sleep(config.sample_every);
        }
        let digests = if config.digest {
            // The line may have begun on the source before the switchover.
            wait_for_done_line(&[&self.src, &self.dst], deadline, config.timeout)?;
            Some(self.dst.digest(&self.prep)?)
        } else {
            None
        };

        let series: Vec<(f64, u64)> = samples.iter().map(|s| (s.t, s.steps)).collect();
        let baseline_rate = step_rate(&series, -BASELINE_WINDOW_S, 0.0);
        let time_to_full_speed = match (baseline_rate, switchover) {
            (Some(rate), Some(at)) => time_to_full_speed(&series, at, rate),
            _ => None,
        };
        let sample_cost_us = {
            let n = self.src.probes + self.dst.probes;
            let total = self.src.probe_time + self.dst.probe_time;
            if n == 0 {
                0.0
            } else {
                total.as_secs_f64() * 1e6 / n as f64
            }
        };
        Ok(QemuMigrationResult {
            qemu_version: self.qemu_version.clone(),
            mode: config.mode,
            mem_bytes: config.mem_bytes,
            workload: config.workload.to_string(),
            steps: config.steps,
            listen_uri: self.listen_uri.clone(),
            connect_uri: self.connect_uri.clone(),
            max_bandwidth: params["max-bandwidth"].as_u64(),
            downtime_limit_ms: params["downtime-limit"].as_u64(),
            boot_s,
            steps_at_migrate,
            baseline_rate,
            postcopy_requested,
            postcopy_started: postcopy_active.is_some(),
            postcopy_active,
            switchover,
            resumed,
            downtime_observed_ms: switchover
                .zip(resumed)
                .map(|(stop, run)| (run - stop) * 1e3),
            source_completed,
            destination_completed,
            steal_pct,
            total_time_ms: source_query["total-time"].as_u64(),
            downtime_ms: source_query["downtime"].as_u64(),
            setup_time_ms: source_query["setup-time"].as_u64(),
            ram: RamStats::from_query(&source_query),
            postcopy_blocktime_ms: destination_query["postcopy-blocktime"].as_u64(),
            postcopy_vcpu_blocktime_ms: destination_query["postcopy-vcpu-blocktime"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect()),
            time_to_full_speed,
            probe: self.src.probe_kind(),
            sample_cost_us,
            unreadable_samples: self.src.unreadable + self.dst.unreadable,
            samples,
            events,
            final_steps,
            digests,
            source_query,
            destination_query,
        })
    }
}

fn validate(config: &QemuMigrationConfig) -> Result<()> {
    let bad = |why: String| Err(QemuMigrationError::Config(why));
    if config.digest && config.steps == 0 {
        return bad("a digest needs a guest that finishes: set steps > 0".into());
    }
    if let MigrateAt::Steps(n) = config.migrate_at {
        if config.steps > 0 && n >= config.steps {
            return bad(format!(
                "migrating at {n} steps of {}: the guest would be done before; migrate earlier",
                config.steps
            ));
        }
    }
    if config.sample_every.is_zero() {
        return bad("sample_every must be above zero".into());
    }
    if !config.work_dir.is_dir() {
        return bad(format!(
            "work dir {} does not exist",
            config.work_dir.display()
        ));
    }
    Ok(())
}

/// The destination's listen address after `migrate-incoming` (QEMU reports the port it got
/// for port 0 in `query-migrate`'s `socket-address`).
fn actual_listen_uri(dst: &mut QemuVm, requested: &str) -> Result<String> {
    let q = dst.execute("query-migrate", None)?;
    let addr = q["socket-address"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| Some((a["host"].as_str()?, a["port"].as_str()?)));
    Ok(match addr {
        Some((host, port)) if host.contains(':') => format!("tcp:[{host}]:{port}"),
        Some((host, port)) => format!("tcp:{host}:{port}"),
        None => format!("tcp:{requested}"),
    })
}

/// Runs the same guest in one QEMU without migrating it, to the end, and digests its memory:
/// the reference for [`QemuMigrationResult::digests`]. Uses `config`'s QEMU, memory, workload,
/// steps and work dir.
pub fn run_unmigrated(config: &QemuMigrationConfig) -> Result<UnmigratedRun> {
    if config.steps == 0 {
        return Err(QemuMigrationError::Config(
            "an unmigrated reference run needs a guest that finishes: set steps > 0".into(),
        ));
    }
    let config = QemuMigrationConfig {
        migrate_at: MigrateAt::Steps(u64::MAX),
        ..config.clone()
    };
    let prep = Prepared::new(&config)?;
    let mut vm = QemuVm::spawn(&prep, &config, Side::Source, false)?;
    let qemu_version = vm.qmp.qemu_version();
    let deadline = vm.started + config.timeout;
    let mut last = None;
    let result = wait_for_workload(&mut vm, &config, deadline, |steps, _| {
        last = Some(steps);
        steps >= config.steps
    });
    // The guest reaching its last step before verifying is not "done"; wait for the state.
    let Warmup {
        samples,
        first_step,
    } = match result {
        Ok(w) => w,
        Err(QemuMigrationError::FinishedTooEarly { .. }) => Warmup {
            samples: Vec::new(),
            first_step: None,
        },
        Err(e) => return Err(e),
    };
    loop {
        if let Some((abi::state::DONE, steps, _)) = vm.progress()? {
            last = Some(steps);
            break;
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: "waiting for the unmigrated guest to finish".into(),
                after: config.timeout,
            });
        }
        vm.check_alive()?;
        std::thread::sleep(config.sample_every);
    }
    let end = Instant::now();
    wait_for_done_line(&[&vm], deadline, config.timeout)?;
    let digests = vm.digest(&prep)?;
    let series: Vec<(f64, u64)> = samples
        .iter()
        .map(|&(at, s)| ((at - vm.started).as_secs_f64(), s))
        .collect();
    Ok(UnmigratedRun {
        qemu_version,
        boot_s: first_step.map(|t| (t - vm.started).as_secs_f64()),
        run_s: (end - vm.started).as_secs_f64(),
        rate: step_rate(&series, f64::MIN, f64::MAX),
        final_steps: last.unwrap_or(0),
        digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xp_output_parses() {
        let out = "0000000000102040: 0x0000000000000001 0x00000000002aa48e\r\n";
        assert_eq!(parse_xp(out), Some(vec![1, 0x2aa48e]));
        let two_lines = "0000000000102040: 0x0000000000000002 0x0000000000000003\r\n\
                         0000000000102050: 0x0000000000000004 0x0000000000000005\r\n";
        assert_eq!(parse_xp(two_lines), Some(vec![2, 3, 4, 5]));
        assert_eq!(parse_xp("Cannot access memory\r\n"), None);
    }

    #[test]
    fn gpa2hva_output_parses() {
        let out = "Host virtual address for 0x102048 (pc.ram) is 0x7f8a1ff02048\r\n";
        assert_eq!(parse_gpa2hva(out), Some(0x7f8a_1ff0_2048));
        assert_eq!(
            parse_gpa2hva("No memory is mapped at address 0x0\r\n"),
            None
        );
    }

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

    #[test]
    fn tcp_uris_are_checked() {
        assert_eq!(
            tcp_address("listen", "tcp:127.0.0.1:4444").unwrap(),
            "127.0.0.1:4444"
        );
        assert!(tcp_address("listen", "unix:/tmp/x").is_err());
        assert!(tcp_address("listen", "tcp:localhost").is_err());
    }

    #[test]
    fn digest_ranges_over_the_layout_is_the_memory_digest() {
        let layout = MemoryLayout::for_size(16 << 20).unwrap();
        let memory = GuestMemory::new(&layout).unwrap();
        memory.write(Gpa(0x5000), b"tsubame").unwrap();
        memory.write(Gpa((16 << 20) - 8), b"qemu").unwrap();
        let d = digest_ranges(&layout.regions, |gpa, buf| memory.read(gpa, buf)).unwrap();
        assert_eq!(d, memory.digest());
    }

    #[test]
    fn workload_ranges_cover_tables_and_working_set() {
        let spec: WorkloadSpec = "uniform:ws=64M,seed=1".parse().unwrap();
        let block = qemu_config_block(&spec, 256 << 20, 10, 0, false).unwrap();
        let ranges = workload_ranges(&block);
        assert_eq!(ranges[0].gpa, Gpa(abi::MAILBOX_GPA));
        assert_eq!(ranges[1].gpa, Gpa(PAGE_TABLES_GPA));
        assert_eq!(ranges[2].gpa, Gpa(abi::DATA_GPA));
        assert_eq!(ranges[2].size, 16 * PAGE_SIZE, "16384 pages * 4 bytes");
        let ws: u64 = ranges[3..].iter().map(|r| r.size).sum();
        assert_eq!(ws, 64 << 20);
        let layout = qemu_layout(256 << 20).unwrap();
        for pair in ranges.windows(2) {
            assert!(pair[0].end() <= pair[1].gpa, "{ranges:?}");
        }
        assert!(ranges.iter().all(|r| layout.contains(r.gpa, r.size)));
    }

    #[test]
    fn ranges_without_firmware_skip_the_first_mib_and_seabios_scratch() {
        const MIB: u64 = 1 << 20;
        let small = ranges_without_firmware(&MemoryLayout::for_size(256 * MIB).unwrap());
        assert_eq!(
            small,
            vec![
                RegionLayout {
                    gpa: Gpa(MIB),
                    size: 0xefe_0000 - MIB
                },
                RegionLayout {
                    gpa: Gpa(0xf00_0000),
                    size: 16 * MIB
                },
            ]
        );
        let big = ranges_without_firmware(&MemoryLayout::for_size(8 << 30).unwrap());
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].end(), Gpa(3 << 30));
        assert_eq!(big[2].gpa, Gpa(4 << 30));
        assert_eq!(big[2].size, 5 << 30);
        // Too small to hold the scratch zone below 16 MiB from the top: all of it past 1 MiB.
        let tiny = ranges_without_firmware(&MemoryLayout::for_size(16 * MIB).unwrap());
        assert_eq!(
            tiny,
            vec![RegionLayout {
                gpa: Gpa(MIB),
                size: 15 * MIB
            }]
        );
    }

    #[test]
    fn step_rate_and_full_speed() {
        // 1000 steps/s before 0; nothing until 0.5 s; 500/s until 1.0 s; then 1000/s.
        let mut s = Vec::new();
        let mut steps = 0u64;
        for i in -100..=300i32 {
            let t = f64::from(i) * 0.01;
            s.push((t, steps));
            steps += match t {
                t if t < 0.0 => 10,
                t if t < 0.5 => 0,
                t if t < 1.0 => 5,
                _ => 10,
            };
        }
        let base = step_rate(&s, -1.0, 0.0).unwrap();
        assert!((base - 1000.0).abs() < 1.0, "{base}");
        let t = time_to_full_speed(&s, 0.0, base).unwrap();
        assert!((t - 1.0).abs() < 0.015, "{t}");
        // Half speed is reached at 0.5 s.
        let half = time_to_rate(&s, 0.0, 450.0, 0.1).unwrap();
        assert!((half - 0.5).abs() < 0.015, "{half}");
        // Never at double speed; no samples after the end.
        assert_eq!(time_to_rate(&s, 0.0, 2000.0, 0.1), None);
        assert_eq!(time_to_full_speed(&s, 5.0, base), None);
        assert_eq!(step_rate(&s, 10.0, 11.0), None);
    }
}
