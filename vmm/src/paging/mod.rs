//! Demand paging: guest RAM registered with the userfaultfd fault engine, whose missing pages
//! come from their owners (a snapshot file for a lazy restore; the migration source, and any
//! page servers it names, for an incoming migration), with background workers that bring in
//! the rest until every page is local. Remote paging ([`remote`]) runs the other way too: a VM
//! under a local memory limit evicts cold pages to memservers and faults them back.
//!
//! ```text
//!  vCPU faults ─► FaultEngine ─► OwnerRouter ─► OwnerMap[gfn] ─┬─ Zero ──────► install zeros
//!                 (tsubame_uffd)  (router)       (owners)        ├─ RemoteOwner ► PageClient ══► page server
//!                                                                └─ LocalOwner ─► PageStore (file)
//!  page clients' receivers ─► OwnedSink (only the owner's copy) ─► FaultEngine (UFFDIO_COPY/MOVE)
//! ```

pub mod owners;
pub mod remote;
pub mod router;

use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::PageStore;
use tsubame_uffd::FaultEngine;

use crate::memory::GuestMemory;
use crate::snapshot::{SnapshotError, SnapshotStore};
use owners::{EndpointId, OwnedSink, Owner, OwnerMap};
use router::{LocalOwner, OwnerRouter};

/// Errors of demand paging.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error(transparent)]
    Uffd(#[from] tsubame_uffd::UffdError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    Endpoint(#[from] tsubame_uffd::FetchError),
    #[error("{0}")]
    Remote(String),
    #[error("cannot start the paging thread {name}: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
}

/// A fault engine's fault read -> installed distribution as the statistics show it, in µs.
pub(crate) struct LatencyUs {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: f64,
    /// (µs, share at or below) points.
    pub cdf: Vec<(f64, f64)>,
}

impl LatencyUs {
    #[allow(clippy::cast_precision_loss)] // microseconds for people
    pub fn of(h: &tsubame_uffd::LatencyHistogram) -> Self {
        let us = |d: Duration| d.as_nanos() as f64 / 1e3;
        Self {
            p50: h.percentile(0.5).map(us),
            p99: h.percentile(0.99).map(us),
            max: us(h.max()),
            cdf: h
                .cdf()
                .into_iter()
                .map(|(d, share)| (us(d), share))
                .collect(),
        }
    }
}

/// Demand-paging statistics.
#[derive(Clone, Debug, Serialize)]
pub struct PagingStats {
    /// Where pages come from: "snapshot" or "migration".
    pub origin: &'static str,
    pub total_pages: u64,
    pub present_pages: u64,
    /// Faults the engine read, and pages it requested because of them.
    pub faults: u64,
    pub demand_requests: u64,
    /// Pages installed with data: copied in (`UFFDIO_COPY`), or moved in from the staging
    /// pool (`UFFDIO_MOVE`).
    pub pages_copied: u64,
    pub pages_moved: u64,
    pub pages_zeroed: u64,
    /// Staging pool (incoming migration with a known layout): pages faulted in ahead of time,
    /// and pages received into it.
    pub staging_pages_prepared: u64,
    pub staging_pages_used: u64,
    /// Pages installed by a precopy round and dropped again because the guest rewrote them.
    pub pages_discarded: u64,
    /// Fault read -> page installed.
    pub demand_p50_us: Option<f64>,
    pub demand_p99_us: Option<f64>,
    pub demand_max_us: f64,
    /// (µs, share at or below) points of the fault-read -> installed distribution.
    pub demand_cdf: Vec<(f64, f64)>,
    /// When the VM first resumed (its last vCPU entered the guest), µs since the Unix epoch
    /// (0: not yet).
    pub resumed_unix_us: u64,
    /// When every page was local, counted from the start of demand paging.
    pub all_present_ms: Option<f64>,
    /// Why fetching pages failed, if it did (faulting vCPUs wait).
    pub fetch_error: Option<String>,
    /// Where the pages come from.
    pub owners: Vec<router::OwnerStats>,
    /// Pages owned by endpoints (not here): a split VM's pages at its memservers.
    pub remote_pages: u64,
    /// The last consolidation (`consolidate`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<ConsolidationStatus>,
}

/// A consolidation: every page brought back from the endpoints that own it.
#[derive(Clone, Debug, Serialize)]
pub struct ConsolidationStatus {
    /// The endpoints asked, with the pages each owned then.
    pub endpoints: Vec<(String, u64)>,
    /// Pages missing here when it started.
    pub pages: u64,
    /// Start -> every page local (None: still running).
    pub ms: Option<f64>,
    /// `pages` over `ms`.
    pub gb_per_s: Option<f64>,
}

/// The fault engine of a VM whose RAM arrives on demand, the owners its faults go to, and the
/// threads feeding it.
#[derive(Debug)]
pub struct DemandPaging {
    engine: Arc<FaultEngine>,
    router: Arc<OwnerRouter>,
    origin: &'static str,
    workers: Vec<JoinHandle<()>>,
    /// Connections the workers read; shut down on drop so that they stop.
    /// Connections workers read, shut down when paging ends (redials add theirs).
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    /// When every page was local.
    all_present: Arc<Mutex<Option<Instant>>>,
    /// When the VM started to depend on the engine (see [`DemandPaging::restart_clock`]).
    started: Instant,
    /// Called once when the VM first resumes (an incoming migration tells its source).
    resumed: Mutex<Option<ResumeHook>>,
    /// When the VM first resumed (its last vCPU entered the guest), µs since the Unix epoch
    /// (0: not yet).
    resumed_unix_us: std::sync::atomic::AtomicU64,
    /// The staging pool pages are received into, if any (for statistics).
    staging: Option<Arc<tsubame_uffd::StagingPool>>,
    /// The last consolidation: when, from whom, how many pages were missing.
    consolidation: Mutex<Option<Consolidation>>,
    /// Looks whether every page is here and completes if so (an incoming migration's), for
    /// [`Self::settle`].
    completion_check: Mutex<Option<CompletionCheck>>,
}

/// A consolidation asked for: when, from whom (with the pages each owned), how many pages
/// were missing.
#[derive(Clone, Debug)]
struct Consolidation {
    started: Instant,
    endpoints: Vec<(String, u64)>,
    pages: u64,
}

/// What runs when the VM first resumes.
struct ResumeHook(Box<dyn FnOnce() + Send>);

/// See [`DemandPaging::set_completion_check`].
struct CompletionCheck(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for CompletionCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionCheck")
    }
}

impl std::fmt::Debug for ResumeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeHook")
    }
}

impl DemandPaging {
    /// Registers all of `memory` (empty) with a new fault engine; every page's owner is
    /// `owner` until told otherwise. Faults are served once [`Self::start`] runs.
    pub fn new(
        memory: &GuestMemory,
        origin: &'static str,
        owner: Owner,
    ) -> Result<Self, PagingError> {
        let owners = Arc::new(OwnerMap::new(memory.layout(), owner));
        let engine = FaultEngine::new(memory.layout(), memory.hvas())?;
        let router = OwnerRouter::new(owners);
        router.attach_engine(&engine);
        Ok(Self {
            engine,
            router,
            origin,
            workers: Vec::new(),
            sockets: Arc::default(),
            all_present: Arc::new(Mutex::new(None)),
            started: Instant::now(),
            resumed: Mutex::new(None),
            resumed_unix_us: std::sync::atomic::AtomicU64::new(0),
            staging: None,
            consolidation: Mutex::new(None),
            completion_check: Mutex::new(None),
        })
    }

    /// Lazy restore: pages fault in from the snapshot at `path` (their one owner); with
    /// `prefetch`, a `prefetch` thread copies the rest in address order (without, pages move
    /// only when touched: the demand path alone, for measurements).
    pub fn from_snapshot(
        memory: &GuestMemory,
        path: &Path,
        ram_start: u64,
        prefetch: bool,
    ) -> Result<Self, PagingError> {
        let mut paging = Self::new(memory, "snapshot", Owner::Endpoint(EndpointId(0)))?;
        let sink = Arc::new(OwnedSink::new(
            paging.engine.clone(),
            paging.router.owners().clone(),
            EndpointId(0),
        ));
        let snapshot = Arc::new(LocalOwner::new(
            SnapshotStore::open(path, ram_start, memory.layout())?,
            sink,
        ));
        paging
            .router
            .add_local(&format!("snapshot {}", path.display()), snapshot.clone())?;
        paging.start()?;
        if prefetch {
            let engine = paging.engine.clone();
            let done = paging.completion();
            paging.spawn("prefetch", move || match prefetch_all(&snapshot, &engine) {
                Ok(()) => done(),
                Err(err) => log::error!("prefetch stopped: {err}; vCPUs still fault pages in"),
            })?;
        }
        Ok(paging)
    }

    /// Starts serving faults: each goes to its page's owner.
    pub fn start(&self) -> Result<(), PagingError> {
        self.engine.start(self.router.clone())?;
        Ok(())
    }

    /// The owners of the pages and their endpoints.
    pub fn router(&self) -> &Arc<OwnerRouter> {
        &self.router
    }

    /// The fault engine.
    pub fn engine(&self) -> &Arc<FaultEngine> {
        &self.engine
    }

    /// A function that records "every page is local now".
    pub fn completion(&self) -> impl Fn() + Send + Sync + 'static {
        let cell = self.all_present.clone();
        move || {
            cell.lock()
                .expect("paging lock")
                .get_or_insert_with(Instant::now);
        }
    }

    /// Whether completion was recorded ([`Self::completion`]'s function ran).
    pub fn is_complete(&self) -> bool {
        self.all_present.lock().expect("paging lock").is_some()
    }

    /// What [`Self::settle`] runs to complete once every page is here.
    pub fn set_completion_check(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.completion_check.lock().expect("paging lock") = Some(CompletionCheck(Box::new(f)));
    }

    /// Once every page is here, makes sure completion ran (and what it starts, such as telling
    /// a migration's source `Complete`, or memservers to forget the VM's pages): completion
    /// normally follows the last page's arrival on the thread that installed it, and a
    /// process about to exit should not depend on that thread having got there. The pages a
    /// thread just read (a final digest) may not be counted yet: their installs woke the
    /// reader before recording them (see `FaultEngine::waiting`), so this first waits until
    /// no page is waited for. Waits at most `timeout` in all.
    pub fn settle(&self, timeout: Duration) {
        let t0 = Instant::now();
        while self.engine.waiting() > 0 && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.engine.present_pages() < self.engine.total_pages() {
            return;
        }
        if let Some(check) = self.completion_check.lock().expect("paging lock").as_ref() {
            (check.0)();
        }
        while !self.is_complete() && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `f` when the VM first resumes ([`DemandPaging::resumed`]).
    pub fn on_resume(&mut self, f: impl FnOnce() + Send + 'static) {
        *self.resumed.get_mut().expect("paging lock") = Some(ResumeHook(Box::new(f)));
    }

    /// The VM resumed at `at_unix_us`: runs the [`DemandPaging::on_resume`] hook, the first
    /// time only.
    pub fn resumed(&self, at_unix_us: u64) {
        let _ = self.resumed_unix_us.compare_exchange(
            0,
            at_unix_us,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(hook) = self.resumed.lock().expect("paging lock").take() {
            (hook.0)();
        }
    }

    /// Counts `all_present_ms` from now: for an incoming migration, from the switchover
    /// rather than from the precopy rounds.
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Starts a named worker thread that feeds the engine.
    pub fn spawn(
        &mut self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), PagingError> {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| PagingError::Thread {
                name: name.into(),
                source,
            })?;
        self.workers.push(t);
        Ok(())
    }

    /// Records the staging pool the receivers use (its counters appear in the statistics).
    pub fn set_staging(&mut self, pool: Arc<tsubame_uffd::StagingPool>) {
        self.staging = Some(pool);
    }

    /// A connection a worker reads: shut down when paging ends, so the worker stops.
    pub fn own_socket(&self, s: TcpStream) {
        self.sockets.lock().expect("paging lock").push(s);
    }

    /// Where connections opened later (by a redial) are recorded, to be shut down with the
    /// rest when paging ends.
    pub fn socket_owner(&self) -> Arc<Mutex<Vec<TcpStream>>> {
        self.sockets.clone()
    }

    /// Consolidation: brings every page the VM's endpoints own (memservers) back here, all of
    /// them pushing in parallel, while the VM runs (its faults still go to the owners, ahead of
    /// the pushes). Returns at once; [`Self::stats`] shows the progress. Nothing to bring is
    /// not an error.
    pub fn consolidate(&self) -> Result<ConsolidationStatus, PagingError> {
        let missing = self.engine.total_pages() - self.engine.present_pages();
        let asked = self.router.ask_every_push()?;
        *self.consolidation.lock().expect("paging lock") = Some(Consolidation {
            started: Instant::now(),
            endpoints: asked,
            pages: missing,
        });
        Ok(self.consolidation_status().expect("just set"))
    }

    #[allow(clippy::cast_precision_loss)] // rates for people
    fn consolidation_status(&self) -> Option<ConsolidationStatus> {
        let Consolidation {
            started: t0,
            endpoints,
            pages,
        } = self.consolidation.lock().expect("paging lock").clone()?;
        let done = *self.all_present.lock().expect("paging lock");
        let ms = done.map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3);
        Some(ConsolidationStatus {
            endpoints,
            pages,
            ms,
            gb_per_s: ms
                .filter(|ms| *ms > 0.0)
                .map(|ms| (pages * tsubame_pages::PAGE_SIZE) as f64 / ms / 1e6),
        })
    }

    #[allow(clippy::cast_precision_loss)] // microseconds for people
    pub fn stats(&self) -> PagingStats {
        let s = self.engine.stats();
        let consolidation = self.consolidation_status(); // (takes the `all_present` lock)
        let all_present = *self.all_present.lock().expect("paging lock");
        let latency = LatencyUs::of(&s.latency);
        PagingStats {
            origin: self.origin,
            total_pages: self.engine.total_pages(),
            present_pages: self.engine.present_pages(),
            faults: s.faults,
            demand_requests: s.requests,
            pages_copied: s.pages_copied,
            pages_moved: s.pages_moved,
            pages_zeroed: s.pages_zeroed,
            staging_pages_prepared: self.staging.as_ref().map_or(0, |p| p.prepared_pages()),
            staging_pages_used: self.staging.as_ref().map_or(0, |p| p.used_pages()),
            pages_discarded: s.pages_discarded,
            demand_p50_us: latency.p50,
            demand_p99_us: latency.p99,
            demand_max_us: latency.max,
            demand_cdf: latency.cdf,
            resumed_unix_us: self
                .resumed_unix_us
                .load(std::sync::atomic::Ordering::Relaxed),
            all_present_ms: all_present
                .map(|t| t.saturating_duration_since(self.started).as_secs_f64() * 1e3),
            fetch_error: self.engine.fetch_error().map(|e| e.to_string()),
            owners: self.router.owner_stats(),
            remote_pages: self.engine.total_pages()
                - self.router.owners().count(Owner::Local)
                - self.router.owners().count(Owner::Zero),
            consolidation,
        }
    }
}

impl Drop for DemandPaging {
    fn drop(&mut self) {
        self.router.close();
        for s in self.sockets.lock().expect("paging lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        self.engine.stop();
    }
}

/// Copies every page of the local owner `from` that is not present yet, in address order,
/// 2 MiB at a time (`UFFDIO_COPY` is fastest on large runs).
fn prefetch_all<S: PageStore>(
    from: &LocalOwner<S>,
    engine: &FaultEngine,
) -> Result<(), tsubame_pages::PageError> {
    for run in from.store().layout().runs(512) {
        if !engine.all_present(run.gfn, run.pages) {
            from.copy(run.gfn, run.pages)?;
        }
    }
    Ok(())
}
