//! [`PageTree`]: a memserver's pages of one VM, in a two-level radix tree (S-memV keeps its
//! pages so), under a [`Budget`] shared by every VM of the memserver.
//!
//! ```text
//!  page index ──► leaf (index / 512) ──► slot (index % 512) ──► 4 KiB page, or held-as-zero
//!  leaves: one pointer per 2 MiB of the VM's memory, a leaf allocated at its first held page
//!  leaf:   512 page pointers + a 512-bit "held" mask (4 160 bytes)
//! ```
//!
//! A page is allocated on its own, and only if it is not zero: zero pages (and pages never
//! stored) take no memory, are never sent as data, and a page stored as zero over a held one
//! frees it. Metadata is the leaves (0.2 % of the data a full leaf holds) and one pointer per
//! 2 MiB of the VM; [`PageTree::usage`] reports both. The budget refuses a page that would take
//! the memserver's data over `--max-mem`, with an error that says so; nothing is evicted.
//!
//! Like [`tsubame_pages::MemStore`], the tree never makes up a page it was not given: reading a
//! page that is not held fails.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tsubame_pages::{
    is_zero, run_buffer, Gfn, MemoryLayout, PageError, PageSink, PageStore, PAGE_BYTES,
};

/// Pages per leaf (2 MiB).
const LEAF_PAGES: usize = 512;

type Page = Box<[u8; PAGE_BYTES]>;

/// 512 page slots.
struct Leaf {
    held: [u64; LEAF_PAGES / 64],
    pages: [Option<Page>; LEAF_PAGES],
}

impl Leaf {
    fn new() -> Box<Self> {
        Box::new(Self {
            held: [0; LEAF_PAGES / 64],
            pages: [const { None }; LEAF_PAGES],
        })
    }

    fn is_held(&self, slot: usize) -> bool {
        self.held[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn set_held(&mut self, slot: usize, held: bool) {
        if held {
            self.held[slot / 64] |= 1 << (slot % 64);
        } else {
            self.held[slot / 64] &= !(1 << (slot % 64));
        }
    }
}

/// The memory all VMs' pages may take, shared by the trees of one memserver.
#[derive(Debug, Default)]
pub struct Budget {
    /// Most bytes of page data (`None`: no limit).
    max: Option<u64>,
    used: AtomicU64,
}

/// The error of a page refused for lack of budget.
#[derive(Debug, thiserror::Error)]
#[error("this memserver is full: it holds {used} bytes of pages and may hold {max} (--max-mem); store the rest elsewhere, or start it with a larger --max-mem")]
pub struct Full {
    pub used: u64,
    pub max: u64,
}

impl Budget {
    /// A budget of at most `max` bytes of page data.
    pub fn new(max: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes of page data held, all VMs.
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

    fn give_page(&self) {
        self.used.fetch_sub(PAGE_BYTES as u64, Ordering::AcqRel);
    }
}

/// What a tree holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TreeUsage {
    /// Pages held, as data or as zero.
    pub pages_held: u64,
    /// Of those, pages with data (4 KiB each).
    pub data_pages: u64,
    pub data_bytes: u64,
    /// The tree itself: leaves and the top level.
    pub metadata_bytes: u64,
}

/// The pages of one VM (module docs): a [`PageStore`] and a [`PageSink`].
pub struct PageTree {
    layout: MemoryLayout,
    leaves: Vec<RwLock<Option<Box<Leaf>>>>,
    budget: Arc<Budget>,
    held: AtomicU64,
    data: AtomicU64,
    leaf_count: AtomicU64,
}

impl std::fmt::Debug for PageTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTree")
            .field("usage", &self.usage())
            .finish_non_exhaustive()
    }
}

impl PageTree {
    /// An empty tree for a VM of `layout`, drawing on `budget`.
    pub fn new(layout: &MemoryLayout, budget: Arc<Budget>) -> Self {
        let leaves = usize::try_from(layout.total_pages().div_ceil(LEAF_PAGES as u64))
            .expect("leaf count fits usize");
        Self {
            layout: layout.clone(),
            leaves: (0..leaves).map(|_| RwLock::new(None)).collect(),
            budget,
            held: AtomicU64::new(0),
            data: AtomicU64::new(0),
            leaf_count: AtomicU64::new(0),
        }
    }

    /// What it holds.
    pub fn usage(&self) -> TreeUsage {
        let data_pages = self.data.load(Ordering::Relaxed);
        TreeUsage {
            pages_held: self.held.load(Ordering::Relaxed),
            data_pages,
            data_bytes: data_pages * PAGE_BYTES as u64,
            metadata_bytes: self.leaf_count.load(Ordering::Relaxed)
                * std::mem::size_of::<Leaf>() as u64
                + (self.leaves.len() * std::mem::size_of::<RwLock<Option<Box<Leaf>>>>()) as u64,
        }
    }

    /// Pages held (data or zero).
    pub fn held_pages(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Calls `f(gfn, pages)` for each run of pages not held, in layout order.
    pub fn for_each_absent(&self, mut f: impl FnMut(Gfn, u64)) {
        let total = self.layout.total_pages();
        let mut i = 0;
        while i < total {
            if self.index_held(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < total && !self.index_held(i) {
                i += 1;
            }
            let mut j = start;
            while let Some(run) = self.layout.run_at(j, i - j).filter(|_| j < i) {
                f(run.gfn, run.pages);
                j += run.pages;
            }
        }
    }

    fn index_held(&self, index: u64) -> bool {
        let (leaf, slot) = split(index);
        self.leaves[leaf]
            .read()
            .expect("tree lock")
            .as_ref()
            .is_some_and(|l| l.is_held(slot))
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
        let mut l = self.leaves[leaf].write().expect("tree lock");
        let l = l.get_or_insert_with(|| {
            self.leaf_count.fetch_add(1, Ordering::Relaxed);
            Leaf::new()
        });
        match (page, &mut l.pages[slot]) {
            (Some(data), Some(held)) => held.copy_from_slice(data),
            (Some(data), empty @ None) => {
                self.budget
                    .take_page()
                    .map_err(|e| PageError::backend("storing a page", e))?;
                let mut p: Page = Box::new([0; PAGE_BYTES]);
                p.copy_from_slice(data);
                *empty = Some(p);
                self.data.fetch_add(1, Ordering::Relaxed);
            }
            (None, held @ Some(_)) => {
                *held = None;
                self.budget.give_page();
                self.data.fetch_sub(1, Ordering::Relaxed);
            }
            (None, None) => {}
        }
        if !l.is_held(slot) {
            l.set_held(slot, true);
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn drop_page(&self, index: u64) {
        let (leaf, slot) = split(index);
        let mut l = self.leaves[leaf].write().expect("tree lock");
        let Some(l) = l.as_mut() else { return };
        if l.pages[slot].take().is_some() {
            self.budget.give_page();
            self.data.fetch_sub(1, Ordering::Relaxed);
        }
        if l.is_held(slot) {
            l.set_held(slot, false);
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for PageTree {
    fn drop(&mut self) {
        for _ in 0..self.data.load(Ordering::Relaxed) {
            self.budget.give_page();
        }
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

impl PageStore for PageTree {
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
        let buf = run_buffer(scratch, gfn, pages)?;
        for (k, out) in (0..pages).zip(buf.chunks_exact_mut(PAGE_BYTES)) {
            let (leaf, slot) = split(index + k);
            let l = self.leaves[leaf].read().expect("tree lock");
            match l.as_ref().filter(|l| l.is_held(slot)) {
                None => return Err(PageError::Absent { gfn: gfn + k }),
                Some(l) => match &l.pages[slot] {
                    Some(p) => out.copy_from_slice(&p[..]),
                    None => out.fill(0),
                },
            }
        }
        Ok(buf)
    }

    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        let index = self.index_of(gfn, pages)?;
        zero.clear();
        for k in 0..pages {
            let (leaf, slot) = split(index + k);
            let l = self.leaves[leaf].read().expect("tree lock");
            zero.push(
                l.as_ref()
                    .is_some_and(|l| l.is_held(slot) && l.pages[slot].is_none()),
            );
        }
        Ok(())
    }
}

impl PageSink for PageTree {
    fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, PageError> {
        if data.is_empty() || data.len() % PAGE_BYTES != 0 {
            return Err(PageError::Unaligned { len: data.len() });
        }
        let pages = (data.len() / PAGE_BYTES) as u64;
        let index = self.index_of(gfn, pages)?;
        for (k, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            self.put(index + k as u64, (!is_zero(page)).then_some(page))?;
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
        Some((0..pages).all(|k| self.index_held(index + k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    #[test]
    fn a_tree_holds_what_it_was_given_in_its_budget_and_nothing_else() {
        let layout = MemoryLayout::for_size(8 << 30).unwrap();
        let budget = Budget::new(Some(3 * PAGE_BYTES as u64));
        let t = PageTree::new(&layout, budget.clone());
        let high = tsubame_pages::Gpa(4 << 30).gfn();
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
    fn metadata_is_a_small_share_of_a_full_leaf() {
        let layout = MemoryLayout::for_size(64 << 20).unwrap();
        let t = PageTree::new(&layout, Budget::new(None));
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
