//! The KVM VM: `/dev/kvm`, the VM fd, one memory slot per guest-memory region, and the CPUID
//! every vCPU gets.
//!
//! No in-kernel irqchip: the built-in guest runs with interrupts off, and without an irqchip a
//! `hlt` exits to the VMM, which is how a broken guest stops.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region, CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
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
    #[error("KVM_CLEAR_DIRTY_LOG on memory slot {slot} failed: {source}")]
    ClearDirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("enabling KVM's manual dirty-log protection failed: {0}")]
    ManualDirtyProtect(kvm_ioctls::Error),
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
    /// Reading the dirty log leaves it as it is (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    manual_dirty_protect: AtomicBool,
}

/// One memory slot's dirty log: bit `b` of word `w` is page `first_gfn + 64 w + b`.
#[derive(Clone, Debug)]
pub struct SlotDirtyLog {
    pub slot: u32,
    pub first_gfn: Gfn,
    pub pages: u64,
    pub words: Vec<u64>,
}

impl SlotDirtyLog {
    /// The gfns whose bits are set, in order.
    pub fn gfns(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.words.iter().enumerate().flat_map(move |(w, word)| {
            let mut bits = *word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    self.first_gfn + (w as u64 * 64 + b)
                })
            })
        })
    }
}

nix::ioctl_readwrite!(kvm_clear_dirty_log_ioctl, 0xAE, 0xc0, kvm_clear_dirty_log);

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
        let vm = Self {
            fd,
            cpuid,
            msrs,
            manual_dirty_protect: AtomicBool::new(false),
        };
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

    /// The gfns written since logging started or since the last call (which resets the log,
    /// also with manual protection: what it returns is cleared).
    pub fn take_dirty_pages(&self, memory: &GuestMemory) -> Result<Vec<Gfn>, VmError> {
        let log = self.dirty_log(memory)?;
        if self.manual_dirty_protect.load(Ordering::Acquire) {
            self.clear_dirty_log(&log)?;
        }
        Ok(log.iter().flat_map(SlotDirtyLog::gfns).collect())
    }

    /// Switches the dirty log to manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, Linux
    /// 5.8+): [`Self::dirty_log`] then only reads the log, and a page's bit stays set, and the
    /// page writable, until [`Self::clear_dirty_log`] clears it and write-protects the page
    /// again. Without it every read write-protects every page it returns, so a reader that
    /// polls costs the guest a write fault per page it keeps writing, per read. Returns
    /// whether this KVM has it (if not, nothing changes).
    pub fn enable_manual_dirty_protect(&self) -> Result<bool, VmError> {
        let cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        // The answer is the set of flags this KVM accepts (ENABLE, INITIALLY_SET).
        let supported = self.fd.check_extension_raw(libc::c_ulong::from(cap));
        let enable_flag = i32::try_from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).expect("a flag");
        if supported & enable_flag == 0 {
            return Ok(false);
        }
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        self.fd
            .enable_cap(&enable)
            .map_err(VmError::ManualDirtyProtect)?;
        self.manual_dirty_protect.store(true, Ordering::Release);
        Ok(true)
    }

    /// Reads every slot's dirty log: with manual protection only reads it, otherwise (like
    /// [`Self::take_dirty_pages`]) also resets it and write-protects the pages returned.
    pub fn dirty_log(&self, memory: &GuestMemory) -> Result<Vec<SlotDirtyLog>, VmError> {
        let mut out = Vec::new();
        for (slot, range) in memory.host_ranges().iter().enumerate() {
            let slot = u32::try_from(slot).expect("few regions");
            let size = usize::try_from(range.layout.size).expect("slot size fits usize");
            let words = self
                .fd
                .get_dirty_log(slot, size)
                .map_err(|source| VmError::DirtyLog { slot, source })?;
            out.push(SlotDirtyLog {
                slot,
                first_gfn: range.layout.first_gfn(),
                pages: range.layout.pages(),
                words,
            });
        }
        Ok(out)
    }

    /// With manual protection: clears the bits set in `log` (a slot's whole log each) and
    /// write-protects those pages, so that the guest's next write to each sets its bit again.
    /// The guest pays one write fault per such page that it writes again.
    pub fn clear_dirty_log(&self, log: &[SlotDirtyLog]) -> Result<(), VmError> {
        for s in log.iter().filter(|s| s.words.iter().any(|w| *w != 0)) {
            let mut clear = kvm_clear_dirty_log {
                slot: s.slot,
                // The whole slot: `first_page` 0 is 64-aligned, and a count that is not a
                // multiple of 64 is allowed when it ends at the slot's end.
                num_pages: u32::try_from(s.pages).expect("slot pages fit u32"),
                first_page: 0,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: s.words.as_ptr().cast_mut().cast(),
                },
            };
            assert!(s.words.len() as u64 * 64 >= s.pages, "a bit per page");
            // SAFETY: `clear` is a valid `kvm_clear_dirty_log` whose bitmap points at
            // `s.words`, at least one bit per page of the slot and alive for the call; KVM only
            // reads the bitmap (the ioctl's write direction covers the struct, not the bitmap).
            unsafe {
                kvm_clear_dirty_log_ioctl(std::os::fd::AsRawFd::as_raw_fd(&self.fd), &mut clear)
            }
            .map_err(|e| VmError::ClearDirtyLog {
                slot: s.slot,
                source: kvm_ioctls::Error::new(e as i32),
            })?;
        }
        Ok(())
    }
}
