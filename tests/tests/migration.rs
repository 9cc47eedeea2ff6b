//! Postcopy migration between two `tsubame` processes over TCP loopback: the destination
//! (`run --incoming`) receives the VM mid-run and finishes it with the same memory digest as a
//! run that never migrated; a wrong secret or a layout mismatch moves nothing and leaves the
//! source running.

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "e2e secret";

/// Starts a destination on an ephemeral port; returns it and its `tcp:HOST:PORT`.
fn destination(extra: &[&str]) -> (VmProcess, String) {
    VmProcess::destination(SECRET, extra).unwrap()
}

fn migrate(name: &str, vcpus: &str, workload: &str, prepage: &str, precopy_rounds: u32) {
    migrate_to(name, vcpus, workload, prepage, precopy_rounds, true);
}

/// [`migrate`], with the destination's staging pool on or off.
fn migrate_to(
    name: &str,
    vcpus: &str,
    workload: &str,
    prepage: &str,
    precopy_rounds: u32,
    staging: bool,
) {
    let dir = Scratch::new(name);
    let common = [
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--workload",
        workload,
        "--steps",
        "1500000",
    ];
    let reference = run_to_end(&common).unwrap();

    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    // Told the size, the destination prepares a staging pool and moves pages in from it,
    // unless told not to.
    let (dest, uri) = if staging {
        destination(&["--mem", "64M"])
    } else {
        destination(&["--mem", "64M", "--no-staging-pool"])
    };
    let stop_at = 300_000 * vcpus.parse::<u64>().unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": stop_at}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "prepage": prepage,
                   "precopy_rounds": precopy_rounds}),
        )
        .unwrap();
    // After a precopy phase little may be left: the postcopy can be over already.
    assert!(m["phase"] == "postcopy" || m["phase"] == "completed", "{m}");
    assert_eq!(m["prepage"], prepage, "{m}");
    assert_eq!(m["precopy_rounds"], precopy_rounds, "{m}");
    if precopy_rounds > 0 {
        assert!(
            m["pages_precopy"].as_u64() >= m["total_pages"].as_u64(),
            "round 1 sends every page: {m}"
        );
    }

    // The source exits once the destination has every page.
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    // The destination finishes the workload with the reference digest.
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(
        summary["digest"], reference["digest"],
        "{workload} on {vcpus} vCPUs: migration changed the result"
    );
    let paging = &summary["demand_paging"];
    assert_eq!(paging["origin"], "migration");
    assert_eq!(paging["present_pages"], paging["total_pages"], "{paging}");
    assert!(
        paging.get("fetch_error").is_some_and(Value::is_null),
        "{paging}"
    );
    // One owner, the source, sent every page (some twice, after a precopy round's copy went
    // stale); it owns none any more, and none of its pages was dropped as another's.
    let owners = paging["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 1, "{paging}");
    assert_eq!(owners[0]["endpoint"], "the migration source");
    assert_eq!(owners[0]["pages_owned"], 0, "{paging}");
    assert!(
        owners[0]["pages_installed"].as_u64() >= paging["total_pages"].as_u64(),
        "{paging}"
    );
    assert_eq!(owners[0]["pages_not_owned"], 0, "{paging}");
    let n = |k: &str| paging[k].as_u64().unwrap();
    assert!(n("pages_moved") <= n("staging_pages_used"), "{paging}");
    assert!(
        n("staging_pages_used") <= n("staging_pages_prepared"),
        "{paging}"
    );
    if !staging {
        assert_eq!(n("staging_pages_prepared"), 0, "{paging}");
        assert!(n("pages_copied") > 0, "{paging}");
    }
}

#[test]
fn uniform_1_vcpu_bubble_without_staging_pool() {
    migrate_to(
        "mig7",
        "1",
        "uniform:ws=32M,write=0.3,seed=77",
        "bubble",
        0,
        false,
    );
}

#[test]
fn hotcold_1_vcpu_hot_first() {
    migrate("mig1", "1", "hotcold:ws=32M,write=0.3,seed=71", "hot", 0);
}

#[test]
fn hotcold_2_vcpus_hybrid_hot_first() {
    migrate("mig4", "2", "hotcold:ws=32M,write=0.3,seed=74", "hot", 2);
}

#[test]
fn uniform_1_vcpu_hybrid_bubble() {
    migrate("mig5", "1", "uniform:ws=32M,write=0.3,seed=75", "bubble", 1);
}

#[test]
fn sequential_1_vcpu_hybrid_address_order() {
    migrate("mig6", "1", "seq:ws=32M,write=0.5,seed=76", "address", 3);
}

#[test]
fn uniform_2_vcpus_bubble() {
    migrate("mig2", "2", "uniform:ws=32M,write=0.3,seed=72", "bubble", 0);
}

#[test]
fn sequential_2_vcpus_address_order() {
    migrate("mig3", "2", "seq:ws=32M,write=0.5,seed=73", "address", 0);
}

#[test]
fn refused_migrations_leave_the_source_running() {
    let dir = Scratch::new("refused");
    let source = VmProcess::idle(&dir.path("src.sock")).unwrap();
    let (dest, uri) = destination(&["--mem", "128M"]);
    // Wrong secret: refused by the destination, nothing moves.
    let e = source
        .ctl("migrate", json!({"uri": uri, "secret": "wrong"}))
        .unwrap_err();
    assert!(e.to_string().contains("shared secret"), "{e}");
    // Right secret, but the destination expects 128 MiB.
    let e = source
        .ctl("migrate", json!({"uri": uri, "secret": SECRET}))
        .unwrap_err();
    assert!(e.to_string().contains("layout mismatch"), "{e}");
    // Nobody listening.
    let e = source
        .ctl(
            "migrate",
            json!({"uri": "tcp:127.0.0.1:1", "secret": SECRET}),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("is `tsubame run --incoming` listening"),
        "{e}"
    );
    let e = source
        .ctl("migrate", json!({"uri": "127.0.0.1:1"}))
        .unwrap_err();
    assert!(e.to_string().contains("tcp:HOST:PORT"), "{e}");
    // The source VM is still running here, and the destination still waits.
    let s = source.ctl("query-status", json!({})).unwrap();
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(
        source.ctl("query-migrate", json!({})).unwrap()["phase"],
        "none"
    );
    assert!(
        dest.stderr().contains("refused a migration connection"),
        "{}",
        dest.stderr()
    );
    source.ctl("quit", json!({})).unwrap();
}

#[test]
fn losing_the_source_never_gives_the_guest_zero_pages() {
    let dir = Scratch::new("lost");
    // Every page of a 40 MiB working set written, then a push capped at 4 MB/s: the source is
    // killed long before it could have sent everything.
    let source = VmProcess::start(
        &dir.path("src.sock"),
        &[
            "--mem",
            "64M",
            "--workload",
            "seq:ws=40M,write=1.0,seed=74",
            "--steps",
            "2000000",
        ],
    )
    .unwrap();
    let dsock = dir.path("dst.sock");
    let (dest, uri) = destination(&["--control", dsock.to_str().unwrap()]);
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 20_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "max_bandwidth": 4_000_000}),
        )
        .unwrap();
    drop(source); // SIGKILL: the page server is gone mid-migration
    dest.wait_for_stderr("control socket ready", std::time::Duration::from_secs(60))
        .unwrap();
    // The destination notices, reports it clearly, and its vCPUs wait rather than run on zeroes.
    let m = dest
        .ctl("wait", json!({"for": "finished", "timeout_ms": 1000}))
        .unwrap();
    assert_eq!(
        m["outcome"], "timed-out",
        "the guest cannot finish without its memory: {m}"
    );
    let m = dest.ctl("query-migrate", json!({})).unwrap();
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("lost the migration source"),
        "{m}"
    );
    let p = &m["demand_paging"];
    assert!(
        p["present_pages"].as_u64() < p["total_pages"].as_u64(),
        "{p}"
    );
    // It says it is stuck, and why: the pages the source still owned are gone for good.
    let s = dest.status_until("stuck", |s| s["status"] == "stuck");
    let why = s["stuck"].as_str().unwrap();
    assert!(
        why.contains("gone for good") && why.contains("the migration source"),
        "{s}"
    );
    assert!(
        s["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["status"] == "running"),
        "{s}"
    );
    assert!(dest.ctl("query-progress", json!({})).unwrap()["verify_error"].is_null());
    // Reading all memory would wait forever: refused with the reason.
    let e = dest.ctl("query-digest", json!({})).unwrap_err();
    assert!(
        e.to_string()
            .contains("still remote and their source failed"),
        "{e}"
    );
}

#[test]
fn losing_the_destination_during_precopy_keeps_the_vm_at_the_source() {
    let dir = Scratch::new("lostdst");
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=32M,write=0.3,seed=77",
        "--steps",
        "1500000",
    ];
    let reference = run_to_end(&common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    // Precopy at 8 MB/s: round 1 alone takes seconds; the destination dies during it.
    let (dest, uri) = destination(&[]);
    let err = std::thread::scope(|s| {
        let m = s.spawn(|| {
            source.ctl(
                "migrate",
                json!({"uri": uri, "secret": SECRET, "precopy_rounds": 2,
                       "max_bandwidth": 8_000_000}),
            )
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let q = source.ctl("query-migrate", json!({})).unwrap();
            if q["phase"] == "precopy" && q["pages_precopy"].as_u64() > Some(500) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no precopy: {q}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(dest); // SIGKILL
        m.join().unwrap().unwrap_err()
    });
    assert!(
        err.to_string().contains("during precopy round 1 of 2")
            && err.to_string().contains("keeps running here"),
        "{err}"
    );
    // Nothing was lost: the VM runs on here and migrates again, to a new destination.
    let s = source.ctl("query-status", json!({})).unwrap();
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(
        source.ctl("query-migrate", json!({})).unwrap()["phase"],
        "none"
    );
    let (dest, uri) = destination(&[]);
    source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "precopy_rounds": 1}),
        )
        .unwrap();
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
}

/// The source's resident memory (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[test]
fn release_frees_the_source_memory_and_changes_nothing_else() {
    release("release", 0);
}

#[test]
fn release_after_precopy_rounds_frees_what_they_sent_too() {
    release("release-hybrid", 2);
}

/// A migration with `release=on` (after `precopy_rounds` rounds): the source ends up holding
/// none of the guest's pages, its resident memory shrinks, and the destination's result is
/// that of a run that never migrated. Without rounds, it first checks that `release=on` is
/// refused with `cancellable=on`.
fn release(name: &str, precopy_rounds: u32) {
    let dir = Scratch::new(name);
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=32M,write=0.3,seed=78",
        "--steps",
        "1500000",
    ];
    let reference = run_to_end(&common).unwrap();
    // Held after the migration, for its status and its memory.
    let source =
        VmProcess::start(&dir.path("src.sock"), &[&common[..], &["--hold"]].concat()).unwrap();
    let (dest, uri) = destination(&["--mem", "64M"]);
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 300_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    // Releasing the source's copy and resuming from it cannot go together.
    if precopy_rounds == 0 {
        refuse_release_with_cancellable(&source, &uri);
    }
    let rss_before = rss_kib(source.child.id());
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "release": "on",
                   "precopy_rounds": precopy_rounds}),
        )
        .unwrap();
    assert!(m["phase"] == "postcopy" || m["phase"] == "completed", "{m}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let m = loop {
        let m = source.ctl("query-migrate", json!({})).unwrap();
        if m["phase"] == "completed" && m["pages_released"] == m["total_pages"] {
            break m;
        }
        assert!(m["phase"] == "postcopy" || m["phase"] == "completed", "{m}");
        assert!(std::time::Instant::now() < deadline, "{m}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Every page is gone from here (what the destination acknowledged as the push went, the
    // rest at `Complete`), and the host has the memory back.
    assert_eq!(m["pages_released"], m["total_pages"], "{m}");
    // Loosely: at least half of the 32 MiB working set came back.
    let rss_after = rss_kib(source.child.id());
    assert!(
        rss_after + (16 << 10) < rss_before,
        "source RSS {rss_before} KiB before, {rss_after} KiB after"
    );
    // The destination finishes the workload with the reference digest.
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(
        summary["digest"], reference["digest"],
        "release=on changed the result"
    );
    assert!(
        summary["demand_paging"]
            .get("fetch_error")
            .is_some_and(Value::is_null),
        "{summary}"
    );
    // (It may exit before it answers.)
    let _ = source.ctl("quit", json!({}));
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
}

/// `release=on` with `cancellable=on` is refused before anything starts, saying why.
fn refuse_release_with_cancellable(source: &VmProcess, uri: &str) {
    let e = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "release": "on", "cancellable": "on"}),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("release=on") && e.contains("cancellable=on") && e.contains("choose one"),
        "{e}"
    );
    assert_eq!(
        source.ctl("query-migrate", json!({})).unwrap()["phase"],
        "none",
        "refused before anything started"
    );
}
