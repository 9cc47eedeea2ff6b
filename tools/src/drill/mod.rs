//! `tsubame drill`: rehearse what goes wrong during a migration, with real processes.
//!
//! Each drill starts its own `tsubame` processes (this executable: sources, destinations,
//! memservers, `linkem` in front of a destination), drives them through their control
//! sockets, injects one fault, and ends with a verdict, its timings and the digest check: the
//! guest's memory at its end equals a reference run of the same guest that never migrated.
//! `all` runs the set; `random` is a fault campaign with a seeded generator.
//!
//! The scenarios about the network (netcut, blackhole, reset, wan) put the source and the
//! destination on two hosts: network namespaces joined by veth and a bridge
//! (`tsubame_netns`), with `linkem` on the destination's host in front of it. A netcut there
//! unplugs the destination's host from the bridge, so the redials meet the outage too. The
//! other scenarios, and all with `--loopback`, run on loopback.
//!
//! Every child is killed and reaped when its drill ends, whatever happened ([`proc::Proc`]).

mod proc;
mod scenarios;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{json, Value};

pub use scenarios::Scenario;

/// Rehearse failures during a migration with real processes, and check the guest survived.
///
/// NAME is one scenario, `all` (each scenario once, then a table) or `random` (a fault
/// campaign). Each drill runs real `tsubame` processes on this machine and ends with a
/// verdict, timings and the digest check: the guest's memory at its end equals that of a
/// reference run of the same guest that never migrated. The scenarios about the network
/// (netcut, blackhole, reset, wan) run the source and the destination on two hosts, network
/// namespaces joined by veth, with `tsubame linkem` in front of the destination; the others
/// run on loopback.
///
/// Scenarios:
///   netcut            postcopy; the destination's host is unplugged for 2 s mid-postcopy
///                     (every path, redials included): the guest finishes at the
///                     destination (outage and time to completion reported)
///   blackhole         postcopy; silence (no byte, no reset) for 4 s, then restore: the
///                     destination gives the link up and resumes the session
///   reset             postcopy; every connection reset mid-postcopy: resumed
///   kill-source       kill -9 of the source mid-postcopy: the destination reports it clearly
///                     and its guest never sees a bad page (the guest is lost by design:
///                     plain postcopy; cancellable=on is the way to survive this)
///   kill-destination  cancellable postcopy; kill -9 of the destination after the
///                     switchover: the source resumes the VM by itself
///   kill-memserver    remote paging over two memservers with --replicas 2; one is killed
///   switch            migrate-switch to a new destination at 50 % of precopy round 1
///   cancel            migrate-cancel during the precopy rounds, then a cancellable
///                     migration cancelled after its switchover: the VM runs at the source
///   wan               migrations over 16 ms and 64 ms one-way delay, 1 Gbit/s
///
/// The destination dials the source's resume listener directly, not through linkem: a
/// blackhole or a reset (and, with --loopback, a netcut: its connections stall) ends when the
/// destination gives the link up, not when it is restored. A netcut on two hosts unplugs the
/// destination's host, so its redials wait for the network to come back.
///
/// Examples:
///   tsubame drill netcut
///   tsubame drill netcut --param 6000     (the destination's host unplugged for 6 s)
///   tsubame drill all --quick            (small guests: about a minute and a half)
///   tsubame drill all --json
///   tsubame drill random --runs 200 --seed 7 --quick
///   tsubame drill random --runs 1 --seed 12   (replays run 5 of --seed 7: seed + run)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct DrillArgs {
    /// A scenario (see above), `all`, or `random`.
    pub name: String,
    /// Small guests (64-128 MiB) and short runs.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Run the network scenarios on loopback too, not on two hosts of network namespaces
    /// joined by veth (the default where this machine allows it: root and iproute2).
    #[arg(long)]
    pub loopback: bool,
    /// One scenario: the fault this many ms after the moment it waits for (the switchover,
    /// the first evictions) [default: the scenario's].
    #[arg(long, value_name = "MS")]
    pub after_ms: Option<u64>,
    /// One scenario: the fault's size: cut or blackhole ms, switch or cancel point (% of
    /// round 1), WAN one-way delay ms [default: the scenario's].
    #[arg(long, value_name = "N")]
    pub param: Option<u64>,
    /// `random`: how many runs.
    #[arg(long, default_value_t = 20)]
    pub runs: u64,
    /// `random`: the seed; run I uses seed + I, so `--runs 1 --seed SEED+I` replays it
    /// [default: from the clock, printed].
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The random parts of a drill: when the fault comes and how big it is.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Knobs {
    /// Milliseconds from the moment the scenario waits for (the switchover, the first
    /// evictions) to the fault.
    pub after_ms: u64,
    /// The fault's size: cut or blackhole ms, switch or cancel point (% of round 1), WAN
    /// delay ms; unused by some scenarios.
    pub param: u64,
}

/// The outcome of one drill.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub name: String,
    pub passed: bool,
    pub verdict: &'static str,
    pub why: String,
    pub seconds: f64,
    /// The figure that matters most, for the table.
    pub key: String,
    /// Named durations, milliseconds.
    pub timings: serde_json::Map<String, Value>,
    /// `equal`, `DIFFERENT`, or why there is no comparison.
    pub digest: String,
    /// The guest was lost: its digest differs, or it could not finish.
    pub guest_lost: bool,
    /// Lost, as plain postcopy loses it when its source dies (kill-source).
    pub lost_by_design: bool,
    pub knobs: Option<Knobs>,
    /// What the processes said: link statistics, recovery, checkpoints...
    pub details: Value,
    /// The guest is in play (the migration began): an error from here on loses it.
    #[serde(skip)]
    pub at_risk: bool,
}

impl Report {
    pub fn timing(&mut self, name: &str, ms: f64) {
        self.timings
            .insert(name.into(), json!((ms * 10.0).round() / 10.0));
    }

    /// Records the digest comparison; returns whether they are equal.
    pub fn digest_check(&mut self, got: &Value, reference: &str) -> bool {
        let ok = got.as_str() == Some(reference);
        self.digest = if ok {
            "equal".into()
        } else if got.is_null() {
            "none (the guest has no digest)".into()
        } else {
            "DIFFERENT".into()
        };
        ok
    }
}

/// What the drills share: sizes, the secret, the reference digests computed so far.
pub struct Ctx {
    pub quick: bool,
    /// The network scenarios run their hosts in network namespaces joined by veth (else on
    /// loopback): not `--loopback`, and this machine can make them (root, iproute2).
    pub netns: bool,
    pub secret: String,
    /// Reference runs by their arguments: (digest, seconds).
    references: RefCell<HashMap<Vec<String>, (String, f64)>>,
}

impl Ctx {
    fn new(quick: bool, netns: bool) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self {
            quick,
            netns,
            secret: format!("drill-{}-{nanos:x}", std::process::id()),
            references: RefCell::default(),
        }
    }

    /// The digest of `guest` run to its end in one process, never migrated (cached).
    pub fn reference(&self, guest: &[String]) -> Result<(String, f64)> {
        if let Some(r) = self.references.borrow().get(guest) {
            return Ok(r.clone());
        }
        let mut args: Vec<String> = ["run", "--serial", "none", "--quiet", "--json"]
            .map(String::from)
            .to_vec();
        args.extend_from_slice(guest);
        let mut p = proc::Proc::spawn("reference run", &args, &self.secret)?;
        let s = p.json_summary(Duration::from_secs(900))?;
        if s["status"] != "finished" {
            bail!("the reference run did not finish: {s}");
        }
        let Some(d) = s["digest"].as_str() else {
            bail!("the reference run has no digest: {s}");
        };
        let r = (d.to_string(), s["elapsed_s"].as_f64().unwrap_or(0.0));
        self.references
            .borrow_mut()
            .insert(guest.to_vec(), r.clone());
        Ok(r)
    }
}

/// Runs one scenario and turns any error into a failed report.
fn run_one(ctx: &Ctx, sc: Scenario, knobs: Knobs) -> Report {
    let t0 = Instant::now();
    let mut r = Report {
        name: sc.name().into(),
        knobs: Some(knobs),
        digest: "not reached".into(),
        details: json!({}),
        ..Report::default()
    };
    eprintln!(
        "tsubame drill: {} (after {} ms, param {}){}",
        sc.name(),
        knobs.after_ms,
        knobs.param,
        if ctx.quick { ", quick" } else { "" }
    );
    match scenarios::run(ctx, sc, knobs, &mut r) {
        Ok(()) => {}
        Err(e) => {
            r.passed = false;
            r.why = format!("{e:#}");
            r.guest_lost = r.at_risk;
        }
    }
    r.verdict = if r.passed { "pass" } else { "fail" };
    r.seconds = (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    eprintln!(
        "tsubame drill: {} {} in {:.1} s: {}",
        r.name, r.verdict, r.seconds, r.why
    );
    r
}

pub fn drill(a: &DrillArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let netns = !a.loopback && namespaces_work();
    let ctx = Ctx::new(a.quick, netns);
    match a.name.as_str() {
        "all" => all(&ctx, a.json),
        "random" => random(&ctx, a),
        name => {
            let Some(sc) = Scenario::by_name(name) else {
                bail!(
                    "no drill named '{name}': one of {}, all, random",
                    Scenario::ALL.map(Scenario::name).join(", ")
                );
            };
            let mut knobs = sc.default_knobs();
            knobs.after_ms = a.after_ms.unwrap_or(knobs.after_ms);
            knobs.param = a.param.unwrap_or(knobs.param);
            let r = run_one(&ctx, sc, knobs);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_report(&r);
            }
            Ok(if r.passed { 0 } else { 1 })
        }
    }
}

/// Whether this machine can make a network of namespaces (root, iproute2); says why not.
fn namespaces_work() -> bool {
    match tsubame_netns::Network::new("drill-check", &["a", "b"]) {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "tsubame drill: network namespaces do not work here ({e}): the network \
                 scenarios run on loopback"
            );
            false
        }
    }
}

fn print_report(r: &Report) {
    println!("drill {}: {} ({:.1} s)", r.name, r.verdict, r.seconds);
    println!("  {}", r.why);
    println!("  digest: {}", r.digest);
    for (k, v) in &r.timings {
        println!("  {k}: {v} ms");
    }
    if r.details != json!({}) {
        println!("  details: {}", r.details);
    }
}

fn all(ctx: &Ctx, as_json: bool) -> Result<i32> {
    let t0 = Instant::now();
    let reports: Vec<Report> = Scenario::ALL
        .iter()
        .map(|sc| run_one(ctx, *sc, sc.default_knobs()))
        .collect();
    let passed = reports.iter().all(|r| r.passed);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "passed": passed,
                "quick": ctx.quick,
                "seconds": t0.elapsed().as_secs_f64(),
                "drills": reports,
            }))?
        );
    } else {
        print_table(&reports);
        println!(
            "{} of {} drills passed in {:.0} s",
            reports.iter().filter(|r| r.passed).count(),
            reports.len(),
            t0.elapsed().as_secs_f64()
        );
        for r in reports.iter().filter(|r| !r.passed) {
            println!("  {}: {}", r.name, r.why);
        }
    }
    Ok(if passed { 0 } else { 1 })
}

fn print_table(reports: &[Report]) {
    println!(
        "{:<17} {:<7} {:>7}  {:<52} digest",
        "drill", "verdict", "seconds", "key timing"
    );
    for r in reports {
        println!(
            "{:<17} {:<7} {:>7.1}  {:<52} {}",
            r.name, r.verdict, r.seconds, r.key, r.digest
        );
    }
}

/// A tiny xorshift64* generator: the campaign is replayable from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that seeds 1, 2, 3 start far apart (never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn random(ctx: &Ctx, a: &DrillArgs) -> Result<i32> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(1)
    });
    eprintln!(
        "tsubame drill random: {} runs, --seed {seed}{}",
        a.runs,
        if ctx.quick { " --quick" } else { "" }
    );
    let t0 = Instant::now();
    let mut reports = Vec::new();
    let mut rows = Vec::new();
    for run in 0..a.runs {
        let run_seed = seed.wrapping_add(run);
        let mut rng = Rng::new(run_seed);
        let sc = Scenario::ALL[usize::try_from(rng.next() % Scenario::ALL.len() as u64)?];
        let knobs = sc.random_knobs(&mut rng);
        eprintln!("run {run} (seed {run_seed}):");
        let r = run_one(ctx, sc, knobs);
        rows.push(json!({
            "run": run, "seed": run_seed, "drill": r.name, "verdict": r.verdict,
            "after_ms": knobs.after_ms, "param": knobs.param,
            "lost": r.guest_lost, "lost_by_design": r.lost_by_design,
            "seconds": r.seconds, "why": r.why,
        }));
        reports.push(r);
    }
    let lost = reports.iter().filter(|r| r.guest_lost).count();
    let by_design = reports.iter().filter(|r| r.lost_by_design).count();
    let failed: Vec<&Value> = rows.iter().filter(|r| r["verdict"] != "pass").collect();
    let seconds = t0.elapsed().as_secs_f64();
    let replay = |r: &Value| {
        format!(
            "tsubame drill random --runs 1 --seed {}{}",
            r["seed"],
            if ctx.quick { " --quick" } else { "" }
        )
    };
    if a.json {
        let failures: Vec<Value> = failed
            .iter()
            .map(|r| {
                let mut r = (*r).clone();
                r["replay"] = json!(replay(&r));
                r
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "seed": seed,
                "runs": a.runs,
                "quick": ctx.quick,
                "guests_lost": lost,
                "guests_lost_by_design": by_design,
                "failed": failures.len(),
                "seconds": seconds,
                "failures": failures,
                "results": reports,
            }))?
        );
    } else {
        println!(
            "{:>4} {:>6} {:<17} {:>8} {:>6} {:<7} {:>7}  key timing",
            "run", "seed", "drill", "after_ms", "param", "verdict", "seconds"
        );
        for (row, r) in rows.iter().zip(&reports) {
            println!(
                "{:>4} {:>6} {:<17} {:>8} {:>6} {:<7} {:>7.1}  {}",
                row["run"].as_u64().unwrap_or_default(),
                row["seed"].as_u64().unwrap_or_default(),
                r.name,
                row["after_ms"].as_u64().unwrap_or_default(),
                row["param"].as_u64().unwrap_or_default(),
                r.verdict,
                r.seconds,
                r.key
            );
        }
        println!(
            "{} runs (--seed {seed}) in {:.0} s: {lost} guests lost, {by_design} lost by design \
             (kill-source, plain postcopy), {} drills failed",
            a.runs,
            seconds,
            failed.len()
        );
        for r in &failed {
            println!(
                "  run {} ({}, seed {}): {}{}\n    replay: {}",
                r["run"],
                r["drill"].as_str().unwrap_or_default(),
                r["seed"],
                if r["lost"] == true {
                    "GUEST LOST: "
                } else {
                    ""
                },
                r["why"].as_str().unwrap_or_default(),
                replay(r)
            );
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}
