//! Running the built-in guest under QEMU (filled in by the QEMU work; see tests/tests/qemu.rs).
