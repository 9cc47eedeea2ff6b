//! The KVM VM: `/dev/kvm`, the VM fd, one memory slot per guest-memory region, and the CPUID
//! every vCPU gets.
//!
//! No in-kernel irqchip: the built-in guest runs with interrupts off, and without an irqchip a
//! `hlt` exits to the VMM, which is how a broken guest stops.

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::{Gfn, GuestMemory};

/// Errors of creating a KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}; this host needs KVM (is the kvm module loaded, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrList(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG on memory slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot add memory slot {slot} (gpa {gpa:#x}, {size} bytes): {source}")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its guest memory registered.
#[derive(Debug)]
pub struct KvmVm {
    pub(crate) fd: VmFd,
    pub(crate) cpuid: CpuId,
    /// MSRs this KVM can save and restore (a subset of those the guest may use).
    pub(crate) msrs: Vec<u32>,
}

/// MSRs the built-in guest (or its CPU state) may depend on; saved with every vCPU.
const GUEST_MSRS: &[u32] = &[
    0x10,        // IA32_TIME_STAMP_COUNTER
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

impl KvmVm {
    /// Opens KVM, creates a VM and registers every region of `memory` as a memory slot.
    pub fn new(memory: &GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::Cpuid)?;
        let supported = kvm.get_msr_index_list().map_err(VmError::MsrList)?;
        let msrs = GUEST_MSRS
            .iter()
            .copied()
            .filter(|m| supported.as_slice().contains(m))
            .collect();
        let vm = Self { fd, cpuid, msrs };
        vm.set_slots(memory, 0)?;
        Ok(vm)
    }

    /// (Re)registers every region of `memory` as a memory slot with `flags`.
    fn set_slots(&self, memory: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, range) in memory.host_ranges().iter().enumerate() {
            let slot = u32::try_from(slot).expect("few regions");
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: range.layout.gpa.0,
                memory_size: range.layout.size,
                userspace_addr: range.hva.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which the caller keeps
            // alive as long as this VM (the Vm object owns both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    gpa: range.layout.gpa.0,
                    size: range.layout.size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Starts or stops KVM's dirty-page logging on all of guest memory. Exact for CPL3 writes on
    /// these hosts; used to record which pages a running guest writes.
    pub fn set_dirty_logging(&self, memory: &GuestMemory, on: bool) -> Result<(), VmError> {
        self.set_slots(memory, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The gfns written since logging started or since the last call (which resets the log).
    pub fn take_dirty_pages(&self, memory: &GuestMemory) -> Result<Vec<Gfn>, VmError> {
        let mut gfns = Vec::new();
        for (slot, range) in memory.host_ranges().iter().enumerate() {
            let slot = u32::try_from(slot).expect("few regions");
            let size = usize::try_from(range.layout.size).expect("slot size fits usize");
            let bitmap = self
                .fd
                .get_dirty_log(slot, size)
                .map_err(|source| VmError::DirtyLog { slot, source })?;
            for (w, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    gfns.push(range.layout.first_gfn() + (w as u64 * 64 + b));
                    bits &= bits - 1;
                }
            }
        }
        Ok(gfns)
    }
}
