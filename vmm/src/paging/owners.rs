//! The owner map: for every guest page, who holds its freshest copy (this host, nobody, or an
//! endpoint), and the sink that lets only that owner's copy in.
//!
//! Source-of-truth rules:
//! - Every page has one owner at a time: [`Owner::Local`] once its copy is installed here,
//!   [`Owner::Zero`] if it was never written, or the endpoint (page server, memserver, file)
//!   whose copy is the freshest.
//! - A page is installed only from its owner ([`OwnedSink`]), and then it is local: a stale copy
//!   from a former owner (a memserver that stored the page before the guest wrote it again at
//!   the source, say) and a second copy from the owner itself (a demand reply racing the push)
//!   are both dropped on arrival, never installed, and counted apart.
//! - An owner that says its copy went stale (`Discard`) takes a local page back: it is dropped
//!   here and owned by that endpoint again. Nothing else makes a local page missing.
//!
//! Owners change before the vCPUs run (a migration's switchover), and under a running guest
//! only through remote paging ([`super::remote`]), which orders each change with the page's
//! write protection and its drop.
//!
//! Two senders (a switched migration, see `crate::migration::destination`): the old
//! destination owns the pages it holds, and the source may take any of them back before the
//! switchover (the guest wrote it again there) with a `Discard`: the source's sink is
//! *senior* ([`OwnedSink::make_senior`]), its `Discard` drops whatever copy is here and makes
//! the page the source's. The old destination's copy of such a page may be on its way at that
//! very moment, so once a map is *contested* ([`OwnerMap::contest`]) the check of a page's
//! owner, the install and the making local are one step with respect to a take-back of the
//! same pages (a lock per 2 MiB of pages): a stale copy is either installed before the
//! take-back, and dropped by it, or refused after it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tsubame_pages::{Delivery, Gfn, MemoryLayout, PageError, PageRun, PageSink};
use tsubame_uffd::FaultEngine;

/// An owner of pages other than "zero": an index into the router's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointId(pub u8);

impl EndpointId {
    /// Most endpoints a VM's pages can be spread over.
    pub const MAX: usize = 126;
}

/// Who holds the freshest copy of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// This host: the page is installed here.
    Local,
    /// Nobody: the page was never written, and faults in as zeros.
    Zero,
    /// A page server, a memserver, a file: an endpoint of the router.
    Endpoint(EndpointId),
}

/// A page's entry in the map: an endpoint's id (below [`FROM`]), a local page with the
/// endpoint it came from (`FROM | id`, so that the endpoint can take it back), a local page that
/// came from no endpoint ([`LOCAL`]), or a zero page ([`ZERO`]).
const ZERO: u8 = u8::MAX;
const LOCAL: u8 = u8::MAX - 1;
const FROM: u8 = 0x80;

impl Owner {
    fn code(self) -> u8 {
        match self {
            Owner::Local => LOCAL,
            Owner::Zero => ZERO,
            Owner::Endpoint(e) => e.0,
        }
    }
    fn from_code(c: u8) -> Self {
        match c {
            ZERO => Owner::Zero,
            c if c >= FROM => Owner::Local,
            e => Owner::Endpoint(EndpointId(e)),
        }
    }
}

/// One owner per page (a byte per page, by page index), and how many pages each entry has.
#[derive(Debug)]
pub struct OwnerMap {
    layout: MemoryLayout,
    owners: Vec<AtomicU8>,
    /// Pages per entry code (kept with every change, so that "does it still own anything"
    /// costs nothing on the install path).
    counts: Vec<AtomicU64>,
    /// Once contested (two senders): a lock per [`CONTEST_STRIPE`] pages, taken by sinks
    /// around each check-install-record step (see the module docs).
    contest: OnceLock<Vec<Mutex<()>>>,
}

/// Pages per lock of a contested map (2 MiB).
const CONTEST_STRIPE: u64 = 512;

impl OwnerMap {
    /// A map of `layout`'s pages, all owned by `owner`.
    pub fn new(layout: &MemoryLayout, owner: Owner) -> Self {
        let pages = usize::try_from(layout.total_pages()).expect("owner map fits memory");
        let counts: Vec<AtomicU64> = (0..256).map(|_| AtomicU64::new(0)).collect();
        counts[usize::from(owner.code())].store(layout.total_pages(), Ordering::Relaxed);
        Self {
            layout: layout.clone(),
            owners: (0..pages).map(|_| AtomicU8::new(owner.code())).collect(),
            counts,
            contest: OnceLock::new(),
        }
    }

    /// Two senders may send the same pages from now on (see the module docs): sinks install
    /// and take back under a lock per 2 MiB of pages.
    pub fn contest(&self) {
        self.contest.get_or_init(|| {
            (0..self.layout.total_pages().div_ceil(CONTEST_STRIPE))
                .map(|_| Mutex::new(()))
                .collect()
        });
    }

    /// The locks of `[gfn, gfn + pages)` if the map is contested (none otherwise), taken in
    /// page order.
    fn guard(&self, gfn: Gfn, pages: u64) -> Vec<MutexGuard<'_, ()>> {
        let Some(locks) = self.contest.get() else {
            return Vec::new();
        };
        let mut stripes: Vec<u64> = self
            .layout
            .split(gfn, pages, u64::MAX)
            .flat_map(|r| r.index / CONTEST_STRIPE..=(r.index + r.pages - 1) / CONTEST_STRIPE)
            .collect();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|i| {
                locks[usize::try_from(i).expect("stripe")]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            })
            .collect()
    }

    fn counted(&self, code: u8) -> &AtomicU64 {
        &self.counts[usize::from(code)]
    }

    /// Moves `n` pages from entry `old` to entry `new` in the counts.
    fn recount(&self, old: u8, new: u8, n: u64) {
        if n > 0 && old != new {
            self.counted(old).fetch_sub(n, Ordering::Relaxed);
            self.counted(new).fetch_add(n, Ordering::Relaxed);
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
        self.set_code(gfn, pages, owner.code())
    }

    fn set_code(&self, gfn: Gfn, pages: u64, code: u8) -> u64 {
        let mut n = 0;
        for run in self.layout.split(gfn, pages, u64::MAX) {
            // Consecutive pages mostly share their old entry: counted once per stretch.
            let (mut old, mut same) = (code, 0);
            for k in 0..run.pages {
                let was = self.slot(run.index + k).swap(code, Ordering::AcqRel);
                if was != old {
                    self.recount(old, code, same);
                    (old, same) = (was, 0);
                }
                same += 1;
            }
            self.recount(old, code, same);
            n += run.pages;
        }
        n
    }

    /// Hands the pages of `[gfn, gfn + pages)` that `from` owns over to `to`, and records
    /// those installed from `from` as installed from `to` (which holds a copy of them now);
    /// the rest (other owners', other local pages) stay. For an owner whose copies `to` has
    /// taken over whole, e.g. a split migration's source, whose frozen memory a memserver now
    /// holds part of. Returns how many pages `to` owns now out of the range.
    pub fn hand_over(&self, gfn: Gfn, pages: u64, from: EndpointId, to: EndpointId) -> u64 {
        let mut owned = 0;
        for run in self.layout.split(gfn, pages, u64::MAX) {
            for k in 0..run.pages {
                let slot = self.slot(run.index + k);
                for (old, new) in [(from.0, to.0), (FROM | from.0, FROM | to.0)] {
                    if slot
                        .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.recount(old, new, 1);
                        owned += u64::from(new == to.0);
                        break;
                    }
                }
            }
        }
        owned
    }

    /// Every run of the map that `owner` owns.
    pub fn all_owned_runs(&self, owner: Owner) -> Vec<PageRun> {
        self.layout
            .regions
            .iter()
            .flat_map(|r| self.owned_runs(r.first_gfn(), r.pages(), owner))
            .collect()
    }

    /// Every run of the map that is local and was installed from `endpoint` (it holds a copy
    /// of those pages, which the guest may have written since).
    pub fn all_installed_from(&self, endpoint: EndpointId) -> Vec<PageRun> {
        self.layout
            .regions
            .iter()
            .flat_map(|r| {
                self.runs_where(r.first_gfn(), r.pages(), |c| c == FROM | endpoint.0, |_| {})
            })
            .collect()
    }

    /// Pages `endpoint` owns (not here yet), at no cost.
    pub fn owned_by(&self, endpoint: EndpointId) -> u64 {
        self.counted(endpoint.0).load(Ordering::Relaxed)
    }

    /// The endpoint a local page was installed from (and not written since, for a page whose
    /// first write is watched: see [`super::remote`]); `None` for other pages.
    pub fn came_from(&self, gfn: Gfn) -> Option<EndpointId> {
        let i = self.layout.page_index(gfn)?;
        match self.slot(i).load(Ordering::Acquire) {
            ZERO | LOCAL => None,
            c if c >= FROM => Some(EndpointId(c & !FROM)),
            _ => None,
        }
    }

    /// Records `[gfn, gfn + pages)` as local, installed from `endpoint`.
    fn set_local_from(&self, gfn: Gfn, pages: u64, endpoint: EndpointId) {
        self.set_code(gfn, pages, FROM | endpoint.0);
    }

    /// Pages owned by `owner`.
    pub fn count(&self, owner: Owner) -> u64 {
        match owner {
            Owner::Local => (FROM..=LOCAL)
                .map(|c| self.counted(c).load(Ordering::Relaxed))
                .sum(),
            o => self.counted(o.code()).load(Ordering::Relaxed),
        }
    }

    /// The parts of `[gfn, gfn + pages)` that `owner` owns, as runs.
    pub fn owned_runs(&self, gfn: Gfn, pages: u64, owner: Owner) -> Vec<PageRun> {
        self.runs_where(gfn, pages, |c| Owner::from_code(c) == owner, |_| {})
    }

    /// The parts of `[gfn, gfn + pages)` whose entry `wanted` selects, as runs, in one pass
    /// that reads each entry once (so that a concurrent change cannot cut a run short) and
    /// shows every entry to `seen`.
    fn runs_where(
        &self,
        gfn: Gfn,
        pages: u64,
        wanted: impl Fn(u8) -> bool,
        mut seen: impl FnMut(u8),
    ) -> Vec<PageRun> {
        let mut out = Vec::new();
        for run in self.layout.split(gfn, pages, u64::MAX) {
            let mut start = None;
            for k in 0..=run.pages {
                let take = k < run.pages && {
                    let code = self.slot(run.index + k).load(Ordering::Acquire);
                    seen(code);
                    wanted(code)
                };
                match (take, start) {
                    (true, None) => start = Some(k),
                    (false, Some(first)) => {
                        out.push(PageRun {
                            gfn: run.gfn + first,
                            pages: k - first,
                            index: run.index + first,
                        });
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// Told of what an [`OwnedSink`] installed, once the owner map says it is local.
pub trait InstallWatch: Send + Sync + std::fmt::Debug {
    fn installed(&self, run: &PageRun);
}

/// The fault engine, as the sink of one owner's pages: installs only what that owner owns, and
/// makes it local (see the module docs).
#[derive(Debug)]
pub struct OwnedSink {
    engine: Arc<FaultEngine>,
    owners: Arc<OwnerMap>,
    endpoint: EndpointId,
    owner: Owner,
    /// Pages are installed write-protected (zero pages too, as copies), and `watch` is told.
    protect: Option<Arc<dyn InstallWatch>>,
    /// Pages installed from this endpoint.
    installed: AtomicU64,
    /// Pages that arrived from this endpoint when they were local already: dropped.
    already_local: AtomicU64,
    /// Pages that arrived from this endpoint while another owned them: dropped.
    not_owned: AtomicU64,
    /// Its `Discard` takes any page back, whoever's copy is here (module docs, "two
    /// senders").
    senior: AtomicBool,
}

/// What an [`OwnedSink`] did with what arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub pages_installed: u64,
    pub pages_already_local: u64,
    pub pages_not_owned: u64,
}

impl OwnedSink {
    pub fn new(engine: Arc<FaultEngine>, owners: Arc<OwnerMap>, endpoint: EndpointId) -> Self {
        Self {
            engine,
            owners,
            endpoint,
            owner: Owner::Endpoint(endpoint),
            protect: None,
            installed: AtomicU64::new(0),
            already_local: AtomicU64::new(0),
            not_owned: AtomicU64::new(0),
            senior: AtomicBool::new(false),
        }
    }

    /// Makes this owner's `Discard` take back any page, whoever's copy is here: the source
    /// of a switched migration, whose copy beats the old destination's (module docs). Only
    /// before the guest runs here: a page dropped then has never been seen by it.
    pub fn make_senior(&self) {
        self.senior.store(true, Ordering::Release);
    }

    /// The source takes `[gfn, gfn + pages)` back before the guest runs here: whatever copy
    /// of those pages is here or on its way, from whichever owner, is dropped, and they are
    /// the source's (its copy is the current one). A switched-after-the-switchover VM's
    /// pages it fetched from the original source after naming it their owner (see
    /// `migration::source`, `take_back_fetched`): that source's push may have brought its
    /// older copy here already.
    pub fn take_back(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        self.drop_copies(gfn, pages, true)
    }

    /// Drops what is here of `[gfn, gfn + pages)` and makes the pages this owner's: those
    /// installed from it, or, `any`, whatever copy is here or on its way from whoever (see
    /// [`Self::make_senior`] and [`Self::take_back`]).
    fn drop_copies(&self, gfn: Gfn, pages: u64, any: bool) -> Result<(), PageError> {
        if self.engine.layout().locate(gfn, pages).is_none() {
            return Err(PageError::OutOfRange { gfn, pages });
        }
        let (mine, from_me) = (self.endpoint.0, FROM | self.endpoint.0);
        let _contested = self.owners.guard(gfn, pages);
        for run in self
            .owners
            .runs_where(gfn, pages, |c| any || c == mine || c == from_me, |_| {})
        {
            self.engine.forget(run.gfn, run.pages)?;
            self.owners.set(run.gfn, run.pages, self.owner);
        }
        Ok(())
    }

    /// A sink that installs pages write-protected, so that the first write to each is seen
    /// (the engine must be [`FaultEngine::new_write_protected`]), and tells `watch` of them.
    pub fn write_protected(
        engine: Arc<FaultEngine>,
        owners: Arc<OwnerMap>,
        endpoint: EndpointId,
        watch: Arc<dyn InstallWatch>,
    ) -> Self {
        Self {
            protect: Some(watch),
            ..Self::new(engine, owners, endpoint)
        }
    }

    /// What was installed and what was dropped.
    pub fn stats(&self) -> SinkStats {
        SinkStats {
            pages_installed: self.installed.load(Ordering::Relaxed),
            pages_already_local: self.already_local.load(Ordering::Relaxed),
            pages_not_owned: self.not_owned.load(Ordering::Relaxed),
        }
    }

    /// Calls `f` for each run of `[gfn, gfn + pages)` this owner owns, then makes the run
    /// local; counts the rest (local already, or another owner's).
    fn each_owned(
        &self,
        gfn: Gfn,
        pages: u64,
        mut f: impl FnMut(PageRun) -> Result<u64, PageError>,
    ) -> Result<u64, PageError> {
        if self.engine.layout().locate(gfn, pages).is_none() {
            return Err(PageError::OutOfRange { gfn, pages });
        }
        let _contested = self.owners.guard(gfn, pages);
        let (mut local, mut others) = (0, 0);
        let runs = self.owners.runs_where(
            gfn,
            pages,
            |c| Owner::from_code(c) == self.owner,
            |c| match Owner::from_code(c) {
                o if o == self.owner => {}
                Owner::Local => local += 1,
                _ => others += 1,
            },
        );
        self.already_local.fetch_add(local, Ordering::Relaxed);
        self.not_owned.fetch_add(others, Ordering::Relaxed);
        let mut installed = 0;
        for run in runs {
            installed += f(run)?;
            self.owners
                .set_local_from(run.gfn, run.pages, self.endpoint);
            if let Some(watch) = &self.protect {
                watch.installed(&run);
            }
        }
        self.installed.fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
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
            let data = &data[at..at + len];
            Ok(if self.protect.is_some() {
                self.engine.install_protected(run.gfn, data)?
            } else {
                self.engine.install(run.gfn, data)?
            })
        })
    }

    /// `UFFDIO_ZEROPAGE` cannot write-protect: a protected sink copies zeros in instead.
    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        self.each_owned(gfn, pages, |run| {
            Ok(if self.protect.is_some() {
                let len = usize::try_from(run.pages).expect("pages") * tsubame_pages::PAGE_BYTES;
                self.engine.install_protected(run.gfn, &vec![0; len])?
            } else {
                self.engine.install_zero(run.gfn, run.pages)?
            })
        })
    }

    /// The owner's copies went stale: the pages installed from it are dropped and its own
    /// again (pages another endpoint owns, or that came from another, are not its to drop).
    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        self.drop_copies(gfn, pages, self.senior.load(Ordering::Acquire))
    }

    fn all_installed(&self, gfn: Gfn, pages: u64) -> Option<bool> {
        Some(self.engine.all_present(gfn, pages))
    }

    /// A run with no page of another owner in it is received the engine's way (bulk pages into
    /// its staging pool): its pages that are local already are present, and the engine never
    /// overwrites a present page. (A demand reply often makes one page of a run local before
    /// the push sends the run; copying the whole run in for that, instead of moving it, cost
    /// the push a tenth of its rate.) A run with pages of another owner is read into `scratch`,
    /// and only this owner's pages are installed.
    fn receive(
        &self,
        gfn: Gfn,
        pages: u64,
        delivery: Delivery,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<u64, PageError> {
        let contested = self.owners.guard(gfn, pages);
        let (mut local, mut others) = (0, 0);
        let mine = self.owners.runs_where(
            gfn,
            pages,
            |c| Owner::from_code(c) == self.owner,
            |c| match Owner::from_code(c) {
                o if o == self.owner => {}
                Owner::Local => local += 1,
                _ => others += 1,
            },
        );
        if others > 0 || self.protect.is_some() || self.engine.layout().locate(gfn, pages).is_none()
        {
            drop(contested); // `install` takes it again
            return tsubame_pages::receive_via(self, gfn, pages, scratch, fill);
        }
        let installed = self.engine.receive(gfn, pages, delivery, scratch, fill)?;
        for run in mine {
            self.owners
                .set_local_from(run.gfn, run.pages, self.endpoint);
        }
        self.already_local.fetch_add(local, Ordering::Relaxed);
        self.installed.fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_pages::Gpa;

    /// A guest of `bytes` and a fault engine over its memory.
    fn guest(bytes: u64) -> (MemoryLayout, crate::memory::GuestMemory, Arc<FaultEngine>) {
        let layout = MemoryLayout::for_size(bytes).unwrap();
        let memory = crate::memory::GuestMemory::new(&layout).unwrap();
        let engine = FaultEngine::new(&layout, memory.hvas()).unwrap();
        (layout, memory, engine)
    }

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
        assert_eq!(
            map.owned_runs(high, 4, b)
                .iter()
                .map(|r| r.pages)
                .sum::<u64>(),
            3
        );
        assert_eq!(
            map.owned_runs(low_end.saturating_sub(1), high - low_end + 2, b)
                .len(),
            2,
            "a run ends at the hole"
        );
    }

    /// Two senders racing on the same pages (a switched migration): the old destination (1)
    /// pushes its copies while the source (0, senior) takes each page back and sends its own.
    /// Whatever the interleaving, every page ends with the source's copy.
    #[test]
    fn the_senior_senders_copy_wins_a_race_on_the_same_pages() {
        const PAGES: u64 = 4096;
        let (layout, memory, engine) = guest(PAGES * 4096);
        let map = Arc::new(OwnerMap::new(&layout, Owner::Endpoint(EndpointId(0))));
        map.set(Gfn(0), PAGES, Owner::Endpoint(EndpointId(1)));
        map.contest();
        let source = OwnedSink::new(engine.clone(), map.clone(), EndpointId(0));
        source.make_senior();
        let old = OwnedSink::new(engine.clone(), map.clone(), EndpointId(1));
        let stale = vec![0xaa; tsubame_pages::PAGE_BYTES];
        let fresh = vec![0x55; tsubame_pages::PAGE_BYTES];
        std::thread::scope(|s| {
            s.spawn(|| {
                for g in 0..PAGES {
                    old.install(Gfn(g), &stale).unwrap();
                }
            });
            s.spawn(|| {
                for g in 0..PAGES {
                    source.forget(Gfn(g), 1).unwrap();
                    source.install(Gfn(g), &fresh).unwrap();
                }
            });
        });
        assert_eq!(engine.present_pages(), PAGES);
        let mut b = vec![0u8; tsubame_pages::PAGE_BYTES];
        for g in 0..PAGES {
            memory.read(Gfn(g).gpa(), &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0x55), "page {g} kept a stale copy");
        }
        assert_eq!(map.owned_by(EndpointId(1)), 0);
    }

    #[test]
    fn a_take_back_drops_any_copy_and_refuses_the_next_one_from_another_owner() {
        let (layout, memory, engine) = guest(8 << 20);
        let map = Arc::new(OwnerMap::new(&layout, Owner::Endpoint(EndpointId(0))));
        map.set(Gfn(10), 4, Owner::Endpoint(EndpointId(1)));
        map.contest();
        let (source, other) = (
            OwnedSink::new(engine.clone(), map.clone(), EndpointId(0)),
            OwnedSink::new(engine.clone(), map.clone(), EndpointId(1)),
        );
        let page = |b: u8, n: usize| vec![b; tsubame_pages::PAGE_BYTES * n];
        // The other owner's copies of 10 and 11 arrived; the source, not senior, takes
        // 10..14 back (it fetched and changed them after naming the other owner).
        assert_eq!(other.install(Gfn(10), &page(1, 2)).unwrap(), 2);
        source.take_back(Gfn(10), 4).unwrap();
        for g in 10..14 {
            assert!(!engine.is_present(Gfn(g)), "page {g} kept the other's copy");
            assert_eq!(map.get(Gfn(g)), Some(Owner::Endpoint(EndpointId(0))));
        }
        // The other owner's copy of 12, late: refused; the source's is installed.
        assert_eq!(other.install(Gfn(12), &page(1, 1)).unwrap(), 0);
        assert_eq!(source.install(Gfn(10), &page(2, 4)).unwrap(), 4);
        let mut b = [0u8; 1];
        for g in 10..14 {
            memory.read(Gfn(g).gpa(), &mut b).unwrap();
            assert_eq!(b[0], 2, "page {g}");
        }
        assert!(source.take_back(Gfn(200_000), 1).is_err());
    }

    #[test]
    fn only_the_owners_copy_is_installed_and_then_the_page_is_local() {
        let (layout, memory, engine) = guest(8 << 20);
        let map = Arc::new(OwnerMap::new(&layout, Owner::Endpoint(EndpointId(0))));
        map.set(Gfn(10), 2, Owner::Endpoint(EndpointId(1)));
        let (s0, s1) = (
            OwnedSink::new(engine.clone(), map.clone(), EndpointId(0)),
            OwnedSink::new(engine.clone(), map.clone(), EndpointId(1)),
        );
        let page = |b: u8| vec![b; tsubame_pages::PAGE_BYTES * 3];
        // Endpoint 1 owns 10 and 11, endpoint 0 owns 9: each installs its own pages only.
        assert_eq!(s1.install(Gfn(9), &page(1)).unwrap(), 2);
        assert_eq!(s0.install(Gfn(9), &page(2)).unwrap(), 1);
        let mut b = [0u8; 1];
        memory.read(Gfn(9).gpa(), &mut b).unwrap();
        assert_eq!(b[0], 2);
        memory.read(Gfn(10).gpa(), &mut b).unwrap();
        assert_eq!(b[0], 1, "endpoint 0's copy of 10 was not installed");
        assert_eq!(map.get(Gfn(10)), Some(Owner::Local));
        assert_eq!(
            s1.stats(),
            SinkStats {
                pages_installed: 2,
                pages_already_local: 0,
                pages_not_owned: 1
            }
        );
        assert_eq!(
            s0.stats(),
            SinkStats {
                pages_installed: 1,
                pages_already_local: 2,
                pages_not_owned: 0
            }
        );
        // A second copy from the owner: dropped, the page is local.
        assert_eq!(s0.install_zero(Gfn(9), 1).unwrap(), 0);
        assert_eq!(s0.stats().pages_already_local, 3);
        // Endpoint 1 says its copies went stale: its pages are missing and its own again; the
        // page endpoint 0 owned stays.
        s1.forget(Gfn(9), 3).unwrap();
        assert!(!engine.is_present(Gfn(10)) && !engine.is_present(Gfn(11)));
        assert!(
            engine.is_present(Gfn(9)),
            "came from endpoint 0: not endpoint 1's to drop"
        );
        assert_eq!(map.get(Gfn(9)), Some(Owner::Local));
        assert_eq!(map.get(Gfn(10)), Some(Owner::Endpoint(EndpointId(1))));
        assert!(s0.install(Gfn(200_000), &page(0)).is_err());
    }

    #[test]
    fn counts_follow_every_change_and_a_hand_over_moves_only_the_former_owners_pages() {
        let (layout, _memory, engine) = guest(8 << 20);
        let (src, ms) = (EndpointId(0), EndpointId(1));
        let map = Arc::new(OwnerMap::new(&layout, Owner::Endpoint(src)));
        let total = layout.total_pages();
        assert_eq!(map.owned_by(src), total);
        let sink = OwnedSink::new(engine.clone(), map.clone(), src);
        // Pages 0..4 arrive from the source; 10 is a zero page.
        sink.install(Gfn(0), &vec![1u8; tsubame_pages::PAGE_BYTES * 4])
            .unwrap();
        map.set(Gfn(10), 1, Owner::Zero);
        assert_eq!(map.owned_by(src), total - 5);
        assert_eq!(map.count(Owner::Local), 4);
        assert_eq!(map.count(Owner::Zero), 1);
        // The source hands 0..16 over to a memserver: the local pages stay local (now "from"
        // the memserver, which holds a copy), the zero page stays zero.
        assert_eq!(map.hand_over(Gfn(0), 16, src, ms), 11);
        assert_eq!(map.owned_by(ms), 11);
        assert_eq!(map.owned_by(src), total - 16);
        assert_eq!(map.count(Owner::Local), 4);
        assert_eq!(map.get(Gfn(2)), Some(Owner::Local));
        assert_eq!(map.get(Gfn(10)), Some(Owner::Zero));
        assert_eq!(map.get(Gfn(12)), Some(Owner::Endpoint(ms)));
        let from_ms: u64 = map.all_installed_from(ms).iter().map(|r| r.pages).sum();
        assert_eq!(from_ms, 4);
        assert!(map.all_installed_from(src).is_empty());
        let owned: u64 = map
            .all_owned_runs(Owner::Endpoint(ms))
            .iter()
            .map(|r| r.pages)
            .sum();
        assert_eq!(owned, 11);
        // The source's late copy of a handed-over page is not installed.
        sink.install(Gfn(12), &[2u8; tsubame_pages::PAGE_BYTES])
            .unwrap();
        assert!(!engine.is_present(Gfn(12)));
        assert_eq!(sink.stats().pages_not_owned, 1);
    }

    #[test]
    fn runs_stay_whole_while_owners_change() {
        // A demand reply making pages local while the push looks at the same pages: every
        // run found has pages, whatever the timing (a run once came out empty).
        let layout = MemoryLayout::for_size(8 << 20).unwrap();
        let e0 = Owner::Endpoint(EndpointId(0));
        let map = Arc::new(OwnerMap::new(&layout, e0));
        let m = map.clone();
        let flipper = std::thread::spawn(move || {
            for round in 0..300u64 {
                for g in 0..2048u64 {
                    let o = if (g + round) % 3 == 0 {
                        Owner::Local
                    } else {
                        e0
                    };
                    m.set(Gfn(g), 1, o);
                }
            }
        });
        let mut looks = 0;
        while !flipper.is_finished() || looks == 0 {
            for r in map.owned_runs(Gfn(0), 2048, e0) {
                assert!(r.pages > 0, "{r:?}");
            }
            looks += 1;
        }
        flipper.join().unwrap();
    }

    #[test]
    fn a_run_with_a_local_page_is_still_moved_in_from_the_staging_pool() {
        let (layout, memory, engine) = guest(8 << 20);
        let pool = Arc::new(tsubame_uffd::StagingPool::new(64).unwrap());
        pool.prepare();
        engine.set_staging(pool);
        let e0 = EndpointId(0);
        let map = Arc::new(OwnerMap::new(&layout, Owner::Endpoint(e0)));
        let sink = OwnedSink::new(engine.clone(), map.clone(), e0);
        // A demand reply brought page 5; then the push sends 0..8.
        sink.install(Gfn(5), &[5u8; tsubame_pages::PAGE_BYTES])
            .unwrap();
        let mut scratch = Vec::new();
        let n = sink
            .receive(Gfn(0), 8, Delivery::Bulk, &mut scratch, &mut |b| {
                b.fill(9);
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 7);
        let s = engine.stats();
        assert_eq!((s.pages_moved, s.pages_copied), (7, 1), "moved, not copied");
        let mut b = [0u8; 1];
        memory.read(Gfn(5).gpa(), &mut b).unwrap();
        assert_eq!(b[0], 5, "the local page is kept");
        assert_eq!(sink.stats().pages_already_local, 1);
        assert_eq!(map.count(Owner::Local), 8);
        // A run with another owner's page in it goes the slow way, and skips that page.
        map.set(Gfn(20), 1, Owner::Endpoint(EndpointId(1)));
        let n = sink
            .receive(Gfn(16), 8, Delivery::Bulk, &mut scratch, &mut |b| {
                b.fill(7);
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 7);
        assert_eq!(sink.stats().pages_not_owned, 1);
        assert!(!engine.is_present(Gfn(20)));
    }
}
