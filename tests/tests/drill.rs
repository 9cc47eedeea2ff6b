//! `tsubame drill all --quick --json`: every drill (link faults and WAN on two hosts of
//! network namespaces, killed processes, switch, cancel) runs its real processes and must
//! pass, the guest's digest equal to a run that never migrated wherever the guest survives
//! by design. No timing is asserted.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tsubame_tests::{output_within, tsubame_bin};

#[test]
fn every_quick_drill_passes() {
    // Generous: about a minute and a half on 2 idle cores; the drills kill their own
    // children when they end.
    let run = output_within(
        Command::new(tsubame_bin()).args(["drill", "all", "--quick", "--json"]),
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("tsubame drill all --quick: {e:#}"));
    let (out, err, status) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        run.status,
    );
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
        // The network drills run on two hosts (namespaces joined by veth), as the multi-host
        // tests do on this machine.
        if ["netcut", "blackhole", "reset", "wan"].contains(&d["name"].as_str().unwrap_or("")) {
            assert_eq!(
                d["details"]["network"], "network namespaces joined by veth",
                "{d:#}\n{err}"
            );
        }
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
