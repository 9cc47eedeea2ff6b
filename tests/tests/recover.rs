//! A postcopy migration whose session breaks after the switchover picks itself up again: the
//! destination dials the source's resume listener, says which pages it still lacks, and the
//! source serves them on the new session (see `vmm::migration::recover`). The link between
//! them goes through `tsubame linkem`, which resets it, or goes silent; the oracle: the guest
//! finishes at the destination with the digest of a run that never migrated. Also: a resume
//! with a wrong secret, or for another VM, is refused.

use std::time::Duration;

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "recover secret";
const COMMON: [&str; 8] = [
    "--mem",
    "128M",
    "--vcpus",
    "2",
    "--workload",
    "uniform:ws=96M,write=0.2,seed=161",
    "--steps",
    "3000000",
];

/// Migrates a running guest, postcopy with its push capped, to a destination behind a
/// `linkem`; once it runs there, applies `fault` to the link (and `then` after `hold`), and
/// checks the guest finishes there with the reference digest, the session resumed at least
/// once if `resumed`. With `noticed_within`, the destination must show the outage that soon
/// after the fault, while its guest still runs.
fn recovers_after(
    name: &str,
    common: &[&str],
    fault: (&str, Value),
    hold: Duration,
    then: Option<&str>,
    resumed: bool,
    noticed_within: Option<Duration>,
) -> Value {
    let dir = Scratch::new(name);
    let reference = run_to_end(common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), common).unwrap();
    let dsock = dir.path("dst.sock");
    let (dest, uri) = VmProcess::destination(
        SECRET,
        &["--mem", "128M", "--control", dsock.to_str().unwrap()],
    )
    .unwrap();
    let (link, via) =
        VmProcess::linkem(uri.trim_start_matches("tcp:"), &dir.path("link.sock")).unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 100_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": format!("tcp:{via}"), "secret": SECRET, "max_bandwidth": 16 << 20}),
        )
        .unwrap();
    assert_eq!(m["phase"], "postcopy", "{m}");
    assert!(m["recovery"]["listen"].is_string(), "{m}");
    dest.wait_for_stderr("control socket ready", Duration::from_secs(30))
        .unwrap();
    if noticed_within.is_some() {
        // Until the guest has its working set: no fault for half a second.
        let faults = || {
            dest.ctl("query-status", json!({})).unwrap()["demand_paging"]["faults"]
                .as_u64()
                .unwrap()
        };
        let mut last = faults();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = faults();
            if now == last {
                break;
            }
            last = now;
        }
    }
    link.ctl(fault.0, fault.1).unwrap();
    if let Some(within) = noticed_within {
        // The destination notices on its own, while its guest still runs.
        let t0 = std::time::Instant::now();
        loop {
            let s = dest.ctl("query-status", json!({})).unwrap();
            if s["demand_paging"]["owners"][0]["link"]["outages"].as_u64() >= Some(1) {
                break;
            }
            assert_ne!(s["status"], "finished", "the guest finished first: {s}");
            assert!(
                t0.elapsed() < within,
                "no outage noticed in {within:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(hold);
    if let Some(then) = then {
        link.ctl(then, json!({})).unwrap();
    }
    let log = source.stderr();
    let (status, _) = source.wait().unwrap();
    assert!(
        status.success(),
        "source: {status}\n{log}\n{}",
        dest.stderr()
    );
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(
        summary["digest"], reference["digest"],
        "the resumed migration changed the result"
    );
    // (Not every page need be here when the summary's statistics are taken: a guest that
    // finished before the capped push did has its last pages read in by the digest.)
    let paging = &summary["demand_paging"];
    assert!(paging["fetch_error"].is_null(), "{paging}\nsource:\n{log}");
    let link = &paging["owners"][0]["link"];
    if resumed {
        assert!(link["outages"].as_u64().unwrap() >= 1, "{link}");
        assert!(link["redials"].as_u64().unwrap() >= 1, "{link}");
    }
    summary
}

#[test]
fn recovers_after_the_connections_are_reset() {
    recovers_after(
        "recover-reset",
        &COMMON,
        ("reset", json!({})),
        Duration::ZERO,
        None,
        true,
        None,
    );
}

/// Silence without a reset: the destination gives the link up once a fault waits 2 s, and
/// dials back.
#[test]
fn recovers_after_a_blackhole() {
    recovers_after(
        "recover-blackhole",
        &COMMON,
        ("blackhole", json!({})),
        Duration::from_secs(4),
        Some("restore"),
        true,
        None,
    );
}

/// Silence while no fault waits: the guest has its working set and touches nothing missing,
/// so only the stalled push could tell. The destination hears nothing on the link for 1 s,
/// probes it with a request for a page the source still owns (a heartbeat), gives it up 2 s
/// later, and dials back.
#[test]
fn recovers_after_a_blackhole_while_no_fault_waits() {
    recovers_after(
        "recover-idle-blackhole",
        &[
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--workload",
            "uniform:ws=8M,write=0.2,seed=161",
            "--steps",
            "45000000",
        ],
        ("blackhole", json!({})),
        Duration::from_secs(5),
        Some("restore"),
        true,
        Some(Duration::from_secs(8)),
    );
}

/// A 2 s cut is right at the destination's silence threshold: the session either carries on
/// when the cut ends (TCP kept it) or is given up and resumed; either way the guest loses
/// nothing.
#[test]
fn survives_a_2_second_cut() {
    recovers_after(
        "recover-cut",
        &COMMON,
        ("cut", json!({"ms": 2000})),
        Duration::ZERO,
        None,
        false,
        None,
    );
}

/// The resume listener authenticates like every other session, and resumes this VM only.
#[test]
fn a_resume_with_a_wrong_secret_or_for_another_vm_is_refused() {
    use tsubame_pageserver::session;
    use tsubame_pageserver::{Channel, Hello, Purpose};
    let dir = Scratch::new("recover-refused");
    let source = VmProcess::start(&dir.path("src.sock"), &COMMON).unwrap();
    let (_dest, uri) = VmProcess::destination(SECRET, &["--mem", "128M"]).unwrap();
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "max_bandwidth": 8 << 20}),
        )
        .unwrap();
    let listen = m["recovery"]["listen"].as_str().unwrap().to_string();
    let layout = tsubame_pages::MemoryLayout::for_size(128 << 20).unwrap();
    let hello = |vm| Hello {
        purpose: Purpose::Resume,
        channel: Channel::Urgent,
        session: 0,
        vm,
        layout: layout.clone(),
        vcpus: 2,
        checkpoint_ms: 0,
    };
    let vm = source.ctl("query-status", json!({})).unwrap()["id"]
        .as_u64()
        .unwrap_or(1);
    let Err(e) = session::open(&listen, b"not the secret", &hello(vm)) else {
        panic!("a wrong secret is refused");
    };
    let e = e.to_string();
    assert!(e.contains("refused"), "{e}");
    let Err(e) = session::open(&listen, SECRET.as_bytes(), &hello(vm ^ 0x5a5a)) else {
        panic!("another VM's resume is refused");
    };
    let e = e.to_string();
    assert!(e.contains("one VM's migration"), "{e}");
}
