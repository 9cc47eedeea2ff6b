//! Reverse checkpoints: what makes a postcopy migration cancellable after its switchover.
//!
//! In plain postcopy, once the VM runs at the destination neither host holds all of it: the
//! source has the memory as of the switchover, the destination the pages the guest has touched
//! since. A cancellable migration (`migrate ... cancellable=on`) closes that gap from the
//! destination's side:
//!
//! - **Destination** ([`Checkpointer`]): KVM's dirty log is on from the moment its VM is
//!   created. Every interval it pauses the vCPUs, captures their state and the devices', takes
//!   the pages written since the last checkpoint, copies them, and resumes the guest; the
//!   pause is the copy. It then streams `CheckpointBegin` (state, lease), `Pages` and
//!   `CheckpointEnd` back to the source on the session's checkpoint channel. Guest output is
//!   held ([`crate::devices::Serial`]): lines of epoch `e` leave the VM only when the source
//!   acknowledges checkpoint `e`. It runs on a lease ([`crate::fence`]) that each
//!   acknowledgement renews: no acknowledgement, no guest.
//! - **Source** ([`Reverse`]): stages each checkpoint whole, checks it (epoch, layout, page
//!   ranges, count), and commits it only at its `CheckpointEnd`: the pages are written into its
//!   own copy of guest memory, the state kept, `CheckpointAck` sent. Writing into the memory it
//!   is still serving from is safe: a page the destination wrote is present there and never
//!   asked for again, and a push that sends it anyway is dropped as a second copy (see
//!   `paging::owners`). The page server sends straight from that memory, so a commit writes
//!   only while no page is being read and sent (`PageServer::exclusive`): sending waits for
//!   the memcpy of one checkpoint. Pages and state are committed under one lock, so a
//!   rollback sees a checkpoint whole or not at all. A checkpoint that ends otherwise (cut
//!   short, forged, malformed) is discarded without touching memory.
//! - **Cancel**: `migrate-cancel` at the source sends `Cancel`; at the destination it stops
//!   the vCPUs at once. Either way the destination fences itself for good and sends `Fenced`
//!   after any checkpoint already on its way, and the source resumes the VM from its last
//!   committed checkpoint: the guest redoes, unseen, what it did since (its output since was
//!   held, and is dropped).
//! - **Automatic resume**: the source resumes by itself once the destination's lease has surely
//!   run out (killed, cut off, or silent: checkpoints are its heartbeat), or at once on
//!   `Fenced`. The destination's vCPUs stop before its lease ends, so the two never both run.
//! - **Completion**: when the destination has every page, the source sends `Complete` on the
//!   checkpoint channel and from then on never resumes the VM; the destination releases its
//!   output and runs without a lease.
//!
//! The interval adapts (destination): a pause longer than a twentieth of the interval doubles
//! it (up to [`MAX_INTERVAL_MS`]), one shorter than an eightieth halves it back towards the
//! asked interval, so that the guest keeps most of its speed when it writes a lot.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{gfn_runs, Gfn, Gpa, MemoryLayout, PAGE_BYTES};
use tsubame_pageserver::message::MAX_PAGES_PER_FRAME;
use tsubame_pageserver::spin::set_nice;
use tsubame_pageserver::{Message, ProtocolError};

use super::MigrationError;
use crate::devices::Devices;
use crate::fence::LeaseState;
use crate::memory::GuestMemory;
use crate::state::VmState;

/// Default checkpoint interval.
pub const DEFAULT_INTERVAL_MS: u32 = 100;
/// The adaptive interval never grows past this.
pub const MAX_INTERVAL_MS: u64 = 2_000;
/// Shortest lease.
const MIN_LEASE_MS: u64 = 300;
/// What the source adds to a lease before it resumes the VM: the destination's watchdog
/// reaction, its pause, and the two clocks' rate difference.
const SOURCE_MARGIN: Duration = Duration::from_millis(50);
/// How often the watchdogs look.
const TICK: Duration = Duration::from_millis(5);
/// The destination's watchdog pauses its vCPUs this long before the deadline.
const FENCE_GUARD: Duration = Duration::from_millis(20);
/// Nice value of the threads that keep the lease alive (acknowledgements, watchdogs): a busy
/// host must not starve them into a needless rollback. (Takes effect when the process may
/// raise priorities, e.g. as root.)
const LEASE_NICE: i32 = -10;

/// The destination's first lease, before any checkpoint is acknowledged: from when the VM
/// state arrived, a lease less the source's margin. (The source counts a whole lease and its
/// margin from when it sent the state: safe while the state takes under twice the margin to
/// arrive.)
pub fn first_lease(interval_ms: u64) -> Duration {
    lease_for(interval_ms) - SOURCE_MARGIN
}

/// The lease that goes with an interval: the interval and 250 ms for the next checkpoint to
/// be taken, sent, committed and acknowledged. It bounds how long a dead destination keeps the
/// VM from resuming at the source (350 ms + the source's margin at the default interval).
pub fn lease_for(interval_ms: u64) -> Duration {
    Duration::from_millis((interval_ms + 250).max(MIN_LEASE_MS))
}

/// Checkpoints as `query-migrate` shows them, on either end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointStatus {
    /// `open` (cancellable), `handed-over` (completed: no rollback any more), `resuming` then
    /// `rolled-back` (source: the VM runs here again), `fenced` / `suspended` (destination:
    /// stopped).
    pub state: &'static str,
    pub interval_ms: u64,
    pub lease_ms: u64,
    /// Checkpoints committed (acknowledged), and the epoch of the last.
    pub committed: u64,
    pub epoch: u64,
    /// Since the last commit (ms).
    pub last_commit_age_ms: Option<f64>,
    /// The guest's pause per checkpoint (µs).
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
    /// Dirty pages and bytes of all checkpoints, and of the last.
    pub pages: u64,
    pub bytes: u64,
    pub last_pages: u64,
    /// Destination: lines of guest output held until their checkpoint is committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_held: Option<u64>,
    /// Destination: how long released lines were held (line complete -> released, ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_delay_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_delay_max_ms: Option<f64>,
    /// Destination: time spent reading KVM's dirty log, all checkpoints (µs): with `pages`,
    /// the per-page cost of tracking writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_us: Option<u64>,
    /// Source: checkpoints refused (malformed, forged, cut short).
    pub rejected: u64,
    /// Why the migration was called off or the channel was lost.
    pub reason: Option<String>,
    /// Source, after a rollback: decision to resume -> vCPUs running here (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<f64>,
}

/// Pause times and totals, shared by both ends' statistics.
#[derive(Debug, Default)]
struct Tally {
    pauses_us: Vec<u64>,
    committed: u64,
    epoch: u64,
    last_commit: Option<Instant>,
    pages: u64,
    last_pages: u64,
    rejected: u64,
    reason: Option<String>,
    resume: Option<Duration>,
    tracking: Duration,
}

impl Tally {
    /// Checkpoint `epoch` of `pages` pages is committed; `pause_us` records its pause (the
    /// destination records pauses as it takes them).
    fn commit(&mut self, epoch: u64, pages: u64, pause_us: Option<u64>) {
        self.committed += 1;
        self.epoch = epoch;
        self.last_commit = Some(Instant::now());
        self.pages += pages;
        self.last_pages = pages;
        self.pauses_us.extend(pause_us);
    }

    fn status(&self, state: &'static str, interval_ms: u64) -> CheckpointStatus {
        let mut p = self.pauses_us.clone();
        p.sort_unstable();
        let pct = |q: usize| p.get((p.len().saturating_sub(1) * q) / 100).copied();
        CheckpointStatus {
            state,
            interval_ms,
            lease_ms: u64::try_from(lease_for(interval_ms).as_millis()).unwrap_or(u64::MAX),
            committed: self.committed,
            epoch: self.epoch,
            last_commit_age_ms: self.last_commit.map(|t| t.elapsed().as_secs_f64() * 1e3),
            pause_p50_us: pct(50).unwrap_or(0),
            pause_p99_us: pct(99).unwrap_or(0),
            pause_max_us: p.last().copied().unwrap_or(0),
            pages: self.pages,
            bytes: self.pages * PAGE_BYTES as u64,
            last_pages: self.last_pages,
            output_held: None,
            output_delay_p50_ms: None,
            output_delay_max_ms: None,
            tracking_us: None,
            rejected: self.rejected,
            reason: self.reason.clone(),
            resume_ms: self.resume.map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------------

/// One checkpoint as captured with the vCPUs paused.
#[derive(Debug)]
pub struct Captured {
    pub state: VmState,
    /// The pages written since the last checkpoint, sorted (their contents are in the buffer
    /// given to [`CheckpointedVm::capture`], in that order).
    pub dirty: Vec<Gfn>,
    /// The output epoch this checkpoint closes.
    pub epoch: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Of the pause: reading (and so re-arming) KVM's dirty log.
    pub tracking: Duration,
}

/// What the destination's checkpointer needs of its VM (implemented by [`crate::Vm`]).
pub trait CheckpointedVm: Send + Sync + 'static {
    /// Pauses the vCPUs (unless paused), captures the VM state and the pages written since
    /// the last capture (KVM dirty log) into the start of `data` (grown if needed, never
    /// shrunk: a buffer reused across checkpoints is already mapped), closes the output epoch,
    /// and resumes the vCPUs if they ran and may still run.
    fn capture(&self, data: &mut Vec<u8>) -> Result<Captured, MigrationError>;
    /// Pauses every vCPU now (the lease already forbids them to enter the guest again).
    fn stop_vcpus(&self);
    /// The devices (serial output gate, lease).
    fn devices(&self) -> &Arc<Devices>;
}

/// A checkpoint sent and not acknowledged yet.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    epoch: u64,
    /// When its `CheckpointBegin` went out: the lease counts from here.
    sent: Instant,
    lease: Duration,
    pages: u64,
}

/// The destination's side of a cancellable migration (module docs).
pub struct Checkpointer {
    vm: Weak<dyn CheckpointedVm>,
    /// The checkpoint channel, for writing (checkpoints, `Fenced`).
    writer: Mutex<TcpStream>,
    /// A clone, to shut it down.
    socket: TcpStream,
    asked_ms: u64,
    interval_ms: AtomicU64,
    /// Checkpoints sent and not yet acknowledged.
    in_flight: Mutex<VecDeque<InFlight>>,
    last_sent: AtomicU64,
    tally: Mutex<Tally>,
    /// The pages of the checkpoint being taken (reused).
    scratch: Mutex<Vec<u8>>,
    /// The checkpoint channel is over (the source closed it, handed the VM over, or is gone).
    over: AtomicBool,
    /// Set (and the checkpoint thread woken) to stop the periodic checkpoints: fenced, handed
    /// over, failed.
    stopping: (Mutex<bool>, Condvar),
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("interval_ms", &self.interval_ms)
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Starts checkpointing `vm` every `interval_ms` on `channel`. The lease and the output
    /// gate were set up before the vCPUs first ran (see `Vm::incoming`).
    pub fn start(
        vm: &Arc<impl CheckpointedVm>,
        channel: TcpStream,
        interval_ms: u32,
    ) -> Result<Arc<Self>, MigrationError> {
        channel.set_nodelay(true)?;
        let vm_dyn: Arc<dyn CheckpointedVm> = vm.clone();
        let me = Arc::new(Self {
            vm: Arc::downgrade(&vm_dyn),
            writer: Mutex::new(channel.try_clone()?),
            socket: channel.try_clone()?,
            asked_ms: u64::from(interval_ms.max(1)),
            interval_ms: AtomicU64::new(u64::from(interval_ms.max(1))),
            in_flight: Mutex::new(VecDeque::new()),
            last_sent: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
            scratch: Mutex::new(Vec::new()),
            over: AtomicBool::new(false),
            stopping: (Mutex::new(false), Condvar::new()),
            threads: Mutex::new(Vec::new()),
        });
        drop(vm_dyn);
        let (a, b, c) = (me.clone(), me.clone(), me.clone());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f)
        };
        let t1 = spawn("checkpoint", Box::new(move || a.checkpoint_loop()))?;
        let t2 = spawn("checkpoint-acks", Box::new(move || b.ack_loop(channel)))?;
        let t3 = spawn("lease-watch", Box::new(move || c.watch_lease()))?;
        me.threads.lock().expect("checkpoint lock").push(t1);
        drop((t2, t3)); // they end with the channel and the lease
        Ok(me)
    }

    fn devices(&self) -> Option<Arc<Devices>> {
        self.vm.upgrade().map(|vm| vm.devices().clone())
    }

    /// `query-migrate` at the destination.
    pub fn status(&self) -> CheckpointStatus {
        let devices = self.devices();
        let state = match devices.as_ref().map(|d| d.lease.state()) {
            Some(LeaseState::Leased) => "open",
            Some(LeaseState::Unlimited) => "handed-over",
            Some(LeaseState::Suspended) => "suspended",
            Some(LeaseState::Fenced) | None => "fenced",
        };
        let mut s = self
            .tally
            .lock()
            .expect("checkpoint lock")
            .status(state, self.interval_ms.load(Ordering::Relaxed));
        let tracking = self.tally.lock().expect("checkpoint lock").tracking;
        s.tracking_us = Some(u64::try_from(tracking.as_micros()).unwrap_or(u64::MAX));
        if let Some(d) = devices {
            s.output_held = Some(d.serial.held_lines() as u64);
            let mut delays = d.serial.output_delays();
            delays.sort_unstable();
            let ms = |d: &Duration| d.as_secs_f64() * 1e3;
            s.output_delay_p50_ms = delays.get(delays.len() / 2).map(ms);
            s.output_delay_max_ms = delays.last().map(ms);
        }
        s
    }

    /// Whether the migration is still open: the source might yet resume the VM.
    pub fn is_open(&self) -> bool {
        self.devices()
            .is_some_and(|d| d.lease.state() == LeaseState::Leased)
    }

    /// Sleeps until the next checkpoint is due or the checkpointer is stopped; returns
    /// whether it is stopped.
    fn sleep(&self, d: Duration) -> bool {
        let (lock, cv) = &self.stopping;
        let stopped = lock.lock().expect("checkpoint lock");
        *cv.wait_timeout_while(stopped, d, |s| !*s)
            .expect("checkpoint lock")
            .0
    }

    fn stop_checkpoints(&self) {
        *self.stopping.0.lock().expect("checkpoint lock") = true;
        self.stopping.1.notify_all();
    }

    fn checkpoint_loop(self: Arc<Self>) {
        // The first checkpoint comes early: until it is acknowledged the lease is the first one.
        let mut wait = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed) / 2);
        loop {
            if self.sleep(wait) {
                return;
            }
            let Some(vm) = self.vm.upgrade() else { return };
            if !vm.devices().lease.may_run() {
                return; // fenced, suspended: the watchdog or a cancel takes it from here
            }
            let t0 = Instant::now();
            if let Err(e) = self.send_checkpoint(vm.as_ref()) {
                log::warn!("reverse checkpoint failed: {e}; the lease will run out and the source resume the VM");
                self.tally.lock().expect("checkpoint lock").reason =
                    Some(format!("checkpoint failed: {e}"));
                return;
            }
            drop(vm);
            let interval = self.interval_ms.load(Ordering::Relaxed);
            wait = Duration::from_millis(interval).saturating_sub(t0.elapsed());
        }
    }

    /// Captures one checkpoint and sends it; adapts the interval to its pause.
    fn send_checkpoint(&self, vm: &dyn CheckpointedVm) -> Result<u64, MigrationError> {
        let mut data = self.scratch.lock().expect("checkpoint lock");
        let c = vm.capture(&mut data)?;
        let interval = self.interval_ms.load(Ordering::Relaxed);
        let pause_us = u64::try_from(c.pause.as_micros()).unwrap_or(u64::MAX);
        // Adaptive interval: keep the pauses under 5 % of the guest's time.
        let next = if pause_us * 20 > interval * 1000 {
            (interval * 2).min(MAX_INTERVAL_MS)
        } else if pause_us * 80 < interval * 1000 && interval > self.asked_ms {
            (interval / 2).max(self.asked_ms)
        } else {
            interval
        };
        if next != interval {
            log::debug!("checkpoint pause {pause_us} µs: interval {interval} -> {next} ms");
            self.interval_ms.store(next, Ordering::Relaxed);
        }
        // The lease must last until the next checkpoint is acknowledged: it is taken one
        // (new) interval from now.
        self.write_checkpoint(&c, &data, lease_for(next.max(interval)))?;
        drop(data);
        let mut t = self.tally.lock().expect("checkpoint lock");
        t.pauses_us.push(pause_us);
        t.tracking += c.tracking;
        Ok(c.epoch)
    }

    /// Writes checkpoint `c` on the channel, with `lease`.
    fn write_checkpoint(
        &self,
        c: &Captured,
        data: &[u8],
        lease: Duration,
    ) -> Result<(), MigrationError> {
        let mut w = self.writer.lock().expect("checkpoint lock");
        let sent = Instant::now();
        self.in_flight
            .lock()
            .expect("checkpoint lock")
            .push_back(InFlight {
                epoch: c.epoch,
                sent,
                lease,
                pages: c.dirty.len() as u64,
            });
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut *w);
        Message::CheckpointBegin {
            epoch: c.epoch,
            lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
            interval_ms: u32::try_from(self.interval_ms.load(Ordering::Relaxed))
                .unwrap_or(u32::MAX),
            state: c.state.to_bytes(),
        }
        .write_to(&mut out)?;
        let mut offset = 0;
        for (gfn, n) in gfn_runs(&c.dirty, u64::from(MAX_PAGES_PER_FRAME)) {
            let len = usize::try_from(n).expect("bounded run") * PAGE_BYTES;
            tsubame_pageserver::frame::write_pages(&mut out, gfn, &data[offset..offset + len])?;
            offset += len;
        }
        Message::CheckpointEnd {
            epoch: c.epoch,
            pages: c.dirty.len() as u64,
            pause_us: u64::try_from(c.pause.as_micros()).unwrap_or(u64::MAX),
        }
        .write_to(&mut out)?;
        std::io::Write::flush(&mut out)?;
        self.last_sent.store(c.epoch, Ordering::Release);
        Ok(())
    }

    /// Whether the source is done with this host: it handed the VM over, or closed the
    /// checkpoint channel (it resumed the VM, or is gone).
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// Reads the source's acknowledgements, `Cancel` and `Complete`, until the channel ends.
    fn ack_loop(self: Arc<Self>, channel: TcpStream) {
        set_nice(LEASE_NICE);
        self.read_acks(channel);
        self.over.store(true, Ordering::Release);
    }

    fn read_acks(&self, mut channel: TcpStream) {
        loop {
            match Message::read_from(&mut channel) {
                Ok(Message::CheckpointAck { epoch }) => self.acknowledged(epoch),
                Ok(Message::Complete) => {
                    let Some(devices) = self.devices() else {
                        return;
                    };
                    self.stop_checkpoints();
                    if devices.lease.own() {
                        devices.release_all();
                        // Vcpus that paused because the lease ran out may run again: the
                        // source promised never to resume the VM.
                        log::info!("the source handed the VM over: no rollback any more");
                        self.tally.lock().expect("checkpoint lock").reason = None;
                    }
                    return;
                }
                Ok(Message::Cancel) => {
                    if let Err(e) = self.cancel("cancelled at the source") {
                        log::warn!("the source asked to cancel: {e}");
                    }
                }
                Ok(m) => {
                    log::warn!("unexpected {m:?} on the checkpoint channel; ignoring it");
                }
                Err(e) => {
                    if self.is_open() {
                        log::warn!("checkpoint channel lost: {e}; the lease will run out");
                    }
                    self.tally
                        .lock()
                        .expect("checkpoint lock")
                        .reason
                        .get_or_insert_with(|| format!("checkpoint channel lost: {e}"));
                    // Whatever was not acknowledged is never released: the source resumes
                    // from its last committed checkpoint and the guest writes it again.
                    if let Some(d) = self.devices() {
                        if d.lease.state() != LeaseState::Unlimited {
                            d.drop_held();
                        }
                    }
                    return;
                }
            }
        }
    }

    fn acknowledged(&self, epoch: u64) {
        let acked = {
            let mut q = self.in_flight.lock().expect("checkpoint lock");
            let mut found = None;
            while q.front().is_some_and(|f| f.epoch <= epoch) {
                found = q.pop_front();
            }
            found
        };
        let Some(f) = acked.filter(|f| f.epoch == epoch) else {
            log::warn!("acknowledgement of checkpoint {epoch}, which was not sent; ignored");
            return;
        };
        let Some(devices) = self.devices() else {
            return;
        };
        devices.lease.renew(f.sent + f.lease);
        // The source committed it: its output may leave, even if the lease ran out meanwhile.
        devices.release(epoch);
        self.tally
            .lock()
            .expect("checkpoint lock")
            .commit(epoch, f.pages, None);
    }

    /// Stops the vCPUs when the lease is about to run out (module docs of `crate::fence`).
    fn watch_lease(self: Arc<Self>) {
        set_nice(LEASE_NICE);
        loop {
            std::thread::sleep(TICK);
            let Some(vm) = self.vm.upgrade() else { return };
            let lease = &vm.devices().lease;
            match lease.remaining() {
                Some(left) if left <= FENCE_GUARD => {
                    // Out of lease: the vCPUs stop now, and the lease reads as run out even
                    // if an acknowledgement arrives this instant.
                    if lease.suspend() {
                        vm.stop_vcpus();
                        self.stop_checkpoints();
                        log::warn!(
                            "no acknowledgement from the source within the lease: the VM stops here; the source resumes it"
                        );
                        self.tally.lock().expect("checkpoint lock").reason =
                            Some("the lease ran out: the source resumes the VM".into());
                        let epoch = self.last_sent.load(Ordering::Acquire);
                        let _ = Message::Fenced { epoch }
                            .write_to(&mut *self.writer.lock().expect("checkpoint lock"));
                    }
                }
                Some(_) => {}
                None => {
                    if lease.state() != LeaseState::Suspended {
                        return; // fenced or handed over: nothing left to watch
                    }
                }
            }
        }
    }

    /// Calls the migration off here (`migrate-cancel` at either end): stops the vCPUs for
    /// good and sends `Fenced`. Fails if the VM was handed over already.
    pub fn cancel(&self, why: &str) -> Result<(), MigrationError> {
        let Some(vm) = self.vm.upgrade() else {
            return Err(MigrationError::NotMigrating);
        };
        let lease = &vm.devices().lease;
        if lease.state() == LeaseState::Unlimited {
            return Err(MigrationError::TooLateToCancel);
        }
        if !lease.fence() {
            return Ok(()); // already fenced
        }
        vm.stop_vcpus();
        self.stop_checkpoints();
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("checkpoint lock")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
        self.tally.lock().expect("checkpoint lock").reason = Some(why.to_string());
        // No last checkpoint: the source resumes from the last one it committed (a checkpoint
        // sent before this is committed first), and the guest redoes what it did here since,
        // unseen (its output since was held and is dropped). The cancel takes a round trip and
        // the restore, not a copy of everything written since.
        let epoch = self.last_sent.load(Ordering::Acquire);
        let fenced =
            Message::Fenced { epoch }.write_to(&mut *self.writer.lock().expect("checkpoint lock"));
        if let Err(e) = fenced {
            log::warn!("cannot tell the source that the VM stopped here ({e}); it resumes it once the lease runs out");
        }
        Ok(())
    }

    /// Stops everything (the VM is going away).
    pub fn shutdown(&self) {
        self.stop_checkpoints();
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------------

/// Where the source's side of a cancellable migration is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settled {
    /// The source may still resume the VM.
    Open,
    /// Completed: the destination owns the VM (`Complete` sent).
    HandedOver,
    /// The VM runs here again.
    RolledBack,
}

#[derive(Debug)]
struct SourceInner {
    settled: Settled,
    /// The last committed state (the switchover's to begin with).
    committed: VmState,
    /// Resuming here is safe once the clock passes this (module docs of `crate::fence`).
    bound: Instant,
    fenced: bool,
    /// An operator asked to cancel; `Cancel` was sent.
    cancel_asked: bool,
    /// Rolled back, and the attempt to resume the VM here is over (see `tally.resume`).
    resume_done: bool,
    tally: Tally,
    interval_ms: u64,
}

/// A checkpoint being received.
struct Staging {
    epoch: u64,
    interval_ms: u64,
    lease: Duration,
    state: VmState,
    begun: Instant,
    pages: Vec<(Gfn, Vec<u8>)>,
    count: u64,
}

/// What the source needs to resume its VM (implemented by [`crate::Vm`]).
pub trait ResumableVm: Send + Sync + 'static {
    /// Loads `state` into the paused vCPUs and devices and runs them (dirty log off).
    fn resume_from(&self, state: VmState) -> Result<(), MigrationError>;
}

/// The source's side of a cancellable migration (module docs).
pub struct Reverse {
    memory: Arc<GuestMemory>,
    writer: Mutex<TcpStream>,
    inner: Mutex<SourceInner>,
    changed: Condvar,
}

impl std::fmt::Debug for Reverse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reverse").finish_non_exhaustive()
    }
}

/// How the source's side ends: hand the VM over when serving completes, roll back otherwise.
pub trait ServingEnd: Send + Sync + 'static {
    /// The destination has every page.
    fn completed(&self) -> bool;
    /// Stops serving pages and waits until nothing reads guest memory any more.
    fn stop_serving(&self);
    /// Runs `f` while nothing reads guest memory to serve it (a commit writes it).
    fn exclusive(&self, f: &mut dyn FnMut());
}

impl Reverse {
    /// Starts receiving checkpoints on `channel` for a VM whose state `state` was sent at
    /// `sent` with interval `interval_ms`. `vm` is resumed if it comes to that; `serving`
    /// says when the destination has every page.
    pub fn start(
        memory: Arc<GuestMemory>,
        channel: TcpStream,
        state: VmState,
        sent: Instant,
        interval_ms: u32,
        vm: Weak<dyn ResumableVm>,
        serving: Arc<dyn ServingEnd>,
    ) -> Result<Arc<Self>, MigrationError> {
        channel.set_nodelay(true)?;
        let lease = lease_for(u64::from(interval_ms));
        let me = Arc::new(Self {
            memory,
            writer: Mutex::new(channel.try_clone()?),
            inner: Mutex::new(SourceInner {
                settled: Settled::Open,
                committed: state,
                bound: sent + lease + SOURCE_MARGIN,
                fenced: false,
                cancel_asked: false,
                resume_done: false,
                tally: Tally::default(),
                interval_ms: u64::from(interval_ms),
            }),
            changed: Condvar::new(),
        });
        let (rx, rx_serving) = (me.clone(), serving.clone());
        std::thread::Builder::new()
            .name("checkpoint-rx".into())
            .spawn(move || rx.receive(channel, rx_serving.as_ref()))?;
        let watch = me.clone();
        std::thread::Builder::new()
            .name("checkpoint-watch".into())
            .spawn(move || watch.watch(&vm, serving.as_ref()))?;
        Ok(me)
    }

    /// `query-migrate` at the source.
    pub fn status(&self) -> CheckpointStatus {
        let s = self.inner.lock().expect("checkpoint lock");
        let state = match s.settled {
            Settled::Open => "open",
            Settled::HandedOver => "handed-over",
            Settled::RolledBack if !s.resume_done => "resuming",
            Settled::RolledBack => "rolled-back",
        };
        s.tally.status(state, s.interval_ms)
    }

    /// Whether the VM runs here again.
    pub fn rolled_back(&self) -> bool {
        self.inner.lock().expect("checkpoint lock").settled == Settled::RolledBack
    }

    /// Whether the source may still resume the VM.
    pub fn is_open(&self) -> bool {
        self.inner.lock().expect("checkpoint lock").settled == Settled::Open
    }

    /// `migrate-cancel` after the switchover: asks the destination to stop, and waits until the
    /// VM runs here again (the destination confirmed it stopped, or its lease ran out).
    pub fn cancel(&self, timeout: Duration) -> Result<(), MigrationError> {
        let mut s = self.inner.lock().expect("checkpoint lock");
        match s.settled {
            Settled::HandedOver => return Err(MigrationError::TooLateToCancel),
            Settled::RolledBack => return Ok(()),
            Settled::Open => {}
        }
        if !s.cancel_asked {
            s.cancel_asked = true;
            s.tally.reason = Some("cancelled at the source".into());
            if let Err(e) =
                Message::Cancel.write_to(&mut *self.writer.lock().expect("checkpoint lock"))
            {
                log::warn!("cannot send Cancel ({e}): the VM resumes here once the destination's lease has run out");
            }
        }
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| {
                s.settled == Settled::Open || s.settled == Settled::RolledBack && !s.resume_done
            })
            .expect("checkpoint lock");
        match s.settled {
            Settled::RolledBack if s.tally.resume.is_some() => Ok(()),
            Settled::RolledBack if s.resume_done => Err(MigrationError::Unsupported(format!(
                "the destination stopped, but the VM cannot resume here: {}",
                s.tally.reason.clone().unwrap_or_default()
            ))),
            Settled::HandedOver => Err(MigrationError::TooLateToCancel),
            Settled::Open | Settled::RolledBack => Err(MigrationError::Unsupported(
                "the cancel did not finish in time; query-migrate shows where it is".into(),
            )),
        }
    }

    /// Reads checkpoints until the channel ends.
    fn receive(self: Arc<Self>, mut channel: TcpStream, serving: &dyn ServingEnd) {
        set_nice(LEASE_NICE);
        let layout = self.memory.layout().clone();
        let mut staging: Option<Staging> = None;
        let why = loop {
            let m = match Message::read_from(&mut channel) {
                Ok(m) => m,
                Err(e) => break format!("checkpoint channel lost: {e}"),
            };
            if let Message::Fenced { epoch } = m {
                log::info!("the destination stopped the VM (last checkpoint {epoch})");
                let mut s = self.inner.lock().expect("checkpoint lock");
                s.fenced = true;
                self.changed.notify_all();
                continue;
            }
            match self.take(m, &mut staging, &layout, serving) {
                Ok(Some(epoch)) => {
                    let ack = Message::CheckpointAck { epoch }
                        .write_to(&mut *self.writer.lock().expect("checkpoint lock"));
                    if let Err(e) = ack {
                        break format!("cannot acknowledge checkpoint {epoch}: {e}");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let mut s = self.inner.lock().expect("checkpoint lock");
                    s.tally.rejected += 1;
                    log::warn!("checkpoint rejected, guest memory here unchanged: {e}");
                    // Nothing more from this channel is trusted: the VM resumes here once the
                    // destination's lease runs out.
                    let _ = channel.shutdown(Shutdown::Both);
                    break format!("checkpoint rejected: {e}");
                }
            }
        };
        let mut s = self.inner.lock().expect("checkpoint lock");
        if s.settled == Settled::Open {
            log::warn!("{why}; the VM resumes here once the destination's lease has run out");
            s.tally.reason.get_or_insert(why);
        }
        self.changed.notify_all();
    }

    /// Takes one message of a checkpoint; returns the epoch committed, if this ended one.
    fn take(
        &self,
        m: Message,
        staging: &mut Option<Staging>,
        layout: &MemoryLayout,
        serving: &dyn ServingEnd,
    ) -> Result<Option<u64>, ProtocolError> {
        let bad = |why: String| ProtocolError::Malformed {
            kind: "checkpoint",
            why,
        };
        match m {
            Message::CheckpointBegin {
                epoch,
                lease_ms,
                interval_ms,
                state,
            } => {
                if let Some(s) = staging {
                    return Err(bad(format!(
                        "checkpoint {epoch} begins inside checkpoint {}",
                        s.epoch
                    )));
                }
                let (last, vm, vcpus) = {
                    let s = self.inner.lock().expect("checkpoint lock");
                    (s.tally.epoch, s.committed.id, s.committed.vcpus.len())
                };
                if epoch <= last {
                    return Err(bad(format!("epoch {epoch} after {last}: epochs only grow")));
                }
                let state = VmState::from_bytes(&state).map_err(|e| bad(e.to_string()))?;
                if state.layout != *layout || state.vcpus.len() != vcpus || state.id != vm {
                    return Err(bad(
                        "the state's VM, layout or vCPU count differs from this VM's".into(),
                    ));
                }
                if lease_ms == 0 || lease_ms > 600_000 {
                    return Err(bad(format!("lease of {lease_ms} ms")));
                }
                *staging = Some(Staging {
                    epoch,
                    interval_ms: u64::from(interval_ms),
                    lease: Duration::from_millis(u64::from(lease_ms)),
                    state,
                    begun: Instant::now(),
                    pages: Vec::new(),
                    count: 0,
                });
                Ok(None)
            }
            Message::Pages { gfn, data } => {
                let s = staging
                    .as_mut()
                    .ok_or_else(|| bad("pages outside a checkpoint".into()))?;
                let n = (data.len() / PAGE_BYTES) as u64;
                if !layout.contains(gfn.gpa(), data.len() as u64) {
                    return Err(bad(format!(
                        "{n} pages at gfn {:#x} are outside the VM",
                        gfn.0
                    )));
                }
                s.count += n;
                if s.count > layout.total_pages() {
                    return Err(bad("more pages than the VM has".into()));
                }
                s.pages.push((gfn, data));
                Ok(None)
            }
            Message::ZeroPages { gfn, count } => {
                let s = staging
                    .as_mut()
                    .ok_or_else(|| bad("pages outside a checkpoint".into()))?;
                let bytes = count.checked_mul(PAGE_BYTES as u64);
                if !bytes.is_some_and(|b| layout.contains(gfn.gpa(), b)) {
                    return Err(bad(format!(
                        "{count} zero pages at gfn {:#x} are outside the VM",
                        gfn.0
                    )));
                }
                s.count += count;
                if s.count > layout.total_pages() {
                    return Err(bad("more pages than the VM has".into()));
                }
                s.pages.push((
                    gfn,
                    vec![0; usize::try_from(count).unwrap_or(0) * PAGE_BYTES],
                ));
                Ok(None)
            }
            Message::CheckpointEnd {
                epoch,
                pages,
                pause_us,
            } => {
                let s = staging
                    .take()
                    .ok_or_else(|| bad(format!("end of checkpoint {epoch}, which never began")))?;
                if s.epoch != epoch || s.count != pages {
                    return Err(bad(format!(
                        "checkpoint {} with {} pages ended as checkpoint {epoch} with {pages}",
                        s.epoch, s.count
                    )));
                }
                Ok(self.commit(s, pause_us, serving).then_some(epoch))
            }
            m => Err(ProtocolError::unexpected("a checkpoint", m)),
        }
    }

    /// Commits a whole checkpoint: its pages into guest memory (while the page server reads
    /// none of it), its state kept. Returns false if the migration is no longer open (the
    /// checkpoint is dropped).
    fn commit(&self, c: Staging, pause_us: u64, serving: &dyn ServingEnd) -> bool {
        // Lock order: the server's reads, then `inner` (the watchdog never waits for the
        // server while it holds `inner`). Pages and state change under `inner` together: a
        // rollback sees all of this checkpoint or none of it.
        let Staging {
            epoch,
            interval_ms,
            lease,
            state,
            begun,
            pages,
            count,
        } = c;
        let mut state = Some(state);
        let mut committed = false;
        serving.exclusive(&mut || {
            let mut s = self.inner.lock().expect("checkpoint lock");
            if s.settled != Settled::Open {
                return;
            }
            for (gfn, data) in &pages {
                // Checked against the layout when staged.
                if let Err(e) = self.memory.write(Gpa(gfn.gpa().0), data) {
                    log::error!("committing checkpoint {epoch}: {e}");
                }
            }
            if let Some(state) = state.take() {
                s.committed = state;
            }
            s.bound = s.bound.max(begun + lease + SOURCE_MARGIN);
            s.interval_ms = interval_ms;
            s.tally.commit(epoch, count, Some(pause_us));
            committed = true;
        });
        committed
    }

    /// Hands the VM over when serving completes; resumes it here when the destination stopped
    /// or its lease has surely run out.
    fn watch(&self, vm: &Weak<dyn ResumableVm>, serving: &dyn ServingEnd) {
        let mut s = self.inner.lock().expect("checkpoint lock");
        loop {
            if s.settled != Settled::Open {
                return;
            }
            if serving.completed() && !s.cancel_asked {
                s.settled = Settled::HandedOver;
                drop(s);
                // From here on the source never resumes the VM, whatever happens.
                let mut w = self.writer.lock().expect("checkpoint lock");
                if let Err(e) = Message::Complete.write_to(&mut *w) {
                    log::warn!("cannot tell the destination it owns the VM now ({e}); it stays suspended until told");
                }
                let _ = w.shutdown(Shutdown::Both);
                drop(w);
                self.changed.notify_all();
                return;
            }
            let now = Instant::now();
            if s.fenced || now >= s.bound {
                let why = if s.fenced {
                    "the destination stopped the VM"
                } else {
                    "the destination's lease ran out"
                };
                s.settled = Settled::RolledBack;
                let state = s.committed.clone();
                let epoch = s.tally.epoch;
                s.tally.reason.get_or_insert_with(|| why.to_string());
                drop(s);
                let t0 = Instant::now();
                serving.stop_serving();
                let resumed = vm
                    .upgrade()
                    .ok_or(MigrationError::NotMigrating)
                    .and_then(|vm| vm.resume_from(state));
                let took = t0.elapsed();
                // The destination is done with: its acknowledgement reader ends.
                let _ = self
                    .writer
                    .lock()
                    .expect("checkpoint lock")
                    .shutdown(Shutdown::Both);
                let mut s = self.inner.lock().expect("checkpoint lock");
                s.resume_done = true;
                match resumed {
                    Ok(()) => {
                        log::warn!(
                            "{why}: the VM runs here again from checkpoint {epoch} ({took:?})"
                        );
                        s.tally.resume = Some(took);
                    }
                    Err(e) => {
                        log::error!("{why}, and the VM cannot resume here: {e}");
                        s.tally.reason = Some(format!("{why}, and the VM cannot resume here: {e}"));
                    }
                }
                self.changed.notify_all();
                return;
            }
            let wait = TICK.min(s.bound.saturating_duration_since(now));
            s = self
                .changed
                .wait_timeout(s, wait)
                .expect("checkpoint lock")
                .0;
        }
    }
}
