//! Userfaultfd write protection under this host's KVM: writes by a vCPU running the guest at
//! CPL3 (KVM writes guest memory in kernel mode) and by VMM threads to write-protected guest
//! pages reach the fault thread, wait there, and land once the page is un-protected.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, reference_digest, TIMEOUT};
use tsubame_pages::Gfn;
use tsubame_uffd::{FaultEngine, FetchError, Fetcher};
use tsubame_vmm::{Vm, WaitOutcome};

/// Missing pages come in as zeros; write faults are counted, then un-protected.
struct Zeros {
    write_faults: AtomicU64,
}

impl Fetcher for Zeros {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        engine
            .install_zero(gfn, 1)
            .map(drop)
            .map_err(|e| FetchError(e.to_string()))
    }

    fn write_fault(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        self.write_faults.fetch_add(1, Ordering::Relaxed);
        engine
            .unprotect(gfn, 1)
            .map_err(|e| FetchError(e.to_string()))
    }
}

#[test]
fn cpl3_vcpu_writes_and_vmm_writes_to_protected_pages_fault_and_land() {
    let cfg = config(1, "uniform:ws=16M,write=0.5,seed=3", 400_000);
    let expected = reference_digest(&cfg);
    let vm = Vm::new(&cfg).unwrap();
    let memory = vm.memory().clone();
    let layout = memory.layout().clone();
    let engine = FaultEngine::new_write_protected(&layout, memory.hvas()).unwrap();
    let fetcher = Arc::new(Zeros {
        write_faults: AtomicU64::new(0),
    });
    engine.start(fetcher.clone()).unwrap();
    vm.resume().unwrap();
    assert_eq!(vm.wait_steps(50_000, TIMEOUT), WaitOutcome::Reached);
    // Every page is registered; protect them all (pages not populated are left alone).
    let region = &layout.regions[0];
    engine
        .write_protect(region.first_gfn(), region.size / 4096)
        .unwrap();
    let t = Instant::now();
    while fetcher.write_faults.load(Ordering::Relaxed) < 100 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no write faults from the vCPU"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A VMM thread's write to a protected page waits for the fault thread too.
    let page = Gfn(0x800);
    let mut b = [0u8; 8];
    memory.read(page.gpa(), &mut b).unwrap();
    engine.write_protect(page, 1).unwrap();
    let before = fetcher.write_faults.load(Ordering::Relaxed);
    memory.write(page.gpa(), &b).unwrap(); // the same bytes: the digest stays
    assert!(fetcher.write_faults.load(Ordering::Relaxed) > before);
    assert_eq!(vm.wait_finished(TIMEOUT), WaitOutcome::Reached);
    vm.pause().unwrap();
    assert_eq!(vm.digest().unwrap().0, expected);
    eprintln!("write faults: {}", engine.stats().write_faults);
    engine.stop();
}
