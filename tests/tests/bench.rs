//! The benchmark commands as smoke tests: they run end to end on a small guest and write
//! their results. (Their numbers are measurements, never asserted: these machines are noisy.)

use tsubame_tests::{tsubame, Scratch};

/// Runs `tsubame bench ARGS`, which must succeed; returns what it printed.
fn bench(args: &[&str]) -> String {
    let o = tsubame(&[&["bench"], args].concat());
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

#[test]
fn bench_migrate_quick_writes_runs_and_a_summary() {
    let dir = Scratch::new("bench-migrate");
    let out = dir.path("results");
    let text = bench(&[
        "migrate",
        "--quick",
        "--configs",
        "postcopy-address,hybrid-1,qemu-postcopy",
        "--out",
        out.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["configs"].as_array().unwrap().len(), 3, "{summary}");
    assert!(summary["loopback"]["throughput_gb_per_s"].as_f64() > Some(0.0));
    for config in ["postcopy-address", "hybrid-1", "qemu-postcopy"] {
        let run: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join(format!("run-{config}-m256-d0-r1.json"))).unwrap(),
        )
        .unwrap();
        let r = &run["run"];
        assert_eq!(
            r["digest_ok"], true,
            "{config}: migration changed the result"
        );
        assert!(r["result"]["total_ms"].as_f64() > Some(0.0), "{r}");
        assert!(!r["result"]["progress"].as_array().unwrap().is_empty());
        assert!(run["machine"]["cpus"].as_u64() > Some(0));
    }
    for figure in ["progress-m256-d0", "fault-cdf-m256-d0"] {
        for ext in ["png", "svg"] {
            let f = out.join(format!("{figure}.{ext}"));
            assert!(
                std::fs::metadata(&f).is_ok_and(|m| m.len() > 1000),
                "{} missing: {text}",
                f.display()
            );
        }
    }
}

#[test]
fn bench_fault_measures_every_path() {
    let dir = Scratch::new("bench-fault");
    let json = dir.path("fault.json");
    let o = tsubame(&[
        "bench",
        "fault",
        "--mem",
        "256M",
        "--ws",
        "64M",
        "--pages",
        "300",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for key in [
        "guest_floor_stall_us",
        "guest_network_stall_us",
        "guest_stall_bar_us",
    ] {
        assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key}: {r}");
    }
    assert!(r["loopback"]["rtt_p50_us"].as_f64() > Some(0.0), "{r}");
    assert!(r["engine"]["faults"].as_u64() > Some(300), "{r}");
}

#[test]
fn bench_memserver_quick_measures_every_bar() {
    let dir = Scratch::new("bench-memserver");
    let out = dir.path("results");
    let text = bench(&["memserver", "--quick", "--out", out.to_str().unwrap()]);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("memserver.json")).unwrap()).unwrap();
    let bars = r["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 5, "{r}");
    for b in bars {
        assert!(b["value"].as_f64().is_some_and(f64::is_finite), "{b}");
    }
    assert!(r["loopback"]["rtt_p50_us"].as_f64() > Some(0.0), "{r}");
    assert!(r["fault_back"]["faults_back"].as_u64() > Some(0), "{r}");
    assert!(
        r["writeback"]["pages_written_back"].as_u64() > Some(0),
        "{r}"
    );
    assert!(r["metadata"]["data_bytes"].as_u64() > Some(0), "{r}");
    assert!(text.contains("fault back p50"), "{text}");
}

#[test]
fn bench_switch_quick_measures_both_ways_to_a_new_destination() {
    let dir = Scratch::new("bench-switch");
    let out = dir.path("results");
    let text = bench(&["switch", "--quick", "--out", out.to_str().unwrap()]);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("switch.json")).unwrap()).unwrap();
    assert_eq!(r["digests_ok"], true, "{r}");
    let bars = r["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 4, "{r}");
    for b in bars {
        assert!(b["value"].as_f64().is_some_and(f64::is_finite), "{b}");
    }
    let switch = &r["switch_runs"][0];
    assert!(switch["pages_at_old"].as_u64() > Some(0), "{switch}");
    assert!(switch["switch_ms"].as_f64() > Some(0.0), "{switch}");
    let restart = &r["restart_runs"][0];
    assert!(
        restart["time_to_completion_ms"].as_f64() > Some(0.0),
        "{restart}"
    );
    assert!(
        text.contains("time to completion, switch / restart"),
        "{text}"
    );
}
