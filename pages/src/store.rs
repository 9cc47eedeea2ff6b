//! The two sides of moving pages: a [`PageStore`] reads runs of pages (the source's memory
//! frozen at switchover, a snapshot file, a memserver's store, an old destination's present
//! pages) and a [`PageSink`] installs them (the fault engine, a memserver, a store under test).
//! A page server is generic over a store, a page client feeds a sink; [`MemStore`] is both, in
//! memory, for tests and for processes that hold pages for others.
//!
//! What a sink does with a page it already has is its own rule: the fault engine keeps it (a
//! present page is the guest's own and may have been written since: installing never
//! overwrites it), a store replaces it (the sender has the newer copy).

use std::io;
use std::sync::RwLock;

use crate::{is_zero, AtomicBitmap, Gfn, MemoryLayout, PAGE_BYTES, PAGE_SIZE};

/// Why pages could not be read or installed.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("gfn {gfn} (+{pages} pages) is outside this VM's memory or crosses a region's end")]
    OutOfRange { gfn: Gfn, pages: u64 },
    #[error("page data of {len} bytes is not a whole number of 4 KiB pages")]
    Unaligned { len: usize },
    #[error("page {gfn} is not held here: its owner is elsewhere")]
    Absent { gfn: Gfn },
    /// Reading the pages' data (from a connection, say) failed before they could be installed.
    #[error("receiving page data failed: {0}")]
    Payload(#[source] io::Error),
    /// The store's or sink's own machinery failed (a file read, an ioctl).
    #[error("{what}: {source}")]
    Backend {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl PageError {
    /// A failure of the store's or sink's machinery while doing `what`.
    pub fn backend(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// How received pages arrive at a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A reply to a demand request: a vCPU is waiting for it.
    Demand,
    /// The background stream (prepaging, precopy rounds, a write-back).
    Bulk,
}

/// Something pages can be read from.
pub trait PageStore: Send + Sync {
    /// The memory the store holds pages of (frames outside it are errors).
    fn layout(&self) -> &MemoryLayout;

    /// Reads the `pages` pages from `gfn` (inside one region of the layout): a slice of memory
    /// the store holds and that does not change while it is borrowed (no copy), or of
    /// `scratch`, filled.
    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError>;

    /// Fills `zero` with one entry per page of `[gfn, gfn + pages)`, true for a page the store
    /// knows to be zero without reading it (a sender then sends a zero marker without touching
    /// the page), or leaves it empty when it knows nothing (the default).
    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        let _ = (gfn, pages);
        zero.clear();
        Ok(())
    }

    /// Releases `[gfn, gfn + pages)` (inside one region): the receiver of these pages holds
    /// them, and the store needs them no more, so it may free their memory (a page server in
    /// release mode, see `tsubame_pageserver::server`). What a released page reads as
    /// afterwards is the store's own business: the caller never reads it again. The default
    /// keeps the pages.
    ///
    /// # Safety
    /// No slice that [`Self::read`] returned over these pages may be alive, and none may be
    /// taken until this returns: a store that hands out its own memory frees it here.
    unsafe fn release(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        let _ = (gfn, pages);
        Ok(())
    }
}

/// Something pages can be installed into.
pub trait PageSink: Send + Sync {
    /// Installs `data` (whole pages) at `gfn` and the frames after it (inside one region);
    /// returns the pages installed (a page the sink keeps, see the module docs, is not).
    fn install(&self, gfn: Gfn, data: &[u8]) -> Result<u64, PageError>;

    /// Installs `pages` zero pages from `gfn`.
    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError>;

    /// Drops the sink's copies of `[gfn, gfn + pages)`: they went stale, and the next need of
    /// them fetches them again.
    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError>;

    /// Whether every page of `[gfn, gfn + pages)` is installed here (`None`: the sink cannot
    /// tell, the default). A page client asks when a server says it released pages this side
    /// acknowledged: they had better be here.
    fn all_installed(&self, gfn: Gfn, pages: u64) -> Option<bool> {
        let _ = (gfn, pages);
        None
    }

    /// Installs `pages` pages at `gfn` whose data `fill` writes into the buffer it is given
    /// (reading them off a connection, say): a sink may hand out memory it can install from
    /// without another copy. The default fills `scratch` and installs from it. A failure of
    /// `fill` is a [`PageError::Payload`].
    fn receive(
        &self,
        gfn: Gfn,
        pages: u64,
        delivery: Delivery,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> Result<u64, PageError> {
        let _ = delivery;
        receive_via(self, gfn, pages, scratch, fill)
    }
}

/// The bytes of `pages` pages, as a buffer length.
pub fn run_bytes(gfn: Gfn, pages: u64) -> Result<usize, PageError> {
    pages
        .checked_mul(PAGE_SIZE)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or(PageError::OutOfRange { gfn, pages })
}

/// `scratch` sized for the `pages` pages from `gfn` (reusing its memory): the buffer a store
/// reads a run into, or a sink receives one into.
pub fn run_buffer(scratch: &mut Vec<u8>, gfn: Gfn, pages: u64) -> Result<&mut [u8], PageError> {
    let len = run_bytes(gfn, pages)?;
    scratch.resize(len, 0);
    Ok(&mut scratch[..len])
}

/// [`PageSink::receive`] the plain way: `fill` writes the pages into `scratch`, and `sink`
/// installs them from there.
pub fn receive_via(
    sink: &(impl PageSink + ?Sized),
    gfn: Gfn,
    pages: u64,
    scratch: &mut Vec<u8>,
    fill: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
) -> Result<u64, PageError> {
    let buf = run_buffer(scratch, gfn, pages)?;
    fill(buf).map_err(PageError::Payload)?;
    sink.install(gfn, buf)
}

impl<T: PageStore + ?Sized> PageStore for std::sync::Arc<T> {
    fn layout(&self) -> &MemoryLayout {
        (**self).layout()
    }
    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError> {
        (**self).read(gfn, pages, scratch)
    }
    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        (**self).known_zero(gfn, pages, zero)
    }
    unsafe fn release(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { (**self).release(gfn, pages) }
    }
}

/// Reads `[gfn, gfn + pages)` from `store` and installs it into `sink`: zero runs as zero
/// pages, each data run with one install. Returns the pages the sink installed.
pub fn copy_run(
    store: &dyn PageStore,
    sink: &dyn PageSink,
    gfn: Gfn,
    pages: u64,
    scratch: &mut Vec<u8>,
) -> Result<u64, PageError> {
    let mut zero = Vec::new();
    store.known_zero(gfn, pages, &mut zero)?;
    let data = store.read(gfn, pages, scratch)?;
    let mut installed = 0;
    crate::for_each_page_run_hinted(
        data,
        |_| true,
        |k| zero.get(k) == Some(&true),
        |a, b, z| {
            let at = gfn + a as u64;
            installed += if z {
                sink.install_zero(at, (b - a) as u64)?
            } else {
                sink.install(at, &data[a * PAGE_BYTES..b * PAGE_BYTES])?
            };
            Ok(())
        },
    )?;
    Ok(installed)
}

/// Pages per chunk of a [`MemStore`] (2 MiB).
const CHUNK_PAGES: u64 = 512;

/// Pages held in memory, for a VM of a given layout: a [`PageStore`] and a [`PageSink`] at
/// once. A page is *held* once installed (as data or as zero) until forgotten; reading a page
/// that is not held fails ([`PageError::Absent`]): the store never makes up a zero page for a
/// page it was not given. Data lives in 2 MiB chunks, allocated when the first non-zero page of
/// one arrives; zero pages take no memory of their own.
#[derive(Debug)]
pub struct MemStore {
    layout: MemoryLayout,
    held: AtomicBitmap,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl MemStore {
    /// An empty store for memory of this layout.
    pub fn new(layout: &MemoryLayout) -> Self {
        let chunks = layout.total_pages().div_ceil(CHUNK_PAGES);
        Self {
            layout: layout.clone(),
            held: AtomicBitmap::new(layout.total_pages()),
            chunks: (0..chunks).map(|_| RwLock::new(None)).collect(),
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

    /// Bytes of page data allocated (whole chunks).
    pub fn bytes_allocated(&self) -> u64 {
        let allocated = self
            .chunks
            .iter()
            .filter(|c| c.read().expect("store lock").is_some())
            .count();
        allocated as u64 * CHUNK_PAGES * PAGE_SIZE
    }

    fn index_of(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        self.layout
            .locate(gfn, pages)
            .map(|l| l.index)
            .ok_or(PageError::OutOfRange { gfn, pages })
    }

    /// Calls `f(chunk, page within chunk, page within the run)` for each page of the run at
    /// page index `index`.
    fn each_page(&self, index: u64, pages: u64, mut f: impl FnMut(usize, usize, usize)) {
        for k in 0..pages {
            let i = index + k;
            let chunk = usize::try_from(i / CHUNK_PAGES).expect("chunk index");
            let within = usize::try_from(i % CHUNK_PAGES).expect("page index");
            f(chunk, within, usize::try_from(k).expect("page index"));
        }
    }
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
        self.each_page(index, pages, |chunk, within, k| {
            let page = &mut buf[k * PAGE_BYTES..(k + 1) * PAGE_BYTES];
            match self.chunks[chunk].read().expect("store lock").as_deref() {
                Some(data) => {
                    page.copy_from_slice(&data[within * PAGE_BYTES..(within + 1) * PAGE_BYTES]);
                }
                None => page.fill(0),
            }
        });
        Ok(buf)
    }

    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        let index = self.index_of(gfn, pages)?;
        zero.clear();
        self.each_page(index, pages, |chunk, _, _| {
            zero.push(self.chunks[chunk].read().expect("store lock").is_none());
        });
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
        self.each_page(index, pages, |chunk, within, k| {
            let page = &data[k * PAGE_BYTES..(k + 1) * PAGE_BYTES];
            let mut c = self.chunks[chunk].write().expect("store lock");
            if c.is_none() && is_zero(page) {
                return; // reads as zero already
            }
            let bytes = c.get_or_insert_with(|| {
                vec![0u8; usize::try_from(CHUNK_PAGES * PAGE_SIZE).expect("chunk")]
                    .into_boxed_slice()
            });
            bytes[within * PAGE_BYTES..(within + 1) * PAGE_BYTES].copy_from_slice(page);
        });
        self.held.set_range(index, pages);
        Ok(pages)
    }

    fn install_zero(&self, gfn: Gfn, pages: u64) -> Result<u64, PageError> {
        let index = self.index_of(gfn, pages)?;
        self.each_page(index, pages, |chunk, within, _| {
            if let Some(bytes) = self.chunks[chunk]
                .write()
                .expect("store lock")
                .as_deref_mut()
            {
                bytes[within * PAGE_BYTES..(within + 1) * PAGE_BYTES].fill(0);
            }
        });
        self.held.set_range(index, pages);
        Ok(pages)
    }

    fn forget(&self, gfn: Gfn, pages: u64) -> Result<(), PageError> {
        let index = self.index_of(gfn, pages)?;
        self.held.clear_range(index, pages);
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
            s.bytes_allocated(),
            2 << 20,
            "one chunk: zero pages take none"
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
    fn copy_run_moves_zero_and_data_runs_between_stores() {
        let layout = MemoryLayout::for_size(16 << 20).unwrap();
        let (from, to) = (MemStore::new(&layout), MemStore::new(&layout));
        let mut data = page(0);
        data.extend(page(7));
        data.extend(page(0));
        from.install(Gfn(100), &data).unwrap();
        let mut scratch = Vec::new();
        assert_eq!(copy_run(&from, &to, Gfn(100), 3, &mut scratch).unwrap(), 3);
        assert_eq!(to.read(Gfn(100), 3, &mut scratch).unwrap(), &data[..]);
        assert!(
            copy_run(&from, &to, Gfn(99), 2, &mut scratch).is_err(),
            "99 is absent"
        );
    }

    #[test]
    fn receive_fills_the_buffer_then_installs() {
        let layout = MemoryLayout::for_size(16 << 20).unwrap();
        let s = MemStore::new(&layout);
        let mut scratch = Vec::new();
        let n = s
            .receive(Gfn(3), 2, Delivery::Bulk, &mut scratch, &mut |b| {
                b.fill(4);
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            s.read(Gfn(3), 2, &mut scratch).unwrap(),
            &[4u8; 2 * PAGE_BYTES][..]
        );
        let failed = s.receive(Gfn(9), 1, Delivery::Demand, &mut scratch, &mut |_| {
            Err(io::ErrorKind::UnexpectedEof.into())
        });
        assert!(matches!(failed, Err(PageError::Payload(_))));
        assert!(!s.holds(Gfn(9)), "nothing installed from a failed read");
    }
}
