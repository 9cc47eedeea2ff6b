//! `tsubame bench migrate`: whole migrations of one guest, each configuration side by side, in
//! one run: Tsubame postcopy with each prepaging policy, Tsubame hybrid (precopy rounds, then
//! postcopy), and QEMU (postcopy, precopy) on the same built-in guest, over plain loopback or
//! through `linkem` with a one-way delay. The raw loopback TCP throughput is measured in the
//! same run. Every run writes a JSON file (machine info, configuration, result, the guest's
//! progress samples); `summary.json` and the printed table give medians and ratios.
//!
//! The guest runs a sequential workload that writes every page of its working set, eight
//! passes: it migrates halfway through its second pass, so all of the working set is in use,
//! and its speed over the 40% of the pass before (pages local) is the baseline for "time to
//! full speed".

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::tsubame::{self, MigrationResult, MigrationSetup};
use super::{plot, raw};

/// Run whole migrations of one guest with Tsubame and QEMU, side by side.
///
/// Examples:
///   tsubame bench migrate --quick
///   tsubame bench migrate --mem 1G --ws 700M --reps 3 --delays 0,16 --out bench/results
///   tsubame bench migrate --configs postcopy-address,hybrid-2 --reps 5
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MigrateBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// Working set the guest writes (all of it, before migrating).
    #[arg(long, default_value = "700M", value_parser = crate::run::parse_mem)]
    pub ws: u64,
    /// Guest sizes to sweep, comma-separated (e.g. 256M,1G,4G), each with a working set of 70%
    /// of it; overrides --mem and --ws. Draws total time against guest size.
    #[arg(long, value_delimiter = ',', value_parser = crate::run::parse_mem)]
    pub sizes: Vec<u64>,
    /// Repetitions of each configuration.
    #[arg(long, default_value_t = 1)]
    pub reps: u32,
    /// Configurations, comma-separated: Tsubame's postcopy-address, postcopy-bubble,
    /// postcopy-hot, postcopy-cancellable (address order, reverse checkpoints every 100 ms),
    /// split-SHARE (address order, SHARE of the memory stored at a memserver process in parallel
    /// with the push, then consolidated back at the destination),
    /// hybrid-N (N precopy rounds, then postcopy, address order); QEMU's
    /// qemu-postcopy, qemu-postcopy-preempt, qemu-precopy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "postcopy-address,postcopy-bubble,postcopy-hot,hybrid-2,qemu-postcopy,qemu-postcopy-preempt,qemu-precopy"
    )]
    pub configs: Vec<String>,
    /// One-way link delays in ms, comma-separated (0: plain loopback, else through linkem).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub delays: Vec<f64>,
    /// Link rate (e.g. 1Gbit) for the delayed links; default unlimited.
    #[arg(long, value_parser = crate::linkem::parse_rate)]
    pub rate: Option<u64>,
    /// Where to write the JSON files.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// A small guest (256 MiB, 128 MiB working set), one repetition: a smoke test.
    #[arg(long)]
    pub quick: bool,
}

/// One configuration of one run.
#[derive(Clone, Debug, Serialize)]
struct Row {
    mem_bytes: u64,
    config: String,
    delay_ms: f64,
    rep: u32,
    result: MigrationResult,
    digest_ok: bool,
}

fn setup_for(config: &str, a: &Args, delay_ms: f64) -> Result<MigrationSetup> {
    let split = match config.strip_prefix("split-") {
        Some(share) => Some(
            share
                .parse::<f64>()
                .ok()
                .filter(|s| (0.0..=1.0).contains(s))
                .with_context(|| format!("'{config}': write split-SHARE, SHARE from 0 to 1"))?,
        ),
        None => None,
    };
    let (prepage, rounds) = match config {
        "postcopy-address" | "postcopy-cancellable" => ("address", 0),
        "postcopy-bubble" => ("bubble", 0),
        "postcopy-hot" => ("hot", 0),
        c if c.starts_with("qemu-") => ("address", 0), // unused by QEMU runs
        c if c.starts_with("split-") => ("address", 0),
        c if c.starts_with("hybrid-") => (
            "address",
            c["hybrid-".len()..]
                .parse()
                .with_context(|| format!("'{c}': write hybrid-N with N precopy rounds"))?,
        ),
        c => bail!(
            "unknown configuration '{c}': use postcopy-address, postcopy-bubble, postcopy-hot, \
             postcopy-cancellable, split-SHARE, hybrid-N, qemu-postcopy, qemu-postcopy-preempt or \
             qemu-precopy"
        ),
    };
    Ok(MigrationSetup {
        mem_bytes: a.mem,
        vcpus: 1,
        workload: a.workload.clone(),
        steps: a.steps,
        migrate_at_steps: a.migrate_at,
        baseline_from_steps: a.baseline_from,
        prepage: prepage.into(),
        precopy_rounds: rounds,
        delay_ms,
        rate_bits: a.rate,
        checkpoint_ms: (config == "postcopy-cancellable").then_some(100),
        report_every: 0,
        split,
    })
}

/// The resolved arguments.
struct Args {
    mem: u64,
    workload: String,
    steps: u64,
    migrate_at: u64,
    baseline_from: u64,
    rate: Option<u64>,
}

/// The never-migrated run's digests: all of RAM (Tsubame runs compare with it) and the
/// workload's memory (QEMU runs compare with it: QEMU's firmware writes RAM a Tsubame VM
/// does not have).
fn reference_digests(a: &Args) -> Result<(String, String)> {
    let vm = crate::demo::run_reference(a.mem, 1, &a.workload, a.steps)?;
    let workload = tsubame_qemu_peer::migration::workload_digest(vm.memory())?;
    Ok((vm.digest()?.0.to_string(), workload.to_string()))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[allow(clippy::cast_precision_loss)]
pub fn bench_migrate(a: &MigrateBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let (sizes, reps): (Vec<(u64, u64)>, u32) = if a.quick {
        (vec![(256 << 20, 128 << 20)], 1)
    } else if a.sizes.is_empty() {
        (vec![(a.mem, a.ws)], a.reps)
    } else {
        (
            a.sizes
                .iter()
                .map(|&m| (m, m / 10 * 7 / 4096 * 4096))
                .collect(),
            a.reps,
        )
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let scratch = std::env::temp_dir().join(format!("tsubame-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let lo = raw::loopback(5_000, 1 << 30).context("measuring loopback TCP")?;
    println!(
        "migration benchmark: raw loopback TCP {:.2} GB/s, 4 KiB round trip p50 {:.1} µs",
        lo.throughput_gb_per_s, lo.rtt_p50_us
    );
    let mut rows = Vec::new();
    let mut guests = Vec::new();
    for &(mem, ws) in &sizes {
        let ws_pages = ws / 4096;
        let args = Args {
            mem,
            workload: format!("seq:ws={}M,write=1.0,seed=5", ws >> 20),
            steps: 8 * ws_pages,
            migrate_at: ws_pages + ws_pages / 2,
            baseline_from: ws_pages + ws_pages / 10,
            rate: a.rate,
        };
        println!(
            "  {} MiB guest, {}, migrating at step {} of {}; {reps} repetition(s); reference run ...",
            mem >> 20,
            args.workload,
            args.migrate_at,
            args.steps,
        );
        let (reference, reference_workload) = reference_digests(&args)?;
        guests.push(
            json!({"mem_bytes": mem, "workload": args.workload, "steps": args.steps,
                           "migrate_at_steps": args.migrate_at}),
        );
        for &delay in &a.delays {
            for rep in 1..=reps {
                for config in &a.configs {
                    let setup = setup_for(config, &args, delay)?;
                    let tag = format!("{config}-m{}-d{delay}-r{rep}", mem >> 20);
                    let (result, qemu, digest_ok) = if let Some(mode) = config.strip_prefix("qemu-")
                    {
                        let (r, q) = super::qemu::migrate(
                            &setup,
                            mode.parse().map_err(anyhow::Error::msg)?,
                            &scratch,
                        )
                        .with_context(|| format!("run {tag}"))?;
                        let ok = r.digest.as_deref() == Some(reference_workload.as_str());
                        (r, Some(q), ok)
                    } else {
                        let r = tsubame::migrate(&setup, &scratch, &tag)
                            .with_context(|| format!("run {tag}"))?;
                        let ok = r.digest.as_deref() == Some(reference.as_str());
                        (r, None, ok)
                    };
                    println!(
                        "  {tag:<34} total {:>7.0} ms (after switchover {:>5.0} ms)  downtime {:>6.0} µs  \
                         demand p50 {:>5.0} µs p99 {:>6.0} µs  push {:>5.2} GB/s  full speed after {:>6} ms  \
                         steal {:>4} %  digest {}",
                        result.total_with_precopy_ms,
                        result.total_ms,
                        result.downtime_us,
                        result.demand_p50_us,
                        result.demand_p99_us,
                        result.push_gb_per_s,
                        result
                            .time_to_full_speed_ms
                            .map_or("-".into(), |t| format!("{t:.0}")),
                        result.steal_pct.map_or("-".into(), |s| format!("{s:.1}")),
                        if digest_ok { "OK" } else { "WRONG" }
                    );
                    let row = Row {
                        mem_bytes: mem,
                        config: config.clone(),
                        delay_ms: delay,
                        rep,
                        result,
                        digest_ok,
                    };
                    write_json(
                        &a.out.join(format!("run-{tag}.json")),
                        &json!({
                            "benchmark": "migrate",
                            "machine": super::machine_info(),
                            "setup": setup,
                            "run": row,
                            "qemu": qemu,
                        }),
                    )?;
                    rows.push(row);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let summary = summarize(&rows, &lo);
    write_json(
        &a.out.join("summary.json"),
        &json!({
            "benchmark": "migrate",
            "machine": super::machine_info(),
            "guests": guests,
            "loopback": lo,
            "configs": summary,
        }),
    )?;
    let figures = figures(&rows, &a.out)?;
    println!(
        "  results in {} ({} figures)",
        a.out.display(),
        figures.len()
    );
    Ok(i32::from(rows.iter().any(|r| !r.digest_ok)))
}

/// The figures: guest progress around the switchover and the demand-latency CDF per (size,
/// delay); total time against delay and against guest size when several were run.
fn figures(rows: &[Row], out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut groups: Vec<(u64, f64)> = Vec::new();
    for r in rows {
        if !groups.contains(&(r.mem_bytes, r.delay_ms)) {
            groups.push((r.mem_bytes, r.delay_ms));
        }
    }
    for &(mem, delay) in &groups {
        let first: Vec<&Row> = rows
            .iter()
            .filter(|r| r.mem_bytes == mem && r.delay_ms == delay && r.rep == 1)
            .collect();
        let progress = plot::Chart {
            title: format!(
                "Guest progress, {} MiB guest, {delay} ms one-way delay",
                mem >> 20
            ),
            x_label: "time from switchover (s)".into(),
            y_label: "guest steps since switchover (thousands)".into(),
            series: first
                .iter()
                .map(|r| plot::Series {
                    label: r.config.clone(),
                    points: progress_around_switchover(&r.result),
                })
                .collect(),
            marks: vec![(0.0, "switchover".into())],
        };
        written.extend(plot::line_chart(
            &out.join(format!("progress-m{}-d{delay}", mem >> 20)),
            &progress,
        )?);
        let cdf = plot::Chart {
            title: format!(
                "Demand faults, fault read to page installed ({} MiB, {delay} ms)",
                mem >> 20
            ),
            x_label: "latency (µs)".into(),
            y_label: "share of demand faults".into(),
            series: first
                .iter()
                .filter(|r| !r.result.demand_cdf.is_empty())
                .map(|r| plot::Series {
                    label: r.config.clone(),
                    points: r
                        .result
                        .demand_cdf
                        .iter()
                        .copied()
                        .take_while(|p| p.1 <= 0.995)
                        .collect(),
                })
                .collect(),
            marks: vec![],
        };
        if !cdf.series.is_empty() {
            written.extend(plot::line_chart(
                &out.join(format!("fault-cdf-m{}-d{delay}", mem >> 20)),
                &cdf,
            )?);
        }
    }
    let configs: Vec<&String> = {
        let mut c: Vec<&String> = Vec::new();
        for r in rows {
            if !c.contains(&&r.config) {
                c.push(&r.config);
            }
        }
        c
    };
    let sweep = |x: &dyn Fn(&Row) -> f64, keep: &dyn Fn(&Row) -> bool| -> Vec<plot::Series> {
        configs
            .iter()
            .map(|c| {
                let mut xs: Vec<f64> = rows
                    .iter()
                    .filter(|r| &&r.config == c && keep(r))
                    .map(x)
                    .collect();
                xs.sort_by(f64::total_cmp);
                xs.dedup();
                plot::Series {
                    label: (*c).clone(),
                    points: xs
                        .iter()
                        .map(|&v| {
                            let totals = rows
                                .iter()
                                .filter(|r| &&r.config == c && keep(r) && x(r) == v)
                                .map(|r| r.result.total_with_precopy_ms)
                                .collect();
                            (v, median(totals))
                        })
                        .collect(),
                }
            })
            .collect()
    };
    let mems: Vec<u64> = groups.iter().map(|g| g.0).collect();
    let smallest_delay = groups.iter().map(|g| g.1).fold(f64::INFINITY, f64::min);
    if groups
        .iter()
        .map(|g| g.1.to_bits())
        .collect::<std::collections::HashSet<_>>()
        .len()
        > 1
    {
        let biggest = mems.iter().copied().max().unwrap_or(0);
        written.extend(plot::line_chart(
            &out.join("total-vs-delay"),
            &plot::Chart {
                title: format!(
                    "Total migration time against link delay ({} MiB guest)",
                    biggest >> 20
                ),
                x_label: "one-way delay (ms)".into(),
                y_label: "total time incl. precopy (ms)".into(),
                series: sweep(&|r| r.delay_ms, &|r| r.mem_bytes == biggest),
                marks: vec![],
            },
        )?);
    }
    if mems.iter().collect::<std::collections::HashSet<_>>().len() > 1 {
        written.extend(plot::line_chart(
            &out.join("total-vs-size"),
            &plot::Chart {
                title: format!(
                    "Total migration time against guest size ({smallest_delay} ms delay)"
                ),
                x_label: "guest RAM (MiB)".into(),
                y_label: "total time incl. precopy (ms)".into(),
                series: sweep(&|r| (r.mem_bytes >> 20) as f64, &|r| {
                    r.delay_ms == smallest_delay
                }),
                marks: vec![],
            },
        )?);
    }
    Ok(written)
}

/// A run's progress samples as (s from switchover, thousands of steps since switchover).
#[allow(clippy::cast_precision_loss)]
fn progress_around_switchover(r: &MigrationResult) -> Vec<(f64, f64)> {
    let at = r
        .progress
        .iter()
        .filter(|p| p.0 <= r.switchover_s)
        .map(|p| p.1)
        .next_back()
        .unwrap_or(0);
    r.progress
        .iter()
        .filter(|p| p.0 >= r.switchover_s - 0.5)
        .map(|p| (p.0 - r.switchover_s, (p.1 as f64 - at as f64) / 1e3))
        .collect()
}

/// Medians per (guest size, configuration, delay), printed as a table, with each
/// configuration's ratio to QEMU postcopy on the same guest and link.
fn summarize(rows: &[Row], lo: &raw::Loopback) -> Vec<Value> {
    let mut keys: Vec<(u64, String, f64)> = Vec::new();
    for r in rows {
        let k = (r.mem_bytes, r.config.clone(), r.delay_ms);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let med = |mem: u64, config: &str, delay: f64, f: &dyn Fn(&MigrationResult) -> f64| {
        median(
            rows.iter()
                .filter(|r| r.mem_bytes == mem && r.config == config && r.delay_ms == delay)
                .map(|r| f(&r.result))
                .collect(),
        )
    };
    // migrate -> every page at the destination, precopy included: comparable across systems.
    let total = |r: &MigrationResult| r.total_with_precopy_ms;
    let full = |r: &MigrationResult| r.time_to_full_speed_ms.unwrap_or(f64::NAN);
    let demand = |r: &MigrationResult| r.blocktime_per_request_us.unwrap_or(r.demand_p50_us);
    println!(
        "\n  {:<22} {:>5} {:>6} {:>9} {:>10} {:>9} {:>8} {:>9} {:>9} {:>10} {:>7} | vs qemu-postcopy: {:>5} {:>6} {:>6} {:>6}",
        "median", "MiB", "delay", "total ms", "downtime", "demand", "p99 µs", "push GB/s",
        "/loopback", "full speed", "steal %", "total", "down", "demand", "full"
    );
    keys.iter()
        .map(|(mem, config, delay)| {
            let m = |f: &dyn Fn(&MigrationResult) -> f64| med(*mem, config, *delay, f);
            let q = |f: &dyn Fn(&MigrationResult) -> f64| med(*mem, "qemu-postcopy", *delay, f);
            let (t, d, dm, p99, push, fs, steal) = (
                m(&total),
                m(&|r| r.downtime_us),
                m(&demand),
                m(&|r| r.demand_p99_us),
                m(&|r| r.push_gb_per_s),
                m(&full),
                m(&|r| r.steal_pct.unwrap_or(f64::NAN)),
            );
            let ratios = (t / q(&total), d / q(&|r| r.downtime_us), dm / q(&demand), fs / q(&full));
            println!(
                "  {config:<22} {:>5} {delay:>6} {t:>9.0} {d:>8.0}µs {dm:>7.0}µs {p99:>8.0} {push:>9.2} {:>9.2} {fs:>10.0} {steal:>7.1} | {:>24.2} {:>6.2} {:>6.2} {:>6.2}",
                mem >> 20,
                push / lo.throughput_gb_per_s,
                ratios.0, ratios.1, ratios.2, ratios.3
            );
            json!({
                "mem_bytes": mem, "config": config, "delay_ms": delay,
                "total_ms": t, "downtime_us": d,
                "demand_us": dm, "demand_p99_us": p99,
                "push_gb_per_s": push,
                "push_vs_loopback": push / lo.throughput_gb_per_s,
                "time_to_full_speed_ms": fs,
                "steal_pct": steal,
                "vs_qemu_postcopy": {"total": ratios.0, "downtime": ratios.1,
                                     "demand": ratios.2, "time_to_full_speed": ratios.3},
            })
        })
        .collect()
}
