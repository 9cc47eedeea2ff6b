//! Tsubame's userfaultfd fault engine: guest RAM registered in missing mode, faults read on a
//! dedicated thread, pages installed with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`. It knows nothing of
//! KVM or sockets: it sees the regions of a guest's memory layout mapped at host addresses, asks
//! a [`Fetcher`] for missing pages, and is the [`PageSink`](tsubame_pages::PageSink) they are
//! installed into.
//!
//! ```text
//!  vCPU / KVM touches a missing page ─► kernel queues a fault on the uffd, the thread sleeps
//!  fault thread: read fault ─► gfn ─► already present? wake : first request? fetcher.request(gfn)
//!  the fetcher (now; after the batch, in `flush` on this thread; or from a network thread)
//!     ─► engine.install(gfn, data) ─► UFFDIO_COPY
//!     (wakes the faulting thread; EEXIST means another install won: still wake)
//! ```
//!
//! Pages can also be *moved* in (`UFFDIO_MOVE`) from a [`StagingPool`] of memory faulted in
//! ahead of time: a receiver reads a page batch straight into a pool slot, and installing it
//! neither allocates nor copies ([`FaultEngine::install_staged`]; the engine's
//! [`PageSink::receive`](tsubame_pages::PageSink::receive) does it for bulk pages).
//!
//! Requests are deduplicated with a "requested" bitmap; a "present" bitmap records installed
//! pages. Installing never overwrites a page that is already there (userfaultfd semantics), so a
//! background push racing a demand fetch is harmless. Fail closed: if fetching fails, the
//! faulting thread keeps waiting and the error is recorded ([`FaultEngine::fetch_error`]);
//! a page is never silently made zero.
//!
//! The ioctls are wrapped here with nix ([`sys`]) rather than through the `userfaultfd` crate:
//! its bindgen build needs libclang on every build machine, and it reports `EAGAIN` from
//! `UFFDIO_COPY` as a huge partial copy.

mod engine;
pub mod staging;
pub mod sys;

pub use engine::{FaultEngine, FaultStats, FetchError, Fetcher, LatencyHistogram};
pub use staging::{StagingPool, StagingSlot};
pub use sys::InstallOutcome;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use tsubame_pages::{Gfn, PageError, PAGE_SIZE};

/// Errors of the fault engine.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot open /dev/userfaultfd: {0}; run as root or give this user access to /dev/userfaultfd")]
    Open(std::io::Error),
    #[error("UFFDIO_API handshake failed: {0}; this kernel's userfaultfd is too old")]
    Api(Errno),
    #[error("this kernel's userfaultfd lacks features {missing:#x} that Tsubame needs")]
    Features { missing: u64 },
    #[error("cannot register {len:#x} bytes at {start:#x} with userfaultfd: {source}")]
    Register { start: u64, len: u64, source: Errno },
    #[error("UFFDIO_COPY of {len} bytes to gfn {gfn} failed: {source}")]
    Copy { gfn: Gfn, len: u64, source: Errno },
    #[error("UFFDIO_MOVE of {len} bytes to gfn {gfn} failed: {source}")]
    Move { gfn: Gfn, len: u64, source: Errno },
    #[error("cannot map a staging area of {bytes} bytes: {source}")]
    Staging { bytes: u64, source: Errno },
    #[error("UFFDIO_ZEROPAGE of {len} bytes at gfn {gfn} failed: {source}")]
    Zero { gfn: Gfn, len: u64, source: Errno },
    #[error("cannot drop the stale pages at gfn {gfn} (+{pages}): {source}")]
    Discard { gfn: Gfn, pages: u64, source: Errno },
    #[error("UFFDIO_WRITEPROTECT of gfn {gfn} (+{pages} pages) failed: {source}")]
    WriteProtect { gfn: Gfn, pages: u64, source: Errno },
    #[error("UFFDIO_WAKE at gfn {gfn} failed: {source}")]
    Wake { gfn: Gfn, source: Errno },
    #[error("gfn {gfn} (+{pages} pages) is outside the registered guest memory")]
    OutOfRange { gfn: Gfn, pages: u64 },
    #[error("page data of {len} bytes is not a whole number of 4 KiB pages")]
    Unaligned { len: usize },
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
    #[error("cannot start the fault thread: {0}")]
    Thread(std::io::Error),
}

impl From<UffdError> for PageError {
    fn from(e: UffdError) -> Self {
        match e {
            UffdError::OutOfRange { gfn, pages } => PageError::OutOfRange { gfn, pages },
            UffdError::Unaligned { len } => PageError::Unaligned { len },
            e => PageError::backend("userfaultfd", e),
        }
    }
}

/// A userfaultfd, opened for kernel-mode faults too (KVM touches guest RAM from the kernel).
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    can_move: bool,
    can_write_protect: bool,
}

impl Userfaultfd {
    /// Opens a userfaultfd and negotiates the API (with fault thread ids).
    pub fn new() -> Result<Self, UffdError> {
        // With `UFFDIO_MOVE` (6.8+) and write-protect mode (5.7+) where the kernel has them;
        // the API handshake happens once per fd, so a kernel without them gets a fresh fd and
        // the required features only.
        let optional = sys::FEATURE_MOVE | sys::FEATURE_PAGEFAULT_FLAG_WP;
        match Self::with_features(sys::FEATURE_THREAD_ID | optional) {
            Err(UffdError::Api(_) | UffdError::Features { .. }) => {
                Self::with_features(sys::FEATURE_THREAD_ID)
            }
            r => r,
        }
    }

    fn with_features(features: u64) -> Result<Self, UffdError> {
        let fd = sys::open_dev_userfaultfd().map_err(UffdError::Open)?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: api is a valid uffdio_api for the UFFDIO_API ioctl on a fresh uffd.
        unsafe { sys::uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(UffdError::Api)?;
        let missing = features & !api.features;
        if missing != 0 {
            return Err(UffdError::Features { missing });
        }
        Ok(Self {
            fd,
            can_move: api.features & sys::FEATURE_MOVE != 0,
            can_write_protect: api.features & sys::FEATURE_PAGEFAULT_FLAG_WP != 0,
        })
    }

    /// Whether ranges can be registered in write-protect mode too.
    pub fn can_write_protect(&self) -> bool {
        self.can_write_protect
    }

    /// Whether pages can be moved in (`UFFDIO_MOVE`) rather than copied.
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Registers `[start, start + len)` (page-aligned host addresses) in missing mode.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.register(start, len, sys::REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start + len)` in missing and write-protect modes: a write to a page
    /// write-protected with [`sys::writeprotect`] (or installed so) faults here too.
    pub fn register_missing_wp(&self, start: u64, len: u64) -> Result<(), UffdError> {
        if !self.can_write_protect {
            return Err(UffdError::Features {
                missing: sys::FEATURE_PAGEFAULT_FLAG_WP,
            });
        }
        self.register(
            start,
            len,
            sys::REGISTER_MODE_MISSING | sys::REGISTER_MODE_WP,
        )
    }

    fn register(&self, start: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: reg is a valid uffdio_register; the kernel checks the range is mapped.
        unsafe { sys::uffdio_register(self.fd.as_raw_fd(), &mut reg) }
            .map(drop)
            .map_err(|source| UffdError::Register { start, len, source })
    }

    /// The raw fd (for polling).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every queued fault (non-blocking) into `out`; returns how many were read.
    pub fn read_faults(&self, out: &mut Vec<sys::UffdMsg>) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        let mut buf = [sys::UffdMsg::default(); BATCH];
        let mut total = 0;
        loop {
            let bytes = std::mem::size_of_val(&buf);
            // SAFETY: buf is a writable array of plain-old-data messages of `bytes` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if n < 0 {
                match Errno::last() {
                    Errno::EAGAIN => return Ok(total),
                    Errno::EINTR => continue,
                    e => return Err(UffdError::Read(e)),
                }
            }
            let count = usize::try_from(n).unwrap_or(0) / std::mem::size_of::<sys::UffdMsg>();
            out.extend_from_slice(&buf[..count]);
            total += count;
            if count < BATCH {
                return Ok(total);
            }
        }
    }
}
