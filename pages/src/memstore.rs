//! [`MemStore`]: pages held in memory, for a VM of a given layout: a [`PageStore`] and a
//! [`PageSink`] at once, optionally under a [`Budget`] shared with other stores (a memserver
//! holds one store per VM under one `--max-mem`).
//!
//! The pages are a two-level radix tree (S-memV keeps its pages so):
//!
//! ```text
//!  page index ──► leaf (index / 512) ──► slot (index % 512) ──► 4 KiB page, or none (zero)
//!  leaves: one pointer per 2 MiB of the VM's memory, a leaf allocated at its first data page
//!  held:   one bit per page of the VM (held as data or as zero, or not held)
//! ```
//!
//! A page is allocated on its own, and only if it is not zero: zero pages (and pages never
//! stored) take no memory, and a page stored as zero over a held one frees it. Metadata is the
//! leaves (0.2 % of the data a full leaf holds), one pointer per 2 MiB and one bit per page of
//! the VM; [`MemStore::usage`] reports it. A budget refuses a page that would take the data
//! over its limit, with an error that says so; nothing is evicted. A page is *held* once
//! installed (as data or as zero) until forgotten; reading a page that is not held fails
//! ([`PageError::Absent`]): the store never makes up a zero page for a page it was not given.
//!
//! Fresh memory is slow on hosts that are themselves VMs (the first touch of a page costs a
//! fault at the hypervisor, ~16 µs here, which capped a memserver's intake at ~0.25 GB/s): a
//! budget can keep *prepared* pages, allocated and touched ahead of time by a background
//! thread ([`Budget::prepare`]), which stores take first, and a page forgotten goes back
//! there for the next store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::store::{run_buffer, PageError, PageSink, PageStore};
use crate::{is_zero, AtomicBitmap, Gfn, MemoryLayout, PAGE_BYTES};

/// Pages per leaf (2 MiB).
const LEAF_PAGES: usize = 512;

type Page = Box<[u8; PAGE_BYTES]>;

/// 512 page slots: a page's data, or none for a zero page (or one not held).
struct Leaf {
    pages: [Option<Page>; LEAF_PAGES],
}

/// The memory stores may take for page data, shared by the stores of one process, and pages
/// allocated and touched ahead of time for them (see the module docs).
#[derive(Debug, Default)]
pub struct Budget {
    /// Most bytes of page data (`None`: no limit).
    max: Option<u64>,
    used: AtomicU64,
    prepared: std::sync::Mutex<Vec<Page>>,
}

/// The error of a page refused for lack of budget.
#[derive(Debug, thiserror::Error)]
#[error("this memserver is full: it holds {used} bytes of pages and may hold {max} (--max-mem); store the rest elsewhere, or start it with a larger --max-mem")]
pub struct Full {
    pub used: u64,
    pub max: u64,
}

impl Budget {
    /// A budget of at most `max` bytes of page data (`None`: no limit).
    pub fn new(max: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicU64::new(0),
            prepared: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Allocates and touches `bytes` of pages for later stores (call it on a thread of its
    /// own: it takes about as long as the host takes to fault that memory in). Stops early at
    /// the limit, counting what is held and prepared.
    pub fn prepare(&self, bytes: u64) {
        const BATCH: usize = 256;
        let want = bytes / PAGE_BYTES as u64;
        let mut made = 0;
        while made < want {
            let room = self.max.map_or(u64::MAX, |m| {
                (m.saturating_sub(self.used())) / PAGE_BYTES as u64
            });
            let prepared = self.prepared_pages();
            if prepared >= room {
                return;
            }
            let n = (want - made).min(BATCH as u64).min(room - prepared);
            let batch: Vec<Page> = (0..n)
                .map(|_| {
                    let mut p = Box::new([0u8; PAGE_BYTES]);
                    // A zeroed allocation may not have touched the memory yet: touch it.
                    // SAFETY: a valid, aligned, exclusively owned byte of `p`.
                    unsafe { std::ptr::write_volatile(p.as_mut_ptr(), 0) };
                    p
                })
                .collect();
            self.prepared.lock().expect("budget lock").extend(batch);
            made += n;
        }
    }

    /// Pages prepared and not taken yet.
    pub fn prepared_pages(&self) -> u64 {
        self.prepared.lock().expect("budget lock").len() as u64
    }

    /// A page for data: a prepared one if any, else a fresh one.
    fn page(&self) -> Page {
        self.prepared
            .lock()
            .expect("budget lock")
            .pop()
            .unwrap_or_else(|| Box::new([0u8; PAGE_BYTES]))
    }

    /// A page no longer held: kept for the next store.
    fn recycle(&self, page: Page) {
        self.prepared.lock().expect("budget lock").push(page);
    }

    /// Bytes of page data held, all stores.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit, if any.
    pub fn max(&self) -> Option<u64> {
        self.max
    }

    /// Takes one page's bytes, or says why not.
    fn take_page(&self) -> Result<(), Full> {
        let page = PAGE_BYTES as u64;
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if let Some(max) = self.max {
                if used + page > max {
                    return Err(Full { used, max });
                }
            }
            match self.used.compare_exchange_weak(
                used,
                used + page,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(u) => used = u,
            }
        }
    }

    fn give_pages(&self, pages: u64) {
        self.used
            .fetch_sub(pages * PAGE_BYTES as u64, Ordering::AcqRel);
    }
}

/// What a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemUsage {
    /// Pages held, as data or as zero.
    pub pages_held: u64,
    /// Of those, pages with data (4 KiB each).
    pub data_pages: u64,
    pub data_bytes: u64,
    /// The tree itself: leaves, the top level, the held bitmap.
    pub metadata_bytes: u64,
}

/// Pages held in memory (module docs).
pub struct MemStore {
    layout: MemoryLayout,
    held: AtomicBitmap,
    leaves: Vec<RwLock<Option<Box<Leaf>>>>,
    budget: Arc<Budget>,
    data: AtomicU64,
    leaf_count: AtomicU64,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("usage", &self.usage())
            .finish_non_exhaustive()
    }
}

impl MemStore {
    /// An empty store for memory of this layout, without a limit.
    pub fn new(layout: &MemoryLayout) -> Self {
        Self::with_budget(layout, Budget::new(None))
    }

    /// An empty store for memory of this layout, drawing on `budget`.
    pub fn with_budget(layout: &MemoryLayout, budget: Arc<Budget>) -> Self {
        let leaves = usize::try_from(layout.total_pages().div_ceil(LEAF_PAGES as u64))
            .expect("leaf count fits usize");
        Self {
            layout: layout.clone(),
            held: AtomicBitmap::new(layout.total_pages()),
            leaves: (0..leaves).map(|_| RwLock::new(None)).collect(),
            budget,
            data: AtomicU64::new(0),
            leaf_count: AtomicU64::new(0),
        }
    }

    /// What it holds.
    pub fn usage(&self) -> MemUsage {
        let data_pages = self.data.load(Ordering::Relaxed);
        MemUsage {
            pages_held: self.held.count_ones(),
            data_pages,
            data_bytes: data_pages * PAGE_BYTES as u64,
            metadata_bytes: self.leaf_count.load(Ordering::Relaxed)
                * std::mem::size_of::<Leaf>() as u64
                + (self.leaves.len() * std::mem::size_of::<RwLock<Option<Box<Leaf>>>>()) as u64
                + self.layout.total_pages().div_ceil(8),
        }
    }

    /// Pages held (data or zero).
    pub fn held_pages(&self) -> u64 {
        self.held.count_ones()
    }

    /// Whether page `gfn` is held.
    pub fn holds(&self, gfn: Gfn) -> bool {
        self.layout
            .page_index(gfn)
            .is_some_and(|i| self.held.get(i))
    }

    /// Calls `f(gfn, pages)` for each run of pages not held, in layout order.
    pub fn for_each_absent(&self, mut f: impl FnMut(Gfn, u64)) {
        for run in self.layout.runs_where(&self.held, false) {
            f(run.gfn, run.pages);
        }
    }

    fn index_of(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        self.layout
            .locate(gfn, pages)
            .map(|l| l.index)
            .ok_or(PageError::OutOfRange { gfn, pages })
    }

    /// Stores `page` (None: a zero page) at page index `index`.
    fn put(&self, index: u64, page: Option<&[u8]>) -> Result<(), PageError> {
        let (leaf, slot) = split(index);
        let mut l = self.leaves[leaf].write().expect("store lock");
        if l.is_none() && page.is_none() {
            self.held.test_and_set(index); // reads as zero already
            return Ok(());
        }
        let l = l.get_or_insert_with(|| {
            self.leaf_count.fetch_add(1, Ordering::Relaxed);
            Box::new(Leaf {
                pages: [const { None }; LEAF_PAGES],
            })
        });
        match (page, &mut l.pages[slot]) {
            (Some(data), Some(held)) => held.copy_from_slice(data),
            (Some(data), empty @ None) => {
                self.budget
                    .take_page()
                    .map_err(|e| PageError::backend("storing a page", e))?;
                let mut p = self.budget.page();
                p.copy_from_slice(data);
                *empty = Some(p);
                self.data.fetch_add(1, Ordering::Relaxed);
            }
            (None, held @ Some(_)) => {
                if let Some(p) = held.take() {
                    self.budget.recycle(p);
                }
                self.budget.give_pages(1);
                self.data.fetch_sub(1, Ordering::Relaxed);
            }
            (None, None) => {}
        }
        self.held.test_and_set(index);
        Ok(())
    }

    /// Drops the page at page index `index` (data and held mark).
    fn drop_page(&self, index: u64) {
        let (leaf, slot) = split(index);
        if let Some(l) = self.leaves[leaf].write().expect("store lock").as_mut() {
            if let Some(p) = l.pages[slot].take() {
                self.budget.recycle(p);
                self.budget.give_pages(1);
                self.data.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.held.clear(index);
    }
}

impl Drop for MemStore {
    fn drop(&mut self) {
        self.budget.give_pages(self.data.load(Ordering::Relaxed));
    }
}

/// Leaf and slot of page index `index`.
fn split(index: u64) -> (usize, usize) {
    let leaf = usize::try_from(index / LEAF_PAGES as u64).expect("leaf index");
    (
        leaf,
        usize::try_from(index % LEAF_PAGES as u64).expect("slot"),
    )
}

impl PageStore for MemStore {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError> {
        let index = self.index_of(gfn, pages)?;
        let missing = self.held.next_clear(index, index + pages);
        if missing < index + pages {
            return Err(PageError::Absent {
                gfn: gfn + (missing - index),
            });
        }
        let buf = run_buffer(scratch, gfn, pages)?;
        for (k, out) in (0..pages).zip(buf.chunks_exact_mut(PAGE_BYTES)) {
            let (leaf, slot) = split(index + k);
            let l = self.leaves[leaf].read().expect("store lock");
            match l.as_ref().and_then(|l| l.pages[slot].as_ref()) {
                Some(p) => out.copy_from_slice(&p[..]),
                None => out.fill(0),
            }
        }
        Ok(buf)
    }

    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        let index = self.index_of(gfn, pages)?;
        zero.clear();
        for k in 0..pages {
            let (leaf, slot) = split(index + k);
            let l = self.leaves[leaf].read().expect("store lock");
            zero.push(l.as_ref().is_none_or(|l| l.pages[slot].is_none()));
        }
        Ok(())
    }

    /// Released pages are no longer held (as if forgotten). Reads copy, so nothing borrowed
    /// can see them go.
    unsafe fn release(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        self.forget(gfn, pages)
    }
}

impl PageSink for MemStore {
    fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, PageError> {
        if data.is_empty() || data.len() % PAGE_BYTES != 0 {
            return Err(PageError::Unaligned { len: data.len() });
        }
        let pages = (data.len() / PAGE_BYTES) as u64;
        let index = self.index_of(gfn, pages)?;
        for (k, page) in (0..pages).zip(data.chunks_exact(PAGE_BYTES)) {
            self.put(index + k, (!is_zero(page)).then_some(page))?;
        }
        Ok(pages)
    }

    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        let index = self.index_of(gfn, pages)?;
        for k in 0..pages {
            self.put(index + k, None)?;
        }
        Ok(pages)
    }

    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        let index = self.index_of(gfn, pages)?;
        for k in 0..pages {
            self.drop_page(index + k);
        }
        Ok(())
    }

    fn all_installed(&self, gfn: Gfn, pages: u64) -> Option<bool> {
        let index = self.index_of(gfn, pages).ok()?;
        Some(self.held.next_clear(index, index + pages) == index + pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    #[test]
    fn a_store_holds_what_it_was_given_and_nothing_else() {
        let layout = MemoryLayout::for_size(8 << 30).unwrap();
        let s = MemStore::new(&layout);
        let high = crate::Gpa(4 << 30).gfn();
        let mut data = page(1);
        data.extend(page(0));
        data.extend(page(3));
        assert_eq!(s.install(high + 10, &data).unwrap(), 3);
        assert_eq!(s.install_zero(Gfn(5), 2).unwrap(), 2);
        assert_eq!(s.held_pages(), 5);
        assert_eq!(
            s.usage().data_bytes,
            2 * PAGE_BYTES as u64,
            "zero pages take no memory"
        );
        let mut scratch = Vec::new();
        assert_eq!(s.read(high + 10, 3, &mut scratch).unwrap(), &data[..]);
        assert_eq!(
            s.read(Gfn(5), 2, &mut scratch).unwrap(),
            &[0u8; 2 * PAGE_BYTES][..]
        );
        let mut zero = Vec::new();
        s.known_zero(Gfn(5), 1, &mut zero).unwrap();
        assert_eq!(zero, [true]);
        assert!(matches!(
            s.read(high + 9, 2, &mut scratch),
            Err(PageError::Absent { gfn }) if gfn == high + 9
        ));
        assert!(matches!(
            s.read(layout.top().gfn(), 1, &mut scratch),
            Err(PageError::OutOfRange { .. })
        ));
        // A newer copy replaces the old one; a forgotten page is absent again.
        s.install(high + 11, &page(9)).unwrap();
        assert_eq!(s.read(high + 11, 1, &mut scratch).unwrap(), &page(9)[..]);
        s.install_zero(high + 12, 1).unwrap();
        assert_eq!(s.read(high + 12, 1, &mut scratch).unwrap(), &page(0)[..]);
        s.forget(high + 10, 1).unwrap();
        assert!(!s.holds(high + 10) && s.holds(high + 11));
        let mut absent = Vec::new();
        s.for_each_absent(|g, n| absent.push((g, n)));
        let low = (3 << 30) / PAGE_SIZE;
        assert_eq!(
            absent,
            [
                (Gfn(0), 5),
                (Gfn(7), low - 7),
                (high, 11),
                (high + 13, layout.total_pages() - low - 13)
            ],
            "split at the region's end"
        );
        assert!(s.read(high + 10, 1, &mut scratch).is_err());
        assert!(matches!(
            s.install(Gfn(0), &[1; 100]),
            Err(PageError::Unaligned { .. })
        ));
    }

    #[test]
    fn a_store_holds_only_what_its_budget_allows() {
        let layout = MemoryLayout::for_size(8 << 30).unwrap();
        let budget = Budget::new(Some(3 * PAGE_BYTES as u64));
        let t = MemStore::with_budget(&layout, budget.clone());
        let high = crate::Gpa(4 << 30).gfn();
        let mut data = page(1);
        data.extend(page(0));
        data.extend(page(3));
        assert_eq!(t.install(high + 10, &data).unwrap(), 3);
        assert_eq!(t.install_zero(Gfn(5), 2).unwrap(), 2);
        let u = t.usage();
        assert_eq!(
            (u.pages_held, u.data_pages),
            (5, 2),
            "zero pages take no data"
        );
        assert_eq!(budget.used(), 2 * PAGE_BYTES as u64);
        let mut scratch = Vec::new();
        assert_eq!(t.read(high + 10, 3, &mut scratch).unwrap(), &data[..]);
        let mut zero = Vec::new();
        t.known_zero(high + 10, 3, &mut zero).unwrap();
        assert_eq!(zero, [false, true, false]);
        assert!(matches!(
            t.read(Gfn(4), 2, &mut scratch),
            Err(PageError::Absent { gfn: Gfn(4) })
        ));
        // The budget: a third data page fits, a fourth does not, and the error says so.
        t.install(Gfn(100), &page(7)).unwrap();
        let e = t.install(Gfn(101), &page(8)).unwrap_err().to_string();
        assert!(e.contains("--max-mem"), "{e}");
        assert!(!t.all_installed(Gfn(101), 1).unwrap());
        // Zero over data frees it; forgetting frees it too.
        t.install_zero(Gfn(100), 1).unwrap();
        t.install(Gfn(101), &page(8)).unwrap();
        t.forget(high + 10, 3).unwrap();
        assert_eq!(budget.used(), PAGE_BYTES as u64);
        assert!(t.read(high + 10, 1, &mut scratch).is_err());
        let mut absent = Vec::new();
        t.for_each_absent(|g, n| absent.push((g, n)));
        assert_eq!(absent.first(), Some(&(Gfn(0), 5)));
        drop(t);
        assert_eq!(budget.used(), 0, "a dropped tree gives its pages back");
    }

    #[test]
    fn stores_take_prepared_pages_first_and_give_them_back() {
        let layout = MemoryLayout::for_size(8 << 20).unwrap();
        let budget = Budget::new(Some(64 * PAGE_BYTES as u64));
        budget.prepare(1 << 30); // more than the limit: stops at it
        assert_eq!(budget.prepared_pages(), 64);
        let store = MemStore::with_budget(&layout, budget.clone());
        store.install(Gfn(3), &page(7)).unwrap();
        store.install(Gfn(4), &page(0)).unwrap(); // zero: no page taken
        assert_eq!(budget.prepared_pages(), 63);
        let mut scratch = Vec::new();
        assert_eq!(store.read(Gfn(3), 1, &mut scratch).unwrap(), &page(7)[..]);
        store.forget(Gfn(3), 2).unwrap();
        assert_eq!(budget.prepared_pages(), 64, "the page went back");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn metadata_is_a_small_share_of_a_full_leaf() {
        let layout = MemoryLayout::for_size(64 << 20).unwrap();
        let t = MemStore::new(&layout);
        for i in 0..LEAF_PAGES as u64 {
            t.install(Gfn(i), &page(1)).unwrap();
        }
        let u = t.usage();
        assert!(
            u.metadata_bytes * 100 < u.data_bytes,
            "metadata {} of {} data bytes",
            u.metadata_bytes,
            u.data_bytes
        );
    }
}
