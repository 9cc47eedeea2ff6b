//! [`Vm`]: a running VM built from a [`VmConfig`] (or restored from a snapshot, or migrated
//! in): guest memory, the KVM VM, one thread per vCPU, devices, and the operations the control
//! socket offers (pause, resume, progress, digest, save, migrate). The migration itself lives
//! in [`crate::migration`]; the VM offers it the few operations it needs (dirty log, pause and
//! capture at the switchover).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::unix_us;
use crate::devices::{CpuStatus, Devices, SerialSink};
use crate::guest::{self, abi, RunOptions, WorkloadSpec};
use crate::memory::{Digest, Gfn, Gpa, GuestMemory, MemoryLayout};
use crate::migration::checkpoint::{self, Captured, Checkpointer};
use crate::migration::{self, MigrateOptions, MigrationError, MigrationStatus, Outgoing};
use crate::paging::remote::{RemotePaging, RemotePagingConfig, RemotePagingStats};
use crate::paging::{DemandPaging, PagingStats};
use crate::snapshot;
use crate::state::{VmState, STATE_FORMAT, STATE_VERSION};
use crate::vstate::vcpu::{BootRegs, RunState, Vcpu, VcpuError, VcpuHandle, VcpuState};
use crate::vstate::vm::KvmVm;
use crate::Error;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    Discard,
}

impl SerialOutput {
    fn open(&self) -> Result<SerialSink, Error> {
        Ok(match self {
            Self::Stdout => SerialSink::Stdout,
            Self::Discard => SerialSink::Discard,
            Self::File(p) => {
                SerialSink::File(
                    std::fs::File::create(p).map_err(|source| Error::SerialFile {
                        path: p.clone(),
                        source,
                    })?,
                )
            }
        })
    }
}

/// What to build: memory, vCPUs, workload.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs; each runs its share of the workload.
    pub vcpus: usize,
    pub workload: WorkloadSpec,
    /// Steps per vCPU; 0 runs forever.
    pub steps: u64,
    /// Steps between the guest's serial progress lines; 0 = never.
    pub report_every: u64,
    /// The guest verifies its whole working set after the last step.
    pub verify_at_end: bool,
    pub serial: SerialOutput,
}

/// Overall state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmRunState {
    /// Created or stopped by the operator.
    Paused,
    Running,
    /// Every vCPU finished its workload.
    Finished,
    /// The guest reported a bad page, took an exception, or a vCPU failed.
    GuestError,
    /// The destination of a cancellable migration that stopped the VM for good (cancelled, or
    /// its lease ran out): the source runs it.
    Fenced,
    /// Paused by itself: an owner of some of its pages (a memserver) cannot be reached. It
    /// resumes once that owner is back (see [`Vm::watch_memory`]).
    Held,
    /// Some of its pages are gone for good: their owner cannot bring them any more (the
    /// migration source died, or gave the migration up after an outage longer than its
    /// `recover_ms`; a memserver restarted without them). vCPUs that touch one wait for ever;
    /// the others run on. `query-status` says which pages and why ([`VmStatus::stuck`]).
    Stuck,
}

/// A pause of the VM while part of its memory was unreachable, as `query-status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryHoldStatus {
    /// The pause now, if any: how long so far, and who cannot be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<crate::paging::router::Unreachable>,
    /// Pauses so far, and the longest that ended.
    pub holds: u64,
    pub longest_hold_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct MemoryHold {
    since: Option<Instant>,
    holds: u64,
    longest: Option<Duration>,
}

/// One vCPU as `query-status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuInfo {
    pub index: usize,
    pub thread: RunState,
    #[serde(flatten)]
    pub guest: CpuStatus,
}

/// `query-status`.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub status: VmRunState,
    pub running: bool,
    pub mem_bytes: u64,
    pub workload: String,
    pub uptime_ms: u64,
    pub vcpus: Vec<VcpuInfo>,
    /// Demand paging, when the VM was restored lazily or migrated in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demand_paging: Option<PagingStats>,
    /// Remote paging (`--local-mem`): limit, resident, evicted, faults back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_paging: Option<RemotePagingStats>,
    /// Pauses while part of the memory was unreachable (VMs with remote page owners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_hold: Option<MemoryHoldStatus>,
    /// Why the VM is stuck ([`VmRunState::Stuck`]), and what is left to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck: Option<String>,
}

/// A bad page the in-guest verifier found.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VerifyError {
    pub vcpu: usize,
    pub kind: &'static str,
    pub gfn: u64,
    pub expected_version: u64,
    pub found_version: u64,
}

/// Progress of one vCPU, read from the mailbox.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuProgress {
    pub steps: u64,
    pub writes: u64,
    pub verified: u64,
}

/// `query-progress`: the guest's own counters, read from the mailbox without exits.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub steps: u64,
    /// Steps per vCPU the workload runs; 0 = forever.
    pub target_steps_per_vcpu: u64,
    pub writes: u64,
    pub verified: u64,
    pub working_set_pages: u64,
    pub finished: bool,
    pub vcpus: Vec<VcpuProgress>,
    pub verify_error: Option<VerifyError>,
    /// The mailbox or config page has not arrived yet (demand paging): counters read as 0.
    pub memory_pending: bool,
}

/// How a wait ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    Reached,
    TimedOut,
    /// The guest failed before the condition held.
    GuestError,
}

/// A live VM.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPU threads stop before the KVM VM goes, and the VM before
    // the memory its slots point into.
    vcpus: Vec<VcpuHandle>,
    /// Serves guest pages on demand (lazy restore, incoming migration); outlives the vCPU
    /// threads, which may wait on a fault while they stop.
    paging: Option<DemandPaging>,
    /// Remote paging (`--local-mem`): cold pages live on memservers; outlives the vCPU threads
    /// for the same reason.
    remote: Option<RemotePaging>,
    kvm: Arc<KvmVm>,
    devices: Arc<Devices>,
    memory: Arc<GuestMemory>,
    /// The VM's identity (see [`VmState::id`]).
    id: u64,
    workload: String,
    /// Locked before `operator_paused` where both are.
    hold: Mutex<MemoryHold>,
    operator_paused: Mutex<bool>,
    created: Instant,
    /// Set once this VM migrated away: it never runs here again.
    outgoing: Mutex<Option<Arc<Outgoing>>>,
    /// For a migrated-in VM: VM state received -> VM assembled.
    incoming_restore: Option<Duration>,
    /// The destination of a cancellable migration: its reverse checkpoints.
    checkpointer: OnceLock<Arc<Checkpointer>>,
}

impl Vm {
    /// Builds a VM with the built-in guest and `config`'s workload. The VM starts paused: call
    /// [`Vm::resume`] to boot it.
    pub fn new(config: &VmConfig) -> Result<Self, Error> {
        Self::build(config, None)
    }

    /// [`Vm::new`] with remote paging: guest RAM is under userfaultfd from the start (never
    /// written pages are zero-filled on first touch), at most `remote.local_bytes` of it stays
    /// resident, and cold pages are evicted to the memservers (see [`crate::paging::remote`]).
    pub fn new_paged(config: &VmConfig, remote: &RemotePagingConfig) -> Result<Self, Error> {
        Self::build(config, Some(remote))
    }

    fn build(config: &VmConfig, remote: Option<&RemotePagingConfig>) -> Result<Self, Error> {
        let layout = MemoryLayout::for_size(config.mem_bytes)?;
        let run = RunOptions {
            vcpus: u32::try_from(config.vcpus).unwrap_or(u32::MAX),
            steps: config.steps,
            report_every: config.report_every,
            verify_at_end: config.verify_at_end,
        };
        let block = guest::config_block(&config.workload, &layout, &run)?;
        let memory = Arc::new(GuestMemory::new(&layout)?);
        let id = new_id();
        // Under remote paging, even the image is written through the fault engine.
        let remote = remote
            .map(|r| RemotePaging::new(&memory, r, id, run.vcpus))
            .transpose()?;
        let entry = guest::load_image(&memory, guest::GUEST_IMAGE)?;
        memory.write(Gpa(abi::CONFIG_GPA), &block.to_bytes())?;
        let info = guest::write_multiboot_info(&memory)?;
        let kvm = Arc::new(KvmVm::new(&memory)?);
        if let Some(r) = &remote {
            // The evictor is the dirty log's only reader (see `paging::remote`).
            kvm.set_dirty_logging(&memory, true)?;
            let log = crate::paging::remote::KvmDirtyLog::new(kvm.clone(), memory.clone())?;
            r.start_evictor(log)?;
        }
        let devices = Arc::new(Devices::new(config.serial.open()?, config.vcpus));
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let vcpu = Vcpu::new(&kvm, index)?;
            let (rax, rbx) = if index == 0 {
                (u64::from(abi::MULTIBOOT_MAGIC), info)
            } else {
                (u64::from(abi::AP_MAGIC), index as u64)
            };
            vcpu.set_boot_state(BootRegs {
                rip: entry,
                rax,
                rbx,
            })?;
            vcpus.push(VcpuHandle::spawn(vcpu, devices.clone())?);
        }
        Ok(Self {
            vcpus,
            paging: None,
            remote,
            kvm,
            devices,
            memory,
            id,
            workload: config.workload.to_string(),
            hold: Mutex::default(),
            operator_paused: Mutex::new(true),
            created: Instant::now(),
            outgoing: Mutex::new(None),
            incoming_restore: None,
            checkpointer: OnceLock::new(),
        })
    }

    /// Rebuilds a VM from a snapshot written by [`Vm::save`], paused, with all its RAM read in.
    pub fn restore(path: &Path, serial: &SerialOutput) -> Result<Self, Error> {
        Self::restore_with(path, serial, None)
    }

    /// Rebuilds a VM from a snapshot, paused, with empty RAM under userfaultfd: pages are read
    /// from the snapshot when first touched, and a `prefetch` thread pushes the rest in address
    /// order. The vCPUs can run before any RAM has been read (postcopy from a file).
    pub fn restore_lazy(path: &Path, serial: &SerialOutput) -> Result<Self, Error> {
        Self::restore_with(path, serial, Some(true))
    }

    /// [`Vm::restore_lazy`] without the prefetch thread: a page is read only when the guest
    /// touches it. This isolates the demand path (the local floor of `tsubame bench fault`).
    pub fn restore_on_demand_only(path: &Path, serial: &SerialOutput) -> Result<Self, Error> {
        Self::restore_with(path, serial, Some(false))
    }

    /// `lazy`: None reads all RAM now; Some(prefetch) restores lazily.
    fn restore_with(path: &Path, serial: &SerialOutput, lazy: Option<bool>) -> Result<Self, Error> {
        let (state, ram_start) = snapshot::read_state(path)?;
        let layout = MemoryLayout::for_size(state.layout.total_bytes())?;
        if layout != state.layout {
            return Err(Error::LayoutMismatch {
                expected: layout,
                found: state.layout,
            });
        }
        let memory = Arc::new(GuestMemory::new(&layout)?);
        let paging = if let Some(prefetch) = lazy {
            Some(DemandPaging::from_snapshot(
                &memory, path, ram_start, prefetch,
            )?)
        } else {
            snapshot::read_memory(path, ram_start, &memory)?;
            None
        };
        Self::assemble(memory, paging, state, serial)
    }

    /// Builds a paused VM around `memory` from a saved or received state.
    fn assemble(
        memory: Arc<GuestMemory>,
        paging: Option<DemandPaging>,
        state: VmState,
        serial: &SerialOutput,
    ) -> Result<Self, Error> {
        let kvm = Arc::new(KvmVm::new(&memory)?);
        let devices = Arc::new(Devices::new(serial.open()?, state.vcpus.len()));
        let vcpus = (0..state.vcpus.len())
            .map(|i| VcpuHandle::spawn(Vcpu::new(&kvm, i)?, devices.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble_with(kvm, memory, paging, state, devices, vcpus, false)
    }

    /// [`Vm::assemble`] with the KVM VM, devices and vCPUs (one per saved vCPU) already
    /// created: loads their state, and runs them right away if `resume`.
    fn assemble_with(
        kvm: Arc<KvmVm>,
        memory: Arc<GuestMemory>,
        paging: Option<DemandPaging>,
        state: VmState,
        devices: Arc<Devices>,
        vcpus: Vec<VcpuHandle>,
        resume: bool,
    ) -> Result<Self, Error> {
        devices.restore(&state.devices);
        // All vCPUs load their state in parallel (in a migration's downtime); every reply is
        // collected before an error is returned.
        for (handle, s) in vcpus.iter().zip(state.vcpus) {
            handle.request_restore(s, resume)?;
        }
        let restored: Vec<_> = vcpus.iter().map(VcpuHandle::wait_done).collect();
        restored.into_iter().collect::<Result<Vec<()>, _>>()?;
        let vm = Self {
            vcpus,
            paging,
            remote: None,
            kvm,
            devices,
            memory,
            // States written before VMs had an identity get one now.
            id: if state.id == 0 { new_id() } else { state.id },
            workload: state.workload,
            hold: Mutex::default(),
            operator_paused: Mutex::new(!resume),
            created: Instant::now(),
            outgoing: Mutex::new(None),
            incoming_restore: None,
            checkpointer: OnceLock::new(),
        };
        if resume {
            vm.resumed();
        }
        Ok(vm)
    }

    /// The destination of a migration: listens on `uri` (`tcp:HOST:PORT`), calls `ready` once
    /// listening, accepts an authenticated migration, creates memory (empty, under
    /// userfaultfd) and the KVM VM at once, tells the source it is ready (the source pauses
    /// its VM only then), takes in the precopy rounds if any, and returns the VM once its
    /// state arrived: running if `options.resume` (its vCPUs enter the guest as soon as each
    /// has loaded its state), else paused. `options.expect` (e.g. from `--mem`) must match the
    /// source's layout if given.
    ///
    /// A cancellable migration (the source asked for reverse checkpoints) also gets the dirty
    /// log on from the start, its output held, a lease to run on, and a [`Checkpointer`]
    /// (see [`crate::migration::checkpoint`]).
    pub fn incoming(
        uri: &str,
        secret: &[u8],
        options: &migration::IncomingOptions,
        serial: &SerialOutput,
        ready: impl FnOnce(std::net::SocketAddr),
    ) -> Result<Arc<Self>, Error> {
        let resume = options.resume;
        let inc = migration::incoming(uri, secret, options, ready)?;
        let checkpoint_ms = inc.checkpoint_ms;
        // Before the state arrives, off the switchover's critical path: the KVM VM, its vCPUs
        // and their threads; the switchover only loads their state.
        let created = (|| -> Result<_, Error> {
            let memory = Arc::new(GuestMemory::new(&inc.layout)?);
            let kvm = Arc::new(KvmVm::new(&memory)?);
            if checkpoint_ms > 0 {
                // Every page the guest writes here, from its first instruction on.
                kvm.set_dirty_logging(&memory, true)?;
            }
            let devices = Arc::new(Devices::new(serial.open()?, inc.vcpus as usize));
            if checkpoint_ms > 0 {
                devices.hold_output();
            }
            let vcpus = (0..inc.vcpus as usize)
                .map(|i| VcpuHandle::spawn(Vcpu::new(&kvm, i)?, devices.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((memory, kvm, devices, vcpus))
        })();
        let (memory, kvm, devices, vcpus) = match created {
            Ok(c) => c,
            Err(e) => {
                // The source is waiting for `Ready`: tell it why not (its VM keeps running).
                inc.refuse(&format!("the destination cannot create the VM: {e}"));
                return Err(e);
            }
        };
        let migration::destination::Received {
            mut paging,
            state,
            at: received,
            checkpoint,
            acceptor,
            hello,
        } = inc.receive(&memory)?;
        paging.restart_clock();
        if checkpoint.is_some() {
            // Until the first checkpoint is acknowledged (see `crate::fence`).
            devices
                .lease
                .start(received + checkpoint::first_lease(u64::from(checkpoint_ms)));
        }
        let mut vm = Self::assemble_with(kvm, memory, Some(paging), state, devices, vcpus, resume)?;
        log::debug!(
            "switchover: VM assembled {:?} after the state arrived",
            received.elapsed()
        );
        vm.incoming_restore = Some(received.elapsed());
        let vm = Arc::new(vm);
        if let Some(channel) = checkpoint {
            let c = Checkpointer::start(&vm, channel, checkpoint_ms)?;
            let _ = vm.checkpointer.set(c);
        }
        migration::switch::listen_for_switch(acceptor, hello, Arc::downgrade(&vm), secret)
            .map_err(MigrationError::Io)?;
        Ok(vm)
    }

    /// A migrated-in VM, asked by the source of its migration (`SwitchTo`, a migration
    /// switched after its switchover): migrates on to `to`, postcopy, and names the source,
    /// serving at `source`, as the owner of the pages still missing here, so that the new
    /// destination fetches those straight from it (see [`crate::migration::switch`]).
    pub fn move_on(
        self: &Arc<Self>,
        to: &str,
        source: &str,
        secret: &[u8],
    ) -> Result<MigrationStatus, Error> {
        if self.checkpointer.get().is_some() {
            return Err(MigrationError::Unsupported(
                "switching a cancellable migration after its switchover is not built yet".into(),
            )
            .into());
        }
        let paging = self.paging.as_ref().ok_or(Error::NothingRemote)?;
        let router = paging.router();
        router.set_source_address(migration::destination::SOURCE, Some(source));
        let moved = self.migrate(to, secret, &MigrateOptions::default());
        match &moved {
            Ok(_) => paging.engine().retire(),
            Err(_) => router.set_source_address(migration::destination::SOURCE, None),
        }
        moved
    }

    /// Migrates this VM to the destination at `uri` on a worker thread (see
    /// [`crate::migration::source`]): authenticates, runs the precopy rounds and the split
    /// `options` ask for while the guest keeps running, pauses, sends the vCPU and device
    /// state, and from then on serves the VM's memory to the destination (the VM never runs
    /// here again). Returns once the VM runs at the destination, or with why it does not: the
    /// VM then keeps running here ([`Vm::cancel_migration`] stops it on the way).
    pub fn migrate(
        self: &Arc<Self>,
        uri: &str,
        secret: &[u8],
        options: &MigrateOptions,
    ) -> Result<MigrationStatus, Error> {
        // Refused as it is: nothing started, nothing to abort.
        options.check()?;
        if self.remote.is_some() {
            return Err(Error::RemotePaged);
        }
        if self.hold.lock().expect("vm lock").since.is_some() {
            // Its pages at the unreachable owner could reach no destination either.
            return Err(self.held_error());
        }
        let out = {
            let mut outgoing = self.outgoing.lock().expect("vm lock");
            if outgoing.as_ref().is_some_and(|o| !o.rolled_back()) {
                return Err(MigrationError::AlreadyMigrating.into());
            }
            if self.is_fenced() {
                return Err(Error::Fenced);
            }
            let out = Arc::new(Outgoing::new(uri, self.memory.clone(), options));
            *outgoing = Some(out.clone());
            out
        };
        let done =
            migration::source::start(self.clone(), &out, uri, secret, options).and_then(|rx| {
                rx.recv().unwrap_or_else(|_| {
                    Err(MigrationError::Unsupported(
                        "the migration worker stopped without a word".into(),
                    ))
                })
            });
        match done {
            Ok(()) => Ok(out.status()),
            Err(e) if !out.switched_over() => {
                *self.outgoing.lock().expect("vm lock") = None;
                if out.cancel_token().is_cancelled() {
                    return Err(out.abort(&MigrationError::Cancelled).into());
                }
                Err(out.abort(&e).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Cancels a migration (`migrate-cancel`):
    /// - at the source, before the switchover: the VM keeps running here;
    /// - at the source, after it, if cancellable: the destination stops and the VM runs here
    ///   again from the last committed checkpoint (returns once it does);
    /// - at the destination of a cancellable migration: the VM stops here for good, a last
    ///   checkpoint goes back, and the source resumes it.
    pub fn cancel_migration(&self) -> Result<(), Error> {
        if let Some(c) = self.checkpointer.get() {
            return Ok(c.cancel("cancelled at the destination")?);
        }
        let out = self.outgoing.lock().expect("vm lock").clone();
        let Some(out) = out.filter(|o| !o.rolled_back()) else {
            return Err(MigrationError::NotMigrating.into());
        };
        if !out.switched_over() {
            out.cancel_token().cancel();
            return Ok(());
        }
        Ok(out.cancel_after_switchover()?)
    }

    /// `migrate-switch`: redirects this VM's migration, before its switchover, to the
    /// destination at `uri` (see [`crate::migration::switch`]); returns once the new
    /// destination receives from both senders, or why not.
    pub fn switch_migration(
        &self,
        uri: &str,
        secret: &[u8],
    ) -> Result<migration::switch::SwitchStatus, Error> {
        let out = self.outgoing.lock().expect("vm lock").clone();
        let Some(out) = out.filter(|o| !o.rolled_back()) else {
            return Err(MigrationError::NotMigrating.into());
        };
        Ok(out.switch_destination(uri, secret)?)
    }

    /// Whether the VM stopped here for good: the destination of a cancellable migration that
    /// was cancelled or whose lease ran out.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self.devices.lease.state(),
            crate::fence::LeaseState::Fenced | crate::fence::LeaseState::Suspended
        )
    }

    /// For a destination that stopped the VM ([`Self::is_fenced`]): whether the source is
    /// done with it (it took the VM back, or is gone), so this process may go away.
    pub fn fence_settled(&self) -> bool {
        self.checkpointer.get().is_none_or(|c| c.is_over())
    }

    /// Whether a migration of this VM could still be rolled back (a cancellable one, switched
    /// over, not yet completed): the VM may yet end up running on the other host.
    pub fn migration_open(&self) -> bool {
        if let Some(c) = self.checkpointer.get() {
            return c.is_open();
        }
        self.outgoing
            .lock()
            .expect("vm lock")
            .as_ref()
            .is_some_and(|o| o.rollback_possible())
    }

    /// Whether an outgoing migration of this VM is under way (precopy rounds, or postcopy
    /// serving): a guest that finishes meanwhile still migrates, and its process must wait.
    pub fn migration_under_way(&self) -> bool {
        self.outgoing
            .lock()
            .expect("vm lock")
            .as_ref()
            .filter(|o| !o.rolled_back())
            .is_some_and(|o| {
                matches!(
                    o.status().phase,
                    migration::Phase::Precopy | migration::Phase::Postcopy
                )
            })
    }

    /// The VM's identity (random when created, kept across snapshots and migrations).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `query-migrate`: the outgoing migration (source) or the incoming one (destination).
    pub fn migration_status(&self) -> Option<serde_json::Value> {
        if let Some(out) = self.outgoing.lock().expect("vm lock").as_ref() {
            return serde_json::to_value(out.status()).ok();
        }
        let restore = self.incoming_restore?;
        let paging = self.paging_stats()?;
        let checkpoints = self.checkpointer.get().map(|c| c.status());
        let phase = if self.is_fenced() {
            "cancelled"
        } else if paging.fetch_error.is_some() {
            "failed"
        } else if paging.present_pages == paging.total_pages
            || paging
                .owners
                .first()
                .is_some_and(|source| source.pages_owned == 0)
        {
            // Every page here, or (a split) every page here or at the memservers.
            "completed"
        } else {
            "postcopy"
        };
        Some(serde_json::json!({
            "role": "destination",
            "phase": phase,
            "error": paging.fetch_error,
            "state_to_running_us": u64::try_from(restore.as_micros()).unwrap_or(u64::MAX),
            "demand_paging": paging,
            "checkpoints": checkpoints,
        }))
    }

    /// Whether this VM migrated away and the destination has all its memory.
    pub fn migrated_away(&self) -> Option<MigrationStatus> {
        self.outgoing
            .lock()
            .expect("vm lock")
            .as_ref()
            .map(|o| o.status())
            .filter(|s| {
                matches!(
                    s.phase,
                    migration::Phase::Completed | migration::Phase::Failed
                )
            })
    }

    /// `consolidate`: brings every page of this VM that memservers (or other page servers)
    /// hold back into this host, from all of them in parallel, while the VM runs. Returns once
    /// they are asked; `query-migrate` shows the progress.
    pub fn consolidate(&self) -> Result<crate::paging::ConsolidationStatus, Error> {
        if self.remote.is_some() {
            return Err(Error::Migration(migration::MigrationError::Unsupported(
                "this VM pages to memservers under --local-mem: bringing every page back would                  go over that limit; start it without --local-mem to hold all its memory"
                    .into(),
            )));
        }
        let paging = self.paging.as_ref().ok_or(Error::NothingRemote)?;
        Ok(paging.consolidate()?)
    }

    /// Remote-paging statistics (`--local-mem`): `query-memory`.
    pub fn remote_paging_stats(&self) -> Option<RemotePagingStats> {
        self.remote.as_ref().map(RemotePaging::stats)
    }

    /// Demand-paging statistics (lazy restore, incoming migration).
    pub fn paging_stats(&self) -> Option<PagingStats> {
        self.paging.as_ref().map(DemandPaging::stats)
    }

    /// Guest memory (for digests, migration, tests).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The devices (serial output, doorbell).
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Pauses every vCPU (in parallel) and returns how long that took.
    pub fn pause(&self) -> Result<Duration, Error> {
        let mut paused = self.operator_paused.lock().expect("vm lock");
        let t = Instant::now();
        self.pause_vcpus()?;
        *paused = true;
        Ok(t.elapsed())
    }

    /// Sends one request to every vCPU, then waits for every reply: the vCPUs act in parallel,
    /// which keeps a pause of all of them short.
    fn all_vcpus(&self, send: impl Fn(&VcpuHandle) -> Result<(), VcpuError>) -> Result<(), Error> {
        for v in &self.vcpus {
            send(v)?;
        }
        for v in &self.vcpus {
            v.wait_done()?;
        }
        Ok(())
    }

    fn pause_vcpus(&self) -> Result<(), Error> {
        self.all_vcpus(VcpuHandle::request_pause)
    }

    fn resume_vcpus(&self) -> Result<(), Error> {
        self.all_vcpus(VcpuHandle::request_resume)
    }

    /// Resumes (or first starts) every vCPU.
    pub fn resume(&self) -> Result<(), Error> {
        if self.is_fenced() {
            return Err(Error::Fenced);
        }
        if let Some(out) = self
            .outgoing
            .lock()
            .expect("vm lock")
            .as_ref()
            .filter(|o| !o.rolled_back())
        {
            if !out.switched_over() {
                return Err(MigrationError::AlreadyMigrating.into());
            }
            return Err(Error::MigratedAway {
                destination: out.status().destination,
            });
        }
        let hold = self.hold.lock().expect("vm lock");
        if hold.since.is_some() {
            return Err(self.held_error());
        }
        let mut paused = self.operator_paused.lock().expect("vm lock");
        self.resume_vcpus()?;
        *paused = false;
        drop(hold);
        self.resumed();
        Ok(())
    }

    /// Why the VM is held: who cannot be reached.
    fn held_error(&self) -> Error {
        let why = self
            .owner_router()
            .map(|r| {
                r.unreachable()
                    .iter()
                    .filter(|u| u.holds_vm)
                    .map(|u| format!("{}: {}", u.endpoint, u.why))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        Error::MemoryHeld { why }
    }

    /// The router of the VM's page owners, if its pages can live elsewhere.
    fn owner_router(&self) -> Option<&Arc<crate::paging::router::OwnerRouter>> {
        self.remote
            .as_ref()
            .map(RemotePaging::router)
            .or_else(|| self.paging.as_ref().map(DemandPaging::router))
    }

    /// Pauses the VM while an owner of some of its pages cannot be reached (a memserver whose
    /// link broke, or left a fault unanswered for [`crate::paging::router::SILENT_LINK`]) and
    /// resumes it once every such owner is back, unless the operator paused it
    /// meanwhile: a vCPU would otherwise wait on such a page inside the guest, and the others
    /// run on with the guest half stopped. Watches on a thread of its own (`memory-watch`)
    /// until the VM goes; nothing to do for a VM whose memory is all here.
    pub fn watch_memory(self: &Arc<Self>) -> Result<(), Error> {
        let Some(router) = self.owner_router().cloned() else {
            return Ok(());
        };
        let vm = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("memory-watch".into())
            .spawn(move || {
                let mut seen = 0;
                loop {
                    seen = router.wait_change(seen, Duration::from_millis(200));
                    let Some(vm) = vm.upgrade() else {
                        return;
                    };
                    router.check_silent(crate::paging::router::SILENT_LINK);
                    if let Err(e) = vm.check_memory(&router) {
                        log::error!("pausing or resuming for unreachable memory: {e}");
                    }
                }
            })
            .map_err(|source| crate::paging::PagingError::Thread {
                name: "memory-watch".into(),
                source,
            })?;
        Ok(())
    }

    fn check_memory(&self, router: &crate::paging::router::OwnerRouter) -> Result<(), Error> {
        let mut down = router.unreachable();
        down.retain(|u| u.holds_vm);
        // Busy: an operation that pauses the VM itself reads its memory (a digest, a save),
        // and may wait for a page of a link that went silent. This thread must not wait
        // behind it: it is the one that gives such links up (`check_silent`). Next round.
        let mut hold = match self.hold.try_lock() {
            Ok(h) => h,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("vm lock: {e}"),
        };
        match (down.is_empty(), hold.since) {
            (false, None) => {
                // Held from now on, before the vCPUs are paused, and without holding any lock
                // while they are: a vCPU inside a fault on the unreachable memory (completing
                // an I/O exit, say) answers only once the page comes, and meanwhile
                // `query-status` and the operator must still be answered. (A test that waited
                // for "held" before plugging the network back hung on exactly that.) `cont`
                // is refused while held.
                hold.since = Some(Instant::now());
                hold.holds += 1;
                drop(hold);
                for u in &down {
                    log::error!(
                        "VM paused: {} cannot be reached and owns {} of its pages ({}); it \
                         resumes once that memory is back",
                        u.endpoint,
                        u.pages_owned,
                        u.why
                    );
                }
                let operator_paused = *self.operator_paused.lock().expect("vm lock");
                if !operator_paused {
                    self.pause_vcpus()?;
                }
            }
            (true, Some(since)) => {
                let paused = self.operator_paused.lock().expect("vm lock");
                if !*paused {
                    self.resume_vcpus()?;
                }
                let held = since.elapsed();
                hold.since = None;
                hold.longest = hold.longest.max(Some(held));
                log::warn!("VM resumed: its memory is reachable again after {held:?}");
            }
            _ => {}
        }
        Ok(())
    }

    fn memory_hold_status(&self) -> Option<MemoryHoldStatus> {
        let router = self.owner_router()?;
        let hold = self.hold.lock().expect("vm lock");
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Some(MemoryHoldStatus {
            held_ms: hold.since.map(|t| ms(t.elapsed())),
            unreachable: router.unreachable(),
            holds: hold.holds,
            longest_hold_ms: hold.longest.map(ms),
        })
    }

    /// Tells demand paging that the VM runs (its first resume ends a migration's downtime), as
    /// of when the last vCPU thread entered the guest.
    fn resumed(&self) {
        if let Some(p) = &self.paging {
            let at = self.vcpus.iter().map(VcpuHandle::resumed_unix_us).max();
            p.resumed(at.unwrap_or_else(unix_us));
        }
    }

    /// Runs `f` with every vCPU paused, restoring the operator's run state afterwards.
    /// Returns `f`'s result and whether the VM had to be paused for it.
    fn with_paused<T>(&self, f: impl FnOnce() -> Result<T, Error>) -> Result<(T, bool), Error> {
        let hold = self.hold.lock().expect("vm lock");
        let paused = self.operator_paused.lock().expect("vm lock");
        let had_to_pause = !*paused && hold.since.is_none();
        if had_to_pause {
            self.pause_vcpus()?;
        }
        let out = f();
        if had_to_pause {
            self.resume_vcpus()?;
        }
        drop(paused);
        drop(hold);
        Ok((out?, had_to_pause))
    }

    /// The overall state.
    pub fn run_state(&self) -> VmRunState {
        let statuses = self.devices.doorbell.statuses();
        if statuses.iter().any(CpuStatus::is_failure) {
            VmRunState::GuestError
        } else if statuses.iter().all(|s| *s == CpuStatus::Finished) {
            VmRunState::Finished
        } else if self.is_fenced() {
            VmRunState::Fenced
        } else if self.lost_for_good().is_some() {
            VmRunState::Stuck
        } else if self.hold.lock().expect("vm lock").since.is_some() {
            VmRunState::Held
        } else if *self.operator_paused.lock().expect("vm lock") {
            VmRunState::Paused
        } else {
            VmRunState::Running
        }
    }

    /// `query-status`.
    pub fn status(&self) -> VmStatus {
        let statuses = self.devices.doorbell.statuses();
        let status = self.run_state();
        VmStatus {
            status,
            running: status == VmRunState::Running,
            mem_bytes: self.memory.layout().total_bytes(),
            workload: self.workload.clone(),
            uptime_ms: u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: self
                .vcpus
                .iter()
                .zip(statuses)
                .map(|(v, guest)| VcpuInfo {
                    index: v.index(),
                    thread: v.run_state(),
                    guest,
                })
                .collect(),
            demand_paging: self.paging_stats(),
            remote_paging: self.remote_paging_stats(),
            memory_hold: self.memory_hold_status(),
            stuck: (status == VmRunState::Stuck)
                .then(|| self.lost_for_good())
                .flatten()
                .map(|why| {
                    format!(
                        "part of its memory is gone for good: {why}. The vCPUs that touch those \
                         pages wait for ever; nothing can bring them back. Start the VM again \
                         from its last snapshot or from its source, and `quit` this one"
                    )
                }),
        }
    }

    /// Which pages are gone for good and why, if any are (see [`VmRunState::Stuck`]).
    fn lost_for_good(&self) -> Option<String> {
        self.owner_router()?.lost_for_good()
    }

    /// Whether the guest page at `gpa` is in this process. The VMM never reads a page that is
    /// not: under demand paging that read would wait for the page, forever if its source died.
    fn is_local(&self, gpa: Gpa) -> bool {
        self.paging
            .as_ref()
            .is_none_or(|p| p.engine().is_present(gpa.gfn()))
    }

    /// Fails if reading all guest memory could wait forever: some pages are still remote and
    /// their source has failed.
    fn require_reachable_memory(&self) -> Result<(), Error> {
        if let Some(down) = self.owner_router().map(|r| r.unreachable()) {
            if !down.is_empty() {
                return Err(Error::MemoryUnreachable {
                    missing: down.iter().map(|u| u.pages_owned).sum(),
                    why: down
                        .iter()
                        .map(|u| format!("{} cannot be reached: {}", u.endpoint, u.why))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
        }
        if let Some(r) = &self.remote {
            if let Some(e) = r.engine().fetch_error() {
                let s = r.stats();
                return Err(Error::MemoryUnreachable {
                    missing: s.evicted_pages,
                    why: e.to_string(),
                });
            }
        }
        match self.paging_stats() {
            Some(p) if p.present_pages < p.total_pages && p.fetch_error.is_some() => {
                Err(Error::MemoryUnreachable {
                    missing: p.total_pages - p.present_pages,
                    why: p.fetch_error.unwrap_or_default(),
                })
            }
            _ => Ok(()),
        }
    }

    fn slot(&self, cpu: usize, field: u64) -> u64 {
        self.memory
            .read_u64_volatile(Gpa(abi::mailbox_slot_field(cpu, field)))
            .unwrap_or(0)
    }

    /// The guest's progress counters (no exits, no pause).
    pub fn progress(&self) -> Progress {
        let pending = !self.is_local(Gpa(abi::CONFIG_GPA)) || !self.is_local(Gpa(abi::MAILBOX_GPA));
        let config = if pending {
            abi::ConfigBlock::default()
        } else {
            guest::read_config(&self.memory).unwrap_or_default()
        };
        let mut p = Progress {
            memory_pending: pending,
            steps: 0,
            target_steps_per_vcpu: config.steps,
            writes: 0,
            verified: 0,
            working_set_pages: config.working_set_pages(),
            finished: self.run_state() == VmRunState::Finished,
            vcpus: Vec::new(),
            verify_error: None,
        };
        if pending {
            return p;
        }
        for cpu in 0..self.vcpus.len().min(abi::MAX_CPUS) {
            let v = VcpuProgress {
                steps: self.slot(cpu, abi::slot::STEPS),
                writes: self.slot(cpu, abi::slot::WRITES),
                verified: self.slot(cpu, abi::slot::VERIFIED),
            };
            p.steps += v.steps;
            p.writes += v.writes;
            p.verified += v.verified;
            p.vcpus.push(v);
            if p.verify_error.is_none() && self.slot(cpu, abi::slot::STATE) == abi::state::ERROR {
                p.verify_error = Some(VerifyError {
                    vcpu: cpu,
                    kind: abi::verify_error_name(self.slot(cpu, abi::slot::ERR_KIND)),
                    gfn: self.slot(cpu, abi::slot::ERR_GFN),
                    expected_version: self.slot(cpu, abi::slot::ERR_EXPECTED),
                    found_version: self.slot(cpu, abi::slot::ERR_FOUND),
                });
            }
        }
        p
    }

    /// Before the process exits: if every page of a VM that arrived on demand is here, makes
    /// sure its completion ran (memservers told to forget; see [`DemandPaging::settle`]).
    pub fn settle(&self, timeout: Duration) {
        if let Some(p) = &self.paging {
            p.settle(timeout);
        }
    }

    /// Digest of all guest memory, taken with the vCPUs paused (pausing briefly if running).
    /// Returns the digest and whether the VM had to be paused for it.
    pub fn digest(&self) -> Result<(Digest, bool), Error> {
        self.require_reachable_memory()?;
        self.with_paused(|| Ok(self.memory.digest()))
    }

    /// Saves the whole VM to a snapshot file (pausing briefly if running). Returns the bytes of
    /// non-zero RAM written.
    pub fn save(&self, path: &Path) -> Result<u64, Error> {
        self.require_reachable_memory()?;
        let (bytes, _) = self.with_paused(|| {
            let state = self.capture_state()?;
            Ok(snapshot::write(path, &state, &self.memory)?)
        })?;
        Ok(bytes)
    }

    /// vCPU and device state of the paused VM.
    fn capture_state(&self) -> Result<VmState, Error> {
        let vcpus = self.all_vcpus_states(VcpuHandle::request_save)?;
        Ok(self.state_with(vcpus))
    }

    /// The VM state around `vcpus` (saved while paused).
    fn state_with(&self, vcpus: Vec<VcpuState>) -> VmState {
        VmState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            id: self.id,
            layout: self.memory.layout().clone(),
            workload: self.workload.clone(),
            vcpus,
            devices: self.devices.save(),
        }
    }

    /// Sends `request` (one that replies with a state) to every vCPU, then collects the states
    /// in order: the vCPUs work in parallel.
    fn all_vcpus_states(
        &self,
        request: impl Fn(&VcpuHandle) -> Result<(), VcpuError>,
    ) -> Result<Vec<VcpuState>, Error> {
        for v in &self.vcpus {
            request(v)?;
        }
        let states: Vec<_> = self.vcpus.iter().map(VcpuHandle::wait_state).collect();
        Ok(states.into_iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Copies the pages `gfns` (sorted) into `out`, in that order. (Measured: two threads
    /// made checkpoint pauses longer on this 2-core host, the second one waiting for a core.)
    fn copy_pages(&self, gfns: &[Gfn], out: &mut [u8]) -> Result<(), crate::memory::MemoryError> {
        let mut offset = 0;
        for (gfn, n) in tsubame_pages::gfn_runs(gfns, u64::MAX) {
            let bytes = usize::try_from(n).expect("bounded") * crate::memory::PAGE_BYTES;
            self.memory
                .read(gfn.gpa(), &mut out[offset..offset + bytes])?;
            offset += bytes;
        }
        Ok(())
    }

    /// Waits until every vCPU finished, or one failed, or `timeout` passed.
    pub fn wait_finished(&self, timeout: Duration) -> WaitOutcome {
        let (_, statuses) = self.devices.doorbell.wait_for(timeout, |s| {
            s.iter().any(CpuStatus::is_failure) || s.iter().all(|c| *c == CpuStatus::Finished)
        });
        if statuses.iter().any(CpuStatus::is_failure) {
            WaitOutcome::GuestError
        } else if statuses.iter().all(|c| *c == CpuStatus::Finished) {
            WaitOutcome::Reached
        } else {
            WaitOutcome::TimedOut
        }
    }

    /// Waits until the guest has done at least `steps` steps in total (checked every
    /// millisecond from the mailbox), or finished, or failed, or `timeout` passed.
    pub fn wait_steps(&self, steps: u64, timeout: Duration) -> WaitOutcome {
        let deadline = Instant::now() + timeout;
        loop {
            match self.run_state() {
                VmRunState::GuestError => return WaitOutcome::GuestError,
                VmRunState::Finished => return WaitOutcome::Reached,
                _ => {}
            }
            if self.progress().steps >= steps {
                return WaitOutcome::Reached;
            }
            if Instant::now() >= deadline {
                return WaitOutcome::TimedOut;
            }
            // The mailbox has no notification: the guest never exits for progress.
            let (_, _) = self
                .devices
                .doorbell
                .wait_for(Duration::from_millis(1), |s| {
                    s.iter().any(CpuStatus::is_failure)
                });
        }
    }
}

/// What the migration of a VM needs of it.
impl migration::source::MigratableVm for Vm {
    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn page_owners(&self) -> Option<migration::source::PageOwners> {
        let router = self.paging.as_ref()?.router();
        let servers = router.dialable();
        (!servers.is_empty()).then(|| (router.owners().clone(), servers))
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn set_dirty_logging(&self, on: bool) -> Result<(), MigrationError> {
        self.kvm
            .set_dirty_logging(&self.memory, on)
            .map_err(|e| MigrationError::Vm(Box::new(e)))
    }

    fn take_dirty_pages(&self) -> Result<Vec<Gfn>, MigrationError> {
        let mut d = self
            .kvm
            .take_dirty_pages(&self.memory)
            .map_err(|e| MigrationError::Vm(Box::new(e)))?;
        d.sort_unstable();
        Ok(d)
    }

    fn pause_for_switchover(
        &self,
        switch: impl FnOnce(VmState, Instant) -> Result<(), MigrationError>,
        left: impl Fn() -> bool,
    ) -> Result<(), MigrationError> {
        let mut paused = self.operator_paused.lock().expect("vm lock");
        let was_paused = *paused;
        let t0 = Instant::now();
        // Every vCPU pauses and saves its state in one round trip, all in parallel.
        let saved = self
            .all_vcpus_states(VcpuHandle::request_pause_and_save)
            .map_err(|e| MigrationError::Vm(Box::new(e)));
        *paused = true;
        let switched = saved.and_then(|vcpus| switch(self.state_with(vcpus), t0));
        if switched.is_err() && !left() && !was_paused {
            // The destination never got the VM: it goes on here.
            self.resume_vcpus()
                .map_err(|e| MigrationError::Vm(Box::new(e)))?;
            *paused = false;
        }
        switched
    }
}

/// What the destination of a cancellable migration does for its checkpoints.
impl checkpoint::CheckpointedVm for Vm {
    fn capture(&self, data: &mut Vec<u8>) -> Result<Captured, MigrationError> {
        let vm_err = |e: Error| MigrationError::Vm(Box::new(e));
        let paused = self.operator_paused.lock().expect("vm lock");
        let t0 = Instant::now();
        let vcpus = self
            .all_vcpus_states(VcpuHandle::request_pause_and_save)
            .map_err(vm_err)?;
        let mut tracking = Duration::ZERO;
        let taken = (|| -> Result<Vec<Gfn>, MigrationError> {
            let t = Instant::now();
            let dirty = migration::source::MigratableVm::take_dirty_pages(self)?;
            tracking = t.elapsed();
            let len = dirty.len() * crate::memory::PAGE_BYTES;
            if data.len() < len {
                data.resize(len, 0);
            }
            self.copy_pages(&dirty, &mut data[..len])
                .map_err(|e| vm_err(e.into()))?;
            Ok(dirty)
        })();
        let state = self.state_with(vcpus);
        let epoch = self.devices.close_epoch();
        // The guest runs on unless the operator paused it or the lease forbids it.
        let resumed = if !*paused && self.devices.lease.may_run() {
            self.resume_vcpus().map_err(vm_err)
        } else {
            Ok(())
        };
        let pause = t0.elapsed();
        resumed?;
        Ok(Captured {
            state,
            dirty: taken?,
            epoch,
            pause,
            tracking,
        })
    }

    fn stop_vcpus(&self) {
        let _paused = self.operator_paused.lock().expect("vm lock");
        if let Err(e) = self.pause_vcpus() {
            log::error!("stopping the vCPUs: {e}");
        }
    }

    fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }
}

/// What the source of a cancellable migration does to resume the VM here.
impl checkpoint::ResumableVm for Vm {
    fn resume_from(&self, state: VmState) -> Result<(), MigrationError> {
        let vm_err = |e: Error| MigrationError::Vm(Box::new(e));
        let mut paused = self.operator_paused.lock().expect("vm lock");
        if let Err(e) = self.kvm.set_dirty_logging(&self.memory, false) {
            log::warn!("turning the dirty log off: {e}");
        }
        if state.vcpus.len() != self.vcpus.len() || state.layout != *self.memory.layout() {
            return Err(MigrationError::BadState(
                "the checkpoint's vCPU count or layout differs from this VM's".into(),
            ));
        }
        self.devices.restore(&state.devices);
        for (handle, s) in self.vcpus.iter().zip(state.vcpus) {
            handle
                .request_restore(s, true)
                .map_err(|e| vm_err(e.into()))?;
        }
        let restored: Vec<_> = self.vcpus.iter().map(VcpuHandle::wait_done).collect();
        restored
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map_err(|e| vm_err(e.into()))?;
        *paused = false;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = self.checkpointer.get() {
            c.shutdown();
        }
    }
}

/// A fresh VM identity (random, never 0).
fn new_id() -> u64 {
    tsubame_pageserver::auth::random_u64()
        .ok()
        .filter(|id| *id != 0)
        .unwrap_or_else(|| unix_us().max(1))
}
