//! Tsubame's VMM library.
//!
//! A [`Vm`] is built from a [`VmConfig`]: anonymous guest memory ([`memory`]), a KVM VM with one
//! thread per vCPU ([`vstate`]), port-I/O devices ([`devices`]) and the built-in guest
//! ([`guest`]), a bare-metal program that drops to CPL3 and runs a deterministic workload. A VM
//! can be paused, resumed, digested and saved to a snapshot that another process restores
//! ([`snapshot`], around the VM's [`state`]); a JSON control socket ([`control`]) exposes all of
//! that to the `tsubame` CLI. A VM whose memory arrives on demand ([`paging`]: a lazy restore,
//! an incoming migration) fetches each missing page from its owner; [`migration`] moves a VM
//! between processes, postcopy first, cancellable after its switchover with reverse
//! checkpoints (the destination then runs on a lease: [`fence`]).
//!
//! Module dependencies run one way: `vm` uses `migration`, `paging`, `snapshot`, `state`,
//! `vstate`, `devices`, `memory`; `migration` uses `paging`, `state` and `vm` (the operations
//! the VM offers it); `vstate` and `devices` use neither.
//!
//! The determinism oracle of every test: the digest of guest memory after N steps of a workload
//! is the same whether or not the VM was paused, saved, restored or migrated in between.

pub mod clock;
pub mod control;
pub mod devices;
pub mod fence;
pub mod guest;
pub mod memory;
pub mod migration;
pub mod paging;
pub mod snapshot;
pub mod state;
pub mod vm;
pub mod vstate;

pub use memory::{Digest, GuestMemory, MemoryLayout};
pub use paging::PagingStats;
pub use vm::{Progress, SerialOutput, Vm, VmConfig, VmRunState, VmStatus, WaitOutcome};

/// Errors of the VMM library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Layout(#[from] memory::LayoutError),
    #[error(transparent)]
    Workload(#[from] guest::WorkloadError),
    #[error("loading the guest image: {0}")]
    Image(#[from] guest::ImageError),
    #[error(transparent)]
    Kvm(#[from] vstate::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Uffd(#[from] tsubame_uffd::UffdError),
    #[error("this VM pages memory out to memservers (--local-mem): migrating it is not supported yet (evicted pages would have to be fetched, and the evictor owns the dirty log); run it without --local-mem to migrate it")]
    RemotePaged,
    #[error("this VM stopped here for good: its cancellable migration was called off or lost its lease, and the source runs it")]
    Fenced,
    #[error("this VM migrated to {destination} and runs there now")]
    MigratedAway { destination: String },
    #[error("this VM is paused because part of its memory cannot be reached ({why}); it resumes by itself once that memory is back")]
    MemoryHeld { why: String },
    #[error("{missing} guest pages are still remote and their source failed ({why}); the memory cannot be read whole")]
    MemoryUnreachable { missing: u64, why: String },
    #[error("migration: {0}")]
    Migration(#[from] migration::MigrationError),
    #[error("demand paging: {0}")]
    Paging(#[from] paging::PagingError),
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("this VM's memory is all here: there is nothing to consolidate (only a VM with pages at memservers or other page servers has)")]
    NothingRemote,
    #[error("memory layout mismatch: expected {expected:?}, found {found:?}")]
    LayoutMismatch {
        expected: MemoryLayout,
        found: MemoryLayout,
    },
}
