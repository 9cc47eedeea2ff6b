//! The fault engine: the fault thread, page states, installs and statistics.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use tsubame_pages::{AtomicBitmap, Delivery, Gfn, MemoryLayout, PageError, PageSink, PAGE_SIZE};

use crate::staging::{StagingPool, StagingSlot};
use crate::sys::{self, InstallOutcome};
use crate::{UffdError, Userfaultfd};

/// Fetching a missing page failed; the faulting threads keep waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Fetches missing pages from wherever they live (a page server over the network, a memserver,
/// a file, memory) into the engine: the engine hands it each first fault on a page.
pub trait Fetcher: Send + Sync {
    /// A thread faulted on `gfn` and nobody asked for it yet. Must not block for long: a network
    /// fetcher sends a request and returns, and installs the page later (in [`Self::flush`], or
    /// from a receiver thread) through the engine's [`PageSink`]. A fetcher with the data at
    /// hand may install it right away.
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError>;

    /// Called on the fault thread after the requests for one batch of faults went out: a
    /// fetcher that answers on the fault thread itself waits for and installs the replies
    /// here, so that a reply wakes no other thread first. The default does nothing.
    fn flush(&self, engine: &FaultEngine) -> Result<(), FetchError> {
        let _ = engine;
        Ok(())
    }

    /// A thread wrote to `gfn` while it was write-protected (memory registered with
    /// [`FaultEngine::new_write_protected`]); the thread waits until the page is un-protected
    /// and woken ([`FaultEngine::unprotect`]), or dropped and woken (it then faults the page
    /// in again). The default lifts the protection at once.
    fn write_fault(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        engine
            .unprotect(gfn, 1)
            .map_err(|e| FetchError(e.to_string()))
    }
}

/// Latency histogram with ~9% resolution (8 buckets per power of two of nanoseconds).
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    max_ns: u64,
}

impl LatencyHistogram {
    const SUB: u32 = 8;

    // Bucket indices stay below 64 * 8: the casts below cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    fn bucket(ns: u64) -> usize {
        if ns < 2 {
            return 0;
        }
        let log = 63 - ns.leading_zeros(); // floor(log2 ns)
        let frac = if log >= 3 {
            (ns >> (log - 3)) & 7
        } else {
            (ns << (3 - log)) & 7
        };
        (log * Self::SUB) as usize + frac as usize
    }

    #[allow(clippy::cast_possible_truncation)]
    fn bucket_floor(b: usize) -> u64 {
        let log = (b / Self::SUB as usize) as u32;
        let frac = (b % Self::SUB as usize) as u64;
        if log >= 3 {
            (8 + frac) << (log - 3)
        } else {
            (8 + frac) >> (3 - log)
        }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let b = Self::bucket(ns);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The latency below which a share `p` (0..=1) of the recorded ones lie (bucket floor).
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((p.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos(Self::bucket_floor(b).min(self.max_ns)));
            }
        }
        Some(Duration::from_nanos(self.max_ns))
    }

    /// The largest latency recorded.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The cumulative distribution: (latency, share of recorded latencies at or below it), one
    /// point per non-empty bucket, at the bucket's upper edge (the maximum for the last).
    #[allow(clippy::cast_precision_loss)]
    pub fn cdf(&self) -> Vec<(Duration, f64)> {
        let mut seen = 0;
        let mut out = Vec::new();
        for (b, n) in self.buckets.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            seen += n;
            let edge = Self::bucket_floor(b + 1).min(self.max_ns);
            out.push((Duration::from_nanos(edge), seen as f64 / self.count as f64));
        }
        out
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    /// Fault events read from the uffd.
    pub faults: u64,
    /// Requests passed to the source (faults on pages nobody had asked for yet).
    pub requests: u64,
    /// Pages installed with data (copied in, or moved in from a staging pool), and as zero
    /// pages.
    pub pages_copied: u64,
    pub pages_moved: u64,
    pub pages_zeroed: u64,
    /// Installs that found the page already there.
    pub already_present: u64,
    /// Installed pages dropped again as stale ([`FaultEngine::forget`]).
    pub pages_discarded: u64,
    /// Write-protect faults read (writes to write-protected pages).
    pub write_faults: u64,
    /// Fault read -> page installed, for faults that waited on an install.
    pub latency: LatencyHistogram,
    /// Faults per faulting thread id (as the kernel reports it).
    pub faults_by_thread: HashMap<u32, u64>,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    requests: AtomicU64,
    pages_copied: AtomicU64,
    pages_moved: AtomicU64,
    pages_zeroed: AtomicU64,
    already_present: AtomicU64,
    pages_discarded: AtomicU64,
    write_faults: AtomicU64,
}

/// The fault engine of one VM's memory.
pub struct FaultEngine {
    uffd: Userfaultfd,
    layout: MemoryLayout,
    /// Host address of each region of `layout`.
    hvas: Vec<u64>,
    present: AtomicBitmap,
    requested: AtomicBitmap,
    counters: Counters,
    /// gfn -> when its first fault was read, until the page is installed.
    pending: Mutex<HashMap<Gfn, Instant>>,
    latency: Mutex<LatencyHistogram>,
    by_thread: Mutex<HashMap<u32, u64>>,
    fetch_error: Mutex<Option<FetchError>>,
    /// The memory's VM moved on to another host: its vCPUs never run here again, and a
    /// fetch failure from now on is expected (its page servers go away).
    retired: std::sync::atomic::AtomicBool,
    /// Memory faulted in ahead of time that bulk pages are received into and moved from.
    staging: std::sync::OnceLock<Arc<StagingPool>>,
    stop: EventFd,
    /// Written by [`Self::reroute`]: the fault thread asks again for the pages in `reroutes`.
    kick: EventFd,
    reroutes: Mutex<Vec<(Gfn, u64)>>,
    /// Written by [`Self::probe`]: pages to ask for with no thread waiting (yet).
    probes: Mutex<Vec<Gfn>>,
    /// Probed pages not installed yet: in `pending` too (so that a silent owner shows), but
    /// no thread's wait, so no latency is recorded when they arrive.
    probed: Mutex<std::collections::HashSet<Gfn>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// How long the fault thread looks for the next fault before sleeping.
    spin: Mutex<Duration>,
}

impl std::fmt::Debug for FaultEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultEngine")
            .field("layout", &self.layout)
            .field("present", &self.present.count_ones())
            .finish_non_exhaustive()
    }
}

impl FaultEngine {
    /// Registers guest memory of `layout`, region `i` mapped in this process at `hvas[i]`
    /// (page-aligned, normally empty), with a new userfaultfd in missing mode. Faults are
    /// served once [`FaultEngine::start`] runs.
    pub fn new(layout: &MemoryLayout, hvas: Vec<u64>) -> Result<Arc<Self>, UffdError> {
        Self::create(layout, hvas, false)
    }

    /// [`FaultEngine::new`], with the memory registered in write-protect mode too: pages can
    /// be write-protected ([`Self::write_protect`], [`Self::install_protected`]), and a write
    /// to one goes to the fetcher's [`Fetcher::write_fault`].
    pub fn new_write_protected(
        layout: &MemoryLayout,
        hvas: Vec<u64>,
    ) -> Result<Arc<Self>, UffdError> {
        Self::create(layout, hvas, true)
    }

    fn create(
        layout: &MemoryLayout,
        hvas: Vec<u64>,
        write_protect: bool,
    ) -> Result<Arc<Self>, UffdError> {
        assert_eq!(
            hvas.len(),
            layout.regions.len(),
            "one host address per region"
        );
        let uffd = Userfaultfd::new()?;
        for (r, hva) in layout.regions.iter().zip(&hvas) {
            if write_protect {
                uffd.register_missing_wp(*hva, r.size)?;
            } else {
                uffd.register_missing(*hva, r.size)?;
            }
        }
        let total = layout.total_pages();
        let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| UffdError::Thread(e.into()))?;
        let kick = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| UffdError::Thread(e.into()))?;
        Ok(Arc::new(Self {
            uffd,
            layout: layout.clone(),
            hvas,
            present: AtomicBitmap::new(total),
            requested: AtomicBitmap::new(total),
            counters: Counters::default(),
            pending: Mutex::new(HashMap::new()),
            latency: Mutex::new(LatencyHistogram::default()),
            by_thread: Mutex::new(HashMap::new()),
            fetch_error: Mutex::new(None),
            retired: std::sync::atomic::AtomicBool::new(false),
            staging: std::sync::OnceLock::new(),
            stop,
            kick,
            reroutes: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
            probed: Mutex::new(std::collections::HashSet::new()),
            thread: Mutex::new(None),
            spin: Mutex::new(Duration::ZERO),
        }))
    }

    /// Lets the fault thread keep looking for the next fault for `spin` after each one before
    /// it sleeps (default: zero, never). A guest that faults on a remote page usually faults
    /// again within microseconds of the install, and waking a sleeping thread costs tens of
    /// microseconds on a virtual CPU. Set it before [`Self::start`].
    pub fn set_spin(&self, spin: Duration) {
        *self.spin.lock().expect("engine lock") = spin;
    }

    /// Receives bulk pages ([`Delivery::Bulk`]) into `pool` and moves them in from there
    /// ([`Self::install_staged`]); set once, before pages arrive.
    pub fn set_staging(&self, pool: Arc<StagingPool>) {
        let _ = self.staging.set(pool);
    }

    /// The staging pool, if one was set.
    pub fn staging(&self) -> Option<&Arc<StagingPool>> {
        self.staging.get()
    }

    /// Starts the fault thread (`uffd-faults`), which asks `fetcher` for missing pages.
    pub fn start(self: &Arc<Self>, fetcher: Arc<dyn Fetcher>) -> Result<(), UffdError> {
        let engine = self.clone();
        let t = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || engine.fault_loop(fetcher.as_ref()))
            .map_err(UffdError::Thread)?;
        *self.thread.lock().expect("engine lock") = Some(t);
        Ok(())
    }

    /// Stops the fault thread (threads still waiting on faults stay blocked). The thread holds
    /// the engine alive, so call this before dropping the last handle.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.lock().expect("engine lock").take() {
            let _ = t.join();
        }
    }

    /// Total guest pages under this engine.
    pub fn total_pages(&self) -> u64 {
        self.present.len()
    }

    /// Pages installed so far.
    pub fn present_pages(&self) -> u64 {
        self.present.count_ones()
    }

    /// The layout of the memory under this engine.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Whether `gfn` has been installed.
    pub fn is_present(&self, gfn: Gfn) -> bool {
        self.locate(gfn, 1)
            .is_ok_and(|(idx, _)| self.present.get(idx))
    }

    /// Whether all of `[gfn, gfn + pages)` (inside one region) has been installed.
    pub fn all_present(&self, gfn: Gfn, pages: u64) -> bool {
        self.locate(gfn, pages)
            .is_ok_and(|(idx, _)| self.present.next_clear(idx, idx + pages) == idx + pages)
    }

    /// The last error a fetcher reported, if any (faulting threads wait until it is resolved).
    pub fn fetch_error(&self) -> Option<FetchError> {
        self.fetch_error.lock().expect("engine lock").clone()
    }

    /// Pages that threads are waiting for, e.g. to re-request after a reconnect.
    pub fn pending_gfns(&self) -> Vec<Gfn> {
        let mut v: Vec<Gfn> = self
            .pending
            .lock()
            .expect("engine lock")
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Pages waited for: faulted on (or probed) and not yet recorded present. A page's install
    /// wakes the threads that faulted on it before the engine records it present, so a thread
    /// that just read a page may see it counted as missing for a moment; once this is 0, every
    /// page read so far is counted (see `DemandPaging::settle` in the VMM).
    pub fn waiting(&self) -> usize {
        self.pending.lock().expect("engine lock").len()
    }

    /// Pages that threads have waited for longer than `age`.
    pub fn pending_longer_than(&self, age: Duration) -> Vec<Gfn> {
        let now = Instant::now();
        self.pending
            .lock()
            .expect("engine lock")
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > age)
            .map(|(g, _)| *g)
            .collect()
    }

    /// A snapshot of the counters and the latency histogram.
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        FaultStats {
            faults: c.faults.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            pages_copied: c.pages_copied.load(Ordering::Relaxed),
            pages_moved: c.pages_moved.load(Ordering::Relaxed),
            pages_zeroed: c.pages_zeroed.load(Ordering::Relaxed),
            already_present: c.already_present.load(Ordering::Relaxed),
            pages_discarded: c.pages_discarded.load(Ordering::Relaxed),
            write_faults: c.write_faults.load(Ordering::Relaxed),
            latency: self.latency.lock().expect("engine lock").clone(),
            faults_by_thread: self.by_thread.lock().expect("engine lock").clone(),
        }
    }

    /// (page index, hva) of `gfn`, checking that `pages` pages from it stay in one region.
    fn locate(&self, gfn: Gfn, pages: u64) -> Result<(u64, u64), UffdError> {
        let l = self
            .layout
            .locate(gfn, pages)
            .ok_or(UffdError::OutOfRange { gfn, pages })?;
        Ok((l.index, self.hvas[l.region] + l.offset))
    }

    /// (gfn, page index) of the guest page mapped at `hva`.
    fn gfn_of_hva(&self, hva: u64) -> Option<(Gfn, u64)> {
        let (r, start) = self
            .layout
            .regions
            .iter()
            .zip(&self.hvas)
            .find(|(r, start)| hva >= **start && hva - **start < r.size)?;
        let gfn = r.first_gfn() + (hva - start) / PAGE_SIZE;
        Some((gfn, self.layout.page_index(gfn)?))
    }

    /// Installs `data` (whole pages) at `gfn` and the frames after it with one `UFFDIO_COPY`
    /// where possible, waking waiters. Pages already present are kept (never overwritten).
    /// Returns the number of pages this call installed.
    pub fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, UffdError> {
        self.copy_in(gfn, data, false)
    }

    /// [`Self::install`], with the pages write-protected (memory registered with
    /// [`Self::new_write_protected`]): the first write to each goes to
    /// [`Fetcher::write_fault`], so that until then the copy it came from is known current.
    pub fn install_protected(&self, gfn: Gfn, data: &[u8]) -> Result<u64, UffdError> {
        self.copy_in(gfn, data, true)
    }

    fn copy_in(&self, gfn: Gfn, data: &[u8], protect: bool) -> Result<u64, UffdError> {
        if data.is_empty() || data.len() as u64 % PAGE_SIZE != 0 {
            return Err(UffdError::Unaligned { len: data.len() });
        }
        let pages = data.len() as u64 / PAGE_SIZE;
        let fd = self.uffd.raw_fd();
        self.fill(gfn, pages, &self.counters.pages_copied, |dst, off, len| {
            let at = usize::try_from(off).expect("offset");
            // SAFETY: data[at..] is valid for len bytes (off + len = data.len()); the
            // destination lies in a range registered on this uffd (fill located it).
            let r = unsafe { sys::copy(fd, dst, data[at..].as_ptr(), len, true, protect) };
            r.map_err(|source| UffdError::Copy {
                gfn: gfn + off / PAGE_SIZE,
                len,
                source,
            })
        })
    }

    /// Write-protects the installed pages of `[gfn, gfn + pages)` (memory registered with
    /// [`Self::new_write_protected`]): a write to one waits in [`Fetcher::write_fault`] from
    /// now on. Pages not installed are left alone.
    pub fn write_protect(&self, gfn: Gfn, pages: u64) -> Result<(), UffdError> {
        let (_, hva) = self.locate(gfn, pages)?;
        sys::writeprotect(self.uffd.raw_fd(), hva, pages * PAGE_SIZE, true, false)
            .map_err(|source| UffdError::WriteProtect { gfn, pages, source })
    }

    /// Lifts the write protection of `[gfn, gfn + pages)` and wakes the threads waiting to
    /// write there.
    pub fn unprotect(&self, gfn: Gfn, pages: u64) -> Result<(), UffdError> {
        let (_, hva) = self.locate(gfn, pages)?;
        sys::writeprotect(self.uffd.raw_fd(), hva, pages * PAGE_SIZE, false, true)
            .map_err(|source| UffdError::WriteProtect { gfn, pages, source })
    }

    /// Wakes the threads waiting on a fault in `[gfn, gfn + pages)` (after a drop: they fault
    /// again, on a missing page).
    pub fn wake(&self, gfn: Gfn, pages: u64) -> Result<(), UffdError> {
        let (_, hva) = self.locate(gfn, pages)?;
        sys::wake(self.uffd.raw_fd(), hva, pages * PAGE_SIZE)
            .map_err(|source| UffdError::Wake { gfn, source })
    }

    /// Drops the installed pages `[gfn, gfn + pages)` (`MADV_DONTNEED`): they are missing again,
    /// and the next touch faults and requests them. For copies that went stale, such as pages a
    /// precopy round sent before the guest wrote them again, and for pages evicted to another
    /// host. Call it only while nothing writes these pages (the destination's vCPUs have not
    /// started, or the pages are write-protected: a write waits in [`Fetcher::write_fault`],
    /// and must be woken after the drop, see [`Self::wake`]) and nothing installs them: a
    /// running thread could read a page between its drop and its re-install and see it fault,
    /// which is harmless, but a write or an install racing the drop would be lost.
    pub fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), UffdError> {
        let (idx, hva) = self.locate(gfn, pages)?;
        let len = usize::try_from(pages * PAGE_SIZE).expect("range fits usize");
        let addr = std::ptr::NonNull::new(hva as *mut std::ffi::c_void)
            .ok_or(UffdError::OutOfRange { gfn, pages })?;
        // SAFETY: [hva, hva + len) lies inside a range registered with this engine (locate
        // checked it), a private anonymous mapping the owner keeps alive; dropping its pages
        // only makes them missing again, which is what the engine's bitmaps record next.
        unsafe { nix::sys::mman::madvise(addr, len, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
            .map_err(|source| UffdError::Discard { gfn, pages, source })?;
        self.present.clear_range(idx, pages);
        self.requested.clear_range(idx, pages);
        self.counters
            .pages_discarded
            .fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }

    /// Installs the pages received into `slot` at `gfn`: moved in (`UFFDIO_MOVE`: no
    /// allocation, no copy) where the kernel can, copied otherwise. Pages already present
    /// stay as they are (their staging copies are left in the pool). Returns the pages
    /// installed.
    pub fn install_staged(&self, gfn: Gfn, slot: &mut StagingSlot<'_>) -> Result<u64, UffdError> {
        if !self.uffd.can_move() {
            return self.install(gfn, slot.as_mut_slice());
        }
        let fd = self.uffd.raw_fd();
        let src = slot.hva;
        self.fill(
            gfn,
            slot.pages,
            &self.counters.pages_moved,
            |dst, off, len| {
                // SAFETY: the slot's pages are this process's anonymous memory, handed to this
                // slot only, and nothing uses them after this call (the caller's slot is spent);
                // the destination lies in a range registered on this uffd (fill located it).
                let r = unsafe { sys::move_pages(fd, dst, src + off, len, true) };
                r.map_err(|source| UffdError::Move {
                    gfn: gfn + off / PAGE_SIZE,
                    len,
                    source,
                })
            },
        )
    }

    /// Installs `pages` zero pages from `gfn` (pages never written at the source).
    pub fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, UffdError> {
        let fd = self.uffd.raw_fd();
        self.fill(gfn, pages, &self.counters.pages_zeroed, |dst, off, len| {
            sys::zeropage(fd, dst, len, true).map_err(|source| UffdError::Zero {
                gfn: gfn + off / PAGE_SIZE,
                len,
                source,
            })
        })
    }

    /// Installs `[gfn, gfn + pages)` with an install ioctl, `op(host address, offset, len)`,
    /// until each page is installed or found present: a partial install continues after what
    /// was done; a page already there is kept, its waiters woken, and skipped. Adds the pages
    /// `op` installed to `counter`, records the range present, and returns that count.
    fn fill(
        &self,
        gfn: Gfn,
        pages: u64,
        counter: &AtomicU64,
        mut op: impl FnMut(u64, u64, u64) -> Result<InstallOutcome, UffdError>,
    ) -> Result<u64, UffdError> {
        let (idx, hva) = self.locate(gfn, pages)?;
        let len = pages * PAGE_SIZE;
        let mut off = 0;
        let mut installed = 0;
        while off < len {
            match op(hva + off, off, len - off)? {
                InstallOutcome::Installed => {
                    installed += (len - off) / PAGE_SIZE;
                    off = len;
                }
                InstallOutcome::Partial { done } => {
                    installed += done / PAGE_SIZE;
                    off += done / PAGE_SIZE * PAGE_SIZE;
                }
                InstallOutcome::AlreadyPresent => {
                    self.counters
                        .already_present
                        .fetch_add(1, Ordering::Relaxed);
                    sys::wake(self.uffd.raw_fd(), hva + off, PAGE_SIZE).map_err(|source| {
                        UffdError::Wake {
                            gfn: gfn + off / PAGE_SIZE,
                            source,
                        }
                    })?;
                    off += PAGE_SIZE;
                }
            }
        }
        counter.fetch_add(installed, Ordering::Relaxed);
        self.mark_present(gfn, idx, pages);
        Ok(installed)
    }

    /// Records the installed pages: their waiters' latency first, then the bitmaps, so that a
    /// page counted present has its latency recorded; all under the `pending` lock, so that a
    /// fault checking "present?" before it waits sees either the page or no record yet (see
    /// `on_fault`). (The install woke the page's waiters already: a thread that read the
    /// page may run before this records it, see [`Self::waiting`].)
    fn mark_present(&self, gfn: Gfn, idx: u64, pages: u64) {
        let now = Instant::now();
        let mut pending = self.pending.lock().expect("engine lock");
        if !pending.is_empty() {
            let mut lat = self.latency.lock().expect("engine lock");
            let mut probed = self.probed.lock().expect("engine lock");
            for k in 0..pages {
                if let Some(t) = pending.remove(&(gfn + k)) {
                    if probed.is_empty() || !probed.remove(&(gfn + k)) {
                        lat.record(now.duration_since(t));
                    }
                }
            }
        }
        self.requested.set_range(idx, pages);
        self.present.set_range(idx, pages);
        drop(pending);
    }

    fn fault_loop(&self, fetcher: &dyn Fetcher) {
        let mut msgs = Vec::with_capacity(64);
        let spin = *self.spin.lock().expect("engine lock");
        let mut last_fault: Option<Instant> = None;
        loop {
            let mut fds = [
                PollFd::new(self.uffd_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.kick.as_fd(), PollFlags::POLLIN),
            ];
            // Right after a fault, look for the next one without sleeping (see `set_spin`).
            let spinning = last_fault.is_some_and(|t| t.elapsed() < spin);
            let timeout = if spinning {
                PollTimeout::ZERO
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    std::thread::yield_now();
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.fail(FetchError(format!("polling the userfaultfd failed: {e}")));
                    return;
                }
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            if fds[2].revents().is_some_and(|r| !r.is_empty()) {
                self.ask_again(fetcher);
            }
            msgs.clear();
            if let Err(e) = self.uffd.read_faults(&mut msgs) {
                self.fail(FetchError(e.to_string()));
                return;
            }
            for m in &msgs {
                if m.event == sys::EVENT_PAGEFAULT {
                    self.on_fault(m, fetcher);
                }
            }
            if let Err(e) = fetcher.flush(self) {
                // Fail closed: the faulting threads keep waiting.
                self.fail(e);
            }
            if !msgs.is_empty() {
                last_fault = Some(Instant::now());
            }
        }
    }

    fn uffd_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the fd is owned by self.uffd and outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.uffd.raw_fd()) }
    }

    fn on_fault(&self, m: &sys::UffdMsg, fetcher: &dyn Fetcher) {
        let now = Instant::now();
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        *self
            .by_thread
            .lock()
            .expect("engine lock")
            .entry(m.ptid)
            .or_default() += 1;
        let hva = m.address & !(PAGE_SIZE - 1);
        let Some((gfn, idx)) = self.gfn_of_hva(hva) else {
            log::error!("fault at {hva:#x} outside registered guest memory");
            return;
        };
        if m.flags & sys::PAGEFAULT_FLAG_WP != 0 {
            self.counters.write_faults.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = fetcher.write_fault(gfn, self) {
                self.fail(e);
            }
            return;
        }
        {
            // Checked under the lock that `mark_present` records pages under: a page installed
            // meanwhile leaves no waiter behind that nothing would remove (one that would look
            // like a request unanswered for ever to the silent-link check).
            let mut pending = self.pending.lock().expect("engine lock");
            if self.present.get(idx) {
                drop(pending);
                // Installed between the fault and now: the install already woke it; wake
                // again in case the fault raced the install's wake.
                let _ = sys::wake(self.uffd.raw_fd(), hva, PAGE_SIZE);
                return;
            }
            pending.entry(gfn).or_insert(now);
        }
        if self.requested.test_and_set(idx) {
            return; // someone asked already: the install will wake this thread too
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.ask(fetcher, gfn, idx);
    }

    /// Asks `fetcher` for page `gfn` (index `idx`, marked requested by the caller). On failure
    /// it fails closed: the page is not requested any more (a later fault or re-request asks
    /// again), its waiters keep waiting, and the engine records why.
    fn ask(&self, fetcher: &dyn Fetcher, gfn: Gfn, idx: u64) {
        if let Err(e) = fetcher.request(gfn, self) {
            self.requested.clear(idx);
            self.fail(e);
        }
    }

    /// The owner of `[gfn, gfn + pages)` changed: pages of it a thread waits for are asked for
    /// again, by the fault thread, from whoever the fetcher says owns them now. (A request to
    /// the former owner may be answered, or not: its copy is dropped or installed by the
    /// sink's rules, and a page is installed once.) Call it after the change is visible to
    /// the fetcher.
    pub fn reroute(&self, gfn: Gfn, pages: u64) {
        self.reroutes
            .lock()
            .expect("engine lock")
            .push((gfn, pages));
        let _ = self.kick.write(1);
    }

    /// Asks for page `gfn` as if a thread had faulted on it, unless it is here or asked for
    /// already: a probe of its owner's link (one that has said nothing for a while, see
    /// `OwnerRouter::check_silent` in the VMM). The page counts as waited for
    /// ([`Self::pending_longer_than`]) until it arrives, but its wait is no fault's latency.
    pub fn probe(&self, gfn: Gfn) {
        self.probes.lock().expect("engine lock").push(gfn);
        let _ = self.kick.write(1);
    }

    /// The fault thread's side of [`Self::probe`].
    fn ask_probes(&self, fetcher: &dyn Fetcher) {
        let probes = std::mem::take(&mut *self.probes.lock().expect("engine lock"));
        for gfn in probes {
            let Ok((idx, _)) = self.locate(gfn, 1) else {
                continue;
            };
            if self.present.get(idx) || self.requested.test_and_set(idx) {
                continue;
            }
            // Pending before it is asked: its reply may come before this thread goes on.
            let mut pending = self.pending.lock().expect("engine lock");
            if let std::collections::hash_map::Entry::Vacant(v) = pending.entry(gfn) {
                v.insert(Instant::now());
                self.probed.lock().expect("engine lock").insert(gfn);
            }
            drop(pending);
            if self.present.get(idx) {
                // Installed meanwhile, past the install's clean-up of `pending`.
                self.pending.lock().expect("engine lock").remove(&gfn);
                self.probed.lock().expect("engine lock").remove(&gfn);
                continue;
            }
            self.ask(fetcher, gfn, idx);
        }
    }

    /// The fault thread's side of [`Self::reroute`]: asks again for the waited-for pages of the
    /// rerouted ranges.
    fn ask_again(&self, fetcher: &dyn Fetcher) {
        let _ = self.kick.read();
        self.ask_probes(fetcher);
        let ranges = std::mem::take(&mut *self.reroutes.lock().expect("engine lock"));
        if ranges.is_empty() {
            return;
        }
        let waiting: Vec<Gfn> = self
            .pending
            .lock()
            .expect("engine lock")
            .keys()
            .copied()
            .filter(|g| ranges.iter().any(|(f, n)| *g >= *f && *g < *f + *n))
            .collect();
        for gfn in waiting {
            let Ok((idx, _)) = self.locate(gfn, 1) else {
                continue;
            };
            if self.present.get(idx) {
                continue;
            }
            self.requested.test_and_set(idx);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.ask(fetcher, gfn, idx);
        }
    }

    /// Forgets the last fetch error: what failed works again (a link came back).
    pub fn clear_fetch_error(&self) {
        *self.fetch_error.lock().expect("engine lock") = None;
    }

    /// Records that fetching pages failed (e.g. a connection broke). Faulting threads keep
    /// waiting; [`FaultEngine::fetch_error`] tells why.
    pub fn report_fetch_error(&self, e: FetchError) {
        self.fail(e);
    }

    /// The memory's VM moved on to another host: later fetch failures are logged as what
    /// they are, the end of its page servers' sessions, not as errors.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    fn fail(&self, e: FetchError) {
        if self.retired.load(Ordering::Acquire) {
            log::info!("the VM moved on; its page servers here went away: {e}");
        } else {
            log::error!("fetching guest pages failed: {e}; faulting vCPUs wait");
        }
        *self.fetch_error.lock().expect("engine lock") = Some(e);
    }
}

/// The engine as the sink of page clients and local stores: installs never overwrite a present
/// page (the guest may have written it), and bulk pages are received into the staging pool,
/// when there is one with prepared pages left, and moved in from there.
impl PageSink for FaultEngine {
    fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, PageError> {
        Ok(FaultEngine::install(self, gfn, data)?)
    }

    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        Ok(FaultEngine::install_zero(self, gfn, pages)?)
    }

    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        Ok(FaultEngine::forget(self, gfn, pages)?)
    }

    fn all_installed(&self, gfn: Gfn, pages: u64) -> Option<bool> {
        Some(self.all_present(gfn, pages))
    }

    /// Bulk pages go through the staging pool; a demand reply is always copied in. Moving a
    /// page takes it out of this process's page tables, so the kernel flushes it from every CPU
    /// that may cache it: an inter-processor interrupt that the mover waits for, and on a host
    /// that is itself a VM a slow one. The bulk stream moves runs of up to 2 MiB and pays it
    /// once per page table; a demand reply is one page on a vCPU's critical path, where
    /// `UFFDIO_COPY` into a page that was never mapped needs no flush. (In `tsubame bench
    /// fault` the engine's p50 went from 45 to 41 µs, and under the push the push rate from
    /// 1.09 to 1.25 GB/s, medians.)
    fn receive(
        &self,
        gfn: Gfn,
        pages: u64,
        delivery: Delivery,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<u64, PageError> {
        let pool = self.staging.get().filter(|_| delivery == Delivery::Bulk);
        if let Some(mut slot) = pool.and_then(|p| p.take(pages)) {
            fill(slot.as_mut_slice()).map_err(PageError::Payload)?;
            return Ok(self.install_staged(gfn, &mut slot)?);
        }
        tsubame_pages::receive_via(self, gfn, pages, scratch, fill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 100);
        let p50 = h.percentile(0.5).unwrap().as_nanos();
        let p99 = h.percentile(0.99).unwrap().as_nanos();
        assert!((45_000..=50_000).contains(&p50), "p50 {p50}");
        assert!((90_000..=99_000).contains(&p99), "p99 {p99}");
        assert_eq!(h.max(), Duration::from_micros(100));
        let cdf = h.cdf();
        assert_eq!(
            cdf.last().map(|c| (c.0, c.1)),
            Some((Duration::from_micros(100), 1.0))
        );
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(LatencyHistogram::default().percentile(0.5).is_none());
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for ns in [1u64, 2, 3, 7, 8, 9, 15, 16, 100, 1000, 12_345, 1 << 40] {
            let b = LatencyHistogram::bucket(ns);
            assert!(b >= last, "{ns}");
            assert!(LatencyHistogram::bucket_floor(b) <= ns.max(2), "{ns}");
            last = b;
        }
    }
}
