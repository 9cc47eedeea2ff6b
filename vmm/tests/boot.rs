//! In-process tests on real KVM: the built-in guest boots, runs its workload to the end, and a
//! paused-saved-restored run gives the same memory digest as an uninterrupted one.

use std::time::Duration;

use tsubame_vmm::{SerialOutput, Vm, VmConfig, VmRunState, WaitOutcome};

fn config(vcpus: usize, workload: &str, steps: u64) -> VmConfig {
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

#[test]
fn guest_boots_and_finishes() {
    let vm = Vm::new(&config(1, "uniform:ws=8M,write=0.5,seed=3", 200_000)).unwrap();
    vm.resume().unwrap();
    let out = vm.wait_finished(Duration::from_secs(60));
    let status = vm.status();
    eprintln!("{}", serde_json::to_string_pretty(&status).unwrap());
    eprintln!("{:?}", vm.devices().serial.recent_lines());
    eprintln!("{}", serde_json::to_string_pretty(&vm.progress()).unwrap());
    assert_eq!(out, WaitOutcome::Reached);
    assert_eq!(vm.run_state(), VmRunState::Finished);
    assert_eq!(vm.progress().steps, 200_000);
}
