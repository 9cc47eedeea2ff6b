//! `tsubame bench switch`: switching a migration's destination during its precopy rounds
//! (`migrate-switch`), against what an operator could do without it: cancel the migration
//! and start it again to the new destination. Real processes on loopback TCP, per repetition
//! (the two runs alternate which goes first, so that a drift of the machine hits both alike):
//!
//! 1. **Switch**: a source S migrates its running guest to an old destination A with
//!    `precopy_rounds` rounds; once round 1 has sent `--at` of the pages, `migrate-switch` to a
//!    new destination B (started before the migration, waiting). Measured: `switch_ms` from the
//!    reply (the command -> B receiving from both senders); the pages S sent after the switch
//!    against what it cannot avoid sending, (total pages - the pages A held) + the pages written
//!    again since; the switch command -> the migration completed at S (every page at B); and
//!    when each sender sent its last page, from the switch: S's is (precopy_ms - at_ms) +
//!    push_ms (its push after the switchover; the switchover itself if nothing was left to
//!    push), A's is `forwarder_pushed_ms`.
//! 2. **Cancel and restart**: the same setup, at the same point `migrate-cancel` at S and, as
//!    soon as the migration has stopped, `migrate` to a fresh destination B' with the same
//!    options. Measured: the cancel command -> completed.
//!
//! "Completed" is the source's `query-migrate` phase `completed`, polled every 2 ms (the
//! source exits right after, so a vanished control socket counts too); the same span from the
//! source's own clocks is reported next to it. Every new destination's final memory digest must
//! equal a run of the same guest that never migrated (`tsubame run --json`, once per bench):
//! a mismatch fails the bench.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tsubame_vmm::control::ControlClient;

use super::plot::{self, Chart, Series};
use super::tsubame::{f, n, wait_steps, SECRET};
use crate::host::Host;

/// Measure `migrate-switch`: switch time, pages the source still sends, time to completion
/// against cancelling and restarting the migration to the new destination, and how evenly
/// the two senders (source and old destination) finish.
///
/// Examples:
///   tsubame bench switch
///   tsubame bench switch --reps 5 --at 0.3 --rate 256M --out bench-results
///   tsubame bench switch --quick
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct SwitchBenchArgs {
    /// Repetitions (each: one switch run and one cancel-and-restart run).
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The guest's workload (it runs during the whole migration).
    #[arg(
        long,
        default_value = "hotcold:ws=768M,hot=0.2,hotaccess=0.9,write=0.1,seed=7"
    )]
    pub workload: tsubame_vmm::guest::WorkloadSpec,
    /// Steps per vCPU: long enough for the guest to outlast both migrations (it then
    /// finishes at the new destination, whose digest is checked).
    #[arg(long, default_value_t = 12_000_000)]
    pub steps: u64,
    /// Migrate once the guest has done this many steps (its hot set written by then).
    #[arg(long, default_value_t = 1_000_000)]
    pub migrate_at_steps: u64,
    /// Precopy rounds of the migration.
    #[arg(long, default_value_t = 2)]
    pub precopy_rounds: u32,
    /// Bytes/s of the precopy rounds and the push (max_bandwidth; e.g. 256M); default none.
    #[arg(long, value_parser = tsubame_vmm::guest::parse_size)]
    pub rate: Option<u64>,
    /// Switch (or cancel) once round 1 has sent this share of the pages.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    pub at: f64,
    /// A small guest (128 MiB, its working set at most 96 MiB, 8 M steps, precopy at 256 MiB/s
    /// unless --rate) and one repetition: a smoke test (~20 s), not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Where the JSON and the figures go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number; write e.g. 0.5"))?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("{v}: write a share of round 1 between 0 and 1"))
    }
}

/// The resolved setup of one bench run.
#[derive(Clone, Debug)]
struct Setup {
    mem: u64,
    vcpus: u32,
    workload: String,
    steps: u64,
    migrate_at_steps: u64,
    precopy_rounds: u32,
    rate: Option<u64>,
    at: f64,
}

impl Setup {
    fn migrate_args(&self, uri: &str) -> Value {
        let mut args = json!({"uri": uri, "secret": SECRET, "precopy_rounds": self.precopy_rounds});
        if let Some(r) = self.rate {
            args["max_bandwidth"] = json!(r);
        }
        args
    }

    fn guest_args(&self) -> Vec<String> {
        [
            "--mem",
            &format!("{}M", self.mem >> 20),
            "--vcpus",
            &self.vcpus.to_string(),
            "--workload",
            &self.workload,
            "--steps",
            &self.steps.to_string(),
            "--serial",
            "none",
            "--quiet",
            "--json",
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }
}

/// A `tsubame run --incoming` waiting on loopback (it prepares its memory meanwhile), and its
/// URI.
fn destination(mem: u64, name: &'static str) -> Result<(Host, String)> {
    let args: Vec<String> = [
        "--incoming",
        "tcp:127.0.0.1:0",
        "--mem",
        &format!("{}M", mem >> 20),
        "--secret",
        SECRET,
        "--serial",
        "none",
        "--quiet",
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let mut host = Host::start(name, &args)?;
    host.echo = false;
    let uri = host
        .wait_line("waiting for an incoming migration on")?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((host, uri))
}

/// The source: the guest running, no `--hold` (it exits once the destination has every page,
/// printing its `query-migrate`), and a client of its control socket.
fn source(s: &Setup, dir: &Path, tag: &str) -> Result<(Host, PathBuf, ControlClient)> {
    let sock = dir.join(format!("{tag}-src.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut args = s.guest_args();
    args.extend([
        "--control".into(),
        sock.display().to_string(),
        "--secret".into(),
        SECRET.into(),
    ]);
    let mut host = Host::start("source", &args)?;
    host.echo = false;
    host.wait_line("control socket ready")?;
    let ctl = ControlClient::connect(&sock).context("connecting to the source")?;
    Ok((host, sock, ctl))
}

/// Polls the source until round 1 has sent `at` of the pages; returns that `query-migrate`.
#[allow(clippy::cast_precision_loss)]
fn wait_for_point(ctl: &mut ControlClient, at: f64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = ctl.execute("query-migrate", json!({}))?;
        let (sent, total) = (n(&q["pages_precopy"]), n(&q["total_pages"]));
        if q["phase"] == "precopy" && total > 0 && sent as f64 >= at * total as f64 {
            if n(&q["precopy_round"]) != 1 {
                bail!(
                    "round 1 ended before the poll saw {at} of its pages sent ({q}): slow the \
                     rounds down with --rate"
                );
            }
            return Ok(q);
        }
        if q["phase"] != "precopy" && q["phase"] != "none" {
            bail!("the migration left its precopy rounds before {at} of round 1: {q}");
        }
        if Instant::now() > deadline {
            bail!("round 1 never got to {at} of the pages: {q}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What the source said until its migration completed.
struct Polled {
    /// (ms since the command, the source's `query-migrate`).
    samples: Vec<(f64, Value)>,
    /// The command -> completed (or the source gone), ms.
    done_ms: f64,
    /// Whether the phase `completed` was seen (else the source had exited).
    saw_completed: bool,
}

/// Polls the source (every 2 ms, from a second client) until its migration completed, or it
/// exited (its socket gone: it exits once completed).
fn poll_until_completed(sock: &Path, t0: Instant) -> Result<Polled> {
    let mut ctl = ControlClient::connect(sock).context("connecting to the source")?;
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match ctl.execute("query-migrate", json!({})) {
            Ok(q) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let phase = q["phase"].as_str().unwrap_or_default().to_string();
                samples.push((ms, q));
                match phase.as_str() {
                    "completed" => {
                        return Ok(Polled {
                            samples,
                            done_ms: ms,
                            saw_completed: true,
                        })
                    }
                    "failed" => bail!("the migration failed: {}", samples[samples.len() - 1].1),
                    _ => {}
                }
            }
            // The source exits (20 ms at most) after completing: it is gone.
            Err(_) => {
                return Ok(Polled {
                    samples,
                    done_ms: t0.elapsed().as_secs_f64() * 1e3,
                    saw_completed: false,
                })
            }
        }
        if Instant::now() > deadline {
            bail!("the migration did not complete within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The source's migration (its exit summary) must have completed: a source whose guest
/// finished before that exits without it.
fn completed_at_source(m: &Value) -> Result<()> {
    if m["phase"] != "completed" {
        bail!(
            "the source exited before its migration completed (did the guest finish first? give \
             it more --steps): {m}"
        );
    }
    Ok(())
}

/// A new destination's summary once its guest finished: its digest against the reference.
fn finished_digest(dest: Host, what: &str) -> Result<(Value, Option<String>)> {
    let summary: Value = serde_json::from_str(&dest.finish()?)
        .with_context(|| format!("parsing the {what}'s summary"))?;
    if summary["status"] != "finished" {
        bail!("the guest did not finish at the {what}: {summary}");
    }
    let digest = summary["digest"].as_str().map(String::from);
    Ok((summary, digest))
}

/// One switch run (see the module docs).
#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn switch_run(s: &Setup, dir: &Path, tag: &str, reference: &str) -> Result<Value> {
    let (old, old_uri) = destination(s.mem, "old destination")?;
    let (new, new_uri) = destination(s.mem, "new destination")?;
    let (src, sock, mut ctl) = source(s, dir, tag)?;
    wait_steps(&mut ctl, s.migrate_at_steps)?;
    let (point, switched, samples, done_ms, saw_completed, migrated) =
        std::thread::scope(|scope| -> Result<_> {
            let mut mig = ControlClient::connect(&sock)?;
            let args = s.migrate_args(&old_uri);
            let migration = scope.spawn(move || mig.execute("migrate", args));
            let point = wait_for_point(&mut ctl, s.at)?;
            let t0 = Instant::now();
            let mut sw = ControlClient::connect(&sock)?;
            let to = new_uri.clone();
            let switch = scope
                .spawn(move || sw.execute("migrate-switch", json!({"uri": to, "secret": SECRET})));
            let Polled {
                samples,
                done_ms,
                saw_completed: saw,
            } = poll_until_completed(&sock, t0)?;
            let switched = switch
                .join()
                .map_err(|_| anyhow::anyhow!("the switch thread panicked"))?
                .context("migrate-switch")?;
            let migrated = migration
                .join()
                .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))?
                .context("migrate")?;
            Ok((point, switched, samples, done_ms, saw, migrated))
        })?;
    drop(ctl);
    let src_out: Value =
        serde_json::from_str(&src.finish()?).context("parsing the source's summary")?;
    let m = &src_out["migration"];
    completed_at_source(m)?;
    let forwarded: Value =
        serde_json::from_str(&old.finish()?).context("parsing the old destination's summary")?;
    let (summary, digest) = finished_digest(new, "new destination")?;
    let sw = &m["switch"];
    if sw.is_null() {
        bail!("the source's migration has no switch: {m}");
    }
    if m["destination"] != new_uri.as_str() {
        bail!("the switchover went to {} not {new_uri}", m["destination"]);
    }
    let total = n(&m["total_pages"]);
    let at_old = n(&sw["pages_at_old"]);
    let since = n(&sw["pages_written_since"]);
    let after = n(&sw["source_pages_after"]);
    let bound = total.saturating_sub(at_old) + since;
    let at_ms = f(&sw["at_ms"]);
    let precopy_ms = f(&m["precopy_ms"]);
    // The source's last page: its push's end; the switchover if nothing was left to push; the
    // completion (an upper bound) if its push sent pages but had not ended when it completed.
    let switchover_ms = precopy_ms - at_ms;
    let (source_finish_ms, source_finish_basis) = match m["push_ms"].as_f64() {
        Some(push) => (switchover_ms + push, "switchover + push_ms"),
        None if n(&m["pages_pushed"]) == 0 => (switchover_ms, "switchover (nothing pushed)"),
        None => (
            switchover_ms + f(&m["total_ms"]),
            "completion (push_ms null though pages were pushed)",
        ),
    };
    // When the source had sent the rest of round 1 (the first sample in a later round).
    let source_round1_done_ms = samples
        .iter()
        .find(|(_, q)| n(&q["precopy_round"]) > 1 || q["phase"] != "precopy")
        .map(|(ms, _)| *ms);
    let old_finish_ms = sw["forwarder_pushed_ms"].as_f64();
    let sender_ratio = old_finish_ms.map(|o| source_finish_ms / o);
    let sender_spread =
        old_finish_ms.map(|o| (source_finish_ms - o).abs() / source_finish_ms.max(o));
    let progress: Vec<Value> = samples
        .iter()
        .map(|(ms, q)| {
            json!([
                ms,
                q["switch"]["source_pages_after"],
                q["switch"]["pages_forwarded"],
                q["precopy_round"],
                q["phase"]
            ])
        })
        .collect();
    let owners = &summary["demand_paging"]["owners"];
    Ok(json!({
        "old_destination": old_uri,
        "new_destination": new_uri,
        "pages_precopy_at_command": point["pages_precopy"],
        "total_pages": total,
        "switch_reply": switched,
        "switch_ms": f(&sw["switch_ms"]),
        "at_ms": at_ms,
        "pages_at_old": at_old,
        "pages_not_forwarded": sw["pages_not_forwarded"],
        "pages_taken_back": sw["pages_taken_back"],
        "pages_written_since": since,
        "pages_forwarded": sw["pages_forwarded"],
        "source_pages_after": after,
        "source_bytes_after": sw["source_bytes_after"],
        "source_pages_bound": bound,
        "source_pages_over_bound": after as f64 / bound.max(1) as f64,
        "time_to_completion_ms": done_ms,
        "completion_seen": if saw_completed { "phase completed" } else { "source exited" },
        "time_to_completion_source_clock_ms": precopy_ms + f(&m["total_ms"]) - at_ms,
        "source_finish_ms": source_finish_ms,
        "source_finish_basis": source_finish_basis,
        "source_round1_done_ms": source_round1_done_ms,
        "source_push_ms": m["push_ms"],
        "old_destination_finish_ms": old_finish_ms,
        "forwarder_done_ms": sw["forwarder_done_ms"],
        "forwarder_lost": sw["forwarder_lost"],
        "sender_finish_ratio": sender_ratio,
        "sender_finish_spread": sender_spread,
        "precopy_ms": precopy_ms,
        "total_ms": m["total_ms"],
        "downtime_us": m["downtime_us"],
        "migrate_reply_destination": migrated["destination"],
        "old_destination_exit": forwarded,
        "new_destination_owners": owners,
        "digest": digest,
        "digest_ok": digest.as_deref() == Some(reference),
        "progress": progress,
        "source_migration": m,
    }))
}

/// One cancel-and-restart run (see the module docs).
#[allow(clippy::cast_precision_loss)]
fn restart_run(s: &Setup, dir: &Path, tag: &str, reference: &str) -> Result<Value> {
    let (old, old_uri) = destination(s.mem, "old destination")?;
    let (new, new_uri) = destination(s.mem, "new destination")?;
    let (src, sock, mut ctl) = source(s, dir, tag)?;
    wait_steps(&mut ctl, s.migrate_at_steps)?;
    let (point, cancelled, restart_ms, samples, done_ms, saw_completed) =
        std::thread::scope(|scope| -> Result<_> {
            let mut mig = ControlClient::connect(&sock)?;
            let args = s.migrate_args(&old_uri);
            let first = scope.spawn(move || mig.execute("migrate", args));
            let point = wait_for_point(&mut ctl, s.at)?;
            let t0 = Instant::now();
            ctl.execute("migrate-cancel", json!({}))
                .context("migrate-cancel")?;
            // The first migration has stopped once its `migrate` returns (cancelled).
            let cancelled = match first
                .join()
                .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))?
            {
                Ok(v) => bail!("the cancelled migration went on to its switchover: {v}"),
                Err(e) => e.to_string(),
            };
            let restart_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut mig = ControlClient::connect(&sock)?;
            let args = s.migrate_args(&new_uri);
            let second = scope.spawn(move || mig.execute("migrate", args));
            let Polled {
                samples,
                done_ms,
                saw_completed: saw,
            } = poll_until_completed(&sock, t0)?;
            second
                .join()
                .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))?
                .context("migrate to the new destination")?;
            Ok((point, cancelled, restart_ms, samples, done_ms, saw))
        })?;
    drop(ctl);
    let src_out: Value =
        serde_json::from_str(&src.finish()?).context("parsing the source's summary")?;
    let m = &src_out["migration"];
    completed_at_source(m)?;
    drop(old); // cancelled: killed if still there
    let (_, digest) = finished_digest(new, "new destination")?;
    let progress: Vec<Value> = samples
        .iter()
        .map(|(ms, q)| {
            json!([
                ms,
                n(&q["pages_precopy"]) + n(&q["pages_pushed"]) + n(&q["pages_demand"]),
                q["precopy_round"],
                q["phase"]
            ])
        })
        .collect();
    Ok(json!({
        "old_destination": old_uri,
        "new_destination": new_uri,
        "pages_precopy_at_command": point["pages_precopy"],
        "total_pages": m["total_pages"],
        "cancel_reply": cancelled,
        "cancel_to_restart_ms": restart_ms,
        "time_to_completion_ms": done_ms,
        "completion_seen": if saw_completed { "phase completed" } else { "source exited" },
        "time_to_completion_source_clock_ms":
            restart_ms + f(&m["precopy_ms"]) + f(&m["total_ms"]),
        "precopy_ms": m["precopy_ms"],
        "total_ms": m["total_ms"],
        "push_ms": m["push_ms"],
        "downtime_us": m["downtime_us"],
        "pages_precopy": m["pages_precopy"],
        "digest": digest,
        "digest_ok": digest.as_deref() == Some(reference),
        "progress": progress,
        "source_migration": m,
    }))
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        l if l % 2 == 1 => s[l / 2],
        l => (s[l / 2 - 1] + s[l / 2]) / 2.0,
    }
}

/// The reference digest: the same guest run to its end without migrating.
fn reference(s: &Setup) -> Result<(String, f64)> {
    let mut vm = Host::start("reference run", &s.guest_args())?;
    vm.echo = false;
    let summary: Value =
        serde_json::from_str(&vm.finish()?).context("parsing the reference run's summary")?;
    let digest = summary["digest"]
        .as_str()
        .with_context(|| format!("the reference run has no digest: {summary}"))?;
    Ok((digest.to_string(), f(&summary["elapsed_s"])))
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
pub fn bench_switch(a: &SwitchBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let started = Instant::now();
    let mut workload = a.workload.clone();
    let s = if a.quick {
        workload.ws_bytes = workload.ws_bytes.min(96 << 20);
        Setup {
            mem: 128 << 20,
            vcpus: a.vcpus,
            workload: workload.to_string(),
            // Seconds of guest: it must outlast both migrations.
            steps: 8_000_000,
            migrate_at_steps: 200_000,
            precopy_rounds: a.precopy_rounds,
            // Slow enough to stop at a chosen point of a 128 MiB round 1.
            rate: a.rate.or(Some(256 << 20)),
            at: a.at,
        }
    } else {
        Setup {
            mem: a.mem,
            vcpus: a.vcpus,
            workload: workload.to_string(),
            steps: a.steps,
            migrate_at_steps: a.migrate_at_steps,
            precopy_rounds: a.precopy_rounds,
            rate: a.rate,
            at: a.at,
        }
    };
    let reps = if a.quick { 1 } else { a.reps.max(1) };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dir = std::env::temp_dir().join(format!("tsubame-bench-switch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "destination switch benchmark: {} MiB guest, {} vCPU(s), {}, {} precopy round(s) at {}; \
         switch or cancel at {} of round 1; {reps} repetition(s){}",
        s.mem >> 20,
        s.vcpus,
        s.workload,
        s.precopy_rounds,
        s.rate
            .map_or("full speed".into(), |r| format!("{} MiB/s", r >> 20)),
        s.at,
        if a.quick {
            " (quick: not a measurement)"
        } else {
            ""
        }
    );
    let cpu_at_start = tsubame_qemu_peer::hoststat::CpuTimes::now();
    let (reference, reference_s) = reference(&s).context("the reference run")?;
    println!(
        "  reference run (no migration): {reference_s:.1} s, digest {}",
        &reference[..reference.len().min(16)]
    );

    let mut switches = Vec::new();
    let mut restarts = Vec::new();
    for rep in 1..=reps {
        // Alternate which goes first.
        let order = if rep % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for switch in order {
            if switch {
                let tag = format!("switch-r{rep}");
                let r = switch_run(&s, &dir, &tag, &reference).with_context(|| tag.clone())?;
                println!(
                    "  rep {rep} switch:  switch {:>6.1} ms, completed {:>7.0} ms after it \
                     (source clock {:>7.0}); source sent {} pages after it, bound {} ({:.3}); \
                     last page: source {:>6.0} ms (its rest of round 1 {} ms), old \
                     destination {} ms; {} pages written in round 1, not forwarded by \
                     the old destination; downtime {} µs; digest {}",
                    f(&r["switch_ms"]),
                    f(&r["time_to_completion_ms"]),
                    f(&r["time_to_completion_source_clock_ms"]),
                    r["source_pages_after"],
                    r["source_pages_bound"],
                    f(&r["source_pages_over_bound"]),
                    f(&r["source_finish_ms"]),
                    r["source_round1_done_ms"]
                        .as_f64()
                        .map_or("-".into(), |v| format!("{v:.0}")),
                    r["old_destination_finish_ms"]
                        .as_f64()
                        .map_or("-".into(), |v| format!("{v:.0}")),
                    r["pages_not_forwarded"],
                    r["downtime_us"],
                    if r["digest_ok"] == true {
                        "OK"
                    } else {
                        "WRONG"
                    },
                );
                switches.push(r);
            } else {
                let tag = format!("restart-r{rep}");
                let r = restart_run(&s, &dir, &tag, &reference).with_context(|| tag.clone())?;
                println!(
                    "  rep {rep} restart: cancel -> migrate again {:>5.1} ms, completed {:>7.0} \
                     ms after the cancel (source clock {:>7.0}); digest {}",
                    f(&r["cancel_to_restart_ms"]),
                    f(&r["time_to_completion_ms"]),
                    f(&r["time_to_completion_source_clock_ms"]),
                    if r["digest_ok"] == true {
                        "OK"
                    } else {
                        "WRONG"
                    },
                );
                restarts.push(r);
            }
        }
    }
    let steal_pct = tsubame_qemu_peer::hoststat::steal_pct_since(cpu_at_start);
    let _ = std::fs::remove_dir_all(&dir);

    let col = |runs: &[Value], key: &str| -> Vec<f64> {
        runs.iter()
            .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let switch_ms = median(&col(&switches, "switch_ms"));
    let over_bound = median(&col(&switches, "source_pages_over_bound"));
    let worst_over_bound = col(&switches, "source_pages_over_bound")
        .into_iter()
        .fold(f64::NAN, f64::max);
    let ttc_switch = median(&col(&switches, "time_to_completion_ms"));
    let ttc_restart = median(&col(&restarts, "time_to_completion_ms"));
    let ttc_ratio = ttc_switch / ttc_restart;
    // Per rep, side by side.
    let ttc_ratios: Vec<f64> = switches
        .iter()
        .zip(&restarts)
        .map(|(a, b)| f(&a["time_to_completion_ms"]) / f(&b["time_to_completion_ms"]))
        .collect();
    let source_finish = median(&col(&switches, "source_finish_ms"));
    let old_finish = median(&col(&switches, "old_destination_finish_ms"));
    let sender_ratio = median(&col(&switches, "sender_finish_ratio"));
    let sender_spread = median(&col(&switches, "sender_finish_spread"));
    let worst_switch_ms = col(&switches, "switch_ms")
        .into_iter()
        .fold(f64::NAN, f64::max);
    let bars = [
        (
            "switch_ms, median (ms)",
            switch_ms,
            "<= 100",
            switch_ms <= 100.0,
        ),
        (
            "source pages after / bound, worst",
            worst_over_bound,
            "<= 1",
            worst_over_bound <= 1.0,
        ),
        (
            "time to completion, switch / restart",
            ttc_ratio,
            "<= 0.6",
            ttc_ratio <= 0.6,
        ),
        (
            "senders' last page, |S - A| / max",
            sender_spread,
            "<= 0.10",
            sender_spread <= 0.10,
        ),
    ];
    let digests_ok = switches
        .iter()
        .chain(&restarts)
        .all(|r| r["digest_ok"] == true);
    let result = json!({
        "benchmark": "switch",
        "machine": super::machine_info(),
        "quick": a.quick,
        "setup": {
            "mem_bytes": s.mem,
            "vcpus": s.vcpus,
            "workload": s.workload,
            "steps": s.steps,
            "migrate_at_steps": s.migrate_at_steps,
            "precopy_rounds": s.precopy_rounds,
            "max_bandwidth": s.rate,
            "at": s.at,
            "reps": reps,
        },
        "reference": {"digest": reference, "elapsed_s": reference_s},
        "switch_runs": switches,
        "restart_runs": restarts,
        "medians": {
            "switch_ms": switch_ms,
            "worst_switch_ms": worst_switch_ms,
            "source_pages_after": median(&col(&switches, "source_pages_after")),
            "source_pages_bound": median(&col(&switches, "source_pages_bound")),
            "source_pages_over_bound": over_bound,
            "worst_source_pages_over_bound": worst_over_bound,
            "switch_time_to_completion_ms": ttc_switch,
            "restart_time_to_completion_ms": ttc_restart,
            "time_to_completion_ratio": ttc_ratio,
            "time_to_completion_ratio_per_rep": ttc_ratios,
            "switch_time_to_completion_source_clock_ms":
                median(&col(&switches, "time_to_completion_source_clock_ms")),
            "restart_time_to_completion_source_clock_ms":
                median(&col(&restarts, "time_to_completion_source_clock_ms")),
            "source_finish_ms": source_finish,
            "old_destination_finish_ms": old_finish,
            "source_round1_done_ms": median(&col(&switches, "source_round1_done_ms")),
            "downtime_us_switch": median(&col(&switches, "downtime_us")),
            "downtime_us_restart": median(&col(&restarts, "downtime_us")),
            "sender_finish_ratio": sender_ratio,
            "sender_finish_spread": sender_spread,
        },
        "bars": bars.iter().map(|b| json!({"measure": b.0, "value": b.1, "bar": b.2, "met": b.3}))
            .collect::<Vec<_>>(),
        "digests_ok": digests_ok,
        "steal_pct": steal_pct,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = a.out.join("switch.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let figures = figures(&switches, &restarts, &a.out)?;

    println!();
    println!("  {:<40} {:>10}  {:>8}", "measure", "value", "bar");
    for (name, value, bar, met) in &bars {
        println!(
            "  {name:<40} {value:>10.3}  {bar:>8}  {}",
            if *met { "met" } else { "missed" }
        );
    }
    println!(
        "  medians: time to completion {ttc_switch:.0} ms switched, {ttc_restart:.0} ms cancelled \
         and restarted; last page from the source {source_finish:.0} ms, from the old \
         destination {old_finish:.0} ms after the switch (ratio {sender_ratio:.2}); steal {}",
        steal_pct.map_or("-".into(), |s| format!("{s:.1} %"))
    );
    println!("  results written to {}", path.display());
    for fig in figures {
        println!("  figure: {}", fig.display());
    }
    println!("  bench took {:.0} s", started.elapsed().as_secs_f64());
    if !digests_ok {
        bail!(
            "DIGEST MISMATCH: a migrated guest ended with other memory than the run that never \
             migrated (see digest_ok in {})",
            path.display()
        );
    }
    Ok(0)
}

/// The figures: time to completion per repetition, switch against cancel-and-restart; the
/// senders' last pages per repetition; pages sent since the command in the first repetition.
#[allow(clippy::cast_precision_loss)]
fn figures(switches: &[Value], restarts: &[Value], out: &Path) -> Result<Vec<PathBuf>> {
    let per_rep = |runs: &[Value], key: &str| -> Vec<(f64, f64)> {
        runs.iter()
            .enumerate()
            .filter_map(|(i, r)| r[key].as_f64().map(|v| ((i + 1) as f64, v)))
            .collect()
    };
    let mut written = plot::line_chart(
        &out.join("switch-completion"),
        &Chart {
            title: "Command -> every page at the new destination".into(),
            x_label: "repetition".into(),
            y_label: "time to completion (ms)".into(),
            series: vec![
                Series {
                    label: "migrate-switch".into(),
                    points: per_rep(switches, "time_to_completion_ms"),
                },
                Series {
                    label: "migrate-cancel + migrate again".into(),
                    points: per_rep(restarts, "time_to_completion_ms"),
                },
                Series {
                    label: "bar: 0.6 x cancel + migrate again".into(),
                    points: per_rep(restarts, "time_to_completion_ms")
                        .into_iter()
                        .map(|(x, y)| (x, 0.6 * y))
                        .collect(),
                },
            ],
            marks: vec![],
        },
    )?;
    written.extend(plot::line_chart(
        &out.join("switch-senders"),
        &Chart {
            title: "After migrate-switch: each sender's last page".into(),
            x_label: "repetition".into(),
            y_label: "ms from the switch command".into(),
            series: vec![
                Series {
                    label: "source (rest of precopy + push)".into(),
                    points: per_rep(switches, "source_finish_ms"),
                },
                Series {
                    label: "source: its rest of round 1".into(),
                    points: per_rep(switches, "source_round1_done_ms"),
                },
                Series {
                    label: "old destination (forwarding)".into(),
                    points: per_rep(switches, "old_destination_finish_ms"),
                },
            ],
            marks: vec![],
        },
    )?);
    if let (Some(sw), Some(rs)) = (switches.first(), restarts.first()) {
        let points = |r: &Value, f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
            r["progress"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|p| Some((p[0].as_f64()?, f(p)? / 1e3)))
                        .collect()
                })
                .unwrap_or_default()
        };
        written.extend(plot::line_chart(
            &out.join("switch-progress"),
            &Chart {
                title: "Pages sent after the command (repetition 1)".into(),
                x_label: "ms from the switch / cancel command".into(),
                y_label: "pages (thousands)".into(),
                series: vec![
                    Series {
                        label: "switch: source".into(),
                        points: points(sw, &|p| p[1].as_f64()),
                    },
                    Series {
                        label: "switch: old destination (reported every 20 ms)".into(),
                        points: points(sw, &|p| p[2].as_f64()),
                    },
                    Series {
                        label: "cancel + restart: source".into(),
                        points: points(rs, &|p| p[1].as_f64()),
                    },
                ],
                marks: vec![
                    (f(&sw["time_to_completion_ms"]), "switch completed".into()),
                    (f(&rs["time_to_completion_ms"]), "restart completed".into()),
                ],
            },
        )?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_missing_values() {
        assert!((median(&[3.0, f64::NAN, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0]) - 2.5).abs() < 1e-9);
        assert!(median(&[]).is_nan());
        assert!(parse_share("0.5").is_ok());
        assert!(parse_share("1").is_err());
        assert!(parse_share("x").is_err());
    }
}
