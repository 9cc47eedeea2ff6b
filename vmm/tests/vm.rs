//! In-process tests on real KVM: the built-in guest boots and runs its workload to the end; a run
//! that is paused, saved and restored into a fresh VM leaves the same memory digest as one that
//! never stopped; the in-guest verifier catches a page corrupted behind its back.
//! (The same across processes, through the CLI, is in tests/tests/restore.rs.)

use std::path::PathBuf;

mod common;
use common::{config, TIMEOUT};

use tsubame_vmm::devices::CpuStatus;
use tsubame_vmm::guest::read_config;
use tsubame_vmm::memory::Gpa;
use tsubame_vmm::{Digest, SerialOutput, Vm, VmConfig, VmRunState, WaitOutcome};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tsubame-vmtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `cfg` to the end without interruption and returns the digest.
fn uninterrupted(cfg: &VmConfig) -> Digest {
    let vm = Vm::new(cfg).unwrap();
    vm.resume().unwrap();
    assert_eq!(
        vm.wait_finished(TIMEOUT),
        WaitOutcome::Reached,
        "{:?}",
        vm.status()
    );
    assert_eq!(vm.progress().steps, cfg.steps * cfg.vcpus as u64);
    vm.digest().unwrap().0
}

/// Runs `cfg` until `stop_at` total steps, saves, restores into a new VM, runs to the end.
fn interrupted(cfg: &VmConfig, stop_at: u64, name: &str) -> Digest {
    let snap = scratch(name);
    {
        let vm = Vm::new(cfg).unwrap();
        vm.resume().unwrap();
        assert_eq!(vm.wait_steps(stop_at, TIMEOUT), WaitOutcome::Reached);
        vm.pause().unwrap();
        let p = vm.progress();
        assert!(!p.finished, "stopped too late to test anything: {p:?}");
        vm.save(&snap).unwrap();
    }
    let vm = Vm::restore(&snap, &SerialOutput::Discard).unwrap();
    assert_eq!(vm.run_state(), VmRunState::Paused);
    vm.resume().unwrap();
    assert_eq!(
        vm.wait_finished(TIMEOUT),
        WaitOutcome::Reached,
        "{:?}",
        vm.status()
    );
    assert_eq!(vm.progress().steps, cfg.steps * cfg.vcpus as u64);
    std::fs::remove_file(&snap).unwrap();
    vm.digest().unwrap().0
}

fn check_restore(vcpus: usize, workload: &str, name: &str) {
    let cfg = config(vcpus, workload, 1_500_000);
    let reference = uninterrupted(&cfg);
    assert_eq!(
        reference,
        uninterrupted(&cfg),
        "the workload itself is not deterministic"
    );
    let resumed = interrupted(&cfg, 300_000 * vcpus as u64, name);
    assert_eq!(
        resumed, reference,
        "{workload} on {vcpus} vCPUs: restore changed the result"
    );
}

#[test]
fn restore_sequential_1_vcpu() {
    check_restore(1, "seq:ws=16M,write=0.5,seed=11", "seq1");
}

#[test]
fn restore_uniform_1_vcpu() {
    check_restore(1, "uniform:ws=16M,write=0.3,seed=12", "uni1");
}

#[test]
fn restore_hotcold_1_vcpu() {
    check_restore(1, "hotcold:ws=16M,write=0.3,seed=13", "hc1");
}

#[test]
fn restore_sequential_2_vcpus() {
    check_restore(2, "seq:ws=16M,write=0.5,seed=21", "seq2");
}

#[test]
fn restore_uniform_2_vcpus() {
    check_restore(2, "uniform:ws=16M,write=0.3,seed=22", "uni2");
}

#[test]
fn restore_hotcold_2_vcpus() {
    check_restore(2, "hotcold:ws=16M,write=0.3,seed=23", "hc2");
}

#[test]
fn different_seeds_give_different_memory() {
    let a = uninterrupted(&config(1, "uniform:ws=4M,seed=1", 100_000));
    let b = uninterrupted(&config(1, "uniform:ws=4M,seed=2", 100_000));
    assert_ne!(a, b);
}

/// Pauses `vm` after some steps and returns (working-set index, gpa) of two pages it has written.
///
/// Tests tamper with both: the pause stops the vCPU at an arbitrary instruction, possibly in the
/// middle of a step on one of the pages, between reading its expected version and writing the
/// page's next version. That step then overwrites the tampering when the VM resumes, so only the
/// other page is certain to stay tampered (one vCPU runs one step at a time).
fn written_pages(vm: &Vm) -> [(u64, u64); 2] {
    assert_eq!(vm.wait_steps(200_000, TIMEOUT), WaitOutcome::Reached);
    vm.pause().unwrap();
    let cfg = read_config(vm.memory()).unwrap();
    let mut written = (0..cfg.working_set_pages())
        .filter(|&i| version(vm, i) > 0)
        .map(|i| (i, cfg.page_gpa(i).unwrap()));
    [
        written.next().expect("the guest wrote some page"),
        written.next().expect("the guest wrote a second page"),
    ]
}

/// The version table entry of working-set page `index`.
fn version(vm: &Vm, index: u64) -> u32 {
    let cfg = read_config(vm.memory()).unwrap();
    let mut v = [0u8; 4];
    vm.memory()
        .read(Gpa(cfg.vtable_gpa + 4 * index), &mut v)
        .unwrap();
    u32::from_le_bytes(v)
}

/// Resumes `vm` and expects the verifier to report `kind` on one of the `pages` (see
/// [`written_pages`] for why there are two).
fn expect_verify_error(vm: &Vm, pages: [(u64, u64); 2], kind: &str) {
    vm.resume().unwrap();
    assert_eq!(vm.wait_finished(TIMEOUT), WaitOutcome::GuestError);
    assert_eq!(vm.run_state(), VmRunState::GuestError);
    let err = vm
        .progress()
        .verify_error
        .expect("the guest reports what it found");
    assert!(
        pages.iter().any(|&(_, gpa)| err.gfn == gpa / 4096),
        "{err:?} is not about the tampered pages {pages:?}"
    );
    assert!(err.kind.starts_with(kind), "{err:?}");
    assert_eq!(vm.status().vcpus[0].guest, CpuStatus::VerifyFailed);
}

#[test]
fn verifier_catches_a_corrupted_page() {
    let vm = Vm::new(&config(1, "uniform:ws=4M,write=0.5,seed=5", 2_000_000)).unwrap();
    vm.resume().unwrap();
    let pages = written_pages(&vm);
    for (_, gpa) in pages {
        let mut byte = [0u8; 1];
        vm.memory().read(Gpa(gpa + 1000), &mut byte).unwrap();
        vm.memory()
            .write(Gpa(gpa + 1000), &[byte[0] ^ 0x5a])
            .unwrap();
    }
    expect_verify_error(&vm, pages, "corrupt");
}

#[test]
fn verifier_catches_a_zeroed_page() {
    // What a migration that lost a page and filled it with zeroes would look like.
    let vm = Vm::new(&config(1, "uniform:ws=4M,write=0.5,seed=6", 2_000_000)).unwrap();
    vm.resume().unwrap();
    let pages = written_pages(&vm);
    for (_, gpa) in pages {
        vm.memory().write(Gpa(gpa), &[0u8; 4096]).unwrap();
    }
    expect_verify_error(&vm, pages, "zeroed");
}

#[test]
fn verifier_catches_a_stale_page() {
    // What a migration that installed an old copy of a page would look like.
    let vm = Vm::new(&config(1, "hotcold:ws=4M,write=0.5,seed=7", 2_000_000)).unwrap();
    vm.resume().unwrap();
    let pages = written_pages(&vm);
    let cfg = read_config(vm.memory()).unwrap();
    for (index, _) in pages {
        // Bump the expected version: the page content is now one version behind.
        let bumped = version(&vm, index) + 1;
        vm.memory()
            .write(Gpa(cfg.vtable_gpa + 4 * index), &bumped.to_le_bytes())
            .unwrap();
    }
    expect_verify_error(&vm, pages, "stale");
}

#[test]
fn lazy_restore_continues_exactly() {
    // Postcopy from a file: the vCPUs resume on empty RAM under userfaultfd; pages fault in from
    // the snapshot while the prefetch thread pushes the rest. Same digest as never stopping.
    for (vcpus, workload) in [
        (1, "hotcold:ws=16M,write=0.3,seed=51"),
        (2, "uniform:ws=16M,write=0.3,seed=52"),
    ] {
        let cfg = config(vcpus, workload, 1_500_000);
        let reference = uninterrupted(&cfg);
        let snap = scratch(&format!("lazy{vcpus}"));
        {
            let vm = Vm::new(&cfg).unwrap();
            vm.resume().unwrap();
            assert_eq!(
                vm.wait_steps(300_000 * vcpus as u64, TIMEOUT),
                WaitOutcome::Reached
            );
            vm.pause().unwrap();
            vm.save(&snap).unwrap();
        }
        let vm = Vm::restore_lazy(&snap, &SerialOutput::Discard).unwrap();
        vm.resume().unwrap();
        assert_eq!(
            vm.wait_finished(TIMEOUT),
            WaitOutcome::Reached,
            "{:?}",
            vm.status()
        );
        let stats = vm.paging_stats().expect("lazily restored");
        assert!(stats.fetch_error.is_none(), "{stats:?}");
        assert_eq!(
            vm.digest().unwrap().0,
            reference,
            "{workload} on {vcpus} vCPUs"
        );
        let stats = vm.paging_stats().unwrap();
        assert_eq!(stats.present_pages, stats.total_pages, "{stats:?}");
        eprintln!("lazy restore, {vcpus} vCPUs: {stats:?}");
        std::fs::remove_file(&snap).unwrap();
    }
}
