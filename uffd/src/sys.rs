//! The userfaultfd kernel interface (`include/uapi/linux/userfaultfd.h`), wrapped once: structs,
//! ioctl numbers, and one typed function per ioctl that turns errno into an outcome.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u8 = 0xAA;

/// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MOVE`: `UFFDIO_MOVE` is available (Linux 6.8).
pub const FEATURE_MOVE: u64 = 1 << 16;
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect mode on anonymous memory (Linux 5.7).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_WP`: writes to write-protected pages fault to the uffd.
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_COPY_MODE_DONTWAKE` (same bit for ZEROPAGE).
pub const MODE_DONTWAKE: u64 = 1;
/// `UFFDIO_COPY_MODE_WP`: the copied pages are installed write-protected.
pub const COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP` (protect; without it, un-protect).
pub const WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write to a write-protected page (not a missing page).
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault member of its union is decoded.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// pagefault.flags
    pub flags: u64,
    /// pagefault.address
    pub address: u64,
    /// pagefault.feat.ptid (with FEATURE_THREAD_ID), then padding
    pub ptid: u32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

nix::ioctl_readwrite!(uffdio_api, UFFDIO, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, UFFDIO, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_unregister, UFFDIO, 0x01, UffdioRange);
nix::ioctl_read!(uffdio_wake, UFFDIO, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, UFFDIO, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, UFFDIO, 0x04, UffdioZeropage);
nix::ioctl_readwrite!(uffdio_move, UFFDIO, 0x05, UffdioMove);
nix::ioctl_readwrite!(uffdio_writeprotect, UFFDIO, 0x06, UffdioWriteprotect);

/// Opens a userfaultfd through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`), which works without
/// `vm.unprivileged_userfaultfd` and is not limited to user-mode faults.
pub fn open_dev_userfaultfd() -> Result<OwnedFd, std::io::Error> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes an int of open flags and returns a new fd or -1; `dev`
    // is a valid open fd for the call's duration.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            nix::request_code_none!(UFFDIO, 0x00),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Result of `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    /// All bytes were installed.
    Installed,
    /// Some page in the range was already present (`EEXIST`): nothing was overwritten; the
    /// caller must still wake waiters.
    AlreadyPresent,
    /// The kernel installed `done` bytes and asks to retry the rest (`EAGAIN`: the mm changed
    /// under the copy).
    Partial { done: u64 },
}

fn outcome(r: Result<libc::c_int, Errno>, count: i64, len: u64) -> Result<InstallOutcome, Errno> {
    match r {
        Ok(_) => Ok(InstallOutcome::Installed),
        Err(Errno::EEXIST) => Ok(InstallOutcome::AlreadyPresent),
        Err(Errno::EAGAIN) => Ok(InstallOutcome::Partial {
            // `count` is bytes copied, or a negative errno when nothing was copied.
            done: u64::try_from(count).unwrap_or(0).min(len),
        }),
        Err(e) => Err(e),
    }
}

/// `UFFDIO_COPY`: copies `len` bytes from `src` to the registered range at `dst`.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes; `dst..dst+len` must lie in a range registered
/// on `fd` (the kernel checks the latter and fails with `ENOENT`/`EINVAL` otherwise).
/// With `protect`, the pages are installed write-protected (the range must be registered in
/// write-protect mode too): the first write to each faults to the uffd.
pub unsafe fn copy(
    fd: RawFd,
    dst: u64,
    src: *const u8,
    len: u64,
    wake: bool,
    protect: bool,
) -> Result<InstallOutcome, Errno> {
    let mut arg = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: if wake { 0 } else { MODE_DONTWAKE } | if protect { COPY_MODE_WP } else { 0 },
        copy: 0,
    };
    // SAFETY: arg is a valid uffdio_copy; the caller guarantees the source buffer.
    let r = unsafe { uffdio_copy(fd, &mut arg) };
    outcome(r, arg.copy, len)
}

/// `UFFDIO_ZEROPAGE`: maps zero pages over `dst..dst+len`.
pub fn zeropage(fd: RawFd, dst: u64, len: u64, wake: bool) -> Result<InstallOutcome, Errno> {
    let mut arg = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode: if wake { 0 } else { MODE_DONTWAKE },
        zeropage: 0,
    };
    // SAFETY: arg is a valid uffdio_zeropage; the kernel validates the range.
    let r = unsafe { uffdio_zeropage(fd, &mut arg) };
    outcome(r, arg.zeropage, len)
}

/// `UFFDIO_MOVE`: moves the pages at `src..src+len` (this process's own anonymous memory,
/// outside any registered range) to the registered range at `dst`, without copying them;
/// the source range is left unmapped.
///
/// # Safety
/// `src..src+len` must be memory of this process that nothing reads or writes any more: its
/// pages are taken away.
pub unsafe fn move_pages(
    fd: RawFd,
    dst: u64,
    src: u64,
    len: u64,
    wake: bool,
) -> Result<InstallOutcome, Errno> {
    let mut arg = UffdioMove {
        dst,
        src,
        len,
        mode: if wake { 0 } else { MODE_DONTWAKE },
        moved: 0,
    };
    // SAFETY: arg is a valid uffdio_move; the kernel validates both ranges, and the caller
    // gives up the source pages.
    let r = unsafe { uffdio_move(fd, &mut arg) };
    outcome(r, arg.moved, len)
}

/// `UFFDIO_WRITEPROTECT`: write-protects `start..start+len` (`protect`), or lifts the
/// protection and, unless `wake` is false, wakes the threads waiting on a write there (the
/// kernel refuses "don't wake" with protecting). The range must be registered in
/// write-protect mode; pages not present are left alone.
pub fn writeprotect(
    fd: RawFd,
    start: u64,
    len: u64,
    protect: bool,
    wake: bool,
) -> Result<(), Errno> {
    let mode = match (protect, wake) {
        (true, _) => WRITEPROTECT_MODE_WP,
        (false, true) => 0,
        (false, false) => WRITEPROTECT_MODE_DONTWAKE,
    };
    let mut arg = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    // SAFETY: arg is a valid uffdio_writeprotect; the kernel validates the range.
    unsafe { uffdio_writeprotect(fd, &mut arg) }.map(drop)
}

/// `UFFDIO_WAKE`: wakes threads waiting on faults in `start..start+len`.
pub fn wake(fd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: arg is a valid uffdio_range; the kernel validates it.
    unsafe { uffdio_wake(fd, &mut arg) }.map(drop)
}
