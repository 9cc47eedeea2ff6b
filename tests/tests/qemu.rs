//! The built-in guest under QEMU with KVM: the same image the Tsubame VMM boots, with its config
//! block patched in, runs its workload to the end, verifies every page of its working set, and
//! ends QEMU through `isa-debug-exit` with the done status.
//!
//! QEMU is the peer Tsubame's migration is measured against, so it must run the same guest. This
//! test fails (it does not skip) when `qemu-system-x86_64` is missing: CI installs it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tsubame_qemu_peer::guest::{
    done_exit_code, find_qemu, qemu_config_block, QemuGuest, QemuOutcome,
};
use tsubame_tests::scratch_dir;
use tsubame_vmm::guest::{image_with_config, WorkloadSpec, GUEST_IMAGE};

const MEM_BYTES: u64 = 256 << 20;
const STEPS: u64 = 2_000_000;
const REPORT_EVERY: u64 = 500_000;
/// Booting takes ~4 s here (SeaBIOS runs at emulated CPL0) and the workload ~1.5 s.
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn builtin_guest_runs_to_the_end_under_qemu_kvm() -> Result<()> {
    let qemu = find_qemu().context(
        "qemu-system-x86_64 is not on PATH: run the README's setup, which installs it \
         (apt-get install -y qemu-system-x86)",
    )?;

    let spec: WorkloadSpec = "hotcold:ws=64M,write=0.3,seed=7".parse()?;
    let exit_on_done = true;
    let config = qemu_config_block(&spec, MEM_BYTES, STEPS, REPORT_EVERY, exit_on_done)?;
    let image = image_with_config(GUEST_IMAGE, &config)?;

    let dir = scratch_dir("qemu")?;
    let image_path = dir.join("guest.elf");
    std::fs::write(&image_path, image)
        .with_context(|| format!("writing {}", image_path.display()))?;
    let guest = QemuGuest {
        qemu_binary: qemu,
        mem_bytes: MEM_BYTES,
        image: image_path,
        serial: dir.join("serial.txt"),
        exit_on_done,
        extra_args: Vec::new(),
    };
    let result = guest
        .run(TIMEOUT)
        .with_context(|| format!("running {:?}", guest.command()))?;
    eprintln!(
        "QEMU ran {STEPS} steps of {spec} in {:.2?} (boot included): {:?}",
        result.elapsed, result.outcome
    );

    let explain = || {
        format!(
            "command: {:?}\nQEMU exit status: {:?}\nserial:\n{}\nQEMU stderr:\n{}",
            guest.command(),
            result.status,
            result.serial,
            result.stderr
        )
    };
    ensure!(
        result.outcome == QemuOutcome::Finished,
        "the guest did not finish under QEMU ({:?})\n{}",
        result.outcome,
        explain()
    );
    let code = result.status.and_then(|s| s.code());
    ensure!(
        code == Some(done_exit_code()),
        "QEMU did not exit with the done status {} (isa-debug-exit)\n{}",
        done_exit_code(),
        explain()
    );
    ensure!(
        !result.serial.contains("VERIFY ERROR"),
        "the guest found a bad page\n{}",
        explain()
    );
    for step in (REPORT_EVERY..=STEPS).step_by(usize::try_from(REPORT_EVERY)?) {
        let line = format!("cpu 0 step {step}\n");
        ensure!(
            result.serial.contains(&line),
            "no progress line {line:?}\n{}",
            explain()
        );
    }
    let done = format!("cpu 0 done after {STEPS} steps\n");
    ensure!(
        result.serial.contains(&done),
        "no line {done:?}\n{}",
        explain()
    );

    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}
