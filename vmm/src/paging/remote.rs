//! Remote paging (S-memV on the main host): a VM whose resident guest memory is kept under a
//! limit by writing cold pages back to memservers and dropping them here; a later touch faults
//! them back in through the fault engine, like any page another endpoint owns.
//!
//! ```text
//!  evictor thread (every TICK):  KVM dirty log ─► seen[page] = epoch
//!     resident > limit? ─► coldest chunks ─► clean pages: owner = memserver, drop (no copy)
//!                                        └─► other pages: EVICTING, write-protect, copy out
//!                                            (Store session) ─► acknowledged ─► still EVICTING?
//!                                            ─► GONE, owner = memserver, MADV_DONTNEED, wake
//!  fault thread:  missing, owner Zero ─► UFFDIO_ZEROPAGE over the page's chunk
//!                 missing, owner memserver ─► Recall session ─► installed write-protected: CLEAN
//!                 write to a protected page ─► CLEAN/EVICTING ─► DIRTY (eviction cancelled),
//!                                              un-protect, wake;  GONE ─► woken after the drop
//! ```
//!
//! **Source-of-truth rules.** The owner map says where a page's freshest copy is; the pager
//! adds a state per page that orders the change of owner with the guest's writes:
//! - `DIRTY`: local (or never touched), and no memserver copy is known current.
//! - `CLEAN`: local, installed write-protected from memserver E (owner code "local, from E"),
//!   not written since: E's copy is current, so the page is dropped without a copy.
//! - `EVICTING`: the evictor write-protected it and is copying it out. A write faults; the
//!   fault thread makes it `DIRTY` and un-protects it: that page's eviction is cancelled.
//! - `GONE`: owned by a memserver that acknowledged storing it. Only the evictor moves a page
//!   to `GONE` (by compare-and-swap from `CLEAN` or `EVICTING`, so a cancelling write and the
//!   commit cannot both win), and then, in this order: owner = memserver, `MADV_DONTNEED`
//!   ([`FaultEngine::forget`]), wake. A write that faulted while it was protected stays
//!   blocked until that wake and then faults the page back in: no write is lost, and a fault
//!   after the drop goes to the memserver, never to a zero page.
//!
//! **Cold pages.** This kernel has no idle-page tracking, so the pager uses what it can see:
//! KVM's dirty log (exact for the guest's CPL3 writes) and the time each page was last faulted
//! in. A page's recency is the last pass (evictor tick) in which a write to it was seen or it
//! was faulted in; the evictor takes the chunks (16 pages, 64 KiB) whose newest page is
//! oldest. Pages that the guest only *reads* are invisible to both after their fault-in: a
//! read-mostly hot page ages like a cold one, is evicted (cheaply: it is clean) and faults back
//! in on its next read. The chunk granularity keeps the write-protect and drop calls (each a
//! TLB flush) few.
//!
//! **Seeing writes costs the guest, so the evictor watches few pages.** For KVM to log a
//! page's next write it must write-protect the page again ("re-arm" it), and that write then
//! takes a fault (about 12 µs under this KVM). `KVM_GET_DIRTY_LOG` alone re-arms every page it
//! returns: read every 10 ms, it cost the guest a fault per page it kept writing per read, and
//! a guest whose hot set fit ran 2.2-2.5× as long as all local (`tsubame bench memserver`). So
//! the log runs with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): the evictor
//! reads it every tick at no cost to the guest, a page's bit stays set (and the page writable)
//! until the evictor re-arms it, and a bit that turns on after a re-arm is a new write. It
//! re-arms only pages it may evict soon: once resident memory is within two passes of the
//! limit, after every pass and every 100 ms, the pages of the coldest chunks worth two passes
//! (`WriteTracker`). A re-armed page the guest still writes shows it before the next pass
//! and leaves the coldest; one that stays silent is evicted. A page written while not re-armed
//! keeps the recency of its last seen write until it sinks to the coldest again: a hot page
//! costs one fault per such round, and none while the VM fits under its limit. Without manual
//! protection (Linux before 5.8) the log is read, and so re-armed whole, every tick but only
//! near the limit.
//!
//! **The dirty log has one consumer.** The evictor keeps its own account of which bits it
//! cleared, so it is the log's only reader on such a VM: migrations and reverse checkpoints of
//! a VM that pages out are refused ([`crate::Vm::migrate`]; migrating would also have to fetch
//! evicted pages rather than take them as never written).
//!
//! **Accounting.** Resident pages are the engine's present pages (zero-filled ones count). The
//! evictor runs when they pass the limit and evicts down to a low watermark; between passes the
//! guest can fault a few pages in over the limit. A memserver that refuses a store (full, gone)
//! leaves the pages local (nothing is lost, the VM runs over its limit) and the reason in
//! [`RemotePagingStats::error`]; a recall that cannot be served leaves the vCPU waiting and the
//! reason in the engine's fetch error, as for any remote owner.
//!
//! Evicted pages are spread over the memservers by stripe: 2 MiB of guest-physical memory
//! (512 pages) per memserver in turn.
//!
//! **Replicas and dead memservers.** With `--replicas 2`, stripe `s` is written to memservers
//! `s mod n` and `s + 1 mod n`, and a page becomes theirs once either acknowledged it; each
//! page remembers which of its two holders acknowledged its last store (`copies`: their copy
//! is current until the guest writes the page, after which the page is local and its owner
//! changes again at its next eviction). When a memserver's link breaks ([`OwnerRouter::lost`]):
//! - every page it owns whose other holder has a current copy and is up is handed over to that
//!   holder, and any vCPU waiting for one is asked for again from there (a short stall);
//! - every local clean page fetched from it (dropped without a copy if evicted) goes to the
//!   other holder the same way, or, without one, becomes dirty: its next eviction copies it;
//! - pages nobody else holds stay its own: vCPUs that touch them wait, and the VM pauses (see
//!   [`crate::Vm`]) until the link is back, with the reason in `query-status`;
//! - a thread dials it again with backoff. A memserver that kept the VM's pages (a network
//!   outage) takes its pages back up and the VM resumes. One that restarted and lost them is
//!   down for good if it owned pages (the VM stays paused: without replicas those pages are
//!   gone); if it owned none it serves again as an empty memserver, and the pages' record of
//!   copies forgets it.
//!
//! **A broken store link is not dialled again**: that memserver takes no more pages from this
//! VM (its recall link still brings back those it holds), eviction goes on to the others, and
//! a stripe with no live holder stays resident. The reason is ordering: bytes of the broken
//! session may still be on their way (a network that held them, then let them go) and land
//! after a newer session stored the same page, so the memserver would hold an older copy
//! than the one it was told to own. Seen in `tests/tests/multihost.rs` (a memserver host
//! unplugged, then plugged back: the guest found a page one version old). Storing there
//! again needs the memserver to fence the old session first; not built yet.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{Gfn, MemoryLayout, PageRun, PAGE_SIZE};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::message::{Hello, Purpose};
use tsubame_pageserver::server::{PageServer, SendKind};
use tsubame_pageserver::session;
use tsubame_pageserver::{ClientError, ClientEvents, PageClient};
use tsubame_uffd::{FaultEngine, FetchError, Fetcher};

use super::owners::{EndpointId, InstallWatch, OwnedSink, Owner, OwnerMap};
use super::router::{connect_owner, OwnerRouter, Redial, RedialError, RemoteOwner};
use super::PagingError;
use crate::memory::GuestMemory;
use crate::migration::source::GuestMemoryStore;
use crate::vstate::vm::{KvmVm, SlotDirtyLog};

/// Pages per chunk: the unit of zero-fill on first touch and of the cold-page choice.
pub const CHUNK_PAGES: u64 = 16;
/// Pages per stripe: consecutive stripes go to consecutive memservers.
pub const STRIPE_PAGES: u64 = 512;
/// How often the evictor collects the dirty log and looks at the resident size.
const TICK: Duration = Duration::from_millis(10);

const DIRTY: u8 = 0;
const CLEAN: u8 = 1;
const EVICTING: u8 = 2;
const GONE: u8 = 3;

/// What `--local-mem` and `--memserver` ask for.
#[derive(Clone, Debug)]
pub struct RemotePagingConfig {
    /// Most bytes of guest memory resident here.
    pub local_bytes: u64,
    /// The memservers cold pages go to (`tcp:HOST:PORT`), at least one.
    pub memservers: Vec<String>,
    pub secret: Vec<u8>,
    /// Memservers each evicted page is written to: 1, or 2 (a memserver's loss costs no page).
    pub replicas: usize,
}

/// One memserver, as `query-memory` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MemserverStats {
    pub uri: String,
    /// Its links: recall (faults back) and store (write-back).
    pub up: bool,
    pub store_up: bool,
    /// Pages it owns now (evicted, not faulted back).
    pub pages_owned: u64,
    /// Pages written to it, and faulted back from it.
    pub pages_written_back: u64,
    pub pages_faulted_back: u64,
}

/// `query-memory` of a VM that pages out.
#[derive(Clone, Debug, Serialize)]
pub struct RemotePagingStats {
    pub limit_bytes: u64,
    pub low_watermark_bytes: u64,
    pub total_pages: u64,
    pub resident_pages: u64,
    pub resident_bytes: u64,
    /// Most pages resident at any pass once eviction had started (how far the guest got over
    /// the limit between passes).
    pub resident_peak_pages: u64,
    /// Pages owned by memservers now.
    pub evicted_pages: u64,
    /// Pages written back (copied out), dropped clean (no copy), faulted back in.
    pub pages_written_back: u64,
    pub clean_drops: u64,
    pub faults_back: u64,
    /// Evictions cancelled by a write to the page while it was copied out.
    pub cancelled_evictions: u64,
    /// Writes to write-protected pages (first writes to pages faulted back, and cancels).
    pub write_faults: u64,
    /// First touches of never-written pages, and the pages zero-filled for them.
    pub zero_fill_faults: u64,
    pub zero_filled_pages: u64,
    /// Evictor passes that evicted something, and their time in all.
    pub eviction_passes: u64,
    pub eviction_ms: f64,
    /// Bytes written back per second of write-back (copy out until acknowledged).
    pub writeback_gbps: Option<f64>,
    /// The fault engine's fault read -> page installed, for the faults that waited on an
    /// install (faults back from memservers, and zero fills of first touches): how many, and
    /// their distribution as `query-migrate`'s `demand_paging` gives it.
    pub demand_faults: u64,
    pub demand_p50_us: Option<f64>,
    pub demand_p99_us: Option<f64>,
    pub demand_max_us: f64,
    /// (µs, share at or below) points of that distribution.
    pub demand_cdf: Vec<(f64, f64)>,
    pub memservers: Vec<MemserverStats>,
    /// Memservers each evicted page is written to.
    pub replicas: usize,
    /// Pages handed over to their other holder when a memserver was lost.
    pub failed_over_pages: u64,
    /// Why eviction stopped, if it did (the guest runs on, over its limit), or the last store
    /// that failed (the pages stayed here).
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    written_back: AtomicU64,
    clean_drops: AtomicU64,
    faults_back: AtomicU64,
    cancelled: AtomicU64,
    zero_faults: AtomicU64,
    zero_pages: AtomicU64,
    passes: AtomicU64,
    eviction_ns: AtomicU64,
    writeback_ns: AtomicU64,
    peak: AtomicU64,
    failed_over: AtomicU64,
}

/// Where evicted pages are copied to.
pub trait PageOut {
    /// Stores `runs` (write-protected guest pages) at memserver number `memserver`; returns
    /// once it has acknowledged storing all of them.
    fn store(&mut self, memserver: usize, runs: &[PageRun]) -> Result<(), String>;

    /// Whether memserver number `memserver` can take pages now (its link is up, or was just
    /// dialled again).
    fn usable(&mut self, _memserver: usize) -> bool {
        true
    }
}

/// The pager's per-page state, its cold-page policy and its eviction state machine (see the
/// module docs).
#[derive(Debug)]
pub struct Pager {
    engine: Arc<FaultEngine>,
    owners: Arc<OwnerMap>,
    layout: MemoryLayout,
    state: Vec<AtomicU8>,
    /// The last pass in which the page was written (dirty log) or faulted in.
    seen: Vec<AtomicU32>,
    epoch: AtomicU32,
    limit_pages: u64,
    low_pages: u64,
    /// The memservers' endpoints, by stripe number modulo their count.
    endpoints: Vec<EndpointId>,
    /// Memservers each page is written to, and which of its holders acknowledged its last
    /// store (bit k: holder k of its stripe, see [`Self::holder`]).
    replicas: usize,
    copies: Vec<AtomicU8>,
    /// Held by an eviction pass and by a fail-over: they change the same pages' owners.
    pass: Mutex<()>,
    per_memserver: Vec<(AtomicU64, AtomicU64)>,
    counters: Counters,
    error: Mutex<Option<String>>,
    /// Wakes the evictor before its tick when a fault-in took resident memory over the limit.
    nudge: std::sync::mpsc::SyncSender<()>,
}

impl Pager {
    /// A pager of `owners`' pages under `engine` (write-protected), keeping at most
    /// `limit_pages` resident, evicting to `endpoints`.
    pub fn new(
        engine: Arc<FaultEngine>,
        owners: Arc<OwnerMap>,
        limit_pages: u64,
        endpoints: Vec<EndpointId>,
        nudge: std::sync::mpsc::SyncSender<()>,
    ) -> Self {
        let layout = owners.layout().clone();
        let pages = usize::try_from(layout.total_pages()).expect("pages fit memory");
        Self {
            engine,
            owners,
            layout,
            state: (0..pages).map(|_| AtomicU8::new(DIRTY)).collect(),
            copies: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            replicas: 1,
            pass: Mutex::new(()),
            seen: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            epoch: AtomicU32::new(1),
            limit_pages,
            // Evict a sixteenth below the limit (at least a few chunks): a pass then frees
            // room for many faults rather than one.
            low_pages: limit_pages.saturating_sub((limit_pages / 16).max(4 * CHUNK_PAGES)),
            per_memserver: endpoints
                .iter()
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            endpoints,
            counters: Counters::default(),
            error: Mutex::new(None),
            nudge,
        }
    }

    /// Called after a fault-in: wakes the evictor if resident memory is over the limit, and
    /// past an eighth over it holds the fault thread back (at most 2 ms a fault) until the
    /// evictor caught up: on a busy host the guest's vCPUs can outrun the evictor's CPU time.
    fn faulted_in(&self) {
        if !self.over_limit() {
            return;
        }
        let _ = self.nudge.try_send(());
        let cap = self.limit_pages + self.limit_pages / 8;
        let t0 = Instant::now();
        while self.engine.present_pages() > cap
            && self.error.lock().expect("pager lock").is_none()
            && t0.elapsed() < Duration::from_millis(2)
        {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn index(&self, gfn: Gfn) -> Option<usize> {
        self.layout
            .page_index(gfn)
            .map(|i| usize::try_from(i).expect("page index"))
    }

    fn fetch_err(e: impl std::fmt::Display) -> FetchError {
        FetchError(e.to_string())
    }

    /// Writes each evicted page to `replicas` memservers (1 or 2, at most their number).
    #[must_use]
    pub fn replicated(mut self, replicas: usize) -> Self {
        self.replicas = replicas.clamp(1, 2).min(self.endpoints.len());
        self
    }

    /// Which memserver (by number) stores `gfn` first.
    pub fn stripe_of(&self, gfn: Gfn) -> usize {
        usize::try_from(gfn.0 / STRIPE_PAGES % self.endpoints.len() as u64).expect("few")
    }

    /// Holder `k` (0: first, 1: replica) of the pages whose first holder is `first`.
    fn holder(&self, first: usize, k: usize) -> usize {
        (first + k) % self.endpoints.len()
    }

    /// Records the guest's writes of the last pass (the dirty log), and starts a new pass.
    pub fn note_written(&self, gfns: &[Gfn]) -> u32 {
        let epoch = self.epoch.load(Ordering::Relaxed);
        for g in gfns {
            if let Some(i) = self.index(*g) {
                self.seen[i].store(epoch, Ordering::Relaxed);
            }
        }
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// First touch of a never-written page: zero-fills the Zero-owned pages of its chunk (one
    /// fault for 16 pages), or only that page once resident memory is over the limit (a guest
    /// filling its memory would otherwise outrun the evictor).
    fn zero_fill(&self, gfn: Gfn) -> Result<(), FetchError> {
        let (start, pages) = if self.over_limit() {
            (gfn, 1)
        } else {
            (Gfn(gfn.0 / CHUNK_PAGES * CHUNK_PAGES), CHUNK_PAGES)
        };
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.counters.zero_faults.fetch_add(1, Ordering::Relaxed);
        for run in self.owners.owned_runs(start, pages, Owner::Zero) {
            let n = self
                .engine
                .install_zero(run.gfn, run.pages)
                .map_err(Self::fetch_err)?;
            self.owners.set(run.gfn, run.pages, Owner::Local);
            for k in 0..run.pages {
                self.seen[usize::try_from(run.index + k).expect("index")]
                    .store(epoch, Ordering::Relaxed);
            }
            self.counters.zero_pages.fetch_add(n, Ordering::Relaxed);
        }
        self.faulted_in();
        Ok(())
    }

    /// A write to a write-protected page (see the module docs).
    fn write_fault(&self, gfn: Gfn) -> Result<(), FetchError> {
        let Some(i) = self.index(gfn) else {
            return Err(FetchError(format!("a write fault on {gfn}, not guest RAM")));
        };
        loop {
            let s = self.state[i].load(Ordering::Acquire);
            match s {
                GONE => {
                    // The evictor committed: it drops the page and wakes this writer, which
                    // then faults it back in. Woken here if the drop is done already.
                    if !self.engine.is_present(gfn) {
                        self.engine.wake(gfn, 1).map_err(Self::fetch_err)?;
                    }
                    return Ok(());
                }
                CLEAN | EVICTING => {
                    if self.state[i]
                        .compare_exchange(s, DIRTY, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    if s == EVICTING {
                        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The memserver's copy goes stale with this write.
                        self.owners.set(gfn, 1, Owner::Local);
                    }
                    break;
                }
                _ => break,
            }
        }
        self.seen[i].store(self.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
        self.engine.unprotect(gfn, 1).map_err(Self::fetch_err)
    }

    /// Whether resident memory is over the limit.
    pub fn over_limit(&self) -> bool {
        self.engine.present_pages() > self.limit_pages
    }

    /// The chunks to evict to get down to the low watermark, coldest first: each with the
    /// pages in it that can be evicted (present, not on the way out).
    fn coldest_chunks(&self, want: u64, usable: &[bool]) -> Vec<PageRun> {
        let mut chunks: Vec<(u32, PageRun, u64)> = Vec::new();
        for run in self.layout.runs(CHUNK_PAGES) {
            let first = self.stripe_of(run.gfn);
            if !(0..self.replicas).any(|k| usable[self.holder(first, k)]) {
                continue; // no memserver of its stripe can take it now
            }
            let (mut newest, mut n) = (0, 0);
            for k in 0..run.pages {
                let i = usize::try_from(run.index + k).expect("index");
                let s = self.state[i].load(Ordering::Relaxed);
                if (s == DIRTY || s == CLEAN) && self.engine.is_present(run.gfn + k) {
                    n += 1;
                    newest = newest.max(self.seen[i].load(Ordering::Relaxed));
                }
            }
            if n > 0 {
                chunks.push((newest, run, n));
            }
        }
        chunks.sort_unstable_by_key(|(newest, run, _)| (*newest, run.index));
        let mut got = 0;
        let mut out = Vec::new();
        for (_, run, n) in chunks {
            if got >= want {
                break;
            }
            got += n;
            out.push(run);
        }
        out.sort_unstable_by_key(|r| r.index);
        out
    }

    /// One pass: if resident memory is over the limit, evicts the coldest pages down to the
    /// low watermark. Returns the pages evicted. A store that fails leaves its pages here
    /// (the reason in the stats) and the pass goes on with the other memservers.
    pub fn evict(&self, out: &mut dyn PageOut) -> Result<u64, String> {
        let _pass = self.pass.lock().expect("pager lock");
        let resident = self.engine.present_pages();
        if self.counters.passes.load(Ordering::Relaxed) > 0 {
            self.counters.peak.fetch_max(resident, Ordering::Relaxed);
        }
        if resident <= self.limit_pages {
            return Ok(0);
        }
        let t0 = Instant::now();
        let usable: Vec<bool> = (0..self.endpoints.len()).map(|m| out.usable(m)).collect();
        let chunks = self.coldest_chunks(resident - self.low_pages, &usable);
        let mut evicted = self.drop_clean(&chunks)?;
        // The rest, by first holder: marked EVICTING, then protected (a write before the
        // protection lands in the copy; one after it faults and cancels).
        let mut by_ms: Vec<Vec<PageRun>> = vec![Vec::new(); self.endpoints.len()];
        for chunk in &chunks {
            let mut marked = Vec::new();
            for k in 0..chunk.pages {
                let i = usize::try_from(chunk.index + k).expect("index");
                let present = self.engine.is_present(chunk.gfn + k);
                if present
                    && self.state[i]
                        .compare_exchange(DIRTY, EVICTING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    marked.push(chunk.gfn + k);
                }
            }
            for run in runs_of(&self.layout, &marked) {
                self.engine
                    .write_protect(run.gfn, run.pages)
                    .map_err(|e| e.to_string())?;
                by_ms[self.stripe_of(run.gfn)].push(run);
            }
        }
        let t_copy = Instant::now();
        for (first, runs) in by_ms.iter().enumerate() {
            if runs.is_empty() {
                continue;
            }
            // Every live holder stores it; the pages are theirs once one of them has.
            let mut acked = 0u8;
            for k in 0..self.replicas {
                let ms = self.holder(first, k);
                if !usable[ms] {
                    continue;
                }
                match out.store(ms, runs) {
                    Ok(()) => acked |= 1 << k,
                    Err(e) => self.note_error(e),
                }
            }
            if acked == 0 {
                // Nothing was dropped: the pages stay local and writable.
                for run in runs {
                    self.abandon(run)?;
                }
                continue;
            }
            evicted += self.commit(first, runs, acked)?;
        }
        self.counters.writeback_ns.fetch_add(
            u64::try_from(t_copy.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.counters.passes.fetch_add(1, Ordering::Relaxed);
        self.counters.eviction_ns.fetch_add(
            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(evicted)
    }

    /// Memserver number `ms` was lost (or came back without the VM's pages, `forget`): its
    /// pages and the clean pages fetched from it go to their other holder where that holder
    /// has a current copy and is up; clean pages nobody else holds become dirty (copied at
    /// their next eviction); the rest stay its own. With `forget`, no page counts it as a
    /// holder of a current copy any more. Returns the pages handed over (vCPUs waiting for
    /// one are asked for again by the caller: [`FaultEngine::reroute`]).
    pub fn fail_over(
        &self,
        ms: usize,
        up: impl Fn(EndpointId) -> bool,
        forget: bool,
    ) -> Vec<PageRun> {
        let _pass = self.pass.lock().expect("pager lock");
        let dead = self.endpoints[ms];
        let mut moved = Vec::new();
        for run in self.layout.runs(STRIPE_PAGES) {
            let first = self.stripe_of(run.gfn);
            let Some(k) = (0..self.replicas).find(|&k| self.holder(first, k) == ms) else {
                continue;
            };
            let other =
                (self.replicas == 2).then(|| (1 - k, self.endpoints[self.holder(first, 1 - k)]));
            for p in 0..run.pages {
                let (gfn, i) = (run.gfn + p, usize::try_from(run.index + p).expect("index"));
                let owned = self.owners.get(gfn) == Some(Owner::Endpoint(dead));
                let fetched = self.owners.came_from(gfn) == Some(dead);
                if forget {
                    self.copies[i].fetch_and(!(1 << k), Ordering::AcqRel);
                }
                if !owned && !fetched {
                    continue;
                }
                let copy = self.copies[i].load(Ordering::Acquire);
                let to = other.filter(|(o, to)| copy & (1 << o) != 0 && up(*to));
                if let Some((_, to)) = to {
                    // Its owned pages and its fetched clean pages alike are `to`'s now.
                    if self.owners.hand_over(gfn, 1, dead, to) > 0 {
                        moved.push(gfn);
                    }
                } else if fetched
                    && self.state[i]
                        .compare_exchange(CLEAN, DIRTY, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    // Its only other copy is here: it is written back, not dropped.
                    self.owners.set(gfn, 1, Owner::Local);
                }
            }
        }
        let runs = runs_of(&self.layout, &moved);
        self.counters
            .failed_over
            .fetch_add(moved.len() as u64, Ordering::Relaxed);
        runs
    }

    /// Records a store that failed (the pass goes on).
    fn note_error(&self, why: String) {
        log::warn!("{why}");
        *self.error.lock().expect("pager lock") = Some(why);
    }

    /// Drops the clean pages of `chunks` (their memserver's copy is current): no copy.
    fn drop_clean(&self, chunks: &[PageRun]) -> Result<u64, String> {
        let mut dropped = Vec::new();
        for chunk in chunks {
            for k in 0..chunk.pages {
                let gfn = chunk.gfn + k;
                let i = usize::try_from(chunk.index + k).expect("index");
                let Some(from) = self.owners.came_from(gfn) else {
                    continue;
                };
                if self.state[i]
                    .compare_exchange(CLEAN, GONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.owners.set(gfn, 1, Owner::Endpoint(from));
                    dropped.push(gfn);
                }
            }
        }
        for run in runs_of(&self.layout, &dropped) {
            self.drop_run(&run)?;
        }
        let n = dropped.len() as u64;
        self.counters.clean_drops.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// The holders in `acked` (bit k: holder k of first holder `first`) acknowledged `runs`:
    /// the pages still `EVICTING` become the first of them's and are dropped; the others
    /// (written meanwhile) stay.
    fn commit(&self, first: usize, runs: &[PageRun], acked: u8) -> Result<u64, String> {
        let k0 = usize::try_from(acked.trailing_zeros()).expect("small");
        let owner = Owner::Endpoint(self.endpoints[self.holder(first, k0)]);
        let mut gone = Vec::new();
        for run in runs {
            for k in 0..run.pages {
                let i = usize::try_from(run.index + k).expect("index");
                if self.state[i]
                    .compare_exchange(EVICTING, GONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.copies[i].store(acked, Ordering::Release);
                    self.owners.set(run.gfn + k, 1, owner);
                    gone.push(run.gfn + k);
                }
            }
        }
        for run in runs_of(&self.layout, &gone) {
            self.drop_run(&run)?;
        }
        let n = gone.len() as u64;
        self.counters.written_back.fetch_add(n, Ordering::Relaxed);
        for k in (0..self.replicas).filter(|k| acked & (1 << k) != 0) {
            self.per_memserver[self.holder(first, k)]
                .0
                .fetch_add(n, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Drops a run of `GONE` pages and wakes writers that waited on them.
    fn drop_run(&self, run: &PageRun) -> Result<(), String> {
        self.engine
            .forget(run.gfn, run.pages)
            .map_err(|e| e.to_string())?;
        self.engine
            .wake(run.gfn, run.pages)
            .map_err(|e| e.to_string())
    }

    /// A store failed: the run's pages still `EVICTING` are `DIRTY` again and writable.
    fn abandon(&self, run: &PageRun) -> Result<(), String> {
        for k in 0..run.pages {
            let i = usize::try_from(run.index + k).expect("index");
            let _ = self.state[i].compare_exchange(
                EVICTING,
                DIRTY,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.engine
            .unprotect(run.gfn, run.pages)
            .map_err(|e| e.to_string())
    }

    /// Records why eviction stopped.
    fn fail(&self, why: String) {
        log::error!("{why}");
        *self.error.lock().expect("pager lock") = Some(why);
    }

    /// The counters.
    #[allow(clippy::cast_precision_loss)] // statistics for people
    /// `up`: each memserver's recall and store links.
    pub fn stats(&self, uris: &[String], up: &[(bool, bool)]) -> RemotePagingStats {
        let c = &self.counters;
        let resident = self.engine.present_pages();
        let written = c.written_back.load(Ordering::Relaxed);
        let wb_ns = c.writeback_ns.load(Ordering::Relaxed);
        let engine = self.engine.stats();
        let latency = super::LatencyUs::of(&engine.latency);
        RemotePagingStats {
            limit_bytes: self.limit_pages * PAGE_SIZE,
            low_watermark_bytes: self.low_pages * PAGE_SIZE,
            total_pages: self.layout.total_pages(),
            resident_pages: resident,
            resident_bytes: resident * PAGE_SIZE,
            resident_peak_pages: c.peak.load(Ordering::Relaxed),
            evicted_pages: self
                .endpoints
                .iter()
                .map(|e| self.owners.count(Owner::Endpoint(*e)))
                .sum(),
            pages_written_back: written,
            clean_drops: c.clean_drops.load(Ordering::Relaxed),
            faults_back: c.faults_back.load(Ordering::Relaxed),
            cancelled_evictions: c.cancelled.load(Ordering::Relaxed),
            write_faults: engine.write_faults,
            zero_fill_faults: c.zero_faults.load(Ordering::Relaxed),
            zero_filled_pages: c.zero_pages.load(Ordering::Relaxed),
            eviction_passes: c.passes.load(Ordering::Relaxed),
            eviction_ms: c.eviction_ns.load(Ordering::Relaxed) as f64 / 1e6,
            writeback_gbps: (wb_ns > 0).then(|| (written * PAGE_SIZE) as f64 / wb_ns as f64),
            demand_faults: engine.latency.count(),
            demand_p50_us: latency.p50,
            demand_p99_us: latency.p99,
            demand_max_us: latency.max,
            demand_cdf: latency.cdf,
            memservers: self
                .endpoints
                .iter()
                .zip(&self.per_memserver)
                .zip(uris)
                .zip(up)
                .map(|(((e, (out, back)), uri), (up, store_up))| MemserverStats {
                    uri: uri.clone(),
                    up: *up,
                    store_up: *store_up,
                    pages_owned: self.owners.count(Owner::Endpoint(*e)),
                    pages_written_back: out.load(Ordering::Relaxed),
                    pages_faulted_back: back.load(Ordering::Relaxed),
                })
                .collect(),
            replicas: self.replicas,
            failed_over_pages: c.failed_over.load(Ordering::Relaxed),
            error: self.error.lock().expect("pager lock").clone(),
        }
    }
}

/// Pages faulted back in from a memserver were installed write-protected: they are clean.
#[derive(Debug)]
struct FaultedBack {
    pager: std::sync::OnceLock<Arc<Pager>>,
    memserver: usize,
}

impl InstallWatch for FaultedBack {
    fn installed(&self, run: &PageRun) {
        let Some(pager) = self.pager.get() else {
            return;
        };
        let epoch = pager.epoch.load(Ordering::Relaxed);
        for k in 0..run.pages {
            let i = usize::try_from(run.index + k).expect("index");
            pager.state[i].store(CLEAN, Ordering::Release);
            pager.seen[i].store(epoch, Ordering::Relaxed);
        }
        pager
            .counters
            .faults_back
            .fetch_add(run.pages, Ordering::Relaxed);
        pager.per_memserver[self.memserver]
            .1
            .fetch_add(run.pages, Ordering::Relaxed);
        pager.faulted_in();
    }
}

/// The runs of consecutive frames in `gfns` (sorted), split where the layout's regions end.
fn runs_of(layout: &MemoryLayout, gfns: &[Gfn]) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::new();
    for g in gfns {
        let Some(index) = layout.page_index(*g) else {
            continue;
        };
        match out.last_mut() {
            Some(r) if r.gfn + r.pages == *g && r.index + r.pages == index => r.pages += 1,
            _ => out.push(PageRun {
                gfn: *g,
                pages: 1,
                index,
            }),
        }
    }
    out
}

/// The engine's fetcher on a VM that pages out: the owner router, with first touches zero-filled
/// by chunk and write faults handled by the pager.
struct PagedRouter {
    router: Arc<OwnerRouter>,
    pager: Arc<Pager>,
}

impl Fetcher for PagedRouter {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        match self.router.owners().get(gfn) {
            Some(Owner::Zero) => self.pager.zero_fill(gfn),
            _ => self.router.request(gfn, engine),
        }
    }

    fn flush(&self, engine: &FaultEngine) -> Result<(), FetchError> {
        self.router.flush(engine)
    }

    fn write_fault(&self, gfn: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        self.pager.write_fault(gfn)
    }
}

/// A recall session's events: a failure marks the memserver's link lost (see the module
/// docs): the router waits and dials again, the pager fails its pages over.
struct RecallEvents {
    router: std::sync::Weak<OwnerRouter>,
    endpoint: EndpointId,
    /// Set when remote paging ends: the connections close on purpose.
    closing: Arc<AtomicBool>,
}

impl ClientEvents for RecallEvents {
    fn failed(&self, client: &PageClient, error: ClientError) {
        if client.is_completed() || self.closing.load(Ordering::Acquire) {
            return;
        }
        if let Some(router) = self.router.upgrade() {
            // A client a redial has replaced may fail late (its network held its bytes, then
            // let them go): only the current one's failure means the link is lost.
            if router.endpoint_of(client) == Some(self.endpoint) {
                router.lost(self.endpoint, &error.to_string());
            }
        }
    }
}

/// How a memserver's recall link is dialled again (see the module docs).
struct RecallDial {
    uri: String,
    /// Which memserver (by number) and its endpoint.
    memserver: usize,
    endpoint: EndpointId,
    secret: Vec<u8>,
    hello: Hello,
    engine: std::sync::Weak<FaultEngine>,
    owners: Arc<OwnerMap>,
    router: std::sync::Weak<OwnerRouter>,
    sink: Arc<OwnedSink>,
    pager: std::sync::OnceLock<Arc<Pager>>,
    closing: Arc<AtomicBool>,
    /// The receivers and sockets of every recall session, to stop at the end.
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// The store links' connections: this memserver's are cut when its recall link is lost.
    stores: StoreSockets,
}

impl RecallDial {
    /// Opens a recall session and starts its client: demand replies on the fault thread,
    /// the bulk channel on a thread of its own. `purpose`: `Recall` (the memserver may hold
    /// nothing of the VM yet) or `Fetch` (it must hold the VM's pages).
    fn open(&self, purpose: Purpose) -> Result<Arc<PageClient>, tsubame_pageserver::SessionError> {
        let hello = Hello {
            purpose,
            ..self.hello.clone()
        };
        let (client, t) = connect_owner(
            &self.uri,
            &self.secret,
            &hello,
            &format!("memserver {}", self.uri),
            self.sink.clone(),
            Arc::new(RecallEvents {
                router: self.router.clone(),
                endpoint: self.endpoint,
                closing: self.closing.clone(),
            }),
            &self.sockets,
            "recall-bulk-rx",
        )?;
        self.threads.lock().expect("paging lock").push(t);
        Ok(client)
    }
}

impl RecallDial {
    /// Hands what can be handed over to the other holders, and asks again for what vCPUs
    /// wait for. `forget`: the memserver lost the VM's pages.
    fn fail_over(&self, forget: bool) {
        let (Some(pager), Some(engine)) = (self.pager.get(), self.engine.upgrade()) else {
            return;
        };
        let router = self.router.upgrade();
        let up = |id| router.as_ref().is_some_and(|r| r.is_up(id));
        for run in pager.fail_over(self.memserver, up, forget) {
            engine.reroute(run.gfn, run.pages);
        }
    }
}

impl Redial for RecallDial {
    fn lost(&self) {
        // A store in flight to it (on a silent network, say) would hold the evictor, and the
        // fail-over waits for the evictor's pass: the store fails now instead.
        for c in &self.stores.lock().expect("paging lock")[self.memserver] {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.fail_over(false);
    }

    fn redial(&self) -> Result<Arc<PageClient>, RedialError> {
        let transient = |e: &dyn std::fmt::Display| RedialError {
            why: format!("memserver {}: {e}", self.uri),
            permanent: false,
        };
        match self.open(Purpose::Fetch) {
            Ok(c) => Ok(c),
            Err(e) if tsubame_pageserver::memserver::lacks_the_vm(&e) => {
                let owned = self.owners.owned_by(self.endpoint);
                if owned > 0 {
                    return Err(RedialError {
                        why: format!(
                            "memserver {} is back but holds none of this VM's pages (it \
                             restarted?): the {owned} pages it held are lost and the VM stays \
                             paused. Run with --replicas 2 and two memservers or more so that \
                             losing one loses no page",
                            self.uri
                        ),
                        permanent: true,
                    });
                }
                // It owned nothing: it serves again as an empty memserver, and no page counts
                // on a copy there any more.
                let c = self.open(Purpose::Recall).map_err(|e| transient(&e))?;
                self.fail_over(true);
                Ok(c)
            }
            Err(e) => Err(transient(&e)),
        }
    }

    fn needed_when_empty(&self) -> bool {
        true // pages are evicted to it again
    }
}

/// The store session with one memserver: a page server of this VM's memory writing to it.
struct StoreLink {
    uri: String,
    urgent: std::net::TcpStream,
    writer: BulkWriter,
    server: PageServer<GuestMemoryStore>,
}

/// How store sessions are opened.
struct StoreDial {
    uris: Vec<String>,
    secret: Vec<u8>,
    hello: Hello,
    memory: Arc<GuestMemory>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// Each memserver's current store connections, shut down when its recall link is lost.
    current: StoreSockets,
}

/// Each memserver's current store connections.
type StoreSockets = Arc<Mutex<Vec<Vec<std::net::TcpStream>>>>;

impl StoreDial {
    fn open(&self, memserver: usize) -> Result<StoreLink, String> {
        let uri = &self.uris[memserver];
        let s = session::open(uri, &self.secret, &self.hello).map_err(|e| e.to_string())?;
        {
            let mut sockets = self.sockets.lock().expect("paging lock");
            let mut current = self.current.lock().expect("paging lock");
            current[memserver].clear();
            for c in [&s.urgent, &s.bulk] {
                sockets.push(c.try_clone().map_err(|e| e.to_string())?);
                current[memserver].push(c.try_clone().map_err(|e| e.to_string())?);
            }
        }
        Ok(StoreLink {
            uri: uri.clone(),
            urgent: s.urgent,
            writer: BulkWriter::new(s.bulk, s.rtt).map_err(|e| e.to_string())?,
            server: PageServer::new(GuestMemoryStore::new(self.memory.clone())),
        })
    }
}

/// The store sessions, one per memserver (`None` while its link is down).
struct Links {
    links: Vec<Option<StoreLink>>,
    /// Which links are up, for `query-memory`.
    up: Arc<Vec<AtomicBool>>,
    dial: StoreDial,
}

impl PageOut for Links {
    /// Sends every page of `runs` with no flush or wait between them (the runs of a pass are
    /// often a few pages each; a flush per run cost a system call per run and made a pass of
    /// scattered chunks send at a fraction of the link), then waits until the memserver has
    /// acknowledged all of it: only then may the pages become its own.
    fn store(&mut self, memserver: usize, runs: &[PageRun]) -> Result<(), String> {
        let Some(link) = self.links[memserver].as_mut() else {
            return Err(format!(
                "memserver {}: its store link is down",
                self.dial.uris[memserver]
            ));
        };
        let mut scratch = tsubame_pageserver::server::Scratch::default();
        // No one waits behind this queue: the whole pass may be in flight at once.
        link.writer
            .set_window_floor(runs.iter().map(|r| r.pages * PAGE_SIZE).sum());
        let sent = (|| -> Result<(), tsubame_pageserver::ServerError> {
            for run in merged_runs(runs) {
                // Sent again each time it is evicted: the memserver replaces its copy.
                link.server.unsend(run.gfn, run.pages);
                let mut done = 0;
                while done < run.pages {
                    let piece = link.writer.run_pages().min(run.pages - done);
                    // Flushes, and waits, only when a window is unacknowledged.
                    link.writer.wait_for_window()?;
                    link.server.send(
                        &mut link.writer,
                        &mut scratch,
                        run.gfn + done,
                        piece,
                        SendKind::Precopy,
                    )?;
                    done += piece;
                }
            }
            link.writer.wait_all_acknowledged()?;
            Ok(())
        })();
        let Err(e) = sent else {
            return Ok(());
        };
        let pages: u64 = runs.iter().map(|r| r.pages).sum();
        let why = crate::migration::source::told_why(&link.urgent).unwrap_or_else(|| e.to_string());
        let message = format!(
            "memserver {} did not store {pages} evicted pages: {why}; the pages stay here \
             (the VM runs over its --local-mem limit if no other memserver takes them). Give \
             the memserver more memory (--max-mem), add memservers, or raise --local-mem",
            link.uri
        );
        self.links[memserver] = None;
        self.up[memserver].store(false, Ordering::Relaxed);
        Err(message)
    }

    /// A memserver whose store link broke takes no more pages from this VM (see the module
    /// docs, "Replicas and dead memservers").
    fn usable(&mut self, memserver: usize) -> bool {
        self.links[memserver].is_some()
    }
}

/// Remote paging of one VM: its fault engine (write-protected), owners, memserver sessions and
/// evictor thread.
pub struct RemotePaging {
    engine: Arc<FaultEngine>,
    router: Arc<OwnerRouter>,
    pager: Arc<Pager>,
    uris: Vec<String>,
    /// The store sessions and the nudges, until the evictor takes them.
    links: Mutex<Option<(Links, std::sync::mpsc::Receiver<()>)>>,
    store_up: Arc<Vec<AtomicBool>>,
    stop: Arc<AtomicBool>,
    evictor: Mutex<Option<JoinHandle<()>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl std::fmt::Debug for RemotePaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePaging")
            .field("memservers", &self.uris)
            .finish_non_exhaustive()
    }
}

impl RemotePaging {
    /// Registers all of `memory` (empty) with a write-protecting fault engine, every page owned
    /// by nobody (zero), opens a store and a recall session with each memserver for VM `vm`
    /// (`vcpus` vCPUs), and starts the fault thread. The evictor starts with
    /// [`Self::start_evictor`].
    pub fn new(
        memory: &Arc<GuestMemory>,
        config: &RemotePagingConfig,
        vm: u64,
        vcpus: u32,
    ) -> Result<Self, PagingError> {
        let layout = memory.layout().clone();
        let limit_pages = config.local_bytes / PAGE_SIZE;
        if config.memservers.is_empty() {
            return Err(PagingError::Remote(
                "--local-mem needs at least one --memserver to evict pages to".into(),
            ));
        }
        if !(1..=2).contains(&config.replicas) || config.replicas > config.memservers.len() {
            return Err(PagingError::Remote(format!(
                "--replicas {} with {} memserver(s): give 1, or 2 with at least two \
                 --memserver addresses",
                config.replicas,
                config.memservers.len()
            )));
        }
        if limit_pages < 16 * CHUNK_PAGES {
            return Err(PagingError::Remote(format!(
                "--local-mem {} KiB is too small: give the VM at least {} KiB resident",
                config.local_bytes >> 10,
                (16 * CHUNK_PAGES * PAGE_SIZE) >> 10
            )));
        }
        let engine = FaultEngine::new_write_protected(&layout, memory.hvas())?;
        let owners = Arc::new(OwnerMap::new(&layout, Owner::Zero));
        let router = OwnerRouter::new(owners.clone());
        router.attach_engine(&engine);
        let hello = Hello {
            purpose: Purpose::Store,
            channel: tsubame_pageserver::Channel::Urgent,
            session: 0,
            vm,
            layout: layout.clone(),
            vcpus,
            checkpoint_ms: 0,
        };
        let threads = Arc::new(Mutex::new(Vec::new()));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let stores: StoreSockets = Arc::new(Mutex::new(
            (0..config.memservers.len()).map(|_| Vec::new()).collect(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let mut endpoints = Vec::new();
        let (mut watches, mut dials) = (Vec::new(), Vec::new());
        let n = config.memservers.len();
        let store = StoreDial {
            uris: config.memservers.clone(),
            secret: config.secret.clone(),
            hello: hello.clone(),
            memory: memory.clone(),
            sockets: sockets.clone(),
            current: stores.clone(),
        };
        let mut links = Vec::new();
        for (ms, uri) in config.memservers.iter().enumerate() {
            let refused = |why: String| {
                PagingError::Remote(format!(
                    "memserver {uri}: {why}. Start it with `tsubame memserver --listen \
                     tcp:HOST:PORT` on the sub-host, and give both hosts the same \
                     TSUBAME_SECRET"
                ))
            };
            links.push(Some(store.open(ms).map_err(refused)?));
            let id = router.next_id();
            let watch = Arc::new(FaultedBack {
                pager: std::sync::OnceLock::new(),
                memserver: ms,
            });
            watches.push(watch.clone());
            let sink = Arc::new(OwnedSink::write_protected(
                engine.clone(),
                owners.clone(),
                id,
                watch,
            ));
            let dial = Arc::new(RecallDial {
                uri: uri.clone(),
                memserver: ms,
                endpoint: id,
                secret: config.secret.clone(),
                hello: hello.clone(),
                engine: Arc::downgrade(&engine),
                owners: owners.clone(),
                router: Arc::downgrade(&router),
                sink: sink.clone(),
                pager: std::sync::OnceLock::new(),
                closing: stop.clone(),
                threads: threads.clone(),
                sockets: sockets.clone(),
                stores: stores.clone(),
            });
            let client = dial
                .open(Purpose::Recall)
                .map_err(|e| refused(e.to_string()))?;
            let added = router
                .add_remote(
                    // Not offered to a migration's destination: a paged VM does not migrate
                    // yet (see `Vm::migrate`).
                    RemoteOwner::new(client, sink, None),
                    Some(dial.clone()),
                )
                .map_err(|e| refused(e.to_string()))?;
            debug_assert_eq!(added, id);
            endpoints.push(added);
            dials.push(dial);
        }
        let store_up: Arc<Vec<AtomicBool>> =
            Arc::new((0..n).map(|_| AtomicBool::new(true)).collect());
        let (nudge, nudged) = std::sync::mpsc::sync_channel(1);
        let pager = Arc::new(
            Pager::new(engine.clone(), owners, limit_pages, endpoints, nudge)
                .replicated(config.replicas),
        );
        for w in watches {
            let _ = w.pager.set(pager.clone());
        }
        for d in dials {
            let _ = d.pager.set(pager.clone());
        }
        engine.start(Arc::new(PagedRouter {
            router: router.clone(),
            pager: pager.clone(),
        }))?;
        let links = Links {
            links,
            up: store_up.clone(),
            dial: store,
        };
        Ok(Self {
            engine,
            router,
            pager,
            uris: config.memservers.clone(),
            links: Mutex::new(Some((links, nudged))),
            store_up,
            stop,
            evictor: Mutex::new(None),
            threads,
            sockets,
        })
    }

    /// Starts the evictor thread (`evictor`): every tick, and whenever a fault-in takes resident
    /// memory over the limit, it reads the guest's writes from `dirty` (the KVM dirty log, which
    /// it alone reads) and evicts if over the limit; near the limit it re-arms the log of the
    /// coldest pages (see the module docs).
    pub fn start_evictor(&self, mut dirty: impl DirtyLog) -> Result<(), PagingError> {
        let Some((mut links, nudged)) = self.links.lock().expect("paging lock").take() else {
            return Ok(());
        };
        let (pager, stop) = (self.pager.clone(), self.stop.clone());
        let t = std::thread::Builder::new()
            .name("evictor".into())
            .spawn(move || {
                let mut tracker = WriteTracker::new(dirty.manual());
                let mut failed = false;
                while !stop.load(Ordering::Acquire) {
                    let _ = nudged.recv_timeout(TICK);
                    if let Err(e) = tracker.observe(&pager, &mut dirty) {
                        pager.fail(format!("reading the dirty log failed: {e}"));
                        return;
                    }
                    if failed {
                        continue;
                    }
                    // Stores that fail do not end eviction (see `Pager::evict`); this does.
                    match pager.evict(&mut links) {
                        Ok(evicted) => {
                            if let Err(e) = tracker.rearm(&pager, &mut dirty, evicted > 0) {
                                pager.fail(format!("re-arming the dirty log failed: {e}"));
                                return;
                            }
                        }
                        Err(e) => {
                            pager.fail(e);
                            failed = true;
                        }
                    }
                }
            })
            .map_err(|source| PagingError::Thread {
                name: "evictor".into(),
                source,
            })?;
        *self.evictor.lock().expect("paging lock") = Some(t);
        Ok(())
    }

    /// The fault engine.
    pub fn engine(&self) -> &Arc<FaultEngine> {
        &self.engine
    }

    /// `query-memory`.
    pub fn stats(&self) -> RemotePagingStats {
        let up: Vec<(bool, bool)> = self
            .pager
            .endpoints
            .iter()
            .zip(self.store_up.iter())
            .map(|(e, s)| (self.router.is_up(*e), s.load(Ordering::Relaxed)))
            .collect();
        self.pager.stats(&self.uris, &up)
    }

    /// The owners of the pages.
    pub fn router(&self) -> &Arc<OwnerRouter> {
        &self.router
    }
}

impl Drop for RemotePaging {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.router.close();
        if let Some(t) = self.evictor.lock().expect("paging lock").take() {
            let _ = t.join();
        }
        for s in self.sockets.lock().expect("paging lock").iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("paging lock"));
        for t in threads {
            let _ = t.join();
        }
        self.engine.stop();
    }
}

/// The guest's dirty log as the evictor reads it: KVM's ([`KvmDirtyLog`]), or a test's.
pub trait DirtyLog: Send + 'static {
    /// Whether reading leaves the log as it is and [`Self::rearm`] clears chosen bits (KVM's
    /// manual protection). If not, each read also clears and re-arms every bit it returns.
    fn manual(&self) -> bool;
    /// Every slot's bits: a page's bit is set once the guest wrote it after it was last
    /// re-armed (and, with manual protection, stays set until re-armed).
    fn read(&mut self) -> Result<Vec<SlotDirtyLog>, String>;
    /// Clears the bits set in `pages` (shaped as [`Self::read`]'s answer) and write-protects
    /// those pages: the guest's next write to each sets its bit again, at a write fault.
    fn rearm(&mut self, pages: &[SlotDirtyLog]) -> Result<(), String>;
}

/// KVM's dirty log of a VM that pages out, with manual protection where KVM has it.
#[derive(Debug)]
pub struct KvmDirtyLog {
    kvm: Arc<KvmVm>,
    memory: Arc<GuestMemory>,
    manual: bool,
}

impl KvmDirtyLog {
    /// The log of `kvm`'s `memory`, whose dirty logging is on; switches it to manual
    /// protection if this KVM can.
    pub fn new(kvm: Arc<KvmVm>, memory: Arc<GuestMemory>) -> Result<Self, PagingError> {
        let manual = kvm
            .enable_manual_dirty_protect()
            .map_err(|e| PagingError::Remote(e.to_string()))?;
        if !manual {
            log::warn!(
                "this KVM has no manual dirty-log protection (Linux 5.8+): remote paging reads \
                 the dirty log only near the local limit, and each read costs the guest a write \
                 fault per page it writes"
            );
        }
        Ok(Self {
            kvm,
            memory,
            manual,
        })
    }
}

impl DirtyLog for KvmDirtyLog {
    fn manual(&self) -> bool {
        self.manual
    }

    fn read(&mut self) -> Result<Vec<SlotDirtyLog>, String> {
        self.kvm.dirty_log(&self.memory).map_err(|e| e.to_string())
    }

    fn rearm(&mut self, pages: &[SlotDirtyLog]) -> Result<(), String> {
        self.kvm.clear_dirty_log(pages).map_err(|e| e.to_string())
    }
}

/// The evictor's view of the guest's writes (see the module docs): which pages it re-armed
/// and has not seen written since, and when it last re-armed the candidates for eviction.
struct WriteTracker {
    manual: bool,
    /// Shaped as the log: a set bit is a page whose log bit was clear (re-armed, or never
    /// set since logging started) when last read, so that a set log bit is a new write.
    armed: Vec<SlotDirtyLog>,
    rearmed: Option<Instant>,
}

/// Re-arm the coldest pages worth this many eviction passes (a pass evicts from the limit
/// down to the low watermark), once resident memory is within that many passes of the limit.
const REARM_PASSES: u64 = 2;
/// Near the limit, re-arm the candidates at least this often (and after every pass).
const REARM_EVERY: Duration = Duration::from_millis(100);

impl WriteTracker {
    fn new(manual: bool) -> Self {
        Self {
            manual,
            armed: Vec::new(),
            rearmed: None,
        }
    }

    /// Pages of the coldest chunks re-armed ahead of eviction.
    fn margin(pager: &Pager) -> u64 {
        REARM_PASSES * (pager.limit_pages - pager.low_pages)
    }

    /// Whether resident memory is within [`Self::margin`] of the limit: only then does the
    /// evictor need to know which pages are written.
    fn near_limit(pager: &Pager) -> bool {
        pager.engine.present_pages() + Self::margin(pager) > pager.limit_pages
    }

    /// One tick: reads the log and tells the pager which pages were written.
    fn observe(&mut self, pager: &Pager, log: &mut dyn DirtyLog) -> Result<(), String> {
        if !self.manual {
            // Every read write-protects every page it returns: read only near the limit.
            let gfns: Vec<Gfn> = if Self::near_limit(pager) {
                log.read()?.iter().flat_map(SlotDirtyLog::gfns).collect()
            } else {
                Vec::new()
            };
            pager.note_written(&gfns);
            return Ok(());
        }
        let bits = log.read()?;
        if self.armed.is_empty() {
            // Logging started with every bit clear.
            self.armed = bits
                .iter()
                .map(|s| {
                    let mut all = SlotDirtyLog {
                        words: vec![u64::MAX; s.words.len()],
                        ..s.clone()
                    };
                    for (w, word) in all.words.iter_mut().enumerate() {
                        let first = w as u64 * 64;
                        if first + 64 > s.pages {
                            *word = if first >= s.pages {
                                0
                            } else {
                                (1u64 << (s.pages - first)) - 1
                            };
                        }
                    }
                    all
                })
                .collect();
        }
        let mut written = Vec::new();
        for (slot, armed) in bits.iter().zip(&mut self.armed) {
            let mut seen = SlotDirtyLog {
                words: vec![0; armed.words.len()],
                ..armed.clone()
            };
            let mut any = false;
            for ((bits, armed), new) in slot.words.iter().zip(&mut armed.words).zip(&mut seen.words)
            {
                *new = bits & *armed;
                *armed &= !*new;
                any |= *new != 0;
            }
            if any {
                written.extend(seen.gfns());
            }
        }
        pager.note_written(&written);
        Ok(())
    }

    /// Near the limit, after an eviction pass (`passed`) or every [`REARM_EVERY`]: re-arms the
    /// pages of the coldest chunks whose writes it would not see, so that by the next pass a
    /// page that is still written has shown it and is no longer among the coldest.
    fn rearm(&mut self, pager: &Pager, log: &mut dyn DirtyLog, passed: bool) -> Result<(), String> {
        if !self.manual || self.armed.is_empty() || !Self::near_limit(pager) {
            return Ok(());
        }
        if !passed && self.rearmed.is_some_and(|t| t.elapsed() < REARM_EVERY) {
            return Ok(());
        }
        self.rearmed = Some(Instant::now());
        let mut clear: Vec<SlotDirtyLog> = self
            .armed
            .iter()
            .map(|s| SlotDirtyLog {
                words: vec![0; s.words.len()],
                ..s.clone()
            })
            .collect();
        let mut any = false;
        // The chunks a pass could evict, whichever memservers can take pages now.
        let usable = vec![true; pager.endpoints.len()];
        for chunk in pager.coldest_chunks(Self::margin(pager), &usable) {
            for k in 0..chunk.pages {
                let gfn = chunk.gfn + k;
                let Some((s, slot)) = self
                    .armed
                    .iter_mut()
                    .enumerate()
                    .find(|(_, s)| s.first_gfn <= gfn && gfn < s.first_gfn + s.pages)
                else {
                    continue;
                };
                let bit = gfn.0 - slot.first_gfn.0;
                let (w, b) = (usize::try_from(bit / 64).expect("word"), bit % 64);
                if slot.words[w] & (1 << b) == 0 {
                    slot.words[w] |= 1 << b;
                    clear[s].words[w] |= 1 << b;
                    any = true;
                }
            }
        }
        if any {
            log.rearm(&clear)?;
        }
        Ok(())
    }
}

/// `runs` (in order) with the runs that continue one another joined: a pass's runs end at
/// chunk boundaries, and a store sends each joined run in as few frames as it can.
fn merged_runs(runs: &[PageRun]) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::with_capacity(runs.len());
    for run in runs {
        match out.last_mut() {
            Some(r) if r.gfn + r.pages == run.gfn && r.index + r.pages == run.index => {
                r.pages += run.pages;
            }
            _ => out.push(*run),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_pages::Gpa;

    /// A pager over 8 MiB with a limit of `limit` pages, its memory, and the fault thread.
    fn pager(limit: u64) -> (Arc<Pager>, Arc<GuestMemory>) {
        replicated_pager(limit, 1, 1)
    }

    /// [`pager`] over `memservers` endpoints, each page written to `replicas` of them.
    fn replicated_pager(
        limit: u64,
        memservers: u8,
        replicas: usize,
    ) -> (Arc<Pager>, Arc<GuestMemory>) {
        let layout = MemoryLayout::for_size(8 << 20).unwrap();
        let memory = Arc::new(GuestMemory::new(&layout).unwrap());
        let engine = FaultEngine::new_write_protected(&layout, memory.hvas()).unwrap();
        let owners = Arc::new(OwnerMap::new(&layout, Owner::Zero));
        let (nudge, _) = std::sync::mpsc::sync_channel(1);
        let pager = Arc::new(
            Pager::new(
                engine.clone(),
                owners.clone(),
                limit,
                (0..memservers).map(EndpointId).collect(),
                nudge,
            )
            .replicated(replicas),
        );
        engine
            .start(Arc::new(PagedRouter {
                router: OwnerRouter::new(owners),
                pager: pager.clone(),
            }))
            .unwrap();
        (pager, memory)
    }

    fn touch(memory: &GuestMemory, gfns: std::ops::Range<u64>, byte: u8) {
        for g in gfns {
            memory.write(Gfn(g).gpa(), &[byte; 8]).unwrap();
        }
    }

    #[test]
    fn the_coldest_chunks_go_first_not_the_lowest_addresses() {
        let (pager, memory) = pager(1024);
        // Chunks 0..4 written in the order 3, 1, 0, 2, one pass each.
        for chunk in [3u64, 1, 0, 2] {
            let gfns: Vec<Gfn> = (chunk * CHUNK_PAGES..(chunk + 1) * CHUNK_PAGES)
                .map(Gfn)
                .collect();
            touch(&memory, chunk * CHUNK_PAGES..(chunk + 1) * CHUNK_PAGES, 1);
            pager.note_written(&gfns);
        }
        let chosen: Vec<u64> = pager
            .coldest_chunks(2 * CHUNK_PAGES, &[true])
            .iter()
            .map(|r| r.gfn.0 / CHUNK_PAGES)
            .collect();
        assert_eq!(chosen, [1, 3], "chunks 3 and 1 were written longest ago");
        pager.engine.stop();
    }

    /// Stores nothing, but writes to `victim` during the copy, as a running guest would.
    struct WriteDuringCopy {
        memory: Arc<GuestMemory>,
        victim: Gfn,
        stored: Vec<PageRun>,
    }

    impl PageOut for WriteDuringCopy {
        fn store(&mut self, _: usize, runs: &[PageRun]) -> Result<(), String> {
            let (m, g) = (self.memory.clone(), self.victim);
            // Waits in the fault thread until it cancels the page's eviction.
            std::thread::spawn(move || m.write(Gpa(g.gpa().0 + 16), &[7u8; 8]).unwrap())
                .join()
                .unwrap();
            self.stored.extend_from_slice(runs);
            Ok(())
        }
    }

    /// A dirty log as KVM keeps it: a write sets the page's bit, which stays set until
    /// re-armed (with manual protection) or read (without).
    #[derive(Clone)]
    struct FakeLog {
        bits: Arc<Mutex<Vec<u64>>>,
        pages: u64,
        manual: bool,
    }

    impl FakeLog {
        fn new(pages: u64) -> Self {
            let words = usize::try_from(pages.div_ceil(64)).unwrap();
            Self {
                bits: Arc::new(Mutex::new(vec![0; words])),
                pages,
                manual: true,
            }
        }

        /// The guest writes `gfns` (the memory itself is left alone: only the log matters).
        fn write(&self, gfns: std::ops::Range<u64>) {
            let mut bits = self.bits.lock().unwrap();
            for g in gfns {
                bits[usize::try_from(g / 64).unwrap()] |= 1 << (g % 64);
            }
        }
    }

    impl DirtyLog for FakeLog {
        fn manual(&self) -> bool {
            self.manual
        }

        fn read(&mut self) -> Result<Vec<SlotDirtyLog>, String> {
            let mut bits = self.bits.lock().unwrap();
            let words = bits.clone();
            if !self.manual {
                bits.iter_mut().for_each(|w| *w = 0);
            }
            Ok(vec![SlotDirtyLog {
                slot: 0,
                first_gfn: Gfn(0),
                pages: self.pages,
                words,
            }])
        }

        fn rearm(&mut self, pages: &[SlotDirtyLog]) -> Result<(), String> {
            let mut bits = self.bits.lock().unwrap();
            for (b, clear) in bits.iter_mut().zip(&pages[0].words) {
                *b &= !clear;
            }
            Ok(())
        }
    }

    /// Stores every run it is given.
    #[derive(Default)]
    struct Stored(Vec<PageRun>);

    impl PageOut for Stored {
        fn store(&mut self, _: usize, runs: &[PageRun]) -> Result<(), String> {
            self.0.extend_from_slice(runs);
            Ok(())
        }
    }

    fn chunk_pages(c: u64) -> std::ops::Range<u64> {
        c * CHUNK_PAGES..(c + 1) * CHUNK_PAGES
    }

    #[test]
    fn pages_written_after_their_rearm_leave_the_coldest_silent_ones_go() {
        let (pager, memory) = pager(1024);
        let layout = pager.layout.clone();
        assert_eq!(layout.gfn_at(0), Some(Gfn(0)));
        let mut log = FakeLog::new(layout.total_pages());
        let mut tracker = WriteTracker::new(true);
        // The guest fills the limit (chunks 0..64) and writes it all: one read sees every
        // page written, and leaves the pages writable (no re-arm far from the limit).
        touch(&memory, 0..1024, 1);
        log.write(0..1024);
        tracker.observe(&pager, &mut log).unwrap();
        // It goes on writing chunks 0..4, unseen: their bits are still set.
        log.write(0..4 * CHUNK_PAGES);
        tracker.observe(&pager, &mut log).unwrap();
        // Then touches new chunks; resident is near the limit, so the coldest chunks worth
        // two passes (chunks 0..8 by their last seen write) are re-armed: their bits clear.
        touch(&memory, 1024..1024 + 4 * CHUNK_PAGES, 1);
        tracker.rearm(&pager, &mut log, true).unwrap();
        let margin = WriteTracker::margin(&pager);
        assert_eq!(margin, 8 * CHUNK_PAGES);
        assert_eq!(
            log.bits.lock().unwrap()[0..2],
            [0, 0],
            "chunks 0..8 re-armed"
        );
        assert_eq!(
            log.bits.lock().unwrap()[2],
            u64::MAX,
            "chunk 8 on: not re-armed"
        );
        // Chunks 0..4 are still written (each such page would take a write fault), 4..8 not.
        log.write(0..4 * CHUNK_PAGES);
        tracker.observe(&pager, &mut log).unwrap();
        let mut out = Stored::default();
        let evicted = pager.evict(&mut out).unwrap();
        assert!(evicted > 0);
        let gone = |c: u64| chunk_pages(c).all(|g| !pager.engine.is_present(Gfn(g)));
        assert!(
            (0..4).all(|c| !gone(c)),
            "chunks written after their re-arm stay"
        );
        assert!(
            (4..8).all(gone),
            "chunks silent since their re-arm go first"
        );
        pager.engine.stop();
    }

    #[test]
    fn without_manual_protection_the_log_is_read_only_near_the_limit() {
        let (pager, memory) = pager(1024);
        let mut log = FakeLog {
            manual: false,
            ..FakeLog::new(pager.layout.total_pages())
        };
        let mut tracker = WriteTracker::new(false);
        // Far from the limit: a read would re-arm (and so slow) every written page; none.
        touch(&memory, 0..256, 1);
        log.write(0..256);
        tracker.observe(&pager, &mut log).unwrap();
        assert_eq!(log.bits.lock().unwrap()[0], u64::MAX, "not read");
        // Near it: read, and the writes count.
        touch(&memory, 256..1000, 1);
        let epoch = pager.epoch.load(Ordering::Relaxed);
        tracker.observe(&pager, &mut log).unwrap();
        assert!(log.bits.lock().unwrap().iter().all(|w| *w == 0), "read");
        assert_eq!(pager.seen[5].load(Ordering::Relaxed), epoch);
        pager.engine.stop();
    }

    #[test]
    fn a_write_during_the_copy_cancels_that_pages_eviction_and_lands() {
        let (pager, memory) = pager(256);
        touch(&memory, 0..512, 1);
        assert!(pager.over_limit());
        let victim = Gfn(5);
        let mut out = WriteDuringCopy {
            memory: memory.clone(),
            victim,
            stored: Vec::new(),
        };
        let evicted = pager.evict(&mut out).unwrap();
        let copied: u64 = out.stored.iter().map(|r| r.pages).sum();
        assert!(out
            .stored
            .iter()
            .any(|r| r.gfn <= victim && victim < r.gfn + r.pages));
        assert_eq!(evicted, copied - 1, "all but the written page");
        let stats = pager.stats(&["test".into()], &[(true, true)]);
        assert_eq!(stats.cancelled_evictions, 1);
        assert_eq!(stats.evicted_pages, evicted);
        assert!(stats.resident_pages <= pager.low_pages + 1);
        // The written page stayed, with the write; its neighbour is the memserver's now.
        assert!(pager.engine.is_present(victim));
        assert_eq!(pager.owners.get(victim), Some(Owner::Local));
        assert_eq!(
            pager.owners.get(Gfn(6)),
            Some(Owner::Endpoint(EndpointId(0)))
        );
        assert!(!pager.engine.is_present(Gfn(6)));
        let mut b = [0u8; 8];
        memory.read(Gpa(victim.gpa().0 + 16), &mut b).unwrap();
        assert_eq!(b, [7u8; 8]);
        pager.engine.stop();
    }

    /// Stores at the memservers not in `refuse`, and records which got what.
    struct Stores {
        refuse: Vec<usize>,
        stored: Vec<(usize, u64)>,
    }

    impl PageOut for Stores {
        fn store(&mut self, ms: usize, runs: &[PageRun]) -> Result<(), String> {
            if self.refuse.contains(&ms) {
                return Err(format!("memserver {ms} is gone"));
            }
            self.stored.push((ms, runs.iter().map(|r| r.pages).sum()));
            Ok(())
        }
    }

    #[test]
    fn with_two_replicas_a_lost_memservers_pages_go_to_the_other_holder() {
        let (pager, memory) = replicated_pager(256, 2, 2);
        touch(&memory, 0..1024, 3); // two stripes: first holders 0 and 1
        let mut out = Stores {
            refuse: vec![],
            stored: vec![],
        };
        let evicted = pager.evict(&mut out).unwrap();
        assert!(evicted > 0);
        // Every run went to both holders of its stripe.
        let to = |ms| {
            out.stored
                .iter()
                .filter(|(m, _)| *m == ms)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        assert_eq!(to(0), evicted);
        assert_eq!(to(1), evicted);
        let owned0 = pager.owners.owned_by(EndpointId(0));
        assert!(owned0 > 0);
        let moved: u64 = pager
            .fail_over(0, |id| id != EndpointId(0), false)
            .iter()
            .map(|r| r.pages)
            .sum();
        assert_eq!(moved, owned0, "each page memserver 0 owned has a copy at 1");
        assert_eq!(pager.owners.owned_by(EndpointId(0)), 0);
        assert_eq!(pager.owners.owned_by(EndpointId(1)), evicted);
        pager.engine.stop();
    }

    #[test]
    fn a_page_whose_only_copy_is_at_the_lost_memserver_stays_its_own() {
        let (pager, memory) = replicated_pager(256, 2, 2);
        touch(&memory, 0..1024, 3);
        // Memserver 1 refuses: every page is at memserver 0 alone.
        let mut out = Stores {
            refuse: vec![1],
            stored: vec![],
        };
        let evicted = pager.evict(&mut out).unwrap();
        assert!(evicted > 0);
        assert_eq!(pager.owners.owned_by(EndpointId(0)), evicted);
        let moved = pager.fail_over(0, |id| id != EndpointId(0), false);
        assert!(
            moved.is_empty(),
            "memserver 1 has no current copy of any: {moved:?}"
        );
        assert_eq!(pager.owners.owned_by(EndpointId(0)), evicted);
        pager.engine.stop();
    }
}
