//! The owner map: for every guest page that is not present here, who holds its freshest copy,
//! and the sink that lets only that owner's copy in.
//!
//! A present page is local, whatever the map says: the map says where to fetch a page when the
//! guest faults on it. Every page has one owner at a time, and a page is installed only from
//! its owner ([`OwnedSink`]): a stale copy from a former owner (a page server that held the
//! page before the source took it back, say) is dropped on arrival, never installed. Owners
//! change only before the vCPUs run (a migration's switchover) for now; changing them under a
//! running guest (eviction, destination switch) needs the change and the installs ordered,
//! which the map's users will add with those features.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tsubame_pages::{Delivery, Gfn, MemoryLayout, PageError, PageRun, PageSink};
use tsubame_uffd::FaultEngine;

/// An owner of pages other than "zero": an index into the router's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointId(pub u8);

impl EndpointId {
    /// Most endpoints a VM's pages can be spread over.
    pub const MAX: usize = 254;
}

/// Who holds the freshest copy of a page that is not present here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Nobody: the page was never written, and faults in as zeros.
    Zero,
    /// A page server, a memserver, a file: an endpoint of the router.
    Endpoint(EndpointId),
}

const ZERO: u8 = u8::MAX;

impl Owner {
    fn code(self) -> u8 {
        match self {
            Owner::Zero => ZERO,
            Owner::Endpoint(e) => e.0,
        }
    }
    fn from_code(c: u8) -> Self {
        if c == ZERO {
            Owner::Zero
        } else {
            Owner::Endpoint(EndpointId(c))
        }
    }
}

/// One owner per page (a byte per page, by page index).
#[derive(Debug)]
pub struct OwnerMap {
    layout: MemoryLayout,
    owners: Vec<AtomicU8>,
}

impl OwnerMap {
    /// A map of `layout`'s pages, all owned by `owner`.
    pub fn new(layout: &MemoryLayout, owner: Owner) -> Self {
        let pages = usize::try_from(layout.total_pages()).expect("owner map fits memory");
        Self {
            layout: layout.clone(),
            owners: (0..pages).map(|_| AtomicU8::new(owner.code())).collect(),
        }
    }

    /// The layout mapped.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn slot(&self, index: u64) -> &AtomicU8 {
        &self.owners[usize::try_from(index).expect("page index")]
    }

    /// The owner of page `gfn` (`None`: not RAM).
    pub fn get(&self, gfn: Gfn) -> Option<Owner> {
        let i = self.layout.page_index(gfn)?;
        Some(Owner::from_code(self.slot(i).load(Ordering::Acquire)))
    }

    /// Makes `owner` the owner of the pages of `[gfn, gfn + pages)` that are RAM; returns how
    /// many there are.
    pub fn set(&self, gfn: Gfn, pages: u64, owner: Owner) -> u64 {
        let mut n = 0;
        for run in self.layout.split(gfn, pages, u64::MAX) {
            for k in 0..run.pages {
                self.slot(run.index + k)
                    .store(owner.code(), Ordering::Release);
            }
            n += run.pages;
        }
        n
    }

    /// Pages owned by `owner`.
    pub fn count(&self, owner: Owner) -> u64 {
        let code = owner.code();
        self.owners
            .iter()
            .filter(|o| o.load(Ordering::Relaxed) == code)
            .count() as u64
    }

    /// The parts of `[gfn, gfn + pages)` that `owner` owns, as runs.
    pub fn owned_runs(&self, gfn: Gfn, pages: u64, owner: Owner) -> Vec<PageRun> {
        let code = owner.code();
        let mut out = Vec::new();
        for run in self.layout.split(gfn, pages, u64::MAX) {
            let mut k = 0;
            while k < run.pages {
                if self.slot(run.index + k).load(Ordering::Acquire) != code {
                    k += 1;
                    continue;
                }
                let start = k;
                while k < run.pages && self.slot(run.index + k).load(Ordering::Acquire) == code {
                    k += 1;
                }
                out.push(PageRun {
                    gfn: run.gfn + start,
                    pages: k - start,
                    index: run.index + start,
                });
            }
        }
        out
    }

    /// Whether `owner` owns all of `[gfn, gfn + pages)` (inside one region).
    pub fn owns_all(&self, gfn: Gfn, pages: u64, owner: Owner) -> bool {
        let code = owner.code();
        self.layout.locate(gfn, pages).is_some_and(|l| {
            (0..pages).all(|k| self.slot(l.index + k).load(Ordering::Acquire) == code)
        })
    }
}

/// The fault engine, as the sink of one owner's pages: installs only what that owner owns
/// (see the module docs) and drops the rest, counted.
#[derive(Debug)]
pub struct OwnedSink {
    engine: Arc<FaultEngine>,
    owners: Arc<OwnerMap>,
    owner: Owner,
    /// Pages that arrived from this endpoint while another owned them: dropped.
    not_owned: AtomicU64,
}

impl OwnedSink {
    pub fn new(engine: Arc<FaultEngine>, owners: Arc<OwnerMap>, endpoint: EndpointId) -> Self {
        Self {
            engine,
            owners,
            owner: Owner::Endpoint(endpoint),
            not_owned: AtomicU64::new(0),
        }
    }

    /// Pages dropped because this endpoint did not own them.
    pub fn pages_not_owned(&self) -> u64 {
        self.not_owned.load(Ordering::Relaxed)
    }

    /// Calls `f` for each run of `[gfn, gfn + pages)` this owner owns; counts the rest.
    fn each_owned(
        &self,
        gfn: Gfn,
        pages: u64,
        mut f: impl FnMut(PageRun) -> Result<u64, PageError>,
    ) -> Result<u64, PageError> {
        if self.engine.layout().locate(gfn, pages).is_none() {
            return Err(PageError::OutOfRange { gfn, pages });
        }
        let runs = self.owners.owned_runs(gfn, pages, self.owner);
        let owned: u64 = runs.iter().map(|r| r.pages).sum();
        self.not_owned.fetch_add(pages - owned, Ordering::Relaxed);
        runs.into_iter().map(&mut f).sum()
    }
}

impl PageSink for OwnedSink {
    fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, PageError> {
        if data.is_empty() || data.len() % tsubame_pages::PAGE_BYTES != 0 {
            return Err(PageError::Unaligned { len: data.len() });
        }
        let pages = (data.len() / tsubame_pages::PAGE_BYTES) as u64;
        self.each_owned(gfn, pages, |run| {
            let at = usize::try_from(run.gfn - gfn).expect("offset") * tsubame_pages::PAGE_BYTES;
            let len = usize::try_from(run.pages).expect("pages") * tsubame_pages::PAGE_BYTES;
            Ok(self.engine.install(run.gfn, &data[at..at + len])?)
        })
    }

    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        self.each_owned(gfn, pages, |run| {
            Ok(self.engine.install_zero(run.gfn, run.pages)?)
        })
    }

    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        self.each_owned(gfn, pages, |run| {
            self.engine.forget(run.gfn, run.pages)?;
            Ok(run.pages)
        })
        .map(drop)
    }

    /// A run this owner owns whole is received the engine's way (bulk pages into its staging
    /// pool); otherwise it is read into `scratch` and only the owned parts are installed.
    fn receive(
        &self,
        gfn: Gfn,
        pages: u64,
        delivery: Delivery,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<u64, PageError> {
        if self.owners.owns_all(gfn, pages, self.owner) {
            return self.engine.receive(gfn, pages, delivery, scratch, fill);
        }
        tsubame_pages::receive_via(self, gfn, pages, scratch, fill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_pages::Gpa;

    #[test]
    fn owners_are_set_by_run_and_read_back_by_run() {
        let layout = MemoryLayout::for_size(8 << 30).unwrap();
        let map = OwnerMap::new(&layout, Owner::Endpoint(EndpointId(0)));
        let (a, b) = (
            Owner::Endpoint(EndpointId(0)),
            Owner::Endpoint(EndpointId(1)),
        );
        let low_end = Gpa(3 << 30).gfn();
        let high = Gpa(4 << 30).gfn();
        // Across the hole: only RAM counts.
        assert_eq!(map.set(low_end.saturating_sub(2), high - low_end + 5, b), 5);
        map.set(Gfn(10), 1, Owner::Zero);
        assert_eq!(map.get(Gfn(10)), Some(Owner::Zero));
        assert_eq!(map.get(low_end), None, "the hole is not RAM");
        assert_eq!(map.get(high + 2), Some(b));
        assert_eq!(map.get(high + 3), Some(a));
        assert_eq!(map.count(b), 5);
        let runs: Vec<_> = map
            .owned_runs(low_end.saturating_sub(3), high - low_end + 6, b)
            .iter()
            .map(|r| (r.gfn, r.pages))
            .collect();
        assert_eq!(runs, [(low_end.saturating_sub(2), 2), (high, 3)]);
        assert!(map.owns_all(high, 3, b) && !map.owns_all(high, 4, b));
        assert!(
            !map.owns_all(low_end.saturating_sub(1), 2, b),
            "crosses the hole"
        );
    }
}
