//! A staging pool: anonymous memory faulted in ahead of time, that incoming pages are received
//! into and then moved into guest memory with `UFFDIO_MOVE`.
//!
//! Installing with `UFFDIO_COPY` allocates a page and copies into it on the receiver's critical
//! path. On this kind of host (itself a VM whose free memory is handed back to the hypervisor)
//! a page the kernel has not used for a while costs a second, host-level fault on first
//! write: `UFFDIO_COPY` into fresh memory ran at 1.2-3.4 GB/s depending on how recently the
//! memory was used, and the destination's receiver spent 70 % of its time there. A staging
//! pool moves both costs out of the migration: [`StagingPool::prepare`] faults its pages in
//! while the destination waits for the migration, a receiver reads each page batch straight
//! into the next [`StagingSlot`], and [`crate::FaultEngine::install_staged`] moves the pages
//! (page-table updates only, ~0.3 µs a page here).
//!
//! Each slot is handed out once (a moved page leaves a hole behind); slots are only handed out
//! from the prepared part, so an unprepared or exhausted pool makes the caller fall back to
//! copying. Pages a move could not place (already present: a demand reply won) stay in the
//! pool until it is dropped.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{UffdError, PAGE_SIZE};

/// Pages prepared between updates of the prepared mark (and checks of the stop flag).
const PREPARE_STEP: u64 = 64;

/// Pre-faulted memory for received pages.
#[derive(Debug)]
pub struct StagingPool {
    base: NonNull<u8>,
    pages: u64,
    /// Pages `[0, prepared)` are faulted in.
    prepared: AtomicU64,
    /// Pages `[0, next)` have been handed out.
    next: AtomicU64,
    /// Where handing out ended when the pool was retired (`u64::MAX`: it was not).
    retired_at: AtomicU64,
    stop: AtomicBool,
}

// SAFETY: the pool owns its mapping; slots are handed out exactly once (an atomic cursor), so
// no two threads get the same memory, and the pointer itself is only read.
unsafe impl Send for StagingPool {}
// SAFETY: as above; all shared state is atomic.
unsafe impl Sync for StagingPool {}

/// A run of pool pages handed to one receiver.
#[derive(Debug)]
pub struct StagingSlot<'a> {
    pub(crate) hva: u64,
    pub(crate) pages: u64,
    _pool: std::marker::PhantomData<&'a StagingPool>,
}

impl StagingSlot<'_> {
    /// The slot's memory, for receiving into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = usize::try_from(self.pages * PAGE_SIZE).expect("slot fits memory");
        // SAFETY: the slot lies inside the pool's mapping, which outlives it (the slot borrows
        // the pool), and was handed out to this slot only.
        unsafe { std::slice::from_raw_parts_mut(self.hva as *mut u8, len) }
    }
}

impl StagingPool {
    /// Maps `pages` pages of anonymous memory (not faulted in yet: see [`Self::prepare`]).
    pub fn new(pages: u64) -> Result<Self, UffdError> {
        let bytes = pages.max(1) * PAGE_SIZE;
        let err = |source| UffdError::Staging { bytes, source };
        let len = std::num::NonZeroUsize::new(usize::try_from(bytes).expect("pool fits memory"))
            .expect("at least one page");
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice
        // touches no existing memory.
        let base = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(err)?;
        // Pages must stay 4 KiB to be moved one by one; failing to say so only costs splits.
        // SAFETY: advice on the mapping just created.
        let _ = unsafe {
            nix::sys::mman::madvise(base, len.get(), nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE)
        };
        Ok(Self {
            base: base.cast(),
            pages,
            prepared: AtomicU64::new(0),
            next: AtomicU64::new(0),
            retired_at: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        })
    }

    /// Faults the pool's pages in, in order, until all are or [`Self::stop_preparing`] is
    /// called. Run it on a thread of its own, ahead of the migration.
    pub fn prepare(&self) {
        let mut done = self.prepared.load(Ordering::Acquire);
        while done < self.pages && !self.stop.load(Ordering::Relaxed) {
            let end = (done + PREPARE_STEP).min(self.pages);
            for page in done..end {
                let at = usize::try_from(page * PAGE_SIZE).expect("offset");
                // SAFETY: inside the mapping; not handed out yet (only prepared pages are),
                // so nothing else touches it. A volatile write makes the kernel allocate it.
                unsafe { self.base.as_ptr().add(at).write_volatile(0) };
            }
            done = end;
            self.prepared.store(done, Ordering::Release);
        }
    }

    /// Makes [`Self::prepare`] return soon.
    pub fn stop_preparing(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Retires the pool: stops preparing, hands out nothing more, and gives the memory of the
    /// pages not handed out back to the system (a split migration's destination, which will
    /// not receive the memservers' share). Returns the pages given back.
    pub fn retire(&self) -> u64 {
        self.stop_preparing();
        let from = self
            .next
            .fetch_max(self.pages, Ordering::AcqRel)
            .min(self.pages);
        self.retired_at.fetch_min(from, Ordering::AcqRel);
        let pages = self.pages - from;
        if pages > 0 {
            let at = usize::try_from(from * PAGE_SIZE).expect("offset");
            let len = usize::try_from(pages * PAGE_SIZE).expect("length");
            // SAFETY: [at, at + len) lies inside the pool's mapping and was never handed out
            // (the cursor now says everything was, so it never will be): nothing refers to
            // it. `prepare` may still touch a page of it once more, which only maps it again.
            let r = unsafe {
                nix::sys::mman::madvise(
                    NonNull::new_unchecked(self.base.as_ptr().add(at).cast()),
                    len,
                    nix::sys::mman::MmapAdvise::MADV_DONTNEED,
                )
            };
            if let Err(e) = r {
                log::warn!("could not give the staging pool's unused memory back: {e}");
            }
        }
        pages
    }

    /// The next `pages` prepared pages, or `None` if fewer are prepared and unused.
    pub fn take(&self, pages: u64) -> Option<StagingSlot<'_>> {
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            if next + pages > self.prepared.load(Ordering::Acquire) {
                return None;
            }
            match self.next.compare_exchange_weak(
                next,
                next + pages,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(StagingSlot {
                        hva: self.base.as_ptr() as u64 + next * PAGE_SIZE,
                        pages,
                        _pool: std::marker::PhantomData,
                    })
                }
                Err(now) => next = now,
            }
        }
    }

    /// Pages faulted in so far.
    pub fn prepared_pages(&self) -> u64 {
        self.prepared.load(Ordering::Acquire)
    }

    /// Pages handed out so far.
    pub fn used_pages(&self) -> u64 {
        self.next
            .load(Ordering::Relaxed)
            .min(self.retired_at.load(Ordering::Relaxed))
    }

    /// Pages in the pool.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and is unmapped once; no
        // slot outlives the pool (slots borrow it).
        unsafe {
            let _ = nix::sys::mman::munmap(
                self.base.cast(),
                usize::try_from(self.pages.max(1) * PAGE_SIZE).expect("pool fits memory"),
            );
        }
    }
}
