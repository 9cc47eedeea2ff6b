//! [`VmState`]: everything about a VM but its RAM (layout, vCPUs, devices, identity), the few
//! kilobytes a snapshot file starts with, a migration sends at switchover, and a reverse
//! checkpoint sends back.

use serde::{Deserialize, Serialize};

use crate::devices::DevicesState;
use crate::memory::MemoryLayout;
use crate::vstate::vcpu::VcpuState;

/// The `format` every VM state carries.
pub const STATE_FORMAT: &str = "tsubame-vm-state";
/// Version of the state's JSON shape.
pub const STATE_VERSION: u32 = 1;

/// Why a VM state was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the VM state does not parse: {0}")]
    Parse(String),
    #[error("the VM state is format {format} version {version}; this Tsubame reads {STATE_FORMAT} version {STATE_VERSION}")]
    Format { format: String, version: u32 },
}

/// Everything about a VM except its RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    pub version: u32,
    /// The VM's identity: random when it is created, kept across snapshots and migrations (a
    /// memserver keys the pages it holds by it). 0 in states written before it existed.
    #[serde(default)]
    pub id: u64,
    pub layout: MemoryLayout,
    /// The workload the guest was started with (for people; the guest reads its config block).
    pub workload: String,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

impl VmState {
    /// The state as JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("VM state serializes")
    }

    /// Parses a state written by [`Self::to_bytes`] and checks its format.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let state: Self =
            serde_json::from_slice(bytes).map_err(|e| StateError::Parse(e.to_string()))?;
        if state.format != STATE_FORMAT || state.version != STATE_VERSION {
            return Err(StateError::Format {
                format: state.format,
                version: state.version,
            });
        }
        Ok(state)
    }
}
