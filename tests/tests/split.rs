//! A VM whose pages come from two owners at once: the source hands part of its memory to a
//! memserver (a third process) while the guest runs, and the destination fetches those pages
//! from the memserver and the rest from the source, in parallel. The oracle: the migrated VM's
//! memory after N steps equals a run that never migrated.

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "split secret";

fn destination() -> (VmProcess, String) {
    VmProcess::destination(SECRET, &["--mem", "64M"]).unwrap()
}

/// Migrates a VM running `workload` on `vcpus` with `share` of its memory handed to
/// `memservers` memservers (`amount`: how the split says it, a share or a size), and checks the
/// digest and that every owner sent pages.
fn split_migration(
    name: &str,
    vcpus: &str,
    workload: &str,
    (share, amount): (f64, &str),
    memservers: usize,
    prepage: &str,
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
    let servers: Vec<(VmProcess, String)> = (0..memservers)
        .map(|_| VmProcess::memserver(SECRET, &[]).unwrap())
        .collect();
    let uris: Vec<String> = servers.iter().map(|(_, u)| u.clone()).collect();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let (dest, uri) = destination();
    let stop_at = 300_000 * vcpus.parse::<u64>().unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": stop_at}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "prepage": prepage,
                   "split": format!("{}:{amount}", uris.join(","))}),
        )
        .unwrap();
    let split = &m["split"];
    assert_eq!(split["memservers"], json!(uris), "{m}");
    let stored = split["pages_stored"].as_u64().unwrap();
    let total = m["total_pages"].as_u64().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let stored_share = stored as f64 / total as f64;
    assert!(
        (stored_share - share).abs() < 0.05,
        "{stored} of {total} pages stored for a share of {share}: {m}"
    );
    // The guest kept writing while its pages were stored: some were taken back.
    assert!(split["pages_reverted"].as_u64().unwrap() > 0, "{m}");

    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination failed: {out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["digest"], reference["digest"],
        "{workload} on {vcpus} vCPUs, {share} split: {summary}"
    );
    // Every owner sent pages: the seam is real.
    let owners = summary["migration"]["demand_paging"]["owners"]
        .as_array()
        .unwrap_or_else(|| panic!("no owners in {summary}"))
        .clone();
    assert_eq!(owners.len(), 1 + memservers, "{owners:?}");
    assert_eq!(owners[0]["endpoint"], "the migration source");
    for (o, ms) in owners[1..].iter().zip(&uris) {
        assert_eq!(o["endpoint"], format!("the page server {ms}"));
    }
    for o in &owners {
        assert!(o["pages_received"].as_u64().unwrap() > 0, "{o}");
        assert_eq!(o["pages_owned"], 0, "every page is here now: {o}");
    }
    let from_memservers: u64 = owners[1..]
        .iter()
        .map(|o| o["pages_installed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        from_memservers,
        stored - split["pages_reverted"].as_u64().unwrap(),
        "every page the memservers still owned came from them: {owners:?}"
    );
    let total_installed: u64 = owners
        .iter()
        .map(|o| o["pages_installed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total_installed, total,
        "each page installed once: {owners:?}"
    );
}

#[test]
fn half_the_pages_from_a_memserver_one_vcpu() {
    split_migration(
        "split1",
        "1",
        "uniform:ws=32M,write=0.3,seed=81",
        (0.5, "0.5"),
        1,
        "bubble",
    );
}

#[test]
fn a_quarter_from_a_memserver_two_vcpus_hot_first() {
    split_migration(
        "split2",
        "2",
        "hotcold:ws=32M,write=0.5,seed=82",
        (0.25, "0.25"),
        1,
        "hot",
    );
}

#[test]
fn half_the_pages_from_two_memservers_given_as_a_size() {
    split_migration(
        "split3",
        "2",
        "uniform:ws=32M,write=0.3,seed=84",
        (0.5, "32M"),
        2,
        "address",
    );
}

#[test]
fn an_unreachable_memserver_leaves_the_source_running() {
    let dir = Scratch::new("split-refused");
    let source = VmProcess::idle(&dir.path("src.sock")).unwrap();
    let (_dest, uri) = destination();
    let e = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "split": "tcp:127.0.0.1:1:0.5"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("is `tsubame memserver` listening"), "{e}");
    let s = source.ctl("query-status", json!({})).unwrap();
    assert_eq!(s["status"], "running", "{s}");
    let e = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "split": "tcp:127.0.0.1:1"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("split=tcp:HOST:PORT"), "{e}");
    source.ctl("quit", json!({})).unwrap();
}

#[test]
fn a_full_memserver_refuses_with_its_reason_and_reports_its_usage() {
    let dir = Scratch::new("split-full");
    let sock = dir.path("ms.sock");
    let (ms, ms_uri) = VmProcess::memserver(
        SECRET,
        &["--max-mem", "4M", "--control", sock.to_str().unwrap()],
    )
    .unwrap();
    let source = VmProcess::start(
        &dir.path("src.sock"),
        &[
            "--mem",
            "64M",
            "--workload",
            "uniform:ws=32M,write=0.5,seed=83",
            "--steps",
            "0",
            "--hold",
        ],
    )
    .unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let (_dest, uri) = destination();
    // Half of 64 MiB, most of it written: more than the memserver's 4 MiB.
    let e = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "split": format!("{ms_uri}:0.5")}),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memserver is full") && e.contains("--max-mem"),
        "{e}"
    );
    let s = source.ctl("query-status", json!({})).unwrap();
    assert_eq!(s["status"], "running", "the VM stays here: {s}");
    let u = ms.ctl("query-usage", json!({})).unwrap();
    assert_eq!(u["max_bytes"], 4 << 20, "{u}");
    assert_eq!(u["refused_full"], 1, "{u}");
    let data = u["data_bytes"].as_u64().unwrap();
    assert!(data > 0 && data <= 4 << 20, "{u}");
    let vm = &u["vms"][0];
    assert_eq!(vm["data_bytes"].as_u64().unwrap(), data, "{u}");
    assert!(
        u["metadata_bytes"].as_u64().unwrap() * 100 < data,
        "metadata under 1 % of the data: {u}"
    );
    ms.ctl("quit", json!({})).unwrap();
    source.ctl("quit", json!({})).unwrap();
}
