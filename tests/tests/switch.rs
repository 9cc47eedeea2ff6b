//! Switching a migration's destination during its precopy rounds (`migrate-switch`): the old
//! destination forwards the pages it holds, the source sends the rest, the new destination
//! merges both and finishes the workload with the same memory digest as a run that never
//! migrated. Also: a new destination that cannot be reached (the migration goes on to the old
//! one), and an old destination killed after the switch (the source sends its pages).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "switch secret";
const MEM: &str = "128M";
/// The precopy rounds' rate: slow enough to switch at a chosen point of round 1.
const RATE: u64 = 64 << 20;

fn destination() -> (VmProcess, String) {
    VmProcess::destination(SECRET, &["--mem", MEM]).unwrap()
}

/// The guest: `workload` on `vcpus`, long enough to outlast the migration.
fn common<'a>(vcpus: &'a str, workload: &'a str) -> Vec<&'a str> {
    vec![
        "--mem",
        MEM,
        "--vcpus",
        vcpus,
        "--workload",
        workload,
        "--steps",
        "12000000",
    ]
}

/// Starts the source and the old destination, runs the guest a little, and starts a migration
/// with two rate-limited precopy rounds to the old destination on a thread of `scope`; waits
/// until round 1 has sent `at` of the pages.
fn migrating<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    source: &'s VmProcess,
    old_uri: &str,
    at: f64,
) -> std::thread::ScopedJoinHandle<'s, anyhow::Result<Value>> {
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let uri = old_uri.to_string();
    let migration = scope.spawn(move || {
        source.ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "precopy_rounds": 2, "max_bandwidth": RATE}),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = source.ctl("query-migrate", json!({})).unwrap();
        let (sent, total) = (q["pages_precopy"].as_u64(), q["total_pages"].as_u64());
        if q["phase"] == "precopy"
            && sent
                .zip(total)
                .is_some_and(|(s, t)| s as f64 >= at * t as f64)
        {
            return migration;
        }
        assert!(Instant::now() < deadline, "round 1 never got to {at}: {q}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The new destination's summary: the reference digest, every page here, both owners done.
fn check_new_destination(dest: VmProcess, reference: &Value, old_uri: &str) -> Value {
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "new destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(
        summary["digest"], reference["digest"],
        "the switched migration changed the result"
    );
    let paging = &summary["demand_paging"];
    assert_eq!(paging["present_pages"], paging["total_pages"], "{paging}");
    assert!(paging["fetch_error"].is_null(), "{paging}");
    let owners = paging["owners"].as_array().unwrap();
    assert_eq!(
        owners.len(),
        2,
        "the source and the old destination: {paging}"
    );
    assert_eq!(owners[0]["endpoint"], "the migration source");
    assert_eq!(
        owners[1]["endpoint"],
        format!("the second sender {old_uri}")
    );
    for o in owners {
        assert_eq!(o["pages_owned"], 0, "{o}");
    }
    summary
}

/// Switches from an old to a new destination once round 1 has sent `at` of the pages.
fn switch_at(name: &str, vcpus: &str, workload: &str, at: f64) {
    let dir = Scratch::new(name);
    let common = common(vcpus, workload);
    let reference = run_to_end(&common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let (old, old_uri) = destination();
    let (new, new_uri) = destination();
    let (switched, migrated) = std::thread::scope(|s| {
        let migration = migrating(s, &source, &old_uri, at);
        let switched = source
            .ctl("migrate-switch", json!({"uri": new_uri, "secret": SECRET}))
            .unwrap();
        (switched, migration.join().unwrap().unwrap())
    });
    assert_eq!(switched["from"], old_uri.as_str(), "{switched}");
    assert_eq!(switched["to"], new_uri.as_str(), "{switched}");
    assert!(switched["forwarder_lost"].is_null(), "{switched}");
    assert!(
        switched["pages_at_old"].as_u64().unwrap() > 0,
        "the old destination held pages: {switched}"
    );
    // The switchover went to the new destination.
    assert_eq!(migrated["destination"], new_uri.as_str(), "{migrated}");
    assert_eq!(migrated["switch"]["to"], new_uri.as_str(), "{migrated}");
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    // The old destination forwarded its pages and went away.
    let (status, out) = old.wait().unwrap();
    assert!(status.success(), "old destination: {status}\n{out}");
    let forwarded: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(forwarded["status"], "forwarded", "{forwarded}");
    assert_eq!(forwarded["to"], new_uri.as_str(), "{forwarded}");
    let summary = check_new_destination(new, &reference, &old_uri);
    let from_old = &summary["demand_paging"]["owners"][1];
    assert!(
        from_old["pages_installed"].as_u64().unwrap() > 0,
        "pages came from the old destination: {from_old}"
    );
}

#[test]
fn switch_at_10_percent_of_precopy() {
    switch_at("switch-10", "1", "hotcold:ws=96M,write=0.05,seed=3", 0.1);
}

#[test]
fn switch_at_50_percent_of_precopy_2_vcpus() {
    switch_at("switch-50", "2", "hotcold:ws=96M,write=0.05,seed=5", 0.5);
}

#[test]
fn switch_at_90_percent_of_precopy() {
    switch_at("switch-90", "1", "hotcold:ws=96M,write=0.1,seed=11", 0.9);
}

/// Every page written again and again while the old destination pushes the copies it holds:
/// the source takes them back as they are written, and the two senders race on them.
#[test]
fn senders_racing_on_the_same_pages() {
    switch_at("switch-race", "2", "uniform:ws=64M,write=0.5,seed=9", 0.5);
}

/// A new destination that refuses (wrong secret) or is not there changes nothing: the
/// migration goes on to the old one and ends with the reference digest.
#[test]
fn a_switch_that_cannot_be_made_leaves_the_migration_as_it_was() {
    let dir = Scratch::new("switch-refused");
    let common = common("1", "hotcold:ws=96M,write=0.05,seed=3");
    let reference = run_to_end(&common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let e = source
        .ctl(
            "migrate-switch",
            json!({"uri": "tcp:127.0.0.1:1", "secret": SECRET}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no migration"), "{e}");
    let (old, old_uri) = destination();
    let (_wrong, wrong_uri) = VmProcess::destination("another secret", &["--mem", MEM]).unwrap();
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp:{}", l.local_addr().unwrap())
    };
    let migrated = std::thread::scope(|s| {
        let migration = migrating(s, &source, &old_uri, 0.3);
        for uri in [&wrong_uri, &nobody] {
            let e = source
                .ctl("migrate-switch", json!({"uri": uri, "secret": SECRET}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("the migration goes on to {old_uri}")),
                "{uri}: {e}"
            );
        }
        let e = source
            .ctl("migrate-switch", json!({"uri": old_uri, "secret": SECRET}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("goes already"), "{e}");
        migration.join().unwrap().unwrap()
    });
    assert_eq!(migrated["destination"], old_uri.as_str(), "{migrated}");
    assert!(migrated.get("switch").is_none(), "{migrated}");
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let (status, out) = old.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["digest"], reference["digest"]);
}

/// The old destination killed right after the switch, before the switchover: the source takes
/// its pages back and sends them itself; nothing waits for it.
#[test]
fn an_old_destination_killed_after_the_switch_leaves_its_pages_to_the_source() {
    let dir = Scratch::new("switch-kill");
    let common = common("1", "hotcold:ws=96M,write=0.05,seed=3");
    let reference = run_to_end(&common).unwrap();
    let mut args = common.clone();
    args.push("--json");
    let source = VmProcess::start(&dir.path("src.sock"), &args).unwrap();
    let (mut old, old_uri) = destination();
    let (new, new_uri) = destination();
    std::thread::scope(|s| {
        let migration = migrating(s, &source, &old_uri, 0.3);
        let switched = source
            .ctl("migrate-switch", json!({"uri": new_uri, "secret": SECRET}))
            .unwrap();
        assert!(switched["pages_at_old"].as_u64().unwrap() > 0, "{switched}");
        old.child.kill().unwrap();
        migration.join().unwrap().unwrap()
    });
    let (status, out) = source.wait().unwrap();
    assert!(status.success(), "source: {status}\n{out}");
    let m = &serde_json::from_str::<Value>(&out).unwrap()["migration"];
    let sw = &m["switch"];
    assert!(sw["forwarder_lost"].is_string(), "{sw}");
    assert_eq!(sw["pages_taken_back"], sw["pages_at_old"], "{sw}");
    check_new_destination(new, &reference, &old_uri);
}

/// After the switchover (the VM runs at the old destination, postcopy, its push held back by a
/// rate): the old destination moves the VM on to the new one, which fetches what the old one
/// still lacks straight from the source.
fn switch_after_switchover(name: &str, vcpus: &str, workload: &str) {
    let dir = Scratch::new(name);
    let common = common(vcpus, workload);
    let reference = run_to_end(&common).unwrap();
    let mut args = common.clone();
    args.push("--json");
    let source = VmProcess::start(&dir.path("src.sock"), &args).unwrap();
    let (old, old_uri) = destination();
    let (new, new_uri) = destination();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": old_uri, "secret": SECRET, "max_bandwidth": RATE}),
        )
        .unwrap();
    assert_eq!(m["phase"], "postcopy", "{m}");
    std::thread::sleep(Duration::from_millis(200)); // the guest runs at the old one meanwhile
    let switched = source
        .ctl("migrate-switch", json!({"uri": new_uri, "secret": SECRET}))
        .unwrap();
    assert_eq!(switched["after_switchover"], true, "{switched}");
    assert_eq!(switched["from"], old_uri.as_str(), "{switched}");
    let (status, out) = source.wait().unwrap();
    assert!(status.success(), "source: {status}\n{out}");
    let m = &serde_json::from_str::<Value>(&out).unwrap()["migration"];
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(
        m["switch"]["source_pages_after"].as_u64().unwrap() > 0,
        "the new destination fetched from the source: {m}"
    );
    // The old destination moved the VM on and went away.
    let (status, out) = old.wait().unwrap();
    assert!(status.success(), "old destination: {status}\n{out}");
    let moved: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        moved["migration"]["destination"],
        new_uri.as_str(),
        "{moved}"
    );
    assert_eq!(moved["migration"]["phase"], "completed", "{moved}");
    let (status, out) = new.wait().unwrap();
    assert!(status.success(), "new destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["digest"], reference["digest"],
        "the move changed the result"
    );
    let paging = &summary["demand_paging"];
    assert_eq!(paging["present_pages"], paging["total_pages"], "{paging}");
    let owners = paging["owners"].as_array().unwrap();
    assert_eq!(
        owners.len(),
        2,
        "the old destination and the source: {paging}"
    );
    assert!(
        owners[1]["pages_installed"].as_u64().unwrap() > 0,
        "pages came straight from the source: {paging}"
    );
}

#[test]
fn switch_after_the_switchover_with_the_guest_writing() {
    switch_after_switchover("switch-after", "1", "hotcold:ws=96M,write=0.3,seed=4");
}

#[test]
fn switch_after_the_switchover_2_vcpus() {
    switch_after_switchover("switch-after-2", "2", "uniform:ws=96M,write=0.3,seed=6");
}

/// The old destination's link lost after the switchover, while it still holds pages the new
/// destination lacks (its forwarding held back by a slow link): the new destination hands
/// those pages back to the source, which pushes them; nothing waits for the old one.
#[test]
fn an_old_destination_lost_after_the_switchover_hands_its_pages_back() {
    let dir = Scratch::new("switch-lost-after");
    let common = common("1", "hotcold:ws=96M,write=0.05,seed=3");
    let reference = run_to_end(&common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let (old, old_uri) = destination();
    let (link, via) =
        VmProcess::linkem(old_uri.trim_start_matches("tcp:"), &dir.path("link.sock")).unwrap();
    let via = format!("tcp:{via}");
    let (new, new_uri) = destination();
    let at_old = std::thread::scope(|s| {
        // The old destination is reached through the link only (the source and, after the
        // switch, the new destination).
        let migration = migrating(s, &source, &via, 0.2);
        // Forwarding crawls from now on.
        link.ctl("set", json!({"rate": "1Mbit"})).unwrap();
        let switched = source
            .ctl("migrate-switch", json!({"uri": new_uri, "secret": SECRET}))
            .unwrap();
        assert!(
            switched["pages_at_old"].as_u64().unwrap() > 1000,
            "{switched}"
        );
        let m = migration.join().unwrap().unwrap();
        assert_eq!(m["destination"], new_uri.as_str(), "{m}");
        // Switched over: the old destination still forwards; its link goes for good.
        link.ctl("drop", json!({})).unwrap();
        switched["pages_at_old"].as_u64().unwrap()
    });
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let summary = check_new_destination(new, &reference, &via);
    let from_old = &summary["demand_paging"]["owners"][1];
    assert!(
        from_old["pages_installed"].as_u64().unwrap() < at_old,
        "the old destination was lost before it forwarded all {at_old} pages: {from_old}"
    );
    drop(old);
}

/// After the switchover, a new destination that is not there changes nothing either: the VM
/// keeps running at the old destination, which finishes it with the reference digest.
#[test]
fn a_switch_after_the_switchover_to_nobody_leaves_the_vm_where_it_runs() {
    let dir = Scratch::new("switch-after-nobody");
    let common = common("1", "hotcold:ws=96M,write=0.1,seed=3");
    let reference = run_to_end(&common).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &common).unwrap();
    let (old, old_uri) = destination();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let m = source
        .ctl(
            "migrate",
            json!({"uri": old_uri, "secret": SECRET, "max_bandwidth": RATE}),
        )
        .unwrap();
    assert_eq!(m["phase"], "postcopy", "{m}");
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp:{}", l.local_addr().unwrap())
    };
    let e = source
        .ctl("migrate-switch", json!({"uri": nobody, "secret": SECRET}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("could not move the VM on"), "{e}");
    let (status, _) = source.wait().unwrap();
    assert!(status.success(), "source: {status}");
    let (status, out) = old.wait().unwrap();
    assert!(status.success(), "destination: {status}\n{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["digest"], reference["digest"]);
}
