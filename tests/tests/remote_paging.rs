//! Remote paging on the main host: a VM run with `--local-mem` under its working set evicts
//! cold pages to real memserver processes and faults them back, and still ends with the same
//! memory as a run that never evicted (the digest oracle). The summary shows that eviction
//! happened and that resident memory stayed near the limit.
//!
//! A memserver that goes away: the VM pauses (status `held`) rather than run on a page it
//! cannot have, resumes once the memserver is back, stays paused with the reason if the
//! memserver came back without its pages, and with `--replicas 2` finishes without a pause
//! that matters.

use std::time::Duration;

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, tsubame, Scratch, VmProcess};

const SECRET: &str = "paging secret";

/// Runs `workload` on `vcpus` in 64 MiB with `local` resident over `memservers` memservers,
/// and compares it with an all-local run; returns the remote-paging statistics.
fn paged_run(vcpus: &str, workload: &str, steps: &str, local: &str, memservers: usize) -> Value {
    let common = [
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--workload",
        workload,
        "--steps",
        steps,
    ];
    let reference = run_to_end(&common).unwrap();
    let servers: Vec<(VmProcess, String)> = (0..memservers)
        .map(|_| VmProcess::memserver(SECRET, &[]).unwrap())
        .collect();
    let uris: Vec<String> = servers.iter().map(|(_, u)| u.clone()).collect();
    let uris = uris.join(",");
    let paged = run_to_end(
        &[
            &common[..],
            &[
                "--local-mem",
                local,
                "--memserver",
                &uris,
                "--secret",
                SECRET,
            ],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(paged["status"], "finished", "{paged}");
    assert_eq!(paged["digest"], reference["digest"], "{paged}");
    let r = paged["remote_paging"].clone();
    eprintln!("{workload} at {local}: {r}");
    assert_eq!(r["error"], Value::Null, "{r}");
    assert!(r["pages_written_back"].as_u64().unwrap() > 0, "{r}");
    assert!(r["faults_back"].as_u64().unwrap() > 0, "{r}");
    let limit = r["limit_bytes"].as_u64().unwrap() / 4096;
    // Between two evictor passes the guest faults pages in over the limit; on this 2-core host
    // two busy vCPUs (and the other tests) leave the evictor little CPU time (see the report).
    let peak = r["resident_peak_pages"].as_u64().unwrap();
    assert!(
        peak <= 3 * limit,
        "resident peaked at {peak} pages over a limit of {limit}: {r}"
    );
    assert!(
        r["resident_pages"].as_u64().unwrap() <= limit + limit / 4,
        "{r}"
    );
    for ms in r["memservers"].as_array().unwrap() {
        assert!(ms["pages_written_back"].as_u64().unwrap() > 0, "{r}");
    }
    r
}

#[test]
fn one_vcpu_writing_uniformly_runs_with_half_its_working_set_resident() {
    paged_run("1", "uniform:ws=32M,write=0.3,seed=5", "40000", "16M", 1);
}

#[test]
fn two_vcpus_hot_and_cold_run_with_a_quarter_resident_over_two_memservers() {
    let r = paged_run("2", "hotcold:ws=32M,write=0.3,seed=9", "40000", "8M", 2);
    assert_eq!(r["memservers"].as_array().unwrap().len(), 2);
}

#[test]
fn two_vcpus_writing_uniformly_run_with_a_quarter_resident() {
    paged_run("2", "uniform:ws=32M,write=0.3,seed=2", "15000", "8M", 1);
}

#[test]
fn a_memserver_that_cannot_be_used_is_named_with_what_to_do() {
    let run = |uri: &str, secret: &str| {
        let out = tsubame(&[
            "run",
            "--serial",
            "none",
            "--quiet",
            "--mem",
            "64M",
            "--workload",
            "uniform:ws=16M",
            "--steps",
            "1000",
            "--local-mem",
            "16M",
            "--memserver",
            uri,
            "--secret",
            secret,
        ]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run("tcp:127.0.0.1:1", SECRET);
    assert!(e.contains("memserver tcp:127.0.0.1:1"), "{e}");
    assert!(e.contains("tsubame memserver"), "{e}");
    let (_ms, uri) = VmProcess::memserver(SECRET, &[]).unwrap();
    let e = run(&uri, "not the secret");
    assert!(e.contains("TSUBAME_SECRET"), "{e}");
}

#[test]
fn a_full_memserver_leaves_pages_local_and_says_why() {
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=32M,write=0.3,seed=4",
        "--steps",
        "20000",
    ];
    let reference = run_to_end(&common).unwrap();
    let (_ms, uri) = VmProcess::memserver(SECRET, &["--max-mem", "1M"]).unwrap();
    let paged = run_to_end(
        &[
            &common[..],
            &["--local-mem", "8M", "--memserver", &uri, "--secret", SECRET],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(paged["digest"], reference["digest"], "{paged}");
    let e = paged["remote_paging"]["error"].as_str().unwrap_or_default();
    assert!(e.contains("--max-mem"), "{paged}");
}

/// A paged VM with a control socket (`dir`/vm.sock), running `workload` for `steps` on 2 vCPUs
/// with 12 MiB resident over `uris`.
fn paged_vm(dir: &Scratch, workload: &str, steps: &str, uris: &str, extra: &[&str]) -> VmProcess {
    VmProcess::start(
        &dir.path("vm.sock"),
        &[
            &common(workload, steps)[..],
            &[
                "--local-mem",
                "12M",
                "--memserver",
                uris,
                "--secret",
                SECRET,
                "--json",
            ],
            extra,
        ]
        .concat(),
    )
    .unwrap()
}

fn common<'a>(workload: &'a str, steps: &'a str) -> [&'a str; 8] {
    [
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        workload,
        "--steps",
        steps,
    ]
}

fn evicted(s: &Value) -> bool {
    s["remote_paging"]["evicted_pages"].as_u64().unwrap_or(0) > 1000
}

#[test]
fn a_memserver_out_of_reach_pauses_the_vm_until_it_is_back() {
    outage("drop", "21");
}

/// A network that drops everything without a reset: TCP says nothing, the fault left
/// unanswered for 2 s does.
#[test]
fn a_silent_memserver_link_pauses_the_vm_until_it_speaks_again() {
    let s = outage("blackhole", "24");
    let why = s["memory_hold"]["unreachable"][0]["why"]
        .as_str()
        .unwrap_or_default();
    // Found out by the unanswered fault, or by whichever end gave up on its connection
    // first (linkem closes a pair when one side errs).
    assert!(
        why.contains("the link is silent") || why.contains("closed the connection"),
        "{s}"
    );
}

/// Cuts the link to the memserver (`fault`: a linkem command) under a paged VM, checks that
/// the VM is held while it is cut and resumes after `restore`, and that its memory at the end
/// equals a run that never paged; returns `query-status` while it was held.
fn outage(fault: &str, seed: &str) -> Value {
    let dir = Scratch::new(&format!("paging-{fault}"));
    let (_ms, uri) = VmProcess::memserver(SECRET, &[]).unwrap();
    let addr = uri.trim_start_matches("tcp:").to_string();
    let (link, via) = VmProcess::linkem(&addr, &dir.path("link.sock")).unwrap();
    let workload = format!("uniform:ws=32M,write=0.5,seed={seed}");
    let steps = "100000";
    let reference = run_to_end(&common(&workload, steps)).unwrap();
    let vm = paged_vm(&dir, &workload, steps, &format!("tcp:{via}"), &[]);
    vm.status_until("evicted", evicted);
    link.ctl(fault, json!({})).unwrap();
    let held = vm.status_until("held", |s| s["status"] == "held");
    let s = held.clone();
    let down = &s["memory_hold"]["unreachable"][0];
    assert!(down["pages_owned"].as_u64().unwrap() > 0, "{s}");
    assert!(down["endpoint"].as_str().unwrap().contains(&via), "{s}");
    // Paused: no step is taken, and the operator cannot resume it.
    let before = vm.ctl("query-progress", json!({})).unwrap()["steps"].clone();
    std::thread::sleep(Duration::from_millis(300));
    let after = vm.ctl("query-progress", json!({})).unwrap()["steps"].clone();
    assert_eq!(before, after, "a held VM ran on");
    let e = vm.ctl("cont", json!({})).unwrap_err().to_string();
    assert!(e.contains("part of its memory cannot be reached"), "{e}");
    link.ctl("restore", json!({})).unwrap();
    let s = vm.status_until("resumed", |s| s["status"] != "held");
    assert_eq!(s["memory_hold"]["holds"], 1, "{s}");
    let (status, out) = vm.wait().unwrap();
    assert!(status.success(), "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    held
}

#[test]
fn a_killed_memserver_pauses_the_vm_and_one_restarted_empty_is_refused_with_the_reason() {
    let dir = Scratch::new("paging-killed");
    let (ms, uri) = VmProcess::memserver(SECRET, &[]).unwrap();
    let vm = paged_vm(&dir, "uniform:ws=32M,write=0.5,seed=22", "0", &uri, &[]);
    vm.status_until("evicted", evicted);
    drop(ms); // SIGKILL: its pages are gone
    vm.status_until("held", |s| s["status"] == "held");
    // A new memserver on the same address holds nothing of this VM: its pages cannot come
    // back, and the VM stays paused, stuck, with the reason (it never runs on a zero page
    // instead).
    let listen = uri.clone();
    let (_ms2, _) = VmProcess::command_until(
        &["memserver", "--listen", &listen, "--secret", SECRET],
        "memserver listening on",
    )
    .unwrap();
    vm.status_until("refused", |s| {
        s["memory_hold"]["unreachable"][0]["lost_for_good"] == true
    });
    // Still paused, and stuck: nothing can bring those pages back.
    let s = vm.status_until("stuck", |s| s["status"] == "stuck");
    assert!(
        s["stuck"].as_str().unwrap().contains("gone for good"),
        "{s}"
    );
    let why = s["memory_hold"]["unreachable"][0]["why"].as_str().unwrap();
    assert!(
        why.contains("holds none of this VM's pages") && why.contains("--replicas 2"),
        "{s}"
    );
    let e = vm.ctl("query-digest", json!({})).unwrap_err().to_string();
    assert!(e.contains("cannot be reached"), "{e}");
    // Told to quit, it says why its memory has no digest (exit status 3), not a wrong one.
    vm.ctl("quit", json!({})).unwrap();
    let (status, out) = vm.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], Value::Null, "{summary}");
    let why = summary["digest_error"].as_str().unwrap_or_default();
    assert!(why.contains("cannot be reached"), "{summary}");
}

#[test]
fn with_two_replicas_a_killed_memserver_costs_no_guest() {
    lose_a_replica(Loss::Kill, "23");
}

#[test]
fn with_two_replicas_a_silent_memserver_costs_no_guest() {
    lose_a_replica(Loss::Blackhole, "25");
}

/// How a memserver goes away.
#[derive(PartialEq)]
enum Loss {
    /// Its process is killed: its connections reset.
    Kill,
    /// Its network goes silent (linkem `blackhole`): nothing resets.
    Blackhole,
}

/// Runs a paged VM over two memservers with `--replicas 2`, loses the first (`loss`) once
/// pages were evicted, and checks that the VM finishes, its pages handed to the other, with
/// the digest of a run that never paged.
fn lose_a_replica(loss: Loss, seed: &str) {
    let dir = Scratch::new(&format!("paging-replicas-{seed}"));
    let (ms0, uri0) = VmProcess::memserver(SECRET, &[]).unwrap();
    let (_ms1, uri1) = VmProcess::memserver(SECRET, &[]).unwrap();
    let (link, via) =
        VmProcess::linkem(uri0.trim_start_matches("tcp:"), &dir.path("link.sock")).unwrap();
    let workload = format!("uniform:ws=32M,write=0.5,seed={seed}");
    let steps = "100000";
    let reference = run_to_end(&common(&workload, steps)).unwrap();
    let vm = paged_vm(
        &dir,
        &workload,
        steps,
        &format!("tcp:{via},{uri1}"),
        &["--replicas", "2"],
    );
    vm.status_until("evicted", evicted);
    match loss {
        Loss::Kill => drop(ms0),
        Loss::Blackhole => drop(link.ctl("blackhole", json!({})).unwrap()),
    }
    let (status, out) = vm.wait().unwrap();
    assert!(status.success(), "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    let r = &summary["remote_paging"];
    assert_eq!(r["replicas"], 2, "{r}");
    assert!(r["failed_over_pages"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["memservers"][0]["up"], false, "{r}");
    // Every page the lost memserver owned went to the other: nothing waits for it.
    assert_eq!(r["memservers"][0]["pages_owned"], 0, "{r}");
}
