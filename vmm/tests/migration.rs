//! Postcopy (and hybrid) migration over TCP loopback between two VMs in this process (the multi-process
//! version, through the CLI, is tests/tests/migration.rs). The oracle: the migrated VM's memory
//! after N steps equals a run that never migrated.

use std::sync::{mpsc, Arc};
use std::time::Duration;

mod common;
use common::{config, reference_digest, TIMEOUT};

use tsubame_vmm::{SerialOutput, Vm, WaitOutcome};

const SECRET: &[u8] = b"test secret";

/// Starts a destination on an ephemeral port (running the VM as soon as it arrives if
/// `resume`); returns its address and the thread building it.
fn destination(
    secret: &'static [u8],
    resume: bool,
) -> (
    String,
    std::thread::JoinHandle<Result<Arc<Vm>, tsubame_vmm::Error>>,
) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        Vm::incoming(
            "tcp:127.0.0.1:0",
            secret,
            &tsubame_vmm::migration::IncomingOptions {
                resume,
                ..Default::default()
            },
            &SerialOutput::Discard,
            |a| tx.send(a).unwrap(),
        )
    });
    let addr = rx.recv_timeout(TIMEOUT).expect("destination listening");
    (format!("tcp:{addr}"), t)
}

#[test]
fn postcopy_migration_keeps_the_digest() {
    use tsubame_vmm::migration::{MigrateOptions, Prepage};
    for (vcpus, workload, prepage, precopy_rounds) in [
        (1, "hotcold:ws=32M,write=0.3,seed=61", Prepage::Address, 0),
        (2, "uniform:ws=32M,write=0.3,seed=62", Prepage::Bubble, 0),
        (2, "hotcold:ws=32M,write=0.3,seed=64", Prepage::Hot, 0),
        (1, "uniform:ws=32M,write=0.5,seed=65", Prepage::Address, 2),
        (2, "hotcold:ws=32M,write=0.3,seed=66", Prepage::Hot, 3),
    ] {
        let cfg = config(vcpus, workload, 1_500_000);
        let reference = reference_digest(&cfg);
        let source = Arc::new(Vm::new(&cfg).unwrap());
        source.resume().unwrap();
        assert_eq!(
            source.wait_steps(300_000 * vcpus as u64, TIMEOUT),
            WaitOutcome::Reached
        );
        let (uri, dest) = destination(SECRET, true);
        let options = MigrateOptions {
            prepage,
            precopy_rounds,
            ..Default::default()
        };
        let status = source.migrate(&uri, SECRET, &options).unwrap();
        assert_eq!(status.prepage, prepage);
        if precopy_rounds > 0 {
            assert!(
                status.pages_precopy >= status.total_pages && status.precopy_round >= 1,
                "round 1 sends every page: {status:?}"
            );
            assert!(
                status.pages_stale > 0,
                "a guest writing throughout leaves stale pages: {status:?}"
            );
        }
        if prepage == Prepage::Hot {
            assert!(
                status.hot_pages > 0,
                "the profile saw the guest write nothing: {status:?}"
            );
        }
        let dest = dest.join().unwrap().unwrap();
        assert_eq!(dest.run_state(), tsubame_vmm::VmRunState::Running);
        assert!(
            source.resume().is_err(),
            "a migrated VM must not run at the source again"
        );
        assert_eq!(
            dest.wait_finished(TIMEOUT),
            WaitOutcome::Reached,
            "{:?}",
            dest.status()
        );
        assert_eq!(
            dest.digest().unwrap().0,
            reference,
            "{workload} on {vcpus} vCPUs"
        );
        let m = dest.migration_status().unwrap();
        eprintln!("source: {status:?}\ndestination: {m}");
        // The source learns that the destination has everything.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while source.migrated_away().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no Complete from the destination"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let done = source.migrated_away().unwrap();
        assert!(done.error.is_none(), "{done:?}");
        if precopy_rounds == 0 {
            assert_eq!(
                done.pages_demand + done.pages_pushed - done.pages_duplicate,
                done.total_pages,
                "every page sent, and only demand replies twice"
            );
        } else {
            assert!(
                done.pages_demand + done.pages_pushed - done.pages_duplicate >= done.pages_stale,
                "every stale page sent again: {done:?}"
            );
        }
        eprintln!("source done: {done:?}");
    }
}

#[test]
fn wrong_secret_moves_nothing() {
    let source = Arc::new(Vm::new(&config(1, "uniform:ws=8M,seed=63", 0)).unwrap());
    source.resume().unwrap();
    let (uri, dest) = destination(b"the right secret", false);
    let err = source
        .migrate(&uri, b"a wrong secret", &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("shared secret"), "{err}");
    // The source VM keeps running here and can still be migrated.
    assert_eq!(source.run_state(), tsubame_vmm::VmRunState::Running);
    assert!(source.migration_status().is_none());
    source
        .migrate(&uri, b"the right secret", &Default::default())
        .unwrap();
    let dest = dest.join().unwrap().unwrap();
    dest.resume().unwrap();
    assert_eq!(dest.run_state(), tsubame_vmm::VmRunState::Running);
}

#[test]
fn a_cancelled_migration_leaves_the_vm_running_and_it_can_migrate_again() {
    use tsubame_vmm::migration::{MigrateOptions, Prepage};
    let cfg = config(1, "uniform:ws=32M,write=0.3,seed=67", 1_500_000);
    let reference = reference_digest(&cfg);
    let source = Arc::new(Vm::new(&cfg).unwrap());
    source.resume().unwrap();
    assert_eq!(source.wait_steps(300_000, TIMEOUT), WaitOutcome::Reached);
    assert!(source.cancel_migration().is_err(), "nothing to cancel yet");
    // Precopy capped at 8 MB/s: round 1 alone would take 8 s.
    let (uri, dest) = destination(SECRET, true);
    let options = MigrateOptions {
        prepage: Prepage::Address,
        precopy_rounds: 2,
        max_bandwidth: Some(8 << 20),
        ..Default::default()
    };
    let migrating = {
        let (s, uri, options) = (source.clone(), uri.clone(), options.clone());
        std::thread::spawn(move || s.migrate(&uri, SECRET, &options))
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while source
        .migration_status()
        .is_none_or(|m| m["pages_precopy"].as_u64().unwrap_or(0) == 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "precopy never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    source.cancel_migration().unwrap();
    let e = migrating.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    assert!(e.contains("keeps running here"), "{e}");
    assert_eq!(source.run_state(), tsubame_vmm::VmRunState::Running);
    assert!(source.migration_status().is_none());
    let d = dest.join().unwrap();
    assert!(d.is_err(), "the destination never got the VM");
    // The guest went on here; now it moves for real and finishes with the same memory.
    let (uri, dest) = destination(SECRET, true);
    source
        .migrate(
            &uri,
            SECRET,
            &MigrateOptions {
                precopy_rounds: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let dest = dest.join().unwrap().unwrap();
    assert_eq!(dest.wait_finished(TIMEOUT), WaitOutcome::Reached);
    assert_eq!(dest.digest().unwrap().0, reference);
    assert!(
        matches!(
            source.cancel_migration(),
            Err(tsubame_vmm::Error::Migration(
                tsubame_vmm::migration::MigrationError::TooLateToCancel
            ))
        ),
        "the VM runs at the destination now"
    );
}

/// Waits until `vm`'s `query-migrate` satisfies `f`.
fn wait_migration(vm: &Vm, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let m = vm.migration_status().unwrap_or_default();
        if f(&m) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {m:#}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cancellable_migration_rolls_back_from_its_checkpoints_at_either_end() {
    use tsubame_vmm::migration::{MigrateOptions, Prepage};
    // (vCPUs, cancelled at the source, checkpoints committed first, seed): right after the
    // switchover (nothing committed yet: the source resumes from the switchover's state) and
    // after several.
    for (vcpus, cancel_at_source, committed, seed) in [
        (1, true, 3, 71),
        (2, false, 3, 72),
        (2, true, 0, 73),
        (1, false, 0, 76),
    ] {
        let cfg = config(
            vcpus,
            &format!("uniform:ws=32M,write=0.3,seed={seed}"),
            1_500_000,
        );
        let reference = reference_digest(&cfg);
        let source = Arc::new(Vm::new(&cfg).unwrap());
        source.resume().unwrap();
        assert_eq!(
            source.wait_steps(200_000 * vcpus as u64, TIMEOUT),
            WaitOutcome::Reached
        );
        let (uri, dest) = destination(SECRET, true);
        // The push capped at 4 MB/s: the destination needs seconds for its pages, and the guest
        // writes throughout.
        let options = MigrateOptions {
            prepage: Prepage::Address,
            max_bandwidth: Some(4 << 20),
            checkpoint_ms: Some(50),
            ..Default::default()
        };
        source.migrate(&uri, SECRET, &options).unwrap();
        let dest = dest.join().unwrap().unwrap();
        wait_migration(&source, "checkpoints committed", |m| {
            m["checkpoints"]["committed"].as_u64().unwrap_or(0) >= committed
        });
        if cancel_at_source {
            source.cancel_migration().unwrap();
        } else {
            dest.cancel_migration().unwrap();
            wait_migration(&source, "rolled back", |m| m["phase"] == "cancelled");
        }
        assert_eq!(
            source.run_state(),
            tsubame_vmm::VmRunState::Running,
            "{:#}",
            source.migration_status().unwrap()
        );
        assert_eq!(
            dest.run_state(),
            tsubame_vmm::VmRunState::Fenced,
            "the destination stopped for good"
        );
        assert!(
            dest.resume().is_err(),
            "a fenced destination never runs again"
        );
        let m = source.migration_status().unwrap();
        assert_eq!(m["phase"], "cancelled", "{m:#}");
        if committed > 0 {
            assert!(
                m["checkpoints"]["pause_p50_us"].as_u64().unwrap() > 0,
                "{m:#}"
            );
        }
        assert!(m["checkpoints"]["resume_ms"].as_f64().is_some(), "{m:#}");
        assert_eq!(source.wait_finished(TIMEOUT), WaitOutcome::Reached);
        assert_eq!(
            source.digest().unwrap().0,
            reference,
            "vcpus {vcpus}, cancelled after {committed} checkpoints"
        );
    }
}

#[test]
fn a_cancellable_migration_that_completes_hands_the_vm_over() {
    use tsubame_vmm::migration::MigrateOptions;
    let cfg = config(2, "hotcold:ws=32M,write=0.3,seed=74", 1_500_000);
    let reference = reference_digest(&cfg);
    let source = Arc::new(Vm::new(&cfg).unwrap());
    source.resume().unwrap();
    assert_eq!(source.wait_steps(300_000, TIMEOUT), WaitOutcome::Reached);
    let (uri, dest) = destination(SECRET, true);
    let options = MigrateOptions {
        checkpoint_ms: Some(20),
        ..Default::default()
    };
    source.migrate(&uri, SECRET, &options).unwrap();
    let dest = dest.join().unwrap().unwrap();
    wait_migration(&source, "handed over", |m| m["phase"] == "completed");
    wait_migration(&dest, "handed over", |m| {
        m["checkpoints"]["state"] == "handed-over"
    });
    assert!(source.cancel_migration().is_err(), "too late");
    assert!(dest.cancel_migration().is_err(), "too late");
    assert_eq!(dest.wait_finished(TIMEOUT), WaitOutcome::Reached);
    assert_eq!(dest.digest().unwrap().0, reference);
}

/// A destination that speaks the protocol by hand: takes the VM's state, then sends `forge`
/// on the checkpoint channel and goes silent.
fn forging_destination(
    forge: impl FnOnce(&mut std::net::TcpStream, &[u8]) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    use tsubame_pageserver::{Acceptor, Message};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let mut acceptor = Acceptor::new(listener, SECRET, "forger");
        let s = acceptor.next(|_| Ok(())).unwrap();
        Message::Ready.write_to(&mut &s.urgent).unwrap();
        let state = loop {
            if let Message::VmState(j) = Message::read_from(&mut &s.urgent).unwrap() {
                break j;
            }
        };
        let mut c = s.checkpoint.expect("a checkpoint channel");
        forge(&mut c, &state);
        // Silent from here on (the connections stay open): only the lease tells the source.
        std::thread::sleep(Duration::from_secs(3));
        drop((s.urgent, s.bulk, c));
    });
    (uri, t)
}

#[test]
fn a_forged_or_truncated_checkpoint_is_rejected_and_memory_stays_unchanged() {
    use tsubame_pageserver::Message;
    use tsubame_vmm::migration::MigrateOptions;
    type Forge = Box<dyn FnOnce(&mut std::net::TcpStream, &[u8]) + Send>;
    // A page of the working set, overwritten by each forgery: applied, it would break the
    // digest and the guest's own verification.
    let victim = tsubame_pages::Gfn(0x2000);
    let begin = |epoch, state: &[u8]| Message::CheckpointBegin {
        epoch,
        lease_ms: 300,
        interval_ms: 50,
        state: state.to_vec(),
    };
    let overwrite = move |c: &mut std::net::TcpStream| {
        Message::Pages {
            gfn: victim,
            data: vec![0xaa; 4096],
        }
        .write_to(c)
        .unwrap();
    };
    let forgeries: Vec<(&str, bool, Forge)> = vec![
        (
            "another VM's state",
            true,
            Box::new(move |c, state| {
                let mut s: serde_json::Value = serde_json::from_slice(state).unwrap();
                s["id"] = serde_json::json!(12345);
                begin(1, &serde_json::to_vec(&s).unwrap())
                    .write_to(c)
                    .unwrap();
            }),
        ),
        (
            "pages outside the VM",
            true,
            Box::new(move |c, state| {
                begin(1, state).write_to(c).unwrap();
                overwrite(c);
                Message::Pages {
                    gfn: tsubame_pages::Gfn(1 << 30),
                    data: vec![0xaa; 4096],
                }
                .write_to(c)
                .unwrap();
            }),
        ),
        (
            "a page count that does not add up",
            true,
            Box::new(move |c, state| {
                begin(1, state).write_to(c).unwrap();
                overwrite(c);
                Message::CheckpointEnd {
                    epoch: 1,
                    pages: 2,
                    pause_us: 1,
                }
                .write_to(c)
                .unwrap();
            }),
        ),
        (
            "a checkpoint cut short",
            false,
            Box::new(move |c, state| {
                begin(1, state).write_to(c).unwrap();
                overwrite(c);
                // No end: the connection goes quiet, then closes.
            }),
        ),
    ];
    let cfg = config(1, "uniform:ws=32M,write=0.3,seed=75", 1_000_000);
    let reference = reference_digest(&cfg);
    for (what, rejected, forge) in forgeries {
        let source = Arc::new(Vm::new(&cfg).unwrap());
        source.resume().unwrap();
        assert_eq!(source.wait_steps(200_000, TIMEOUT), WaitOutcome::Reached);
        let (uri, forger) = forging_destination(forge);
        let options = MigrateOptions {
            checkpoint_ms: Some(50),
            ..Default::default()
        };
        source.migrate(&uri, SECRET, &options).unwrap();
        wait_migration(&source, "the source resumes the VM", |m| {
            m["phase"] == "cancelled"
        });
        let m = source.migration_status().unwrap();
        let c = &m["checkpoints"];
        assert_eq!(c["committed"], 0, "{what}: {c:#}");
        assert_eq!(c["rejected"], u64::from(rejected), "{what}: {c:#}");
        if rejected {
            let reason = c["reason"].as_str().unwrap();
            assert!(reason.contains("rejected"), "{what}: {c:#}");
        }
        assert_eq!(
            source.wait_finished(TIMEOUT),
            WaitOutcome::Reached,
            "{what}"
        );
        assert_eq!(source.digest().unwrap().0, reference, "{what}");
        forger.join().unwrap();
    }
}
