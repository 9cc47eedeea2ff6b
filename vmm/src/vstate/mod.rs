//! KVM state in one place: the VM (`vm.rs`: KVM handle, memory slots, CPUID) and its vCPUs
//! (`vcpu.rs`: one thread each, pause/resume/save/restore from any thread).

pub mod vcpu;
pub mod vm;

mod hex;
pub use hex::HexBytes;
