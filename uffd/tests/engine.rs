//! The fault engine on a real userfaultfd: threads of this process touch registered memory and
//! are served by a fetcher.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use tsubame_pages::{Delivery, Gfn, MemoryLayout, PageSink, RegionLayout, PAGE_SIZE};
use tsubame_uffd::{FaultEngine, FetchError, Fetcher, StagingPool};

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory; tests access it with volatile reads/writes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(pages: u64) -> Self {
        let len = usize::try_from(pages * PAGE_SIZE).unwrap();
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        Self { ptr, len }
    }
    fn hva(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn read_u64(&self, page: u64, word: u64) -> u64 {
        // SAFETY: in bounds of the mapping; a missing page blocks on the uffd until installed.
        unsafe { std::ptr::read_volatile((self.hva() + page * PAGE_SIZE + word * 8) as *const u64) }
    }
    fn write_u64(&self, page: u64, word: u64, v: u64) {
        // SAFETY: in bounds of the mapping.
        unsafe {
            std::ptr::write_volatile((self.hva() + page * PAGE_SIZE + word * 8) as *mut u64, v)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this object owns.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

const FIRST_GFN: Gfn = Gfn(0x100);

/// The test pattern of page `gfn`: word `w` holds `gfn * 1000 + w`.
fn page_data(gfn: Gfn) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| (gfn.0 * 1000 + w).to_le_bytes())
        .collect()
}

/// Serves every page from memory at once; page `zero_gfn` as a zero page.
struct MemorySource {
    requests: AtomicU64,
    zero_gfn: Gfn,
}

impl Fetcher for MemorySource {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = if gfn == self.zero_gfn {
            engine.install_zero(gfn, 1)
        } else {
            engine.install(gfn, &page_data(gfn))
        };
        r.map(drop).map_err(|e| FetchError(e.to_string()))
    }
}

fn engine_over(m: &Mapping, pages: u64) -> Arc<FaultEngine> {
    let layout = MemoryLayout::from_regions(vec![RegionLayout {
        gpa: FIRST_GFN.gpa(),
        size: pages * PAGE_SIZE,
    }])
    .unwrap();
    FaultEngine::new(&layout, vec![m.hva()]).unwrap()
}

/// Waits until `n` pages are marked present: a reader wakes as its page lands, and the engine
/// marks the page present (and records its latency) just after.
fn wait_present(engine: &FaultEngine, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while engine.present_pages() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "pages never marked present"
        );
        std::thread::yield_now();
    }
}

#[test]
fn faults_are_served_with_the_right_pages() {
    let pages = 64;
    let m = Arc::new(Mapping::new(pages));
    let engine = engine_over(&m, pages);
    let source = Arc::new(MemorySource {
        requests: AtomicU64::new(0),
        zero_gfn: FIRST_GFN + 7,
    });
    engine.start(source.clone()).unwrap();
    // Two threads touch every page: each page is requested once, whoever faults first.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for p in 0..pages {
                    let gfn = FIRST_GFN + p;
                    let want = if p == 7 { 0 } else { gfn.0 * 1000 + 5 };
                    assert_eq!(m.read_u64(p, 5), want, "page {p}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    wait_present(&engine, pages);
    let s = engine.stats();
    assert_eq!(
        source.requests.load(Ordering::Relaxed),
        pages,
        "one request per page"
    );
    assert_eq!(s.requests, pages);
    assert_eq!(s.pages_copied + s.pages_zeroed, pages);
    assert_eq!(s.pages_zeroed, 1);
    assert_eq!(engine.present_pages(), pages);
    assert!(s.faults >= pages);
    assert_eq!(s.latency.count(), pages);
    assert!(s.latency.percentile(0.5).unwrap() <= s.latency.max());
    assert!(engine.fetch_error().is_none());
    engine.stop();
}

#[test]
fn install_never_overwrites_a_present_page() {
    let m = Mapping::new(4);
    let engine = engine_over(&m, 4);
    // A background push installs pages 0..4; the "guest" then writes page 1.
    let mut run = Vec::new();
    for p in 0..4 {
        run.extend(page_data(FIRST_GFN + p));
    }
    assert_eq!(engine.install(FIRST_GFN, &run).unwrap(), 4);
    m.write_u64(1, 0, 0xdead);
    // A late demand reply for pages 1..3 must not undo the write.
    let late: Vec<u8> = [page_data(FIRST_GFN + 1), page_data(FIRST_GFN + 2)].concat();
    assert_eq!(engine.install(FIRST_GFN + 1, &late).unwrap(), 0);
    assert_eq!(m.read_u64(1, 0), 0xdead);
    assert_eq!(engine.stats().already_present, 2);
    // Out of range and unaligned installs are refused with an explanation.
    let e = engine
        .install(FIRST_GFN + 4, &page_data(Gfn(0)))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("outside the registered guest memory"),
        "{e}"
    );
    assert!(engine.install(FIRST_GFN, &[0u8; 100]).is_err());
}

#[test]
fn forgotten_pages_are_missing_again_and_fault_in_fresh() {
    let m = Mapping::new(4);
    let engine = engine_over(&m, 4);
    // A precopy round installed an old version of every page.
    let old: Vec<u8> = (0..4).flat_map(|p| page_data(FIRST_GFN + p + 50)).collect();
    assert_eq!(engine.install(FIRST_GFN, &old).unwrap(), 4);
    assert_eq!(m.read_u64(2, 0), (FIRST_GFN + 52).0 * 1000);
    // Pages 1 and 2 went stale: after forget, a touch faults them in from the source.
    engine.forget(FIRST_GFN + 1, 2).unwrap();
    assert_eq!(engine.present_pages(), 2);
    assert!(!engine.is_present(FIRST_GFN + 1));
    engine
        .start(Arc::new(MemorySource {
            requests: AtomicU64::new(0),
            zero_gfn: Gfn(u64::MAX),
        }))
        .unwrap();
    assert_eq!(m.read_u64(1, 3), (FIRST_GFN + 1).0 * 1000 + 3);
    assert_eq!(m.read_u64(2, 3), (FIRST_GFN + 2).0 * 1000 + 3);
    assert_eq!(m.read_u64(3, 3), (FIRST_GFN + 53).0 * 1000 + 3, "kept");
    wait_present(&engine, 4);
    let s = engine.stats();
    assert_eq!((s.pages_discarded, s.requests), (2, 2));
    assert!(engine.forget(FIRST_GFN + 3, 2).is_err(), "out of range");
    engine.stop();
}

#[test]
fn staged_pages_move_in_and_a_waiting_thread_wakes() {
    let m = Arc::new(Mapping::new(8));
    let engine = engine_over(&m, 8);
    let pool = StagingPool::new(6).unwrap();
    assert!(pool.take(1).is_none(), "nothing prepared yet");
    pool.prepare();
    assert_eq!(pool.prepared_pages(), 6);
    // A thread faults on page 5 before its pages arrive; nobody serves requests.
    engine.start(Arc::new(SilentSource)).unwrap();
    let reader = {
        let m = m.clone();
        std::thread::spawn(move || m.read_u64(5, 7))
    };
    let mut slot = pool.take(4).unwrap();
    for (p, chunk) in slot
        .as_mut_slice()
        .chunks_mut(usize::try_from(PAGE_SIZE).unwrap())
        .enumerate()
    {
        chunk.copy_from_slice(&page_data(FIRST_GFN + 2 + p as u64));
    }
    assert_eq!(engine.install_staged(FIRST_GFN + 2, &mut slot).unwrap(), 4);
    assert_eq!(reader.join().unwrap(), (FIRST_GFN + 5).0 * 1000 + 7);
    assert_eq!(m.read_u64(2, 0), (FIRST_GFN + 2).0 * 1000);
    // A batch overlapping an installed page installs the rest and keeps the present one.
    let mut slot = pool.take(2).unwrap();
    slot.as_mut_slice().fill(0xee);
    assert_eq!(engine.install_staged(FIRST_GFN + 1, &mut slot).unwrap(), 1);
    assert_eq!(
        m.read_u64(2, 0),
        (FIRST_GFN + 2).0 * 1000,
        "not overwritten"
    );
    assert_eq!(m.read_u64(1, 0), 0xeeee_eeee_eeee_eeee);
    assert!(pool.take(1).is_none(), "every slot is handed out once");
    let s = engine.stats();
    assert_eq!(s.pages_moved + s.pages_copied, 5);
    engine.stop();
}

/// Answers after the batch: requests are queued, `flush` installs them (on the fault thread).
struct DeferredSource {
    queued: Mutex<Vec<Gfn>>,
    flushes: AtomicU64,
}

impl Fetcher for DeferredSource {
    fn request(&self, gfn: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        self.queued.lock().unwrap().push(gfn);
        Ok(())
    }
    fn flush(&self, engine: &FaultEngine) -> Result<(), FetchError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        for gfn in self.queued.lock().unwrap().drain(..) {
            engine
                .install(gfn, &page_data(gfn))
                .map_err(|e| FetchError(e.to_string()))?;
        }
        Ok(())
    }
}

#[test]
fn a_source_may_answer_in_flush_on_the_fault_thread() {
    let m = Arc::new(Mapping::new(3));
    let engine = engine_over(&m, 3);
    engine.set_spin(Duration::from_micros(200));
    let source = Arc::new(DeferredSource {
        queued: Mutex::new(Vec::new()),
        flushes: AtomicU64::new(0),
    });
    engine.start(source.clone()).unwrap();
    for p in 0..3 {
        assert_eq!(m.read_u64(p, 1), (FIRST_GFN + p).0 * 1000 + 1);
    }
    assert!(source.flushes.load(Ordering::Relaxed) >= 1);
    assert_eq!(engine.stats().requests, 3);
    engine.stop();
}

/// Never answers.
struct SilentSource;

impl Fetcher for SilentSource {
    fn request(&self, _: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        Ok(())
    }
}

/// A source that fails until told otherwise, then serves.
struct FlakySource {
    healthy: Mutex<bool>,
}

impl Fetcher for FlakySource {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        if !*self.healthy.lock().unwrap() {
            return Err(FetchError("page server unreachable".into()));
        }
        engine
            .install(gfn, &page_data(gfn))
            .map(drop)
            .map_err(|e| FetchError(e.to_string()))
    }
}

#[test]
fn a_failed_source_leaves_the_thread_waiting_never_zero() {
    let m = Arc::new(Mapping::new(2));
    let engine = engine_over(&m, 2);
    let source = Arc::new(FlakySource {
        healthy: Mutex::new(false),
    });
    engine.start(source.clone()).unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = {
        let m = m.clone();
        std::thread::spawn(move || tx.send(m.read_u64(0, 3)).unwrap())
    };
    // The fault is read and the request fails: the error is reported and the page is pending.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.fetch_error().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the source error was never reported"
        );
        std::thread::yield_now();
    }
    assert_eq!(engine.pending_gfns(), vec![FIRST_GFN]);
    assert!(
        rx.try_recv().is_err(),
        "the faulting thread must still be waiting"
    );
    assert!(!engine.is_present(FIRST_GFN));
    // Recovery: the source comes back and the pending page is requested again.
    *source.healthy.lock().unwrap() = true;
    for gfn in engine.pending_gfns() {
        source.request(gfn, &engine).unwrap();
    }
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        FIRST_GFN.0 * 1000 + 3
    );
    reader.join().unwrap();
    assert!(engine.pending_gfns().is_empty());
    engine.stop();
}

#[test]
fn the_engine_as_a_sink_moves_bulk_pages_from_its_pool_and_copies_demand_replies() {
    let m = Arc::new(Mapping::new(8));
    let engine = engine_over(&m, 8);
    let pool = Arc::new(StagingPool::new(4).unwrap());
    pool.prepare();
    engine.set_staging(pool.clone());
    let sink: &dyn PageSink = engine.as_ref();
    let mut scratch = Vec::new();
    let fill = |first: Gfn| {
        move |buf: &mut [u8]| {
            for (k, page) in buf
                .chunks_mut(usize::try_from(PAGE_SIZE).unwrap())
                .enumerate()
            {
                page.copy_from_slice(&page_data(first + k as u64));
            }
            Ok(())
        }
    };
    let n = sink
        .receive(
            FIRST_GFN,
            3,
            Delivery::Bulk,
            &mut scratch,
            &mut fill(FIRST_GFN),
        )
        .unwrap();
    assert_eq!((n, pool.used_pages()), (3, 3), "received into the pool");
    let n = sink
        .receive(
            FIRST_GFN + 3,
            1,
            Delivery::Demand,
            &mut scratch,
            &mut fill(FIRST_GFN + 3),
        )
        .unwrap();
    assert_eq!((n, pool.used_pages()), (1, 3), "a demand reply is copied");
    // Two pages do not fit the pool's last page: copied, not lost.
    let n = sink
        .receive(
            FIRST_GFN + 4,
            2,
            Delivery::Bulk,
            &mut scratch,
            &mut fill(FIRST_GFN + 4),
        )
        .unwrap();
    assert_eq!(n, 2);
    for p in 0..6 {
        assert_eq!(m.read_u64(p, 2), (FIRST_GFN + p).0 * 1000 + 2, "page {p}");
    }
    let s = engine.stats();
    assert_eq!(s.pages_moved + s.pages_copied, 6);
    assert!(engine.all_present(FIRST_GFN, 6) && !engine.all_present(FIRST_GFN, 7));
    let e = sink
        .receive(
            FIRST_GFN + 7,
            2,
            Delivery::Demand,
            &mut scratch,
            &mut fill(FIRST_GFN),
        )
        .unwrap_err();
    assert!(
        matches!(e, tsubame_pages::PageError::OutOfRange { .. }),
        "{e}"
    );
}
