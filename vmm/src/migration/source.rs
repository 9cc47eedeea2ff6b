//! The source of a migration: a worker thread that moves the VM away, then the page server of
//! its memory.
//!
//! [`start`] registers an [`Outgoing`] migration and runs [`run`] on a worker thread:
//!
//! 1. *Session*: dial the destination (urgent and bulk channels, both authenticated) and wait
//!    for its `Ready`: its VM is created and its receivers run. Nothing about the VM changes
//!    before, so a refused connection leaves it running here, and the downtime never includes
//!    the destination's setup.
//! 2. *Precopy rounds* (optional, hybrid migration), while the guest keeps running: with KVM's
//!    dirty log on, round 1 sends every page on the bulk channel, each later round drops the
//!    destination's stale copies of the pages written since (`Discard`) and sends them again.
//!    Each round ends with `RoundDone`, which the destination acknowledges once it has
//!    installed it, so the bulk channel is empty when the next round (or the switchover)
//!    starts. Rounds never have to converge: whatever the guest wrote after the last one
//!    simply goes postcopy. Discard-only passes then drop what the guest wrote since the last
//!    round until a pass is small, so that the switchover's own discards are few.
//! 3. *Split* (optional), still before the pause: the stripes of memory the memservers will
//!    hold are dealt to them in turn, a store session is opened at each, and each is named to
//!    the destination (`Owners` without pages), which dials it and says `Ready`. The stripes
//!    are withheld from the destination's push.
//! 4. *Switchover*: pause the vCPUs, send the vCPU and device state, then drop the pages
//!    written since the last round and end the precopy phase (`PrecopyDone`) on the bulk
//!    channel; the destination reads the state while it drops them. Without precopy rounds
//!    nothing precedes `PrecopyDone` on the bulk channel, and it goes before the pause, so
//!    that the destination has it when the state arrives.
//! 5. *Postcopy*: the worker ends; the page server answers demand requests and pushes every
//!    other page (address order, around faults, or hot pages first: [`Prepage`]) straight from
//!    the frozen guest memory until the destination says `Complete`. A split's stripes are
//!    stored at the memservers meanwhile, all in parallel with the push, straight from the
//!    same frozen memory; when the push has sent its last page and every store has ended, the
//!    source hands each memserver's stripes over to it (`Owners` on the bulk channel, before
//!    `PushDone`): the destination asks the memservers for those pages from then on, and
//!    keeps them there (split-memory hosting) until it consolidates. A memserver that failed
//!    gets nothing handed over: its stripes are pushed to the destination instead. The
//!    destination says `Complete` once the source owns none of its pages, so the migration
//!    ends when the larger of the two halves has been sent, not the sum.
//!
//! *Release* (`release=on`, eviction): from the switchover on, the page server frees each page
//! of the frozen guest memory once the destination holds it (`MADV_DONTNEED`, see
//! `tsubame_pageserver::server`), so the source host gets its memory back as the migration
//! goes, not only when it ends. Not before: until the switchover the guest runs here, and
//! every page it has may yet be written and sent again. Not with a cancellable migration,
//! which needs the source's copy to resume the VM here.
//!
//! A [`CancelToken`] ends the worker at any point before the state is out: the VM keeps running
//! here (the destination runs it only after `PrecopyDone` and the state).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tsubame_pages::{
    gfn_runs, run_buffer, run_bytes, take_run, Gfn, MemoryLayout, PageError, PageRun, PageStore,
};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::message::MAX_OWNER_RUNS;
use tsubame_pageserver::session::{self, Session};
use tsubame_pageserver::{
    server::PushHook, BulkSender, Hello, HotPages, Message, PageServer, Prepage, ProtocolError,
    Purpose, PushOptions, SendKind, ServeState,
};

use super::checkpoint::{ResumableVm, Reverse, ServingEnd};
use super::switch::{SwitchRequest, SwitchStatus, Switched};
use super::{
    CancelToken, HeldStatus, MigrateOptions, MigrationError, MigrationStatus, Phase, Split,
    SplitStatus,
};
use crate::clock::unix_us;
use crate::memory::GuestMemory;
use crate::paging::owners::{EndpointId, Owner, OwnerMap};
use crate::state::VmState;

/// What a VM offers the migration of it (implemented by [`crate::Vm`]): its memory, its dirty
/// log, the switchover's pause, and (cancellable migrations) resuming from a checkpoint.
pub trait MigratableVm: ResumableVm {
    /// Guest memory.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// The VM's identity.
    fn id(&self) -> u64;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;
    /// Starts or stops KVM's dirty log on all of guest memory.
    fn set_dirty_logging(&self, on: bool) -> Result<(), MigrationError>;
    /// The pages written since the last call (or since the log started), sorted.
    fn take_dirty_pages(&self) -> Result<Vec<Gfn>, MigrationError>;
    /// The VM's owner map and the page servers another host could fetch its pages from (it
    /// runs split: it arrived by a split migration, or evicts to memservers); `None`: all its
    /// memory is here.
    fn page_owners(&self) -> Option<PageOwners> {
        None
    }
    /// Pauses every vCPU and captures the VM state, then runs `switch` with it and the time of
    /// the pause. If that fails and the VM has not `left` (its state never reached a
    /// destination that could run it), the vCPUs resume, unless the operator had paused them.
    fn pause_for_switchover(
        &self,
        switch: impl FnOnce(VmState, Instant) -> Result<(), MigrationError>,
        left: impl Fn() -> bool,
    ) -> Result<(), MigrationError>;
}

/// A split VM's owner map, and the page servers other hosts can fetch its pages from, with
/// their addresses and whether each is a memserver (else the source of the migration that
/// brought the VM here, serving what it still lacks: a migration switched after its
/// switchover).
pub type PageOwners = (Arc<OwnerMap>, Vec<(EndpointId, String, bool)>);

/// Drop passes before the pause stop once one covers at most this many pages (4 MiB: a few
/// hundred microseconds for the destination to drop)...
const DROP_PASS_SMALL: usize = 1024;
/// ...or after this many passes, for a guest that writes faster than the destination drops.
const DROP_PASSES_MAX: u32 = 8;
/// Longest wait for the destination to create its VM after the handshake.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages per stripe of a split (2 MiB).
const SPLIT_STRIPE: u64 = 512;
/// Default length of the write profile of hot-first prepaging.
const PROFILE_DEFAULT: Duration = Duration::from_millis(100);

/// The source's guest memory as a [`PageStore`]. While the guest runs (precopy rounds, the
/// split), pages are copied out, and whatever the guest writes meanwhile is caught by the dirty
/// log and sent again. Once [`Self::freeze`] is called (the vCPUs paused for good at the
/// switchover), pages are sent straight from guest memory, and pages `/proc/self/pagemap`
/// shows were never populated go as zero markers without being read (which would map them).
#[derive(Debug)]
pub struct GuestMemoryStore {
    memory: Arc<GuestMemory>,
    frozen: AtomicBool,
    /// `/proc/self/pagemap` (None: unreadable, pages are read).
    pagemap: Option<std::fs::File>,
}

impl GuestMemoryStore {
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        Self {
            memory,
            frozen: AtomicBool::new(false),
            pagemap: std::fs::File::open("/proc/self/pagemap")
                .inspect_err(|e| log::warn!("zero pages will be found by reading them: {e}"))
                .ok(),
        }
    }

    /// Declares guest memory unchanging from now on: the vCPUs are paused for good (the VM
    /// migrated away; a cancellable migration resumes them only once serving has stopped), and
    /// nothing else writes it while pages are read (a commit of a reverse checkpoint waits for
    /// that: `PageServer::exclusive`). Reads no longer copy.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }
}

impl PageStore for GuestMemoryStore {
    fn layout(&self) -> &MemoryLayout {
        self.memory.layout()
    }

    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError> {
        let bad = |e: crate::memory::MemoryError| PageError::backend("reading guest memory", e);
        if self.frozen.load(Ordering::Acquire) {
            let len = run_bytes(gfn, pages)?;
            // SAFETY: frozen: the vCPUs are paused for good, and the only other writer (a
            // cancellable migration committing a reverse checkpoint) writes only inside
            // `PageServer::exclusive`, which waits until no page is being read and sent, and
            // the page server uses this slice only while it sends it (see `freeze`); the
            // mapping lives as long as `self.memory`.
            return unsafe { self.memory.frozen_slice(gfn.gpa(), len) }.map_err(bad);
        }
        // The guest runs: take a copy (whatever it writes meanwhile is sent again).
        let buf = run_buffer(scratch, gfn, pages)?;
        self.memory.read(gfn.gpa(), buf).map_err(bad)?;
        Ok(buf)
    }

    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        let Some(pm) = self.pagemap.as_ref() else {
            zero.clear();
            return Ok(());
        };
        let n = usize::try_from(pages).map_err(|_| PageError::OutOfRange { gfn, pages })?;
        self.memory
            .populated(pm, gfn.gpa(), n, zero)
            .map_err(|e| PageError::backend("reading /proc/self/pagemap", e))?;
        zero.iter_mut()
            .for_each(|populated| *populated = !*populated);
        Ok(())
    }

    /// Frees the pages' memory (`MADV_DONTNEED`): refused until [`Self::freeze`], since a
    /// guest that may still run here needs every page it has.
    unsafe fn release(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        const WHAT: &str = "releasing guest memory";
        if !self.frozen.load(Ordering::Acquire) {
            return Err(PageError::backend(
                WHAT,
                "the guest may still run here (memory is released only after the switchover)",
            ));
        }
        let len = run_bytes(gfn, pages)? as u64;
        // SAFETY: the caller promises that no slice `read` returned over these pages (the
        // only slices of guest memory this store hands out) is alive or taken meanwhile.
        unsafe { self.memory.release(gfn.gpa(), len) }.map_err(|e| PageError::backend(WHAT, e))
    }
}

/// An outgoing migration: what the worker and the page server report.
#[derive(Debug)]
pub struct Outgoing {
    /// Where the VM goes (the new destination, once switched).
    destination: Mutex<String>,
    /// A `migrate-switch` waiting for the worker (see [`super::switch`]).
    switch_request: Mutex<Option<SwitchRequest>>,
    /// The switch made, if any.
    switched_to: Mutex<Option<Arc<Switched>>>,
    /// The session's Hello (the VM's identity and layout), once the worker made it.
    hello: Mutex<Option<Hello>>,
    /// This host's address on the link to the destination (from the switchover on): a switch
    /// after the switchover serves the new destination there.
    local_ip: Mutex<Option<std::net::IpAddr>>,
    /// Where the destination dials back if the session breaks after the switchover.
    recovery: Mutex<Option<(Arc<super::recover::Recovery>, String, u32)>>,
    /// A switch after the switchover: the page server of the pages the old destination lacks,
    /// for the new destination (once it dialled in).
    onward: Arc<std::sync::OnceLock<Arc<PageServer<GuestMemoryStore>>>>,
    started: Instant,
    /// The page server of this VM's memory (serving once the VM switched over).
    server: Arc<PageServer<GuestMemoryStore>>,
    cancel: CancelToken,
    precopy_rounds: u32,
    precopy_round: AtomicU32,
    pages_stale: AtomicU64,
    /// Start -> pause; pause -> state sent.
    switched: Mutex<Option<(Duration, Duration)>>,
    /// Wall-clock time of the pause (µs since the Unix epoch), to compare with the
    /// destination's resume time on the same host.
    paused_unix_us: AtomicU64,
    state_bytes: AtomicU64,
    prepage: Mutex<(Prepage, u64)>,
    split: Mutex<Option<SplitStatus>>,
    /// A split VM: the pages left at each memserver.
    held: Mutex<Vec<HeldStatus>>,
    /// A failure before the server took over.
    failed: Mutex<Option<String>>,
    /// A cancellable migration: reverse checkpoints this often (ms).
    checkpoint_ms: Option<u32>,
    /// A cancellable migration, switched over: the checkpoints received from the destination.
    reverse: Mutex<Option<Arc<Reverse>>>,
}

/// The end of serving, as the checkpoint receiver sees it.
struct Serving(Arc<PageServer<GuestMemoryStore>>);

impl ServingEnd for Serving {
    fn completed(&self) -> bool {
        self.0.status().state == ServeState::Completed
    }

    fn stop_serving(&self) {
        self.0.stop_and_wait();
    }

    fn exclusive(&self, f: &mut dyn FnMut()) {
        self.0.exclusive(f);
    }
}

impl Outgoing {
    /// A migration of `memory` to `destination`, not started.
    pub fn new(destination: &str, memory: Arc<GuestMemory>, options: &MigrateOptions) -> Self {
        Self {
            destination: Mutex::new(destination.to_string()),
            switch_request: Mutex::new(None),
            switched_to: Mutex::new(None),
            hello: Mutex::new(None),
            local_ip: Mutex::new(None),
            recovery: Mutex::new(None),
            onward: Arc::default(),
            started: Instant::now(),
            server: Arc::new(PageServer::new(GuestMemoryStore::new(memory))),
            cancel: CancelToken::default(),
            precopy_rounds: options.precopy_rounds,
            precopy_round: AtomicU32::new(0),
            pages_stale: AtomicU64::new(0),
            switched: Mutex::new(None),
            paused_unix_us: AtomicU64::new(0),
            state_bytes: AtomicU64::new(0),
            prepage: Mutex::new((options.prepage, 0)),
            split: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            checkpoint_ms: options.checkpoint_ms,
            reverse: Mutex::new(None),
        }
    }

    fn reverse(&self) -> Option<Arc<Reverse>> {
        self.reverse.lock().expect("migration lock").clone()
    }

    /// Whether a cancellable migration was rolled back: the VM runs here again.
    pub fn rolled_back(&self) -> bool {
        self.reverse().is_some_and(|r| r.rolled_back())
    }

    /// Whether the VM, switched over, may still be resumed here.
    pub fn rollback_possible(&self) -> bool {
        self.reverse().is_some_and(|r| r.is_open())
    }

    /// `migrate-cancel` after the switchover: only a cancellable migration that has not
    /// completed can be; returns once the VM runs here again.
    pub fn cancel_after_switchover(&self) -> Result<(), MigrationError> {
        let reverse = self.reverse().ok_or(MigrationError::TooLateToCancel)?;
        let lease = super::checkpoint::lease_for(u64::from(self.checkpoint_ms.unwrap_or(0)));
        reverse.cancel(lease * 4 + Duration::from_secs(2))
    }

    /// The migration's cancel token.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Whether the VM state went out: from then on the VM runs at the destination.
    pub fn switched_over(&self) -> bool {
        self.switched.lock().expect("migration lock").is_some()
    }

    /// Records a failure before switchover (the VM stays here) and returns the error to
    /// report, saying where it happened.
    pub fn abort(&self, e: &dyn std::fmt::Display) -> MigrationError {
        *self.failed.lock().expect("migration lock") = Some(e.to_string());
        let round = self.precopy_round.load(Ordering::Relaxed);
        MigrationError::Aborted {
            stage: if round == 0 {
                "the switchover".into()
            } else {
                format!("precopy round {round} of {}", self.precopy_rounds)
            },
            reason: e.to_string(),
        }
    }

    /// `query-migrate` on the source.
    pub fn status(&self) -> MigrationStatus {
        let s = self.server.status();
        let switched = *self.switched.lock().expect("migration lock");
        let failed = self.failed.lock().expect("migration lock").clone();
        let (prepage, hot_pages) = *self.prepage.lock().expect("migration lock");
        let reverse = self.reverse();
        let checkpoints = reverse.as_ref().map(|r| r.status());
        let recovery = self
            .recovery
            .lock()
            .expect("migration lock")
            .as_ref()
            .map(|(r, _, _)| r.clone());
        let (phase, error) = match (failed, checkpoints.as_ref().map(|c| c.state)) {
            (Some(e), _) => (Phase::Failed, Some(e)),
            // A cancellable migration: whatever serving did, the VM may still come back here
            // until it is handed over.
            (None, Some("rolled-back")) => (Phase::Cancelled, None),
            (None, Some("handed-over")) => (Phase::Completed, None),
            (None, Some(_)) => (Phase::Postcopy, None),
            // Switched after the switchover: the old destination's session ends when it has
            // moved the VM on; what counts is serving the new one.
            (None, None) => match self
                .onward
                .get()
                .map_or(s.state.clone(), |o| o.status().state)
            {
                // The session broke after the switchover: the destination may dial back.
                ServeState::Failed(_) if recovery.as_ref().is_some_and(|r| !r.gave_up()) => {
                    (Phase::Postcopy, None)
                }
                ServeState::Idle => (Phase::Precopy, None),
                ServeState::Serving => (Phase::Postcopy, None),
                ServeState::Completed => (Phase::Completed, None),
                ServeState::Failed(e) => (Phase::Failed, Some(e.clone())),
            },
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        MigrationStatus {
            role: "source",
            phase,
            error,
            destination: self.destination(),
            precopy_rounds: self.precopy_rounds,
            precopy_round: self.precopy_round.load(Ordering::Relaxed),
            pages_precopy: s.pages_precopy,
            pages_stale: self.pages_stale.load(Ordering::Relaxed),
            precopy_ms: switched.map(|s| ms(s.0)),
            downtime_us: switched
                .map(|s| u64::try_from(s.1.as_micros()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            paused_unix_us: self.paused_unix_us.load(Ordering::Relaxed),
            state_bytes: self.state_bytes.load(Ordering::Relaxed),
            pages_demand: s.pages_demand,
            pages_pushed: s.pages_pushed,
            pages_duplicate: s.pages_duplicate,
            zero_pages: s.zero_pages,
            bytes_sent: s.bytes_sent,
            bytes_pushed: s.bytes_pushed,
            pages_released: s.pages_released,
            pages_asked_after_release: s.pages_asked_after_release,
            total_pages: self.server.store().layout().total_pages(),
            prepage,
            hot_pages,
            split: self.split.lock().expect("migration lock").clone(),
            held: self.held.lock().expect("migration lock").clone(),
            push_ms: s.push_ms,
            total_ms: s.serve_ms,
            checkpoints,
            recovery: recovery.map(|r| r.status()),
            switch: self.switch().map(|sw| match self.onward.get() {
                Some(o) => {
                    let o = o.status();
                    let mut st = sw.status(o.pages_pushed + o.pages_demand, o.bytes_sent);
                    // What the old destination had (or was being sent) when the new one came.
                    st.pages_at_old = o.pages_withheld;
                    st
                }
                None => sw.status(
                    s.pages_precopy + s.pages_pushed + s.pages_demand,
                    s.bytes_sent,
                ),
            }),
        }
    }

    /// Where the VM goes (the new destination, once switched).
    pub fn destination(&self) -> String {
        self.destination.lock().expect("migration lock").clone()
    }

    fn switch(&self) -> Option<Arc<Switched>> {
        self.switched_to.lock().expect("migration lock").clone()
    }

    /// `migrate-switch`: redirects this migration to the destination at `uri` before its
    /// switchover (see [`super::switch`]); returns once the new destination receives from
    /// both senders, or why it does not (the migration then goes on to the old destination,
    /// unless the error says it failed).
    pub fn switch_destination(
        &self,
        uri: &str,
        secret: &[u8],
    ) -> Result<SwitchStatus, MigrationError> {
        let refused = |reason: &str| MigrationError::Switch {
            to: uri.to_string(),
            reason: reason.to_string(),
        };
        session::parse_uri(uri)?;
        if let Some(sw) = self.switch() {
            return Err(refused(&format!(
                "this migration was switched already (to {}), and a second switch is not built yet",
                sw.status.lock().expect("switch lock").to
            )));
        }
        if *uri == self.destination() {
            return Err(refused("that is where the migration goes already"));
        }
        if self.checkpoint_ms.is_some() {
            return Err(refused(
                "switching a cancellable (cancellable=on) migration is not built yet",
            ));
        }
        if self.switched_over() {
            return self.switch_after(uri, secret);
        }
        if self.precopy_rounds == 0 {
            return Err(refused(
                "a postcopy-only migration switches over at once, so there is nothing to switch: migrate with precopy_rounds=N to be able to switch during the rounds",
            ));
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        {
            let mut asked = self.switch_request.lock().expect("migration lock");
            if asked.is_some() {
                return Err(refused("another switch is under way"));
            }
            *asked = Some(SwitchRequest {
                uri: uri.to_string(),
                secret: secret.to_vec(),
                asked: Instant::now(),
                reply: tx,
            });
        }
        rx.recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| {
                self.switch_request.lock().expect("migration lock").take();
                Err(refused(
                    "the migration worker did not take the request in 90 s",
                ))
            })
    }

    /// `migrate-switch` after the switchover (see [`super::switch`]): the old destination
    /// moves the VM on to `uri`, which fetches what the old one lacks straight from here.
    /// (The checks every switch needs are made by the caller.)
    fn switch_after(&self, uri: &str, secret: &[u8]) -> Result<SwitchStatus, MigrationError> {
        let refused = |reason: &str| MigrationError::Switch {
            to: uri.to_string(),
            reason: reason.to_string(),
        };
        if self.server.status().state != ServeState::Serving {
            return Err(refused(
                "the old destination has every page already (or was lost): migrate the VM on from there (ctl migrate at the old destination)",
            ));
        }
        let (Some(hello), Some(ip)) = (
            self.hello.lock().expect("migration lock").clone(),
            *self.local_ip.lock().expect("migration lock"),
        ) else {
            return Err(refused("the migration has not switched over yet"));
        };
        let asked = Instant::now();
        let from = self.destination();
        let first = self.server.clone();
        let onward = self.onward.clone();
        let store = GuestMemoryStore::new(first.store().memory.clone());
        store.freeze(); // switched over: the vCPUs never run here again
        let (peer, layout) = (format!("the new destination {uri}"), hello.layout.clone());
        let serve = move |session: Session| {
            let second = Arc::new(PageServer::new(store));
            // What the old destination has (or is being sent) it sends on itself.
            for (gfn, n) in first.sent_runs() {
                second.withhold(gfn, n);
            }
            // The old destination gets nothing more unasked: it asks for what it still needs
            // until it pauses, and the new destination gets the rest from here.
            for r in &layout.regions {
                first.withhold(r.first_gfn(), r.pages());
            }
            let _ = onward.set(second.clone());
            let served = BulkWriter::new(session.bulk, session.rtt)
                .map_err(tsubame_pageserver::ServerError::from)
                .and_then(|bulk| {
                    second.serve(
                        &peer,
                        session.urgent,
                        bulk,
                        super::switch::push_at_once(&layout),
                    )
                });
            if let Err(e) = served {
                log::warn!("cannot serve {peer}: {e}");
            }
        };
        super::switch::move_on(&from, uri, ip, secret, &hello, serve).map_err(|e| match e {
            e @ MigrationError::Switch { .. } => e,
            e => refused(&format!("{e}; the VM keeps running at {from}")),
        })?;
        *self.destination.lock().expect("migration lock") = uri.to_string();
        let switched = Arc::new(Switched {
            status: Mutex::new(SwitchStatus {
                from,
                to: uri.to_string(),
                at_ms: asked.duration_since(self.started).as_secs_f64() * 1e3,
                after_switchover: true,
                switch_ms: asked.elapsed().as_secs_f64() * 1e3,
                ..SwitchStatus::default()
            }),
            runs: Vec::new(),
            lost: AtomicBool::new(false),
            taken_back: AtomicBool::new(false),
            at: Instant::now(),
            sent_before: (0, 0),
        });
        *self.switched_to.lock().expect("migration lock") = Some(switched.clone());
        Ok(self.status().switch.unwrap_or_default())
    }

    /// Where the destination is to dial back if the session breaks after the switchover
    /// (see [`super::recover`]), once the resume listener is open.
    fn resume_at(&self) -> Option<Message> {
        self.recovery
            .lock()
            .expect("migration lock")
            .as_ref()
            .map(|(_, uri, within_ms)| Message::ResumeAt {
                uri: uri.clone(),
                within_ms: *within_ms,
            })
    }

    /// Counts `pages` written again by the guest and sent again (or left for the push): after
    /// a switch, what the source sends beyond what the old destination lacks.
    fn written_again(&self, pages: u64) {
        if let Some(sw) = self.switch() {
            sw.status.lock().expect("switch lock").pages_written_since += pages;
        }
    }

    /// Answers a switch request the worker will not take any more.
    fn refuse_switch(&self, why: &str) {
        if let Some(req) = self.switch_request.lock().expect("migration lock").take() {
            let _ = req.reply.send(Err(MigrationError::Switch {
                to: req.uri,
                reason: why.to_string(),
            }));
        }
    }
}

/// Starts migrating `vm` to `uri` on a worker thread (`migrate`) and returns the migration and
/// a channel that tells how the switchover went: `Ok` once the VM runs at the destination, or
/// why it did not (the VM then keeps running here).
pub fn start<V: MigratableVm + 'static>(
    vm: Arc<V>,
    out: &Arc<Outgoing>,
    uri: &str,
    secret: &[u8],
    options: &MigrateOptions,
) -> Result<crossbeam::channel::Receiver<Result<(), MigrationError>>, MigrationError> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    let (out, uri, secret, options) = (
        out.clone(),
        uri.to_string(),
        secret.to_vec(),
        options.clone(),
    );
    std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || {
            let r = run(&vm, &out, &uri, &secret, &options);
            let _ = tx.send(r);
        })?;
    Ok(rx)
}

/// The worker: everything up to and including the switchover (see the module docs).
pub fn run<V: MigratableVm + 'static>(
    vm_arc: &Arc<V>,
    out: &Arc<Outgoing>,
    uri: &str,
    secret: &[u8],
    options: &MigrateOptions,
) -> Result<(), MigrationError> {
    options.check()?;
    let vm = vm_arc.as_ref();
    let owners = vm.page_owners();
    if owners
        .as_ref()
        .is_some_and(|(map, servers)| servers.iter().any(|(id, _, _)| map.owned_by(*id) > 0))
        && options.checkpoint_ms.is_some()
    {
        return Err(MigrationError::Unsupported(
            "this VM has pages at memservers, and cancellable=on cannot keep them there yet: consolidate first (ctl consolidate wait=true) or migrate without cancellable=on".into(),
        ));
    }
    let resumable: Arc<dyn ResumableVm> = vm_arc.clone();
    let resumable = Arc::downgrade(&resumable);
    let hello = migrate_hello(vm, options.checkpoint_ms.unwrap_or(0));
    *out.hello.lock().expect("migration lock") = Some(hello.clone());
    let cancel = &out.cancel;
    cancel.check()?;
    let Session {
        mut urgent,
        bulk,
        checkpoint,
        rtt,
        ..
    } = session::open(uri, secret, &hello)
        .map_err(|e| MigrationError::opening("destination", "tsubame run --incoming", e))?;
    cancel.watch(&urgent)?;
    cancel.watch(&bulk)?;
    if let Some(c) = &checkpoint {
        cancel.watch(c)?;
    }
    wait_ready(&urgent, cancel)?;
    announce_resume(out, &mut urgent, secret, &hello, options)?;
    let held = match owners {
        Some((map, servers)) => announce_held(out, map, &servers, &mut urgent)?,
        None => None,
    };
    let mut bulk = BulkWriter::new(bulk, rtt)?;
    let mut hot = HotPages::new(vm.memory().layout());
    if options.precopy_rounds > 0 {
        vm.set_dirty_logging(true)?;
        let copied = (|| -> Result<(), MigrationError> {
            vm.take_dirty_pages()?; // start from a clean log
            precopy(vm, out, &mut urgent, &mut bulk, options, &mut hot)
        })();
        out.refuse_switch("too late: the precopy rounds are over and the switchover has begun");
        if copied.is_err() {
            let _ = vm.set_dirty_logging(false);
        }
        copied?;
    } else if options.prepage == Prepage::Hot {
        // Hot-first: what the guest writes during a short profile is pushed first.
        hot.add(&profile_writes(
            vm,
            options.profile.unwrap_or(PROFILE_DEFAULT),
        )?);
    }
    let split = match &options.split {
        Some(split) => Some(prepare_split(vm, out, split, secret, &hello, &mut urgent)?),
        None => None,
    };
    if options.precopy_rounds == 0 {
        // Nothing precedes `PrecopyDone` on the bulk channel then (no pages, no discards), and
        // the destination, which resumes the VM only after reading it, has it in hand when the
        // state arrives instead of waiting inside the downtime for its bulk receiver to wake
        // and read it. `bench migrate`, the three postcopy policies, 3 alternating rounds (9
        // runs each): downtime median 973 -> 684 µs, longest 1136 -> 831 µs.
        Message::PrecopyDone.write_to(&mut bulk)?;
        bulk.flush()?;
    }
    cancel.check()?;
    let logging = options.precopy_rounds > 0;
    let switched = vm.pause_for_switchover(
        |state, paused_at| {
            // Written since the last round: dropped at the destination, sent postcopy. (The log stays on: turning it off rebuilds the memory slots, which
            // would only lengthen the downtime; see below.)
            let stale = if logging {
                vm.take_dirty_pages()?
            } else {
                Vec::new()
            };
            if options.prepage == Prepage::Hot {
                hot.add(&stale); // with the drop passes': all written since the last round
            }
            log::debug!(
                "switchover: vCPUs paused and state captured after {:?}",
                paused_at.elapsed()
            );
            let channels = Channels {
                urgent,
                bulk,
                checkpoint,
            };
            let leftovers = Leftovers {
                split,
                held,
                secret,
                hello: &hello,
            };
            switch_over(
                out, state, channels, paused_at, options, hot, &stale, resumable, leftovers,
            )
        },
        || out.switched_over(),
    );
    // The log goes off only if the VM stays here. Once the state is sent the vCPUs never run
    // here again, and turning it off rebuilds the memory slots: milliseconds of CPU taken
    // exactly when the destination is resuming (measured: hybrid downtimes of 6 ms against
    // 1 ms on 2 cores).
    if logging && !out.switched_over() {
        let _ = vm.set_dirty_logging(false);
    }
    switched
}

/// Tells the destination where to dial back if the session breaks after the switchover
/// (`ResumeAt`), opening the resume listener the first time (see [`super::recover`]).
fn announce_resume(
    out: &Arc<Outgoing>,
    urgent: &mut TcpStream,
    secret: &[u8],
    hello: &Hello,
    options: &MigrateOptions,
) -> Result<(), MigrationError> {
    let within_ms = options
        .recover_ms
        .unwrap_or(super::recover::DEFAULT_RECOVER_MS);
    if within_ms == 0 {
        return Ok(());
    }
    let mut recovery = out.recovery.lock().expect("migration lock");
    if recovery.is_none() {
        let (r, uri) = super::recover::listen(
            urgent.local_addr()?.ip(),
            secret,
            hello,
            Arc::downgrade(&out.server),
            Duration::from_millis(u64::from(within_ms)),
            (options.prepage, options.max_bandwidth, options.release),
        )?;
        *recovery = Some((r, uri, within_ms));
    }
    drop(recovery);
    if let Some(m) = out.resume_at() {
        m.write_to(urgent)?;
    }
    Ok(())
}

/// The Hello that opens a migration session of `vm` (`checkpoint_ms`: 0 unless cancellable).
fn migrate_hello(vm: &impl MigratableVm, checkpoint_ms: u32) -> Hello {
    Hello {
        purpose: Purpose::Migrate,
        channel: tsubame_pageserver::Channel::Urgent,
        session: 0,
        vm: vm.id(),
        layout: vm.memory().layout().clone(),
        vcpus: u32::try_from(vm.vcpu_count()).expect("few vCPUs"),
        checkpoint_ms,
    }
}

/// Waits for the destination's `Ready`: its VM exists and its receivers run (or, after an
/// `Owners` announcement, it has dialled the owners named).
fn wait_ready(urgent: &TcpStream, cancel: &CancelToken) -> Result<(), MigrationError> {
    urgent.set_read_timeout(Some(READY_TIMEOUT))?;
    let got = Message::read_from(&mut &*urgent);
    urgent.set_read_timeout(None)?;
    cancel.check()?;
    match got {
        Ok(Message::Ready) => Ok(()),
        Ok(m) => Err(ProtocolError::unexpected("Ready", m).into()),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(MigrationError::NotReady {
                secs: READY_TIMEOUT.as_secs(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The precopy rounds and drop passes (module docs, step 2). The pages the drop passes find
/// written are added to `hot` when prepaging hot pages first.
fn precopy(
    vm: &impl MigratableVm,
    out: &Outgoing,
    urgent: &mut TcpStream,
    w: &mut BulkWriter,
    options: &MigrateOptions,
    hot: &mut HotPages,
) -> Result<(), MigrationError> {
    let server = &out.server;
    let mut sender = BulkSender::new(server, options.max_bandwidth);
    let layout = vm.memory().layout().clone();
    let send =
        |sender: &mut BulkSender<'_, _>, urgent: &mut TcpStream, w: &mut BulkWriter, gfn, n| {
            between_runs(vm, out, urgent, w, sender)?;
            sender
                .send(w, gfn, n, SendKind::Precopy)
                .map_err(MigrationError::from)
        };
    for round in 1..=out.precopy_rounds {
        out.precopy_round.store(round, Ordering::Relaxed);
        if round == 1 {
            let mut index = 0;
            while let Some(run) = layout.run_at(index, w.run_pages()) {
                send(&mut sender, urgent, w, run.gfn, run.pages)?;
                index += run.pages;
            }
        } else {
            let written = vm.take_dirty_pages()?;
            if written.is_empty() {
                break;
            }
            let mut rest = &written[..];
            while let Some((gfn, n)) = take_run(&mut rest, w.run_pages()) {
                server.unsend(gfn, n);
                out.written_again(n);
                Message::Discard { gfn, count: n }.write_to(w)?;
                send(&mut sender, urgent, w, gfn, n)?;
            }
        }
        end_round(urgent, w, round)?;
    }
    // Passes that drop, while the guest still runs here, what it wrote since the last round,
    // without sending it again: those pages go postcopy. The discards made at the switchover,
    // inside the downtime, then cover only the last moments: dropping a page costs the
    // destination about half a microsecond, so a fast writer's last round would otherwise take
    // tens of milliseconds of downtime. A guest writing while a pass is dropped leaves the next
    // pass less to do (it writes slower than the destination drops), so passes repeat until
    // one is small. Nothing between the last pass and the pause may take long (see
    // `HotPages`).
    for pass in 1..=DROP_PASSES_MAX {
        between_runs(vm, out, urgent, w, &mut sender)?;
        let dirtied = vm.take_dirty_pages()?;
        if dirtied.is_empty() {
            break;
        }
        for (gfn, n) in gfn_runs(&dirtied, u64::MAX) {
            let dropped = server.unsend(gfn, n);
            out.written_again(n);
            out.pages_stale.fetch_add(dropped, Ordering::Relaxed);
            Message::Discard { gfn, count: n }.write_to(w)?;
        }
        end_round(urgent, w, out.precopy_rounds + pass)?;
        if options.prepage == Prepage::Hot {
            hot.add(&dirtied);
        }
        if dirtied.len() <= DROP_PASS_SMALL {
            break;
        }
    }
    Ok(())
}

/// What the worker does between two runs of pages of the precopy phase: checks for a
/// cancel, makes a switch that was asked for, and takes back the pages of an old destination
/// that stopped forwarding them (see [`super::switch`]).
fn between_runs(
    vm: &impl MigratableVm,
    out: &Outgoing,
    urgent: &mut TcpStream,
    w: &mut BulkWriter,
    sender: &mut BulkSender<'_, GuestMemoryStore>,
) -> Result<(), MigrationError> {
    out.cancel.check()?;
    let asked = out.switch_request.lock().expect("migration lock").take();
    if let Some(req) = asked {
        match switch_to(vm, out, &req, urgent, w) {
            Ok((status, written)) => {
                let _ = req.reply.send(Ok(status));
                // What the guest wrote during the switch goes first.
                for (gfn, n) in gfn_runs(&written, w.run_pages()) {
                    sender.send(w, gfn, n, SendKind::Precopy)?;
                }
            }
            // Nothing changed: the migration goes on to the old destination.
            Err((e, false)) => {
                let _ = req.reply.send(Err(MigrationError::Switch {
                    to: req.uri.clone(),
                    reason: format!("{e}; the migration goes on to {}", out.destination()),
                }));
            }
            Err((e, true)) => {
                let _ = req.reply.send(Err(MigrationError::Switch {
                    to: req.uri.clone(),
                    reason: format!("{e}; the migration failed and the VM keeps running here"),
                }));
                return Err(e);
            }
        }
    }
    take_back_if_lost(out, w)
}

/// If the old destination of a switch stopped forwarding before it was done, makes every page
/// it held the source's again at the new destination (`Discard`: whatever copy is there is
/// dropped) and marks them unsent, so that the rounds or the push send them.
fn take_back_if_lost(out: &Outgoing, w: &mut BulkWriter) -> Result<(), MigrationError> {
    let Some(sw) = out.switch() else {
        return Ok(());
    };
    if !sw.take_back_due() {
        return Ok(());
    }
    let mut pages = 0;
    for &(gfn, count) in &sw.runs {
        out.server.unsend(gfn, count);
        Message::Discard { gfn, count }.write_to(w)?;
        pages += count;
    }
    sw.status.lock().expect("switch lock").pages_taken_back = pages;
    log::info!("took back the {pages} pages the lost old destination held: sending them from here");
    Ok(())
}

/// Makes the switch `req` asks for (see [`super::switch`], steps 1-4): on success `urgent`
/// and `w` are the new destination's, and the pages the guest wrote during the switch are
/// returned, to be sent first (step 5). An error says whether the migration failed (`true`), or
/// goes on to the old destination as if nothing happened (`false`).
fn switch_to(
    vm: &impl MigratableVm,
    out: &Outgoing,
    req: &SwitchRequest,
    urgent: &mut TcpStream,
    w: &mut BulkWriter,
) -> Result<(SwitchStatus, Vec<Gfn>), (MigrationError, bool)> {
    let from = out.destination();
    let round = out.precopy_round.load(Ordering::Relaxed);
    let goes_on = |e: MigrationError| (e, false);
    let failed = |e: MigrationError| (e, true);
    if !out.held.lock().expect("migration lock").is_empty() {
        return Err(goes_on(MigrationError::Unsupported(
            "this VM runs split (memservers hold pages of it), and switching such a migration is not built yet".into(),
        )));
    }
    // 1. The new destination, ready.
    let new = session::open(&req.uri, &req.secret, &migrate_hello(vm, 0)).map_err(|e| {
        goes_on(MigrationError::opening(
            "new destination",
            "tsubame run --incoming",
            e,
        ))
    })?;
    out.cancel.watch(&new.urgent).map_err(goes_on)?;
    out.cancel.watch(&new.bulk).map_err(goes_on)?;
    wait_ready(&new.urgent, &out.cancel).map_err(goes_on)?;
    if let Some(m) = out.resume_at() {
        m.write_to(&mut &new.urgent)
            .map_err(|e| goes_on(e.into()))?;
    }
    // 2. The old destination made current: what it holds is what is marked sent here.
    let written = vm.take_dirty_pages().map_err(failed)?;
    for (gfn, n) in gfn_runs(&written, u64::MAX) {
        out.server.unsend(gfn, n);
    }
    let old_ready = (|| -> Result<(), MigrationError> {
        end_round(urgent, w, round)?;
        // 3. It forwards from now on, all but what was written again here.
        Message::Forward {
            to: req.uri.clone(),
        }
        .write_to(urgent)?;
        let runs: Vec<(Gfn, u64)> = gfn_runs(&written, u64::MAX).collect();
        announce_owners(urgent, "", &runs)?;
        Message::Ready.write_to(urgent)?;
        wait_ready(urgent, &out.cancel)
    })();
    let (runs, lost) = match old_ready {
        Ok(()) => (out.server.sent_runs(), None),
        Err(e) => {
            // It holds nothing anyone can fetch: everything goes from here.
            for (gfn, n) in out.server.sent_runs() {
                out.server.unsend(gfn, n);
            }
            log::warn!("the old destination {from} cannot forward ({e}): the source sends all");
            (Vec::new(), Some(e.to_string()))
        }
    };
    let pages_at_old: u64 = runs.iter().map(|r| r.1).sum();
    let Session {
        urgent: mut new_urgent,
        bulk: new_bulk,
        rtt,
        ..
    } = new;
    // 4. The new destination dials the old one and takes its pages as its own.
    if !runs.is_empty() {
        let told = (|| -> Result<(), MigrationError> {
            Message::Forwarder {
                endpoint: from.clone(),
            }
            .write_to(&mut new_urgent)?;
            wait_ready(&new_urgent, &out.cancel)?;
            for _ in 0..announce_owners(&mut new_urgent, &from, &runs)? {
                wait_ready(&new_urgent, &out.cancel)?;
            }
            Ok(())
        })();
        told.map_err(|e| {
            failed(match told_why(&new_urgent) {
                Some(why) => MigrationError::Switch {
                    to: req.uri.clone(),
                    reason: why,
                },
                None => e,
            })
        })?;
    }
    // From here on the rounds go to the new destination.
    let new_w = BulkWriter::new(new_bulk, rtt).map_err(|e| failed(e.into()))?;
    let old_urgent = std::mem::replace(urgent, new_urgent);
    let old_bulk = std::mem::replace(w, new_w);
    *out.destination.lock().expect("migration lock") = req.uri.clone();
    let s = out.server.status();
    let sent_before = (
        s.pages_precopy + s.pages_pushed + s.pages_demand,
        s.bytes_sent,
    );
    let switched = Arc::new(Switched {
        status: Mutex::new(SwitchStatus {
            from: from.clone(),
            to: req.uri.clone(),
            at_ms: req.asked.duration_since(out.started).as_secs_f64() * 1e3,
            precopy_round: round,
            switch_ms: req.asked.elapsed().as_secs_f64() * 1e3,
            pages_at_old,
            pages_not_forwarded: written.len() as u64,
            forwarder_lost: lost.clone(),
            ..SwitchStatus::default()
        }),
        runs,
        lost: AtomicBool::new(false),
        taken_back: AtomicBool::new(false),
        at: Instant::now(),
        sent_before,
    });
    *out.switched_to.lock().expect("migration lock") = Some(switched.clone());
    if lost.is_none() {
        super::switch::watch_forwarder(switched.clone(), old_urgent, old_bulk)
            .map_err(|e| failed(e.into()))?;
    }
    log::info!(
        "migration switched from {from} to {} in {:.1} ms: {pages_at_old} pages come from {from}",
        req.uri,
        req.asked.elapsed().as_secs_f64() * 1e3
    );
    Ok((switched.status(sent_before.0, sent_before.1), written))
}

/// Ends round `round` on the bulk channel and waits until the destination has applied it.
fn end_round(urgent: &mut TcpStream, w: &mut BulkWriter, round: u32) -> Result<(), MigrationError> {
    Message::RoundDone { round }.write_to(w)?;
    w.flush()?;
    match Message::read_from(urgent)? {
        Message::RoundDone { round: r } if r == round => Ok(()),
        m => Err(ProtocolError::unexpected("RoundDone", m).into()),
    }
}

/// The gfns the running guest writes during `window` (KVM dirty log), sorted: the access
/// profile of hot-first prepaging.
fn profile_writes(vm: &impl MigratableVm, window: Duration) -> Result<Vec<Gfn>, MigrationError> {
    vm.set_dirty_logging(true)?;
    let profile = (|| {
        vm.take_dirty_pages()?; // start from a clean log
                                // The profile is a measurement over wall-clock time: the guest runs meanwhile.
        std::thread::sleep(window);
        vm.take_dirty_pages()
    })();
    vm.set_dirty_logging(false)?;
    profile
}

/// The stripes of `layout` a split of `share` hands over: 2 MiB stripes in layout order,
/// stripe `i` taken when `floor((i + 1) * share) > floor(i * share)` (evenly spread).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn split_stripes(layout: &MemoryLayout, share: f64) -> Vec<PageRun> {
    layout
        .runs(SPLIT_STRIPE)
        .enumerate()
        .filter(|(i, _)| ((*i + 1) as f64 * share).floor() > (*i as f64 * share).floor())
        .map(|(_, run)| run)
        .collect()
}

/// A split prepared before the switchover: a store session open at each memserver, with the
/// stripes dealt to it (withheld from the destination's push).
struct SplitPlan {
    memservers: Vec<(String, Session, Vec<PageRun>)>,
}

/// The split's first half (module docs, step 3), while the guest still runs: deals the stripes
/// to the memservers, opens a store session at each, and names each to the destination
/// (an `Owners` frame without pages), which dials it and says `Ready`. Nothing is stored yet:
/// the pages go once memory is frozen, in parallel with the push ([`store_split`]). A
/// memserver that cannot be reached stops the migration here, the VM still running.
fn prepare_split(
    vm: &impl MigratableVm,
    out: &Outgoing,
    split: &Split,
    secret: &[u8],
    hello: &Hello,
    urgent: &mut TcpStream,
) -> Result<SplitPlan, MigrationError> {
    let layout = vm.memory().layout();
    let stripes = split_stripes(layout, split.share(layout.total_bytes()));
    let n = split.uris.len().max(1);
    let store = Hello {
        purpose: Purpose::Store,
        ..hello.clone()
    };
    let mut memservers = Vec::new();
    for (m, uri) in split.uris.iter().enumerate() {
        let dealt: Vec<PageRun> = stripes.iter().skip(m).step_by(n).copied().collect();
        let session = session::open(uri, secret, &store)
            .map_err(|e| MigrationError::opening("memserver", "tsubame memserver", e))?;
        out.cancel.watch(&session.urgent)?;
        out.cancel.watch(&session.bulk)?;
        memservers.push((uri.clone(), session, dealt));
    }
    for (uri, _, _) in &memservers {
        // The destination dials the memserver now, outside the downtime.
        announce_owners(urgent, uri, &[])?;
        wait_ready(urgent, &out.cancel)?;
    }
    for stripe in &stripes {
        out.server.withhold(stripe.gfn, stripe.pages);
    }
    *out.split.lock().expect("migration lock") = Some(SplitStatus {
        memservers: split.uris.clone(),
        pages_planned: stripes.iter().map(|s| s.pages).sum(),
        pages_stored_each: vec![0; memservers.len()],
        ..SplitStatus::default()
    });
    Ok(SplitPlan { memservers })
}

/// The split's second half, from the switchover on (memory frozen): stores each memserver's
/// stripes at it, all in parallel and in parallel with the destination's push (from when the
/// push starts: the returned first step, [`PushOptions::before_push`]), and returns the push's
/// last step too ([`PushOptions::after_push`]): once every store has ended, it hands
/// each memserver's pages over to it (`Owners` on the bulk channel: the destination asks the
/// memserver for them from then on), and pushes the stripes of any memserver that failed
/// itself, so that the destination still gets every page.
fn store_split(
    out: &Arc<Outgoing>,
    plan: SplitPlan,
    secret: &[u8],
    hello: &Hello,
) -> (PushHook, PushHook) {
    let t0 = Instant::now();
    // The stores start with the push, once the destination runs the VM (or the push's gate
    // times out): started at the switchover, they took the CPU the destination needed to
    // resume (downtime 1.1-2.9 ms against 0.7 ms without a split, on 2 cores).
    let (go, started) = crossbeam::channel::bounded::<()>(0);
    let stores: Vec<_> = plan
        .memservers
        .into_iter()
        .enumerate()
        .map(|(i, (uri, session, stripes))| {
            let (out, started) = (out.clone(), started.clone());
            let thread = std::thread::Builder::new()
                .name("split-store".into())
                .spawn({
                    let (uri, stripes) = (uri.clone(), stripes.clone());
                    move || {
                        let _ = started.recv(); // `go` dropped: start
                        store_stripes(&out, i, &uri, session, &stripes)
                    }
                });
            (uri, stripes, thread)
        })
        .collect();
    let start = PushHook::new(move |_| {
        drop(go);
        Ok(())
    });
    let out = out.clone();
    let (secret, hello) = (secret.to_vec(), hello.clone());
    let hand_over = PushHook::new(move |w| {
        let mut failed = Vec::new();
        let mut stored_at = Vec::new();
        for (uri, stripes, thread) in stores {
            let stored = match thread {
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(MigrationError::Unsupported(
                        "the store thread panicked".into(),
                    ))
                }),
                Err(e) => Err(MigrationError::Io(e)),
            };
            match stored {
                Ok(_) => {
                    let runs: Vec<(Gfn, u64)> = stripes.iter().map(|s| (s.gfn, s.pages)).collect();
                    announce_owners(w, &uri, &runs)?;
                    stored_at.push((uri, runs));
                }
                Err(e) => {
                    log::warn!(
                        "split: the memserver {uri} did not store its pages ({e}); they go to \
                         the destination instead"
                    );
                    failed.push(format!("{uri}: {e}"));
                    let mut sender = BulkSender::new(&out.server, None);
                    for s in &stripes {
                        out.server.unsend(s.gfn, s.pages);
                        sender.send_run(w, s.gfn, s.pages, SendKind::Push)?;
                    }
                }
            }
        }
        if let Some(s) = out.split.lock().expect("migration lock").as_mut() {
            s.store_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            s.failed = failed;
        }
        forget_if_complete(&out, stored_at, &secret, &hello);
        Ok(())
    });
    (start, hand_over)
}

/// The split's stores ended (`stored_at`: what each memserver stored): if the destination
/// has completed already, its memservers are told to forget the VM's pages again. The
/// destination tells them when it has every page, but it can get there before the stores end:
/// a guest, or its final digest, that reads every page fetches the stripes not handed over yet
/// from the source, and the source's part is complete. A store that lands after the
/// destination's word would stay at the memserver for ever. (Complete before the hand-over
/// means the destination lacked no page the source owned, stripes included: none of the
/// memservers' copies is needed.)
fn forget_if_complete(
    out: &Outgoing,
    stored_at: Vec<(String, Vec<(Gfn, u64)>)>,
    secret: &[u8],
    hello: &Hello,
) {
    if stored_at.is_empty() || out.server.status().state != ServeState::Completed {
        return;
    }
    let (uris, runs): (Vec<String>, Vec<_>) = stored_at.into_iter().unzip();
    forget_in_background(uris, move |i| runs[i].clone(), secret, hello, |_, _| {});
}

/// Stores `stripes` of the frozen guest memory at the memserver `uri` (the `i`th of the
/// split) on its open store `session`; returns the pages stored.
fn store_stripes(
    out: &Outgoing,
    i: usize,
    uri: &str,
    session: Session,
    stripes: &[PageRun],
) -> Result<u64, MigrationError> {
    // Its own server over the same frozen memory (its own "sent" marks), read in place.
    let store = GuestMemoryStore::new(out.server.store().memory.clone());
    store.freeze();
    let server = PageServer::new(store);
    let mut w = BulkWriter::new(session.bulk, session.rtt)?;
    let mut sender = BulkSender::new(&server, None);
    let sent = (|| -> Result<(), MigrationError> {
        for stripe in stripes {
            sender.send(&mut w, stripe.gfn, stripe.pages, SendKind::Precopy)?;
            if let Some(s) = out.split.lock().expect("migration lock").as_mut() {
                s.pages_stored_each[i] += stripe.pages;
                s.pages_stored += stripe.pages;
            }
        }
        Message::PushDone.write_to(&mut w)?;
        w.wait_all_acknowledged()?;
        w.finish()?;
        Ok(())
    })();
    match sent {
        Ok(()) => Ok(stripes.iter().map(|s| s.pages).sum()),
        // A memserver that refuses (full, say) says why on the urgent channel.
        Err(e) => Err(match told_why(&session.urgent) {
            Some(reason) => MigrationError::Owner {
                endpoint: uri.to_string(),
                reason,
            },
            None => e,
        }),
    }
}

/// What the switchover does besides the state: a split's stores, pages left at memservers.
struct Leftovers<'a> {
    split: Option<SplitPlan>,
    held: Option<Held>,
    secret: &'a [u8],
    hello: &'a Hello,
}

/// Pages of a VM that runs split (see [`MigratableVm::page_owners`]) which stay at their
/// memservers when it migrates on: the new destination's owner map points at them.
///
/// Source-of-truth rules of a split VM on the move:
/// - a page a memserver owns here is not here, and its copy there is the only one: the
///   destination is told to fetch it there (`Owners`, before the switchover, which it dials);
/// - a page the guest faults in here before the pause is here and may be written: at the
///   pause it is taken back (`Owners` naming the source) and sent from here like any other;
/// - a memserver's copy of a page fetched here (and maybe written since) is stale: once the
///   VM has left, the memserver is told to forget it, so it never holds a page the VM has
///   rewritten elsewhere.
struct Held {
    map: Arc<OwnerMap>,
    /// Each memserver (or the source of the migration that brought the VM here), its
    /// address, and the pages announced as its own.
    servers: Vec<(EndpointId, String, Vec<PageRun>)>,
    /// Which of them are memservers (the others keep their copies: nothing to forget).
    memservers: Vec<bool>,
}

/// Announces the pages each memserver holds to the destination (which dials each and says
/// `Ready`), and withholds them from the push; `None` if no memserver holds any.
fn announce_held(
    out: &Outgoing,
    map: Arc<OwnerMap>,
    servers: &[(EndpointId, String, bool)],
    urgent: &mut TcpStream,
) -> Result<Option<Held>, MigrationError> {
    let mut held = Vec::new();
    let mut memservers = Vec::new();
    for (id, uri, memserver) in servers {
        let runs = map.all_owned_runs(Owner::Endpoint(*id));
        if runs.is_empty() {
            continue;
        }
        if !*memserver {
            // The source this VM came from: the destination takes it as a second sender.
            Message::Forwarder {
                endpoint: uri.clone(),
            }
            .write_to(urgent)?;
            wait_ready(urgent, &out.cancel)?;
        }
        let pairs: Vec<(Gfn, u64)> = runs.iter().map(|r| (r.gfn, r.pages)).collect();
        for _ in 0..announce_owners(urgent, uri, &pairs)? {
            wait_ready(urgent, &out.cancel)?;
        }
        for r in &runs {
            out.server.withhold(r.gfn, r.pages);
        }
        held.push((*id, uri.clone(), runs));
        memservers.push(*memserver);
    }
    *out.held.lock().expect("migration lock") = held
        .iter()
        .map(|(_, uri, runs)| HeldStatus {
            memserver: uri.clone(),
            pages_kept: runs.iter().map(|r| r.pages).sum(),
            ..HeldStatus::default()
        })
        .collect();
    Ok((!held.is_empty()).then_some(Held {
        map,
        servers: held,
        memservers,
    }))
}

/// At the pause: the announced pages the guest faulted in here since are the source's again
/// (see [`Held`]).
fn take_back_fetched(
    out: &Outgoing,
    held: &Held,
    urgent: &mut TcpStream,
) -> Result<(), MigrationError> {
    let mut back = Vec::new();
    for (i, (id, _, runs)) in held.servers.iter().enumerate() {
        let mut pages = 0;
        for r in runs {
            for g in r.gfn.0..r.gfn.0 + r.pages {
                if held.map.get(Gfn(g)) != Some(Owner::Endpoint(*id)) {
                    back.push(Gfn(g));
                    pages += 1;
                }
            }
        }
        if let Some(s) = out.held.lock().expect("migration lock").get_mut(i) {
            s.pages_kept -= pages;
            s.pages_taken_back = pages;
        }
    }
    back.sort_unstable();
    let runs: Vec<(Gfn, u64)> = gfn_runs(&back, u64::MAX).collect();
    for &(gfn, n) in &runs {
        out.server.unsend(gfn, n);
    }
    if !runs.is_empty() {
        announce_owners(urgent, "", &runs)?;
    }
    Ok(())
}

/// Once the VM has left: tells each memserver to forget its copies of the pages fetched here
/// (see [`Held`]), in the background.
fn drop_stale_copies(out: &Arc<Outgoing>, held: Held, secret: &[u8], hello: &Hello) {
    // Only memservers: a migration's source keeps its frozen copy until it exits.
    let at: Vec<usize> = (0..held.servers.len())
        .filter(|&i| held.memservers[i])
        .collect();
    let memservers = at.iter().map(|&i| held.servers[i].1.clone()).collect();
    let out = out.clone();
    let which = at.clone();
    forget_in_background(
        memservers,
        move |j| {
            let (id, _, _) = &held.servers[which[j]];
            held.map
                .all_installed_from(*id)
                .iter()
                .map(|r| (r.gfn, r.pages))
                .collect()
        },
        secret,
        hello,
        move |j, pages| {
            if let Some(s) = out.held.lock().expect("migration lock").get_mut(at[j]) {
                s.stale_copies_dropped = pages;
            }
        },
    );
}

/// On a thread of its own, tells each of `memservers` in turn to forget the runs `runs_of(i)`
/// gives for it ([`forget_at`]), and `forgot(i, pages)` once it has; a memserver that cannot
/// be told keeps its copies, which is logged.
pub(crate) fn forget_in_background(
    memservers: Vec<String>,
    runs_of: impl Fn(usize) -> Vec<(Gfn, u64)> + Send + 'static,
    secret: &[u8],
    hello: &Hello,
    forgot: impl Fn(usize, u64) + Send + 'static,
) {
    let (secret, hello) = (secret.to_vec(), hello.clone());
    let spawned = std::thread::Builder::new()
        .name("memserver-forget".into())
        .spawn(move || {
            for (i, uri) in memservers.iter().enumerate() {
                let runs = runs_of(i);
                match forget_at(uri, &secret, &hello, &runs) {
                    Ok(()) => forgot(i, runs.iter().map(|r| r.1).sum()),
                    Err(e) => {
                        log::warn!("the memserver {uri} keeps stale copies of this VM's pages: {e}")
                    }
                }
            }
        });
    match spawned {
        Ok(t) => CHORES.lock().expect("chores lock").push(t),
        Err(e) => log::warn!("memservers keep stale copies of this VM's pages: {e}"),
    }
}

/// Adds `chore` to the chores [`finish_chores`] waits for.
pub(crate) fn add_chore(chore: std::thread::JoinHandle<()>) {
    CHORES.lock().expect("chores lock").push(chore);
}

/// Background chores a process should let finish before it exits (telling memservers to
/// forget stale copies, hearing an old destination's last report).
static CHORES: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits (at most `timeout`) for the background chores to finish: call it before the process
/// exits, or a memserver may keep copies it should have forgotten. Returns whether all did.
pub fn finish_chores(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut chores = CHORES.lock().expect("chores lock");
        chores.retain(|t| !t.is_finished());
        if chores.is_empty() {
            return true;
        }
        drop(chores);
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tells the memserver at `uri` to forget `runs` of the VM `hello` names (`Discard` in a
/// store session), and waits until it has.
pub(crate) fn forget_at(
    uri: &str,
    secret: &[u8],
    hello: &Hello,
    runs: &[(Gfn, u64)],
) -> Result<(), MigrationError> {
    let store = Hello {
        purpose: Purpose::Store,
        checkpoint_ms: 0,
        ..hello.clone()
    };
    let s = session::open(uri, secret, &store)
        .map_err(|e| MigrationError::opening("memserver", "tsubame memserver", e))?;
    let mut w = BulkWriter::new(s.bulk, s.rtt)?;
    for &(gfn, count) in runs {
        Message::Discard { gfn, count }.write_to(&mut w)?;
    }
    Message::PushDone.write_to(&mut w)?;
    w.wait_all_acknowledged()?;
    w.finish()?;
    Ok(())
}

/// The `Error` a peer sent on `urgent` before closing, if any (read within 200 ms).
pub(crate) fn told_why(urgent: &TcpStream) -> Option<String> {
    urgent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    match Message::read_from(&mut &*urgent) {
        Ok(Message::Error { message }) => Some(message),
        _ => None,
    }
}

/// Tells the destination that `endpoint` ("" for the source itself) owns `runs`, in as many
/// `Owners` frames as it takes (at least one); returns how many. (The same frames, the other
/// way, say which pages a destination lacks, or which an old destination must not forward.)
pub(crate) fn announce_owners(
    w: &mut impl Write,
    endpoint: &str,
    runs: &[(Gfn, u64)],
) -> Result<usize, ProtocolError> {
    let mut frames = 0;
    // An empty list names the endpoint (the destination dials it) and gives it nothing yet.
    for chunk in runs
        .chunks(MAX_OWNER_RUNS as usize)
        .chain(runs.is_empty().then_some(&[][..]))
    {
        Message::Owners {
            endpoint: endpoint.to_string(),
            runs: chunk.to_vec(),
        }
        .write_to(w)?;
        frames += 1;
    }
    Ok(frames)
}

/// The session's connections at the switchover.
struct Channels {
    urgent: TcpStream,
    bulk: BulkWriter,
    /// A cancellable migration's.
    checkpoint: Option<TcpStream>,
}

/// Switchover with the vCPUs paused since `paused_at` (module docs, step 4), then serving
/// (and storing a split's stripes), and for a cancellable migration receiving checkpoints
/// (`vm` is resumed from them if it comes to that). `stale`: pages written since the last
/// round (sorted). An error before both the state and `PrecopyDone` are out leaves the
/// destination unable to run the VM: the caller may resume it here.
#[allow(clippy::too_many_arguments)]
fn switch_over(
    out: &Arc<Outgoing>,
    state: VmState,
    channels: Channels,
    paused_at: Instant,
    options: &MigrateOptions,
    hot: HotPages,
    stale: &[Gfn],
    vm: std::sync::Weak<dyn ResumableVm>,
    leftovers: Leftovers<'_>,
) -> Result<(), MigrationError> {
    let Leftovers {
        split,
        held,
        secret,
        hello,
    } = leftovers;
    let Channels {
        mut urgent,
        mut bulk,
        checkpoint,
    } = channels;
    let server = &out.server;
    *out.prepage.lock().expect("migration lock") = (options.prepage, hot.len());
    if let Some(held) = &held {
        take_back_fetched(out, held, &mut urgent)?;
    }
    let json = state.to_bytes();
    out.state_bytes.store(json.len() as u64, Ordering::Relaxed);
    let encoded = paused_at.elapsed();
    Message::VmState(json).write_to(&mut urgent)?;
    let sent = paused_at.elapsed();
    if out.precopy_rounds > 0 {
        take_back_if_lost(out, &mut bulk)?;
        for (gfn, n) in gfn_runs(stale, u64::MAX) {
            // Pages dropped before the pause and not sent since need no second drop.
            let dropped = server.unsend(gfn, n);
            out.written_again(n);
            out.pages_stale.fetch_add(dropped, Ordering::Relaxed);
            if dropped > 0 {
                Message::Discard { gfn, count: n }.write_to(&mut bulk)?;
            }
        }
        Message::PrecopyDone.write_to(&mut bulk)?;
        bulk.flush()?;
    }
    let now = Instant::now();
    log::debug!(
        "switchover: state encoded after {encoded:?}, sent after {sent:?}, switchover messages out after {:?}",
        now.duration_since(paused_at)
    );
    let since_pause = now.duration_since(paused_at);
    out.paused_unix_us.store(
        unix_us().saturating_sub(u64::try_from(since_pause.as_micros()).unwrap_or(0)),
        Ordering::Relaxed,
    );
    *out.switched.lock().expect("migration lock") = Some((
        paused_at.duration_since(out.started),
        now.duration_since(paused_at),
    ));
    // The vCPUs never run here again (a cancellable migration resumes them only after
    // serving stopped): memory can be served without copies. Committed reverse checkpoints
    // write it only while the server reads none of it (`PageServer::exclusive`).
    server.store().freeze();
    out.cancel.release();
    *out.local_ip.lock().expect("migration lock") = urgent.local_addr().ok().map(|a| a.ip());
    let (before_push, after_push) = match split.map(|plan| store_split(out, plan, secret, hello)) {
        Some((start, hand_over)) => (Some(start), Some(hand_over)),
        None => (None, None),
    };
    if let Some(held) = held {
        drop_stale_copies(out, held, secret, hello);
    }
    if out.switch().is_some() {
        // The old destination may yet be lost: the new one then hands its pages back here.
        server.linger();
    }
    server
        .serve(
            &format!("the destination {}", out.destination()),
            urgent,
            bulk,
            PushOptions {
                prepage: options.prepage,
                rate: options.max_bandwidth,
                hot,
                // A destination that stays paused after the state arrived still gets its pages.
                gate_timeout: Some(Duration::from_millis(500)),
                start_on_demand: true,
                before_push,
                after_push,
                // Frozen above: `check` refuses release with a cancellable migration.
                release: options.release,
            },
        )
        .map_err(MigrationError::from)?;
    if let (Some(channel), Some(ms)) = (checkpoint, options.checkpoint_ms) {
        let sent = paused_at
            + out
                .switched
                .lock()
                .expect("migration lock")
                .map_or(Duration::ZERO, |s| s.1);
        let reverse = Reverse::start(
            server.store().memory.clone(),
            channel,
            state,
            sent,
            ms,
            vm,
            Arc::new(Serving(server.clone())),
        )?;
        *out.reverse.lock().expect("migration lock") = Some(reverse);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_stripes_spread_the_share_evenly() {
        let layout = MemoryLayout::for_size(64 << 20).unwrap(); // 32 stripes
        for (share, want) in [(0.0, 0), (0.25, 8), (0.5, 16), (1.0, 32)] {
            let s = split_stripes(&layout, share);
            assert_eq!(s.len(), want, "share {share}");
            assert!(s.iter().all(|r| r.pages == SPLIT_STRIPE));
        }
        let half: Vec<u64> = split_stripes(&layout, 0.5)
            .iter()
            .map(|r| r.gfn.0 / SPLIT_STRIPE)
            .collect();
        assert_eq!(
            half,
            (0..16).map(|i| 2 * i + 1).collect::<Vec<_>>(),
            "every other"
        );
    }
}
