//! `tsubame drill all --quick --json`: every drill (link faults, killed processes, switch,
//! cancel, WAN) runs its real processes and must pass, the guest's digest equal to a run that
//! never migrated wherever the guest survives by design. No timing is asserted.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tsubame_tests::tsubame_bin;

#[test]
fn every_quick_drill_passes() {
    let mut child = Command::new(tsubame_bin())
        .args(["drill", "all", "--quick", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tsubame drill");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    // Generous: about a minute and a half on 2 idle cores; the drills kill their own
    // children when they end.
    let deadline = Instant::now() + Duration::from_secs(1200);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tsubame drill all --quick did not end within 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = out.join().unwrap().unwrap();
    let err = err.join().unwrap().unwrap();
    let results: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}\n{err}\nexit status {status}"));
    let drills = results["drills"].as_array().expect("a list of drills");
    let names: Vec<&str> = drills.iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "netcut",
            "blackhole",
            "reset",
            "kill-source",
            "kill-destination",
            "kill-memserver",
            "switch",
            "cancel",
            "wan"
        ],
        "{results:#}"
    );
    let failed: Vec<String> = drills
        .iter()
        .filter(|d| d["passed"] != true)
        .map(|d| format!("{}: {}", d["name"], d["why"]))
        .collect();
    assert!(
        failed.is_empty(),
        "failed drills:\n{}\n{err}",
        failed.join("\n")
    );
    for d in drills {
        if d["name"] == "kill-source" {
            // Plain postcopy loses the guest with its source, by design; the drill checks
            // that the destination says so and never ran the guest on a bad page.
            assert_eq!(d["guest_lost"], false, "{d:#}");
        } else {
            assert_eq!(d["digest"], "equal", "{d:#}");
            assert_eq!(d["guest_lost"], false, "{d:#}");
            assert_eq!(d["lost_by_design"], false, "{d:#}");
        }
    }
    assert!(
        status.success(),
        "every drill passed, yet exit status {status}"
    );
    assert_eq!(results["passed"], true, "{results:#}");
}
