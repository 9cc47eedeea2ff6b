//! Migrations between hosts that are network namespaces joined by a bridge (`tsubame_tests::netns`):
//! the source, the memserver and the destination each in a namespace of its own, every session
//! over a real network path (veth, bridge, veth) rather than loopback. The oracle: the migrated
//! VM's memory after N steps equals a run that never migrated.

use serde_json::{json, Value};
use tsubame_tests::netns::Network;
use tsubame_tests::{run_to_end, Place, Scratch, VmProcess};

const SECRET: &str = "multihost secret";

/// The VM every test here migrates, and the step at which it migrates.
const COMMON: [&str; 8] = [
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--workload",
    "uniform:ws=32M,write=0.3,seed=141",
    "--steps",
    "1500000",
];
const MIGRATE_AT: u64 = 300_000;

/// The split VM: [`COMMON`], run on longer after the switchover. Its memserver's stripes are
/// handed over once stored, and a guest that ends first (its final digest fetching every page
/// from the source) would never ask the memserver for one.
fn split_vm() -> [&'static str; 8] {
    let mut vm = COMMON;
    vm[7] = "6000000";
    vm
}

/// Starts the source (running `vm`) on `net`'s host "src" and the destination on "dst", runs
/// it to [`MIGRATE_AT`]; returns both and the destination's URI (on its own address).
fn source_and_destination(
    net: &Network,
    dir: &Scratch,
    vm: &[&str],
) -> (VmProcess, VmProcess, String) {
    let source =
        VmProcess::start_at(Place::of(net.host("src")), &dir.path("src.sock"), vm).unwrap();
    let (dest, uri) =
        VmProcess::destination_at(Place::of(net.host("dst")), SECRET, &["--mem", "64M"]).unwrap();
    assert!(
        uri.starts_with(&format!("tcp:{}:", net.host("dst").ip)),
        "{uri}"
    );
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": MIGRATE_AT}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    (source, dest, uri)
}

/// Waits for the destination's summary and checks its digest against `reference`.
fn finished_with(dest: VmProcess, reference: &Value) -> Value {
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "destination failed: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert!(reference["digest"].is_string(), "{reference}");
    assert_eq!(
        summary["digest"], reference["digest"],
        "the migration across hosts changed the result: {summary}"
    );
    summary
}

#[test]
fn postcopy_from_one_host_to_another() {
    let net = Network::new("postcopy", &["src", "dst"]).unwrap();
    let dir = Scratch::new("multihost-postcopy");
    let reference = run_to_end(&COMMON).unwrap();
    let (source, dest, uri) = source_and_destination(&net, &dir, &COMMON);

    // The destination is not on the source's loopback: the path is the network's.
    let port = uri.rsplit(':').next().unwrap();
    let e = source
        .ctl(
            "migrate",
            json!({"uri": format!("tcp:127.0.0.1:{port}"), "secret": SECRET}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("listening"), "{e}");

    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "prepage": "bubble"}),
        )
        .unwrap();
    assert!(m["phase"] == "postcopy" || m["phase"] == "completed", "{m}");
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let summary = finished_with(dest, &reference);
    let owners = summary["demand_paging"]["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 1, "{summary}");
    assert_eq!(owners[0]["pages_owned"], 0, "{summary}");
    assert!(
        owners[0]["pages_installed"].as_u64() >= summary["demand_paging"]["total_pages"].as_u64(),
        "{summary}"
    );
}

#[test]
fn split_migration_with_the_memserver_on_a_third_host() {
    let net = Network::new("split", &["src", "ms", "dst"]).unwrap();
    let dir = Scratch::new("multihost-split");
    let split_vm = split_vm();
    let reference = run_to_end(&split_vm).unwrap();
    let ms_sock = dir.path("ms.sock");
    let (ms, ms_uri) = VmProcess::memserver_at(
        Place::of(net.host("ms")),
        SECRET,
        &["--control", ms_sock.to_str().unwrap()],
    )
    .unwrap();
    assert!(
        ms_uri.starts_with(&format!("tcp:{}:", net.host("ms").ip)),
        "{ms_uri}"
    );
    let (source, dest, uri) = source_and_destination(&net, &dir, &split_vm);
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "prepage": "bubble",
                   "split": format!("{ms_uri}:0.5")}),
        )
        .unwrap();
    let split = &m["split"];
    assert_eq!(split["memservers"], json!([ms_uri]), "{m}");
    let total = m["total_pages"].as_u64().unwrap();
    let planned = split["pages_planned"].as_u64().unwrap();
    assert!(
        planned.abs_diff(total / 2) < total / 20,
        "{planned} of {total} pages dealt for half: {m}"
    );

    let summary = finished_with(dest, &reference);
    // The memserver held what the source stored (from the source's host, after the switchover,
    // in parallel with the push to the destination), and forgot it once the destination had
    // every page (its final digest reads them all).
    let t0 = std::time::Instant::now();
    loop {
        let usage = ms.ctl("query-usage", json!({})).unwrap();
        if usage["vms"][0]["pages_held"] == 0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 10, "still held: {usage}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let owners = summary["migration"]["demand_paging"]["owners"]
        .as_array()
        .unwrap_or_else(|| panic!("no owners in {summary}"))
        .clone();
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert_eq!(owners[0]["endpoint"], "the migration source");
    assert_eq!(owners[0]["pages_owned"], 0, "{owners:?}");
    // The destination fetched from the memserver at its own address, across the bridge.
    assert_eq!(owners[1]["endpoint"], format!("the page server {ms_uri}"));
    let from_ms = owners[1]["pages_installed"].as_u64().unwrap();
    assert!(from_ms > 0 && from_ms <= planned, "{owners:?}");
    for o in &owners {
        assert!(o["pages_received"].as_u64().unwrap() > 0, "{o}");
    }
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
}

/// Remote paging across hosts: the memserver's host is unplugged from the switch (its port
/// down: a real silent network, no reset) while the VM runs with pages there. The VM pauses
/// (the fault left unanswered for 2 s gives the link up), resumes once the host is plugged
/// back in and the redial gets through, and ends with the memory of a run that never paged.
#[test]
fn a_memserver_host_unplugged_pauses_the_paged_vm_until_it_is_back() {
    let net = Network::new("unplug", &["main", "ms"]).unwrap();
    let dir = Scratch::new("multihost-unplug");
    let (_ms, ms_uri) = VmProcess::memserver_at(Place::of(net.host("ms")), SECRET, &[]).unwrap();
    let common = [
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "uniform:ws=32M,write=0.5,seed=143",
        "--steps",
        "100000",
    ];
    let reference = run_to_end(&common).unwrap();
    let vm = VmProcess::start_at(
        Place::of(net.host("main")),
        &dir.path("vm.sock"),
        &[
            &common[..],
            &[
                "--local-mem",
                "12M",
                "--memserver",
                &ms_uri,
                "--secret",
                SECRET,
                "--json",
            ],
        ]
        .concat(),
    )
    .unwrap();
    vm.status_until("evicted", |s| {
        s["remote_paging"]["evicted_pages"].as_u64().unwrap_or(0) > 1000
    });
    net.unplug("ms").unwrap();
    let s = vm.status_until("held", |s| s["status"] == "held");
    assert!(
        s["memory_hold"]["unreachable"][0]["endpoint"]
            .as_str()
            .unwrap()
            .contains(&ms_uri),
        "{s}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    net.plug("ms").unwrap();
    vm.status_until("resumed", |s| s["status"] != "held");
    let summary = {
        let (status, out) = vm.wait().unwrap();
        assert!(status.success(), "{out}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["digest"], reference["digest"], "{summary}");
    assert!(
        summary["memory_hold"]["holds"].as_u64().unwrap() >= 1,
        "{summary}"
    );
}

/// The VM every switch test here migrates: long enough to outlast the switch.
const SWITCHED: [&str; 8] = [
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--workload",
    "hotcold:ws=40M,write=0.1,seed=143",
    "--steps",
    "16000000",
];

/// A switched migration across hosts: the source on "a", the old destination on "b", the new
/// one on `new_host` ("c": a chain A -> B -> C; "a": back to the source's host, A -> B -> A),
/// switched during the precopy rounds or, `after`, once the VM runs at the old destination.
fn switched_across_hosts(name: &str, new_host: &str, after: bool) {
    let net = Network::new(name, &["a", "b", "c"]).unwrap();
    let dir = Scratch::new(&format!("multihost-{name}"));
    let reference = run_to_end(&SWITCHED).unwrap();
    let source =
        VmProcess::start_at(Place::of(net.host("a")), &dir.path("src.sock"), &SWITCHED).unwrap();
    let (old, old_uri) =
        VmProcess::destination_at(Place::of(net.host("b")), SECRET, &["--mem", "64M"]).unwrap();
    let (new, new_uri) =
        VmProcess::destination_at(Place::of(net.host(new_host)), SECRET, &["--mem", "64M"])
            .unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let rate = 48u64 << 20; // slow enough to switch in the middle
    let switched = std::thread::scope(|s| {
        let migration = s.spawn(|| {
            let rounds = if after { 0 } else { 2 };
            source.ctl(
                "migrate",
                json!({"uri": old_uri, "secret": SECRET, "precopy_rounds": rounds,
                       "max_bandwidth": rate}),
            )
        });
        let mut migration = Some(migration);
        if after {
            migration.take().unwrap().join().unwrap().unwrap();
        } else {
            let t0 = std::time::Instant::now();
            loop {
                let q = source.ctl("query-migrate", json!({})).unwrap();
                if q["phase"] == "precopy" && q["pages_precopy"].as_u64() > Some(4000) {
                    break;
                }
                assert!(t0.elapsed().as_secs() < 30, "no precopy: {q}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let sw = source
            .ctl("migrate-switch", json!({"uri": new_uri, "secret": SECRET}))
            .unwrap();
        if let Some(m) = migration {
            m.join().unwrap().unwrap();
        }
        sw
    });
    assert_eq!(switched["after_switchover"], after, "{switched}");
    assert_eq!(switched["to"], new_uri.as_str(), "{switched}");
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let (status, out) = old.wait().unwrap();
    assert!(status.success(), "old destination: {status}\n{out}");
    let summary = finished_with(new, &reference);
    let owners = summary["demand_paging"]["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "{summary}");
    assert!(
        owners[1]["pages_installed"].as_u64().unwrap() > 0,
        "the second sender sent pages: {summary}"
    );
}

#[test]
fn switch_during_precopy_chain_a_b_c() {
    switched_across_hosts("switch-abc", "c", false);
}

#[test]
fn switch_after_switchover_back_to_the_source_host_a_b_a() {
    switched_across_hosts("switch-aba", "a", true);
}

/// The destination's host unplugged for 3.5 s mid-postcopy (its port down: every path to it
/// silent, the resume path too): the destination gives the link up once a fault has waited
/// 2 s, dials the source back until the network returns, and the guest finishes with the
/// reference digest.
#[test]
fn postcopy_recovers_after_the_destination_host_is_unplugged() {
    let net = Network::new("recover", &["src", "dst"]).unwrap();
    let dir = Scratch::new("multihost-recover");
    let common = [
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "uniform:ws=40M,write=0.2,seed=147",
        "--steps",
        "3000000",
    ];
    let reference = run_to_end(&common).unwrap();
    let source =
        VmProcess::start_at(Place::of(net.host("src")), &dir.path("src.sock"), &common).unwrap();
    let dsock = dir.path("dst.sock");
    let (dest, uri) = VmProcess::destination_at(
        Place::of(net.host("dst")),
        SECRET,
        &["--mem", "64M", "--control", dsock.to_str().unwrap()],
    )
    .unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 100_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "max_bandwidth": 8 << 20}),
        )
        .unwrap();
    assert_eq!(m["phase"], "postcopy", "{m}");
    // Longer than the 2 s a fault may wait before the link is given up.
    net.unplug("dst").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    // How soon the link is back once the network is (printed, not asserted: timing), and
    // how soon a raw TCP connect gets through from the same host (the kernel's ARP retries
    // make most of it).
    let mut prober = net
        .host("dst")
        .probe_until_reaches(&net.host("src").ip)
        .unwrap();
    net.plug("dst").unwrap();
    let plugged = std::time::Instant::now();
    let raw = std::thread::spawn(move || {
        let status = prober.wait();
        (status, plugged.elapsed())
    });
    let back = loop {
        let s = dest.ctl("query-status", json!({})).unwrap();
        let link = &s["demand_paging"]["owners"][0]["link"];
        if link["up"] == true && link["outages"].as_u64() >= Some(1) {
            break Some(plugged.elapsed());
        }
        if s["status"] == "finished" || plugged.elapsed().as_secs() > 20 {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let summary = finished_with(dest, &reference);
    let link = &summary["demand_paging"]["owners"][0]["link"];
    let (probed, raw) = raw.join().unwrap();
    eprintln!(
        "the source's link at the destination: {link}; back {back:?} after the plug, a raw TCP \
         connect {raw:?} ({probed:?})"
    );
    assert!(link["outages"].as_u64().unwrap() >= 1, "{link}");
    assert!(link["redials"].as_u64().unwrap() >= 1, "{link}");
}
