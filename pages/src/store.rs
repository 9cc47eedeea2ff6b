//! The two sides of moving pages: a [`PageStore`] reads runs of pages (the source's memory
//! frozen at switchover, a snapshot file, a memserver's store, an old destination's present
//! pages) and a [`PageSink`] installs them (the fault engine, a memserver, a store under test).
//! A page server is generic over a store, a page client feeds a sink; [`crate::MemStore`] is
//! both, in memory, for tests and for processes that hold pages for others (a memserver).
//!
//! What a sink does with a page it already has is its own rule: the fault engine keeps it (a
//! present page is the guest's own and may have been written since: installing never
//! overwrites it), a store replaces it (the sender has the newer copy).

use crate::{Gfn, MemoryLayout, PAGE_BYTES, PAGE_SIZE};
use std::io;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
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
