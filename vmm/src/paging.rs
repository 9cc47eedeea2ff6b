//! Demand paging: guest RAM registered with the userfaultfd fault engine and fed by a page
//! source (a snapshot file for a lazy restore, the migration source for an incoming migration),
//! with background workers that bring in the rest until every page is local.

use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_uffd::{FaultEngine, GuestRange};

use crate::memory::GuestMemory;
use crate::snapshot::SnapshotPages;
use crate::Error;

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
    pub source_error: Option<String>,
}

/// The fault engine of a VM whose RAM arrives on demand, and the threads feeding it.
#[derive(Debug)]
pub struct DemandPaging {
    engine: Arc<FaultEngine>,
    origin: &'static str,
    workers: Vec<JoinHandle<()>>,
    /// Connections the workers read; shut down on drop so that they stop.
    sockets: Vec<TcpStream>,
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
}

/// What runs when the VM first resumes.
struct ResumeHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for ResumeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeHook")
    }
}

impl DemandPaging {
    /// Registers all of `memory` (empty) with a new fault engine.
    pub fn new(memory: &GuestMemory, origin: &'static str) -> Result<Self, Error> {
        let ranges = memory
            .host_ranges()
            .iter()
            .map(|r| GuestRange {
                first_gfn: r.layout.first_gfn(),
                pages: r.layout.pages(),
                hva: r.hva.as_ptr() as u64,
            })
            .collect();
        Ok(Self {
            engine: FaultEngine::new(ranges)?,
            origin,
            workers: Vec::new(),
            sockets: Vec::new(),
            all_present: Arc::new(Mutex::new(None)),
            started: Instant::now(),
            resumed: Mutex::new(None),
            resumed_unix_us: std::sync::atomic::AtomicU64::new(0),
            staging: None,
        })
    }

    /// Lazy restore: pages fault in from the snapshot at `path`; with `prefetch`, a `prefetch`
    /// thread pushes the rest in address order (without, pages move only when touched: the
    /// demand path alone, for measurements).
    pub fn from_snapshot(
        memory: &GuestMemory,
        path: &Path,
        ram_start: u64,
        prefetch: bool,
    ) -> Result<Self, Error> {
        let mut paging = Self::new(memory, "snapshot")?;
        let pages = Arc::new(SnapshotPages::open(path, ram_start, memory.layout())?);
        paging.engine.start(pages.clone())?;
        if prefetch {
            let engine = paging.engine.clone();
            let done = paging.completion();
            paging.spawn("prefetch", move || match pages.prefetch_all(&engine) {
                Ok(()) => done(),
                Err(err) => log::error!("prefetch stopped: {err}; vCPUs still fault pages in"),
            })?;
        }
        Ok(paging)
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
    pub fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| Error::Uffd(tsubame_uffd::UffdError::Thread(e)))?;
        self.workers.push(t);
        Ok(())
    }

    /// Records the staging pool the receivers use (its counters appear in the statistics).
    pub fn set_staging(&mut self, pool: Arc<tsubame_uffd::StagingPool>) {
        self.staging = Some(pool);
    }

    /// A connection a worker reads: shut down when paging ends, so the worker stops.
    pub fn own_socket(&mut self, s: TcpStream) {
        self.sockets.push(s);
    }

    #[allow(clippy::cast_precision_loss)] // microseconds for people
    pub fn stats(&self) -> PagingStats {
        let s = self.engine.stats();
        let us = |d: Duration| d.as_nanos() as f64 / 1e3;
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
            demand_p50_us: s.latency.percentile(0.5).map(us),
            demand_p99_us: s.latency.percentile(0.99).map(us),
            demand_max_us: us(s.latency.max()),
            demand_cdf: s
                .latency
                .cdf()
                .into_iter()
                .map(|(d, share)| (us(d), share))
                .collect(),
            resumed_unix_us: self
                .resumed_unix_us
                .load(std::sync::atomic::Ordering::Relaxed),
            all_present_ms: self
                .all_present
                .lock()
                .expect("paging lock")
                .map(|t| t.saturating_duration_since(self.started).as_secs_f64() * 1e3),
            source_error: self.engine.source_error().map(|e| e.to_string()),
        }
    }
}

impl Drop for DemandPaging {
    fn drop(&mut self) {
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        self.engine.stop();
    }
}
