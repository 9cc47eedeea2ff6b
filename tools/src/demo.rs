//! `tsubame demo`: the main job. Two `tsubame` processes on this machine, a source running a
//! workload and a destination listening; the VM migrates postcopy mid-run, finishes at the
//! destination, and its memory digest is checked against a run that never migrated.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tsubame_vmm::control::ControlClient;
use tsubame_vmm::{SerialOutput, Vm, VmConfig, WaitOutcome};

use crate::host::Host;

/// Migrate a running VM postcopy between two local processes and check its memory.
///
/// Starts a destination (`tsubame run --incoming`) and a source VM, lets the guest run, migrates
/// it with `tsubame ctl SOCK migrate`, lets it finish at the destination, and compares the final
/// memory digest with a run that never migrated.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Workload (see `tsubame run --help`).
    #[arg(long, default_value = "hotcold:ws=512M,write=0.3,seed=7")]
    pub workload: String,
    /// Steps per vCPU.
    #[arg(long, default_value_t = 3_000_000)]
    pub steps: u64,
    /// Migrate after this share of the steps.
    #[arg(long, default_value_t = 0.3)]
    pub migrate_at: f64,
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub fn demo(a: &DemoArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    crate::check::require_userfaultfd()?;
    let dir = std::env::temp_dir().join(format!("tsubame-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("source.sock");
    let secret = "tsubame-demo";
    let mem = format!("{}M", a.mem >> 20);
    println!(
        "Tsubame demo: a {mem} VM with {} vCPUs runs {} for {} steps per vCPU,",
        a.vcpus, a.workload, a.steps
    );
    println!(
        "migrating postcopy from one tsubame process to another after {:.0}% of them.\n",
        a.migrate_at * 100.0
    );

    // Told the VM's size, the destination prepares its memory while it waits.
    let dest = Host::start(
        "destination",
        &[
            "--incoming",
            "tcp:127.0.0.1:0",
            "--mem",
            &mem,
            "--secret",
            secret,
            "--serial",
            "none",
            "--quiet",
            "--json",
        ]
        .map(String::from),
    )?;
    let uri = dest
        .wait_line("waiting for an incoming migration on")?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    println!("destination: listening on {uri}");
    let src_args: Vec<String> = [
        "--mem",
        &mem,
        "--vcpus",
        &a.vcpus.to_string(),
        "--workload",
        &a.workload,
        "--steps",
        &a.steps.to_string(),
        "--control",
        sock.to_str().unwrap_or_default(),
        "--secret",
        secret,
        "--serial",
        "none",
        "--quiet",
        "--hold",
    ]
    .map(String::from)
    .to_vec();
    let source = Host::start("source", &src_args)?;
    source.wait_line("control socket ready")?;
    let mut ctl = ControlClient::connect(&sock)?;
    let at = (a.steps as f64 * a.migrate_at) as u64 * u64::from(a.vcpus);
    let t0 = Instant::now();
    ctl.execute("wait", json!({"for": "steps", "steps": at}))?;
    println!(
        "source:      guest at {at} steps after {:.2} s; migrating",
        t0.elapsed().as_secs_f64()
    );
    let m = ctl.execute("migrate", json!({"uri": uri}))?;
    println!(
        "switchover:  vCPUs paused, {} KiB of vCPU/device state sent in {} µs (source side of the downtime)",
        m["state_bytes"].as_u64().unwrap_or(0) / 1024,
        m["downtime_us"]
    );
    let t_switch = Instant::now();
    let m = loop {
        let m = ctl.execute("query-migrate", json!({}))?;
        if m["phase"] != "postcopy" {
            break m;
        }
        // Poll the source's counters for the operator: the migration itself never waits on this.
        std::thread::sleep(Duration::from_millis(50));
    };
    if m["phase"] != "completed" {
        bail!("migration failed: {}", m["error"]);
    }
    println!(
        "postcopy:    every page at the destination after {:.0} ms: {} on demand, {} pushed ({} zero), {:.1} MiB sent",
        m["total_ms"].as_f64().unwrap_or(0.0),
        m["pages_demand"], m["pages_pushed"], m["zero_pages"],
        m["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1 << 20)
    );
    ctl.execute("quit", json!({}))?;
    drop(ctl);
    source.finish()?;
    let out: Value =
        serde_json::from_str(&dest.finish()?).context("parsing the destination's summary")?;
    let p = &out["demand_paging"];
    if let Some(us) = whole_downtime_us(&m, p) {
        println!(
            "downtime:    {us} µs from the pause at the source to the guest running at the destination"
        );
    }
    println!(
        "destination: guest finished {} steps {:.2} s after the switchover; {} faults, fault-to-install p50 {:.0} µs, p99 {:.0} µs",
        out["progress"]["steps"],
        t_switch.elapsed().as_secs_f64(),
        p["faults"],
        p["demand_p50_us"].as_f64().unwrap_or(0.0),
        p["demand_p99_us"].as_f64().unwrap_or(0.0)
    );

    println!("reference:   running the same workload without migrating ...");
    let vm = run_reference(a.mem, a.vcpus as usize, &a.workload, a.steps)?;
    let reference = vm.digest()?.0.to_string();
    let migrated = out["digest"].as_str().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    if migrated == reference {
        println!("digest check: OK, {migrated} with and without migration");
        Ok(0)
    } else {
        println!("digest check: FAILED: migrated {migrated}, reference {reference}");
        Ok(1)
    }
}

/// A migration's whole downtime, paused at the source -> running at the destination, from the
/// wall-clock stamps both processes report on this one host: `paused_unix_us` in the source's
/// migration status, `resumed_unix_us` in the destination's demand paging. None if either is
/// missing (or they are not in that order).
pub fn whole_downtime_us(source: &Value, paging: &Value) -> Option<u64> {
    let paused = source["paused_unix_us"].as_u64().filter(|&p| p > 0)?;
    let resumed = paging["resumed_unix_us"].as_u64()?;
    resumed.checked_sub(paused).filter(|&d| d > 0)
}

/// Runs `workload` for `steps` steps per vCPU in this process, never migrating, and returns the
/// finished VM: the reference whose memory a migrated run must end with.
pub fn run_reference(mem_bytes: u64, vcpus: usize, workload: &str, steps: u64) -> Result<Vm> {
    let vm = Vm::new(&VmConfig {
        mem_bytes,
        vcpus,
        workload: workload.parse()?,
        steps,
        report_every: 0,
        verify_at_end: true,
        serial: SerialOutput::Discard,
    })?;
    vm.resume()?;
    if vm.wait_finished(Duration::from_secs(3600)) != WaitOutcome::Reached {
        bail!("the reference run failed: {:?}", vm.status());
    }
    Ok(vm)
}
