//! Shared helpers of the in-process KVM tests.

use std::time::Duration;

use tsubame_vmm::{SerialOutput, VmConfig};

/// Upper bound of any wait in these tests (a stuck guest fails instead of hanging).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A 64 MiB VM running `workload` for `steps` steps per vCPU, verifying at the end.
pub fn config(vcpus: usize, workload: &str, steps: u64) -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        vcpus,
        workload: workload.parse().unwrap(),
        steps,
        report_every: 0,
        verify_at_end: true,
        serial: SerialOutput::Discard,
    }
}
