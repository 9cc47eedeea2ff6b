//! Shared helpers of the in-process KVM tests.

use std::time::Duration;

use tsubame_vmm::{Digest, SerialOutput, Vm, VmConfig, WaitOutcome};

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

/// The digest of a run of `cfg` to the end that never migrated: the oracle.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn reference_digest(cfg: &VmConfig) -> Digest {
    let vm = Vm::new(cfg).unwrap();
    vm.resume().unwrap();
    assert_eq!(vm.wait_finished(TIMEOUT), WaitOutcome::Reached);
    vm.digest().unwrap().0
}
