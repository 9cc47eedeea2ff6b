//! Cancellable postcopy across processes: the destination sends reverse checkpoints, and the
//! source resumes the VM from the last one it committed when the migration is called off, or
//! when the destination is killed or stopped. Oracles: the guest's memory at the end equals a
//! run that never migrated; its serial output, source and destination together, equals that
//! run's (no line lost, none twice, none released before its checkpoint was committed); and a
//! destination that comes back after the source resumed never runs the guest again.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tsubame_tests::{run_to_end, Scratch, VmProcess};

const SECRET: &str = "cancel secret";

/// One test at a time: each runs two VMs whose timing (leases, checkpoints) is the subject,
/// and three at once on a 2-core machine only measure the overcommit.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
const STEPS: &str = "1500000";

fn common(vcpus: &str, seed: u32) -> Vec<String> {
    [
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--workload",
        &format!("uniform:ws=32M,write=0.3,seed={seed}"),
        "--steps",
        STEPS,
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Polls `p`'s `query-migrate` until `f` holds.
fn wait_migration(p: &VmProcess, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = p.ctl("query-migrate", json!({})).unwrap_or(Value::Null);
        if f(&m) {
            return m;
        }
        if Instant::now() >= deadline {
            let bt = std::process::Command::new("gdb")
                .args([
                    "-p",
                    &p.child.id().to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            std::fs::write("/tmp/cancel-bt.txt", bt).ok();
            panic!("{what}: {m:#}\n{}", p.stderr());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts a migration of `source` to a new destination (extra arguments `dest_extra`),
/// cancellable, with the push slowed so that postcopy lasts seconds; returns the destination
/// once the VM runs there.
fn migrate_cancellable(source: &VmProcess, dest_extra: &[&str]) -> VmProcess {
    let (dest, uri) =
        VmProcess::destination(SECRET, &[&["--mem", "64M"], dest_extra].concat()).unwrap();
    let m = source
        .ctl(
            "migrate",
            json!({"uri": uri, "secret": SECRET, "cancellable": "on", "checkpoint_ms": 50,
                   "max_bandwidth": 8 << 20}),
        )
        .unwrap();
    assert_eq!(m["phase"], "postcopy", "{m:#}");
    dest
}

/// Waits for the source's run to end and returns its summary.
fn summary_of(p: VmProcess) -> Value {
    let (status, out) = p.wait().unwrap();
    assert!(status.success(), "the source failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A small xorshift generator: random kill moments, replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn killing_the_destination_resumes_the_vm_at_the_source() {
    let _serial = one_at_a_time();
    // TSUBAME_KILL_RUNS=200 for a campaign; CI runs a few.
    let runs: u64 = std::env::var("TSUBAME_KILL_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("TSUBAME_KILL_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .wrapping_mul(2_654_435_761)
                .into()
        });
    eprintln!("kill campaign: {runs} runs, TSUBAME_KILL_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let references: Vec<Value> = ["1", "2"]
        .iter()
        .map(|v| run_to_end(&strs(&common(v, 81))).unwrap())
        .collect();
    let mut resume_ms = Vec::new();
    for run in 0..runs {
        let vcpus = if run % 2 == 0 { "1" } else { "2" };
        let dir = Scratch::new(&format!("kill-{run}"));
        let mut args = common(vcpus, 81);
        args.push("--json".into());
        let source = VmProcess::start(&dir.path("src.sock"), &strs(&args)).unwrap();
        let w = source
            .ctl("wait", json!({"for": "steps", "steps": 200_000}))
            .unwrap();
        assert_eq!(w["outcome"], "reached", "{w}");
        let mut dest = migrate_cancellable(&source, &[]);
        // Killed at a random moment of the first 600 ms after the switchover: before the
        // first checkpoint, between checkpoints, or in the middle of one.
        let after = rng.below(600);
        std::thread::sleep(Duration::from_millis(after));
        dest.child.kill().unwrap();
        let killed = Instant::now();
        dest.child.wait().unwrap();
        let mut m = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(30);
        while m["phase"] != "cancelled" {
            m = source
                .ctl("query-migrate", json!({}))
                .unwrap_or(Value::Null);
            if m.is_null() && Instant::now() > deadline {
                let err = source.stderr();
                let (st, out) = source.wait().unwrap();
                panic!("run {run}: the source never resumed the VM; it exited {st}: {out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = killed.elapsed();
        resume_ms.push(took.as_millis());
        eprintln!(
            "run {run} ({vcpus} vCPUs): killed {after} ms after the switchover, running at the source {took:?} later, from checkpoint {} ({})",
            m["checkpoints"]["epoch"], m["checkpoints"]["reason"]
        );
        let s = summary_of(source);
        let reference = &references[usize::from(vcpus == "2")];
        assert_eq!(
            s["digest"], reference["digest"],
            "run {run}, TSUBAME_KILL_SEED={seed}: {s:#}"
        );
        assert_eq!(s["status"], "finished", "{s:#}");
    }
    eprintln!("killed -> running at the source, ms: {resume_ms:?}");
}

#[test]
fn output_leaves_only_once_committed_and_a_cancel_loses_no_line() {
    let _serial = one_at_a_time();
    let dir = Scratch::new("cancel-serial");
    let report = ["--report-every", "20000"];
    let base = common("1", 82);
    let reference_file = dir.path("reference.txt");
    let mut reference_args = strs(&base);
    reference_args.extend(report);
    let out = tsubame_tests::tsubame(
        &[
            &[
                "run",
                "--quiet",
                "--serial",
                reference_file.to_str().unwrap(),
            ],
            &reference_args[..],
        ]
        .concat(),
    );
    assert!(out.status.success());
    let reference = std::fs::read_to_string(&reference_file).unwrap();

    let (src_file, dst_file) = (dir.path("src.txt"), dir.path("dst.txt"));
    let sock = dir.path("src.sock");
    let source = VmProcess::start(
        &sock,
        &[
            &["--json", "--serial", src_file.to_str().unwrap()],
            &reference_args[..],
        ]
        .concat(),
    )
    .unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 200_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let dsock = dir.path("dst.sock");
    let dest = migrate_cancellable(
        &source,
        &[
            "--serial",
            dst_file.to_str().unwrap(),
            "--control",
            dsock.to_str().unwrap(),
        ],
    );
    dest.wait_for_stderr("control socket ready", Duration::from_secs(30))
        .unwrap();
    // The destination releases lines only as checkpoints are committed: wait for a few. (On
    // a starved host the destination's lease may run out first: the source then takes the VM
    // back by itself, and what follows must hold all the same.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let released = |d: &VmProcess| {
        d.ctl("query-serial", json!({}))
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
    };
    let rolled_back =
        |s: &VmProcess| s.ctl("query-migrate", json!({})).unwrap()["phase"] == "cancelled";
    let mut by_itself = false;
    while released(&dest).is_some_and(|n| n < 3) {
        if rolled_back(&source) {
            by_itself = true;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the destination released no line"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if !by_itself && !rolled_back(&source) {
        let m = source.ctl("query-migrate", json!({})).unwrap();
        assert!(
            m["checkpoints"]["pause_p50_us"].as_u64().unwrap() > 0,
            "{m:#}"
        );
        // Cancelled at the source: the destination stops, and the VM goes on here from the
        // last checkpoint committed.
        let c = source.ctl("migrate-cancel", json!({})).unwrap();
        assert_eq!(c, json!({}));
    } else {
        eprintln!("the destination's lease ran out before the cancel: the source took the VM back by itself");
    }
    let m = source.ctl("query-migrate", json!({})).unwrap();
    assert_eq!(m["phase"], "cancelled", "{m:#}");
    assert!(m["checkpoints"]["resume_ms"].as_f64().is_some(), "{m:#}");
    let (status, out) = dest.wait().unwrap();
    assert!(status.success(), "the destination exits once fenced: {out}");
    let fenced: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fenced["status"], "fenced", "{fenced:#}");
    let s = summary_of(source);
    let ref_summary = run_to_end(&reference_args).unwrap();
    assert_eq!(s["digest"], ref_summary["digest"], "{s:#}");

    // Lines: the source's before the switchover, the destination's, the source's after the
    // cancel, in that order, make the reference exactly.
    let src = std::fs::read_to_string(&src_file).unwrap();
    let dst = std::fs::read_to_string(&dst_file).unwrap();
    let (src, dst, want): (Vec<&str>, Vec<&str>, Vec<&str>) = (
        src.lines().collect(),
        dst.lines().collect(),
        reference.lines().collect(),
    );
    assert!(
        by_itself || !dst.is_empty(),
        "the destination released no line"
    );
    let fits = (0..=src.len()).any(|i| {
        let mut all = src[..i].to_vec();
        all.extend(&dst);
        all.extend(&src[i..]);
        all == want
    });
    assert!(
        fits,
        "source {src:?} and destination {dst:?} lines do not make the reference {want:?}"
    );
}

#[test]
fn a_stopped_destination_never_runs_the_vm_again() {
    let _serial = one_at_a_time();
    let dir = Scratch::new("cancel-stop");
    let mut args = common("2", 83);
    args.push("--json".into());
    let reference = run_to_end(&strs(&common("2", 83))).unwrap();
    let source = VmProcess::start(&dir.path("src.sock"), &strs(&args)).unwrap();
    let w = source
        .ctl("wait", json!({"for": "steps", "steps": 400_000}))
        .unwrap();
    assert_eq!(w["outcome"], "reached", "{w}");
    let dsock = dir.path("dst.sock");
    let dest = migrate_cancellable(&source, &["--control", dsock.to_str().unwrap(), "--hold"]);
    dest.wait_for_stderr("control socket ready", Duration::from_secs(30))
        .unwrap();
    wait_migration(&source, "a checkpoint committed", |m| {
        m["checkpoints"]["committed"].as_u64().unwrap_or(0) >= 2
    });
    // SIGSTOP: the destination goes silent; the source resumes the VM once its lease is over.
    let pid = dest.child.id().to_string();
    let kill = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    kill("-STOP");
    let stopped = Instant::now();
    let m = wait_migration(&source, "the source resumes the VM", |m| {
        m["phase"] == "cancelled"
    });
    eprintln!(
        "destination stopped -> running at the source after {:?}: {}",
        stopped.elapsed(),
        m["checkpoints"]
    );
    // Let the source's guest run on a little, then wake the destination: it must find its
    // lease over and never enter the guest again.
    std::thread::sleep(Duration::from_millis(200));
    kill("-CONT");
    let steps = |p: &VmProcess| {
        p.ctl("query-progress", json!({})).unwrap()["steps"]
            .as_u64()
            .unwrap()
    };
    let first = steps(&dest);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(steps(&dest), first, "the destination ran the guest again");
    let st = dest.ctl("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "fenced", "{st:#}");
    let e = dest.ctl("cont", json!({})).unwrap_err().to_string();
    assert!(e.contains("stopped here for good"), "{e}");
    let s = summary_of(source);
    assert_eq!(s["digest"], reference["digest"], "{s:#}");
}
