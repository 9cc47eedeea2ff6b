//! Tsubame's page-owner seam: what every part that moves guest pages shares, and nothing of
//! KVM, userfaultfd or sockets.
//!
//! A VM's memory is a set of 4 KiB guest frames ([`Gfn`]) laid out in regions of guest-physical
//! memory ([`MemoryLayout`]). Per-page state (present, requested, sent, held) lives in
//! [`AtomicBitmap`]s indexed by *page index*, the frame's position in layout order; the layout
//! walks memory in [`PageRun`]s that never cross a region. Pages move from a [`PageStore`]
//! (something pages are read from) to a [`PageSink`] (something they are installed into):
//!
//! ```text
//!   PageStore ──read runs──► page server ══ TCP ══► page client ──receive──► PageSink
//!   (frozen source memory,   (tsubame-pageserver)   (tsubame-pageserver)     (fault engine,
//!    snapshot file,                                                           memserver store,
//!    memserver store)                                                         MemStore in tests)
//! ```
//!
//! [`MemStore`] is both a store and a sink, in memory.

mod addr;
mod bitmap;
mod layout;
mod memstore;
mod runs;
mod store;

pub use addr::{Gfn, Gpa};
pub use bitmap::AtomicBitmap;
pub use layout::{
    LayoutError, Location, MemoryLayout, PageRun, RegionLayout, HIGH_MEMORY_BASE, LOW_MEMORY_TOP,
    MAX_MEMORY, MIN_MEMORY, SPLIT_THRESHOLD,
};
pub use memstore::{Budget, Full, MemStore, MemUsage};
pub use runs::{for_each_page_run, for_each_page_run_hinted, gfn_runs, is_zero, take_run};
pub use store::{
    copy_run, receive_via, run_buffer, run_bytes, Delivery, PageError, PageSink, PageStore,
};

/// Size of a guest page: Tsubame tracks, moves and digests memory in 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a buffer length.
#[allow(clippy::cast_possible_truncation)] // 4096 fits every usize
pub const PAGE_BYTES: usize = PAGE_SIZE as usize;
