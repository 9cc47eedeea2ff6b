//! Split migration and split-memory hosting across processes: the source sends part of a
//! VM's memory to memservers (third processes) and the rest to the destination, in parallel,
//! after the switchover; the destination then runs with those pages at the memservers,
//! fetching them when touched, until it consolidates (pulls them all back) or migrates on,
//! leaving them where they are (split -> split). The oracle: the VM's memory after N steps
//! equals a run that never migrated.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "split secret";

/// A destination with a control socket at `socket` (and `extra` arguments).
fn destination_with(socket: &std::path::Path, extra: &[&str]) -> (VmProcess, String) {
    VmProcess::destination(
        SECRET,
        &[
            &["--mem", "64M", "--control", socket.to_str().unwrap()],
            extra,
        ]
        .concat(),
    )
    .unwrap()
}

fn destination(socket: &std::path::Path) -> (VmProcess, String) {
    destination_with(socket, &[])
}

/// A source that stays (`--hold`) after its VM migrated away, to be asked how it went.
fn source(socket: &std::path::Path, common: &[&str]) -> VmProcess {
    VmProcess::start(socket, &[common, &["--hold"]].concat()).unwrap()
}

/// Waits until the migration out of `source` has completed (the destination needs nothing
/// more from it); returns its `query-migrate`.
fn completed(source: &VmProcess) -> Value {
    let t0 = Instant::now();
    loop {
        let m = source.ctl("query-migrate", json!({})).unwrap();
        match m["phase"].as_str() {
            Some("completed") => return m,
            Some("postcopy" | "precopy") if t0.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => panic!("the migration did not complete: {m}"),
        }
    }
}

/// The `owners` of a destination's `query-migrate`.
fn owners(m: &Value) -> Vec<Value> {
    m["demand_paging"]["owners"]
        .as_array()
        .unwrap_or_else(|| panic!("no owners in {m}"))
        .clone()
}

/// What to do with the split VM once the source is done.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Keep running with the pages at the memservers until the end.
    Host,
    /// Bring every page back while the guest runs.
    Consolidate,
}

/// Migrates a VM running `workload` on `vcpus` with `share` of its memory handed to
/// `memservers` memservers (`amount`: how the split says it, a share or a size); checks the
/// split's figures, the hosting (pages really stay at the memservers), what `then` does, and
/// the digest.
fn split_migration(
    name: &str,
    vcpus: &str,
    workload: &str,
    (share, amount): (f64, &str),
    memservers: usize,
    prepage: &str,
    then: Then,
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
    let sockets: Vec<_> = (0..memservers)
        .map(|i| dir.path(&format!("ms{i}.sock")))
        .collect();
    let servers: Vec<(VmProcess, String)> = sockets
        .iter()
        .map(|s| VmProcess::memserver(SECRET, &["--control", s.to_str().unwrap()]).unwrap())
        .collect();
    let uris: Vec<String> = servers.iter().map(|(_, u)| u.clone()).collect();
    let source = source(&dir.path("src.sock"), &common);
    let (dest, uri) = destination(&dir.path("dest.sock"));
    let stop_at = 300_000 * vcpus.parse::<u64>().unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": stop_at}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "prepage": prepage,
                   "split": format!("{}:{amount}", uris.join(","))}),
        )
        .unwrap();
    let m = completed(&source);
    let split = &m["split"];
    assert_eq!(split["memservers"], json!(uris), "{m}");
    assert_eq!(split["failed"], json!([]), "{m}");
    let stored = split["pages_stored"].as_u64().unwrap();
    assert_eq!(split["pages_planned"].as_u64().unwrap(), stored, "{m}");
    let total = m["total_pages"].as_u64().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let stored_share = stored as f64 / total as f64;
    assert!(
        (stored_share - share).abs() < 0.05,
        "{stored} of {total} pages stored for a share of {share}: {m}"
    );
    let each = split["pages_stored_each"].as_array().unwrap();
    assert!(each.iter().all(|n| n.as_u64().unwrap() > 0), "{m}");
    // The source sent the rest only: pages handed over never went to the destination.
    assert!(
        m["pages_pushed"].as_u64().unwrap() + m["pages_demand"].as_u64().unwrap() < total,
        "{m}"
    );

    // The destination runs split: the source owns nothing, the memservers own pages.
    let d = dest.ctl("query-migrate", json!({})).unwrap();
    assert_eq!(d["phase"], "completed", "{d}");
    let o = owners(&d);
    assert_eq!(o.len(), 1 + memservers, "{o:?}");
    assert_eq!(o[0]["endpoint"], "the migration source");
    assert_eq!(o[0]["pages_owned"], 0, "{o:?}");
    for (o, ms) in o[1..].iter().zip(&uris) {
        assert_eq!(o["endpoint"], format!("the page server {ms}"));
    }
    let remote = d["demand_paging"]["remote_pages"].as_u64().unwrap();
    assert!(remote > 0 && remote <= stored, "{d}");

    if then == Then::Consolidate {
        let c = dest
            .ctl("consolidate", json!({"wait": true, "timeout_ms": 30_000}))
            .unwrap();
        assert!(c["ms"].as_f64().is_some(), "{c}");
        assert_eq!(c["endpoints"].as_array().unwrap().len(), memservers, "{c}");
        let d = dest.ctl("query-migrate", json!({})).unwrap();
        assert_eq!(d["demand_paging"]["remote_pages"], 0, "{d}");
        assert_eq!(
            d["demand_paging"]["present_pages"], d["demand_paging"]["total_pages"],
            "{d}"
        );
        let e = dest.ctl("consolidate", json!({})).unwrap();
        assert_eq!(e["pages"], 0, "nothing left to bring: {e}");
        // Every page is here and written here from now on: the memservers forget theirs.
        for (ms, _) in &servers {
            let t0 = Instant::now();
            loop {
                let u = ms.ctl("query-usage", json!({})).unwrap();
                if u["vms"][0]["pages_held"] == 0 && u["data_bytes"] == 0 {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "still held: {u}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination failed: {out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["digest"], reference["digest"],
        "{workload} on {vcpus} vCPUs, {share} split: {summary}"
    );
    // Every memserver sent pages: the seam is real.
    let o = owners(&summary["migration"]);
    for o in &o {
        assert!(o["pages_installed"].as_u64().unwrap() > 0, "{o}");
    }
    let total_installed: u64 = o
        .iter()
        .map(|o| o["pages_installed"].as_u64().unwrap())
        .sum();
    assert!(
        total_installed <= total,
        "each page installed once at most: {o:?}"
    );
}

#[test]
fn half_the_pages_at_a_memserver_one_vcpu() {
    split_migration(
        "split1",
        "1",
        "uniform:ws=32M,write=0.3,seed=81",
        (0.5, "0.5"),
        1,
        "bubble",
        Then::Host,
    );
}

#[test]
fn a_quarter_at_a_memserver_two_vcpus_hot_first_then_consolidated() {
    split_migration(
        "split2",
        "2",
        "hotcold:ws=32M,write=0.5,seed=82",
        (0.25, "0.25"),
        1,
        "hot",
        Then::Consolidate,
    );
}

#[test]
fn half_the_pages_at_two_memservers_given_as_a_size_then_consolidated() {
    split_migration(
        "split3",
        "2",
        "uniform:ws=32M,write=0.3,seed=84",
        (0.5, "32M"),
        2,
        "address",
        Then::Consolidate,
    );
}

#[test]
fn a_split_vm_migrates_on_and_its_pages_stay_at_the_memserver() {
    let dir = Scratch::new("split-on");
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=40M,write=0.3,seed=85",
        "--steps",
        "1500000",
    ];
    let reference = run_to_end(&common).unwrap();
    let sock = dir.path("ms.sock");
    let (ms, ms_uri) =
        VmProcess::memserver(SECRET, &["--control", sock.to_str().unwrap()]).unwrap();
    let a = source(&dir.path("a.sock"), &common);
    let (b, b_uri) = destination_with(&dir.path("b.sock"), &["--hold"]);
    let w = a
        .ctl("wait", json!({"for": "steps", "steps": 300_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    a.ctl(
        "migrate",
        json!({"uri": b_uri, "secret": SECRET, "split": format!("{ms_uri}:0.5")}),
    )
    .unwrap();
    let stored = completed(&a)["split"]["pages_stored"].as_u64().unwrap();
    let w = b
        .ctl("wait", json!({"for": "steps", "steps": 600_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let held_before = ms.ctl("query-usage", json!({})).unwrap()["vms"][0]["pages_held"]
        .as_u64()
        .unwrap();
    assert_eq!(held_before, stored);
    // B runs split; it migrates on to C with no split of its own: C's owners are the
    // memserver (what B still had there) and B.
    let (c, c_uri) = destination(&dir.path("c.sock"));
    b.ctl("migrate", json!({"uri": c_uri, "secret": SECRET}))
        .unwrap();
    let m = completed(&b);
    let held = &m["held"][0];
    assert_eq!(held["memserver"], ms_uri, "{m}");
    let kept = held["pages_kept"].as_u64().unwrap();
    assert!(kept > 0, "{m}");
    let d = c.ctl("query-migrate", json!({})).unwrap();
    let o = owners(&d);
    assert_eq!(
        o[1]["endpoint"],
        format!("the page server {ms_uri}"),
        "{o:?}"
    );
    assert_eq!(o[0]["pages_owned"], 0, "{o:?}");
    // B told the memserver to forget the copies it fetched (they may be stale now).
    let t0 = Instant::now();
    let dropped = loop {
        let m = b.ctl("query-migrate", json!({})).unwrap();
        let n = m["held"][0]["stale_copies_dropped"].as_u64().unwrap();
        if n > 0 || t0.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        dropped > 0,
        "B fetched pages from the memserver, so some were stale"
    );
    let held_after = ms.ctl("query-usage", json!({})).unwrap()["vms"][0]["pages_held"]
        .as_u64()
        .unwrap();
    assert!(
        held_after <= held_before - dropped,
        "the memserver forgot them: {held_before} -> {held_after}, {dropped} dropped"
    );
    assert!(held_after >= kept, "what C needs is still there");
    let (status, out) = c.wait().unwrap();
    assert!(status.success(), "C failed: {out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    ms.ctl("quit", json!({})).unwrap();
    drop(b);
}

#[test]
fn an_unreachable_memserver_leaves_the_source_running() {
    let dir = Scratch::new("split-refused");
    let source = VmProcess::idle(&dir.path("src.sock")).unwrap();
    let (_dest, uri) = destination(&dir.path("dest.sock"));
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
fn a_full_memserver_refuses_with_its_reason_and_its_pages_go_to_the_destination() {
    let dir = Scratch::new("split-full");
    let sock = dir.path("ms.sock");
    let (ms, ms_uri) = VmProcess::memserver(
        SECRET,
        &["--max-mem", "4M", "--control", sock.to_str().unwrap()],
    )
    .unwrap();
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=32M,write=0.5,seed=83",
        "--steps",
        "1000000",
    ];
    let reference = run_to_end(&common).unwrap();
    let source = source(&dir.path("src.sock"), &common);
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let (dest, uri) = destination(&dir.path("dest.sock"));
    // Half of 64 MiB, most of it written: more than the memserver's 4 MiB.
    source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "split": format!("{ms_uri}:0.5")}),
        )
        .unwrap();
    // What it held when it refused: read at once, since the destination tells it to forget
    // the VM's pages as soon as it has them all (the source pushes them once it knows).
    let t0 = Instant::now();
    let u = loop {
        let u = ms.ctl("query-usage", json!({})).unwrap();
        if u["refused_full"] == 1 {
            break u;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never refused: {u}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let m = completed(&source);
    let failed = m["split"]["failed"][0].as_str().unwrap_or_default();
    assert!(
        failed.contains("memserver is full") && failed.contains("--max-mem"),
        "{m}"
    );
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
    // Nothing was handed over: the destination got every page from the source.
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination failed: {out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    let o = owners(&summary["migration"]);
    assert_eq!(o[1]["pages_installed"], 0, "{o:?}");
    // ...and then told the memserver to forget what it had stored.
    let t0 = Instant::now();
    while ms.ctl("query-usage", json!({})).unwrap()["data_bytes"] != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the memserver kept the pages"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ms.ctl("quit", json!({})).unwrap();
}

#[test]
fn a_memserver_out_of_reach_pauses_the_split_vm_until_it_is_back() {
    let dir = Scratch::new("split-outage");
    let (_ms, ms_uri) = VmProcess::memserver(SECRET, &[]).unwrap();
    // Source and destination both reach the memserver through the link.
    let (link, via) =
        VmProcess::linkem(ms_uri.trim_start_matches("tcp:"), &dir.path("link.sock")).unwrap();
    let common = [
        "--mem",
        "64M",
        "--workload",
        "uniform:ws=32M,write=0.3,seed=91",
        "--steps",
        "1200000",
    ];
    let reference = run_to_end(&common).unwrap();
    let source = source(&dir.path("src.sock"), &common);
    let (dest, uri) = destination(&dir.path("dest.sock"));
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 300_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "split": format!("tcp:{via}:0.5")}),
        )
        .unwrap();
    completed(&source);
    link.ctl("drop", json!({})).unwrap();
    let s = dest.status_until("held", |s| s["status"] == "held");
    let down = &s["memory_hold"]["unreachable"][0];
    assert!(down["endpoint"].as_str().unwrap().contains(&via), "{s}");
    assert!(down["pages_owned"].as_u64().unwrap() > 0, "{s}");
    // Consolidation asked while it is down is asked again once it is back.
    let c = dest.ctl("consolidate", json!({})).unwrap();
    assert!(c["pages"].as_u64().unwrap() > 0, "{c}");
    let before = dest.ctl("query-progress", json!({})).unwrap()["steps"].clone();
    std::thread::sleep(Duration::from_millis(300));
    let after = dest.ctl("query-progress", json!({})).unwrap()["steps"].clone();
    assert_eq!(before, after, "a held VM ran on");
    link.ctl("restore", json!({})).unwrap();
    dest.status_until("resumed", |s| s["status"] != "held");
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination failed: {out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    let memserver = &owners(&summary["migration"])[1];
    assert_eq!(memserver["pages_owned"], 0, "{memserver}");
    assert_eq!(memserver["link"]["outages"], 1, "{memserver}");
    assert_eq!(memserver["link"]["redials"], 1, "{memserver}");
}
