//! vCPUs: each runs `KVM_RUN` on its own named thread (`vcpu0`, `vcpu1`, ...) and obeys requests
//! (pause, resume, save, restore, exit) sent from any other thread.
//!
//! Kicking a vCPU out of `KVM_RUN` (the Firecracker scheme): the requester queues the request,
//! then sends [`kick_signal`] to the thread. The signal handler sets `immediate_exit` in that
//! thread's `kvm_run`, so a kick that lands just before `KVM_RUN` is not lost: KVM returns `EINTR`
//! at once instead of entering the guest. The thread then clears `immediate_exit` and drains its
//! requests. Before a vCPU pauses or parks it completes any pending port-I/O exit (one `KVM_RUN`
//! with `immediate_exit` set), so saved state never sits in the middle of an `out`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender, TryRecvError};
use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, kvm_xcr, kvm_xcrs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use super::vm::KvmVm;
use super::HexBytes;
use crate::devices::{Devices, ExitAction, ParkReason};

/// Errors of vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {op} failed: {source}")]
    Kvm {
        index: usize,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: saved state does not fit this KVM: {why}")]
    BadState { index: usize, why: String },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn {
        index: usize,
        source: std::io::Error,
    },
    #[error("vCPU {index} thread is gone (it panicked or exited)")]
    Gone { index: usize },
}

/// What a vCPU thread is doing, as others see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Waiting for `resume` (vCPUs start paused).
    Paused,
    /// Inside or around `KVM_RUN`.
    Running,
    /// Stopped by the guest (finished, verify error, exception, triple fault); see the devices.
    Parked,
}

impl RunState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Paused,
            1 => Self::Running,
            _ => Self::Parked,
        }
    }
}

/// One segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    #[serde(rename = "type")]
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl From<kvm_segment> for Segment {
    fn from(s: kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<Segment> for kvm_segment {
    fn from(s: Segment) -> Self {
        kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

/// General-purpose registers, by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

macro_rules! regs_conv {
    ($($r:ident),*) => {
        impl From<kvm_regs> for Regs {
            fn from(k: kvm_regs) -> Self { Self { $($r: k.$r),* } }
        }
        impl From<Regs> for kvm_regs {
            fn from(r: Regs) -> Self { kvm_regs { $($r: r.$r),* } }
        }
    };
}
regs_conv!(
    rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags
);

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment and control registers, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<kvm_sregs> for Sregs {
    fn from(k: kvm_sregs) -> Self {
        Self {
            cs: k.cs.into(),
            ds: k.ds.into(),
            es: k.es.into(),
            fs: k.fs.into(),
            gs: k.gs.into(),
            ss: k.ss.into(),
            tr: k.tr.into(),
            ldt: k.ldt.into(),
            gdt: DescriptorTable {
                base: k.gdt.base,
                limit: k.gdt.limit,
            },
            idt: DescriptorTable {
                base: k.idt.base,
                limit: k.idt.limit,
            },
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }
}

impl Sregs {
    fn apply(&self, k: &mut kvm_sregs) {
        k.cs = self.cs.into();
        k.ds = self.ds.into();
        k.es = self.es.into();
        k.fs = self.fs.into();
        k.gs = self.gs.into();
        k.ss = self.ss.into();
        k.tr = self.tr.into();
        k.ldt = self.ldt.into();
        k.gdt.base = self.gdt.base;
        k.gdt.limit = self.gdt.limit;
        k.idt.base = self.idt.base;
        k.idt.limit = self.idt.limit;
        k.cr0 = self.cr0;
        k.cr2 = self.cr2;
        k.cr3 = self.cr3;
        k.cr4 = self.cr4;
        k.cr8 = self.cr8;
        k.efer = self.efer;
        k.apic_base = self.apic_base;
        k.interrupt_bitmap = self.interrupt_bitmap;
    }
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// Everything needed to continue a vCPU exactly where it stopped, in another process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: usize,
    pub regs: Regs,
    pub sregs: Sregs,
    /// `struct kvm_xsave`: x87, SSE and AVX state.
    pub xsave: HexBytes,
    pub xcrs: Vec<Msr>,
    pub msrs: Vec<Msr>,
    /// `struct kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMM state.
    pub events: HexBytes,
    pub mp_state: u32,
}

/// A vCPU fd with its index.
#[derive(Debug)]
pub(crate) struct Vcpu {
    index: usize,
    fd: VcpuFd,
    msr_indices: Vec<u32>,
}

/// The boot state of a vCPU: 32-bit protected mode, flat segments, paging off, as multiboot
/// prescribes. Only general registers differ between vCPUs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BootRegs {
    pub rip: u64,
    pub rax: u64,
    pub rbx: u64,
}

impl Vcpu {
    pub(crate) fn new(vm: &KvmVm, index: usize) -> Result<Self, VcpuError> {
        let kvm_err = |op, source| VcpuError::Kvm { index, op, source };
        let fd = vm
            .fd
            .create_vcpu(index as u64)
            .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
        let mut cpuid = vm.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            // Initial APIC ID: leaf 1 EBX[31:24], and leaf 0xB EDX (x2APIC ID).
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((u32::try_from(index).unwrap_or(0) & 0xff) << 24);
            }
            if e.function == 0xb {
                e.edx = u32::try_from(index).unwrap_or(u32::MAX);
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(|e| kvm_err("KVM_SET_CPUID2", e))?;
        Ok(Self {
            index,
            fd,
            msr_indices: vm.msrs.clone(),
        })
    }

    fn err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm { index, op, source }
    }

    /// Puts the vCPU in the multiboot entry state.
    pub(crate) fn set_boot_state(&self, boot: BootRegs) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x18,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 = 0x11; // PE | ET
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: boot.rip,
            rax: boot.rax,
            rbx: boot.rbx,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(self.err("KVM_SET_REGS"))
    }

    /// Lets KVM finish a pending port-I/O exit without entering the guest again.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run(); // EINTR once any pending I/O is completed
        self.fd.set_kvm_immediate_exit(0);
    }

    fn save(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_pending_io();
        let regs = self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(self.err("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(self.err("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.err("KVM_GET_MP_STATE"))?;
        let entries: Vec<_> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState {
            index: self.index,
            why: format!("MSR list: {e:?}"),
        })?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            index: self.index,
            regs: regs.into(),
            sregs: sregs.into(),
            xsave: HexBytes(xsave.as_bytes().to_vec()),
            xcrs: xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
                .iter()
                .map(|x| Msr {
                    index: x.xcr,
                    data: x.value,
                })
                .collect(),
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| Msr {
                    index: e.index,
                    data: e.data,
                })
                .collect(),
            events: HexBytes(events.as_bytes().to_vec()),
            mp_state: mp_state.mp_state,
        })
    }

    fn restore(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        let bad = |why: String| VcpuError::BadState {
            index: self.index,
            why,
        };
        let mut sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        s.sregs.apply(&mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&s.regs.into())
            .map_err(self.err("KVM_SET_REGS"))?;
        let xsave = kvm_bindings::kvm_xsave::read_from_bytes(&s.xsave.0)
            .map_err(|_| bad(format!("xsave area of {} bytes", s.xsave.0.len())))?;
        // SAFETY: the buffer is a full `struct kvm_xsave` (read_from_bytes checked its size);
        // KVM validates the content and rejects features this host lacks.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(self.err("KVM_SET_XSAVE"))?;
        let mut xcrs = kvm_xcrs::default();
        if s.xcrs.len() > xcrs.xcrs.len() {
            return Err(bad(format!("{} XCRs", s.xcrs.len())));
        }
        for (slot, x) in xcrs.xcrs.iter_mut().zip(&s.xcrs) {
            *slot = kvm_xcr {
                xcr: x.index,
                value: x.data,
                reserved: 0,
            };
        }
        xcrs.nr_xcrs = u32::try_from(s.xcrs.len()).expect("checked above");
        self.fd.set_xcrs(&xcrs).map_err(self.err("KVM_SET_XCRS"))?;
        let entries: Vec<_> = s
            .msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| bad(format!("MSR list: {e:?}")))?;
        let n = self.fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(bad(format!(
                "KVM accepted {n} of {} MSRs; first refused: {:#x}",
                entries.len(),
                entries[n].index
            )));
        }
        let events = kvm_bindings::kvm_vcpu_events::read_from_bytes(&s.events.0)
            .map_err(|_| bad(format!("event block of {} bytes", s.events.0.len())))?;
        self.fd
            .set_vcpu_events(&events)
            .map_err(self.err("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: s.mp_state,
            })
            .map_err(self.err("KVM_SET_MP_STATE"))
    }
}

/// Requests a vCPU thread obeys.
#[derive(Debug)]
enum Request {
    Pause,
    /// Pause, then save at once: one round trip to the vCPU thread in a migration's downtime.
    PauseAndSave,
    Resume,
    Save,
    /// Load a saved state; then run at once if `resume` (an incoming migration: one hand-off
    /// to the vCPU thread in the downtime instead of two).
    Restore {
        state: Box<VcpuState>,
        resume: bool,
    },
    Exit,
}

#[derive(Debug)]
enum Reply {
    Done,
    State(Box<VcpuState>),
    Failed(VcpuError),
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> nix::sys::signal::Signal {
    nix::sys::signal::Signal::SIGUSR2
}

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU running on this thread (null elsewhere).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int) {
    // Async-signal-safe: one const-initialised thread-local read and one volatile store.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: p points into the kvm_run mapping of this thread's vCPU, registered by the
        // thread itself and cleared before the vCPU (and the mapping) goes away.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
        let action = SigAction::new(
            SigHandler::Handler(handle_kick),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only does async-signal-safe work (see handle_kick).
        unsafe { sigaction(kick_signal(), &action) }.expect("installing the vCPU kick handler");
    });
}

/// The controlling side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: usize,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    state: Arc<AtomicU8>,
    /// When the thread last resumed the guest (Unix microseconds; 0: never).
    resumed_at: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread of `vcpu`, paused.
    pub(crate) fn spawn(vcpu: Vcpu, devices: Arc<Devices>) -> Result<Self, VcpuError> {
        install_kick_handler();
        let index = vcpu.index;
        let (req_tx, req_rx) = channel::unbounded();
        let (rep_tx, rep_rx) = channel::unbounded();
        let state = Arc::new(AtomicU8::new(RunState::Paused as u8));
        let thread_state = state.clone();
        let resumed_at = Arc::new(AtomicU64::new(0));
        let thread_resumed_at = resumed_at.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                vcpu_loop(
                    vcpu,
                    &devices,
                    &req_rx,
                    &rep_tx,
                    &thread_state,
                    &thread_resumed_at,
                );
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(Self {
            index,
            requests: req_tx,
            replies: rep_rx,
            state,
            resumed_at,
            thread: Some(thread),
        })
    }

    /// Index of this vCPU.
    pub fn index(&self) -> usize {
        self.index
    }

    /// What the thread is doing now.
    pub fn run_state(&self) -> RunState {
        RunState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// When the thread last resumed the guest, in Unix microseconds (0: never): the moment
    /// the guest runs again, not when the thread that asked hears of it.
    pub fn resumed_unix_us(&self) -> u64 {
        self.resumed_at.load(Ordering::Relaxed)
    }

    fn send(&self, req: Request) -> Result<(), VcpuError> {
        self.requests
            .send(req)
            .map_err(|_| VcpuError::Gone { index: self.index })?;
        // Only a thread inside KVM_RUN needs the kick: a paused or parked one looks at its
        // requests before it enters the guest again.
        if self.run_state() == RunState::Running {
            if let Some(t) = &self.thread {
                use std::os::unix::thread::JoinHandleExt;
                // A thread that already exited makes pthread_kill fail with ESRCH.
                let _ = nix::sys::pthread::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
        Ok(())
    }

    fn reply(&self) -> Result<Reply, VcpuError> {
        self.replies
            .recv()
            .map_err(|_| VcpuError::Gone { index: self.index })
    }

    /// Asks the vCPU to pause without waiting; pair with [`Self::wait_done`]. Pausing all vCPUs
    /// in parallel this way keeps the pause short.
    pub(crate) fn request_pause(&self) -> Result<(), VcpuError> {
        self.send(Request::Pause)
    }

    /// Asks the vCPU to pause and save its state without waiting; pair with
    /// [`Self::wait_state`].
    pub(crate) fn request_pause_and_save(&self) -> Result<(), VcpuError> {
        self.send(Request::PauseAndSave)
    }

    /// Waits for the state a [`Self::request_pause_and_save`] asked for.
    pub(crate) fn wait_state(&self) -> Result<VcpuState, VcpuError> {
        match self.reply()? {
            Reply::State(s) => Ok(*s),
            Reply::Failed(e) => Err(e),
            Reply::Done => unreachable!("a save replies with a state"),
        }
    }

    /// Asks the vCPU to resume without waiting; pair with [`Self::wait_done`].
    pub(crate) fn request_resume(&self) -> Result<(), VcpuError> {
        self.send(Request::Resume)
    }

    /// Waits for the reply to a `request_*` call.
    pub(crate) fn wait_done(&self) -> Result<(), VcpuError> {
        match self.reply()? {
            Reply::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Asks the (paused or parked) vCPU to save its state without waiting; pair with
    /// [`Self::wait_state`].
    pub(crate) fn request_save(&self) -> Result<(), VcpuError> {
        self.send(Request::Save)
    }

    /// Asks the (paused) vCPU to load a saved state without waiting, and to run right after
    /// if `resume`; pair with [`Self::wait_done`].
    pub(crate) fn request_restore(&self, state: VcpuState, resume: bool) -> Result<(), VcpuError> {
        self.send(Request::Restore {
            state: Box::new(state),
            resume,
        })
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.send(Request::Exit).is_ok() {
            let _ = self.reply();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to a save request: the vCPU's state, or why it could not be read.
fn saved(vcpu: &mut Vcpu) -> Reply {
    match vcpu.save() {
        Ok(s) => Reply::State(Box::new(s)),
        Err(e) => Reply::Failed(e),
    }
}

fn vcpu_loop(
    mut vcpu: Vcpu,
    devices: &Devices,
    requests: &Receiver<Request>,
    replies: &Sender<Reply>,
    state: &AtomicU8,
    resumed_at: &AtomicU64,
) {
    let immediate_exit: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    let set_state = |s: RunState| state.store(s as u8, Ordering::Release);
    let mut paused = true;
    let mut parked = false;
    loop {
        let request = if paused || parked {
            match requests.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            }
        } else {
            match requests.try_recv() {
                Ok(r) => Some(r),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        };
        if let Some(request) = request {
            let reply = match request {
                Request::Pause | Request::PauseAndSave => {
                    if !paused && !parked {
                        vcpu.complete_pending_io();
                    }
                    paused = true;
                    if !parked {
                        set_state(RunState::Paused);
                    }
                    if matches!(request, Request::PauseAndSave) {
                        saved(&mut vcpu)
                    } else {
                        Reply::Done
                    }
                }
                Request::Resume => {
                    paused = false;
                    if !parked {
                        set_state(RunState::Running);
                        resumed_at.store(crate::clock::unix_us(), Ordering::Relaxed);
                    }
                    Reply::Done
                }
                Request::Save => saved(&mut vcpu),
                Request::Restore { state: s, resume } => match vcpu.restore(&s) {
                    Ok(()) => {
                        parked = false;
                        paused = !resume;
                        if resume {
                            resumed_at.store(crate::clock::unix_us(), Ordering::Relaxed);
                        }
                        set_state(if paused {
                            RunState::Paused
                        } else {
                            RunState::Running
                        });
                        Reply::Done
                    }
                    Err(e) => Reply::Failed(e),
                },
                Request::Exit => {
                    let _ = replies.send(Reply::Done);
                    break;
                }
            };
            if replies.send(reply).is_err() {
                break;
            }
            continue;
        }
        if !devices.lease.may_run() {
            // The destination of a cancellable migration whose lease ran out (or that was
            // fenced): the source may run the VM now, so this vCPU never enters the guest
            // again, even if its thread was stopped and continues late (see `crate::fence`).
            vcpu.complete_pending_io();
            paused = true;
            set_state(RunState::Paused);
            continue;
        }
        let index = vcpu.index;
        let park = match vcpu.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match devices.io_out(index, port, data) {
                ExitAction::Continue => None,
                ExitAction::Park => Some(None),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.io_in(port, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(Some(ParkReason::Halted)),
            Ok(VcpuExit::Shutdown) => Some(Some(ParkReason::TripleFault)),
            Ok(other) => Some(Some(ParkReason::UnexpectedExit(format!("{other:?}")))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Some(ParkReason::RunFailed(e.to_string()))),
        };
        if let Some(reason) = park {
            vcpu.complete_pending_io();
            if let Some(reason) = reason {
                let rip = vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                devices.vcpu_stopped(index, reason, rip);
            }
            parked = true;
            set_state(RunState::Parked);
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}
