//! The QEMU peer Tsubame is measured against.
//!
//! Tsubame's benchmarks and tests compare it with QEMU running the very same built-in guest
//! (the image, config block and memory layout of [`tsubame_vmm::guest`]). This crate holds that
//! harness, so that the VMM crate contains no QEMU code:
//!
//! - [`guest`]: running the built-in guest under QEMU (`qemu-system-x86_64 -kernel`): finding
//!   the binary, the config block and memory map QEMU gives it, a run to completion;
//! - [`migration`]: one QEMU migration of the built-in guest (postcopy, precopy, ...) driven
//!   over QMP and measured, and the memory digests that compare its outcome with a Tsubame VM's;
//! - [`hoststat`]: the host's steal time from `/proc/stat`, recorded beside benchmark figures
//!   as a measure of their noise.
//!
//! Only `tools/` (`tsubame bench`, `tsubame check --qemu`, `tsubame guest-image`) and `tests/`
//! use it; the VMM itself does not depend on it.

pub mod guest;
pub mod hoststat;
pub mod migration;
