//! A VM stopped at an arbitrary step, saved by one `tsubame` process and restored by another,
//! finishes with the same memory digest as a run that never stopped: for each workload pattern,
//! on 1 and 2 vCPUs, and restored lazily (pages faulted in through userfaultfd). This is the
//! determinism oracle that every migration test reuses.

use serde_json::json;
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const STEPS: &str = "1000000";

fn check(name: &str, vcpus: &str, workload: &str) {
    check_restore(name, vcpus, workload, false);
}

fn check_restore(name: &str, vcpus: &str, workload: &str, lazy: bool) {
    let dir = Scratch::new(name);
    let common = [
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--workload",
        workload,
        "--steps",
        STEPS,
    ];

    let reference = run_to_end(&common).unwrap();
    assert_eq!(reference["status"], "finished", "{reference}");

    // Process 1: run, stop somewhere in the middle, save, quit.
    let snap = dir.path("vm.snap");
    let a = VmProcess::start(&dir.path("a.sock"), &[&common[..], &["--hold"]].concat()).unwrap();
    let stop_at = 200_000 * vcpus.parse::<u64>().unwrap();
    let w = a
        .ctl("wait", json!({"for": "steps", "steps": stop_at}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    a.ctl("stop", json!({})).unwrap();
    let p = a.ctl("query-progress", json!({})).unwrap();
    assert!(
        !p["finished"].as_bool().unwrap(),
        "stopped after the end: {p}"
    );
    a.ctl("save", json!({"path": snap})).unwrap();
    a.ctl("quit", json!({})).unwrap();
    let (status, _) = a.wait().unwrap();
    assert!(status.success());

    // Process 2: restore and run to the end.
    let mut restore = vec!["--restore", snap.to_str().unwrap()];
    if lazy {
        restore.push("--lazy");
    }
    let b = run_to_end(&restore).unwrap();
    if lazy {
        let l = &b["demand_paging"];
        assert_eq!(l["present_pages"], l["total_pages"], "{l}");
        assert!(
            l.get("fetch_error").is_some_and(serde_json::Value::is_null),
            "{l}"
        );
        // One owner: the snapshot file, which sent every page once.
        let owners = l["owners"].as_array().unwrap();
        assert_eq!(owners.len(), 1, "{l}");
        assert_eq!(owners[0]["pages_installed"], l["total_pages"], "{l}");
        assert_eq!(owners[0]["pages_owned"], 0, "{l}");
        assert!(
            owners[0]["endpoint"]
                .as_str()
                .unwrap()
                .starts_with("snapshot "),
            "{l}"
        );
    }
    assert_eq!(b["status"], "finished", "{b}");
    assert_eq!(
        b["progress"]["steps"].as_u64().unwrap(),
        STEPS.parse::<u64>().unwrap() * vcpus.parse::<u64>().unwrap()
    );
    assert_eq!(
        b["digest"], reference["digest"],
        "{workload} on {vcpus} vCPUs: the restored run's memory differs from the reference"
    );
}

#[test]
fn sequential_1_vcpu() {
    check("seq1", "1", "seq:ws=16M,write=0.5,seed=31");
}

#[test]
fn uniform_1_vcpu() {
    check("uni1", "1", "uniform:ws=16M,write=0.3,seed=32");
}

#[test]
fn hotcold_1_vcpu() {
    check("hc1", "1", "hotcold:ws=16M,write=0.3,seed=33");
}

#[test]
fn sequential_2_vcpus() {
    check("seq2", "2", "seq:ws=16M,write=0.5,seed=41");
}

#[test]
fn uniform_2_vcpus() {
    check("uni2", "2", "uniform:ws=16M,write=0.3,seed=42");
}

#[test]
fn hotcold_2_vcpus() {
    check("hc2", "2", "hotcold:ws=16M,write=0.3,seed=43");
}

#[test]
fn lazy_hotcold_2_vcpus() {
    check_restore("lazy2", "2", "hotcold:ws=16M,write=0.3,seed=44", true);
}
