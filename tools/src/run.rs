//! `tsubame run`: start a VM with a built-in workload (or restore one from a snapshot), serve its
//! control socket, show its progress, and print a summary with the memory digest at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tsubame_vmm::control::{ControlServer, VmCommands};
use tsubame_vmm::guest::WorkloadSpec;
use tsubame_vmm::{SerialOutput, Vm, VmConfig, VmRunState};

/// Run a VM with a built-in guest workload.
///
/// The guest is a small bare-metal program that drops to CPL3 and runs a deterministic workload on
/// its working set; every page it writes carries gfn, version and checksum, and it verifies each
/// page it touches. The VM starts, runs its steps, and `tsubame run` prints a summary with the
/// memory digest (the same config and step count always give the same digest).
///
/// Examples:
///   tsubame run --mem 1G --vcpus 2 --workload hotcold:ws=512M,write=0.3,seed=7 --steps 5000000
///   tsubame run --mem 256M --workload uniform:ws=64M --control /tmp/vm.sock --hold
///   tsubame run --restore /tmp/vm.snap --control /tmp/vm.sock
///   TSUBAME_SECRET=... tsubame run --incoming tcp:0.0.0.0:4444   (destination of a migration)
///   TSUBAME_SECRET=... tsubame run --mem 256M --local-mem 64M --memserver tcp:10.0.0.2:7000
///                                                        (cold pages live on a memserver)
///
/// Exit status: 0 done, 1 the guest failed, 2 an error, 3 part of the memory could not be
/// reached at the end (a memserver gone: the summary has no digest, and says why).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Guest RAM, e.g. 256M, 1G, 8G (binary units) [default: 256M].
    #[arg(long, value_parser = parse_mem, conflicts_with = "restore")]
    pub mem: Option<u64>,
    /// Number of vCPUs (1-32); the working set is split among them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32), conflicts_with = "restore")]
    pub vcpus: u32,
    /// Workload: PATTERN[:OPTION=VALUE,...]. Patterns: seq, uniform, hotcold. Options:
    /// ws=SIZE (working set, default: all free RAM), write=RATIO (share of steps that write,
    /// default 0.3), seed=N (default 1), and for hotcold hot=RATIO (share of hot pages, default
    /// 0.1), hotaccess=RATIO (share of accesses to hot pages, default 0.9).
    /// Example: hotcold:ws=512M,write=0.3,seed=7
    #[arg(
        long,
        default_value = "uniform:ws=64M,write=0.3,seed=1",
        conflicts_with = "restore"
    )]
    pub workload: WorkloadSpec,
    /// Steps per vCPU (one step touches one page); 0 runs forever.
    #[arg(long, default_value_t = 5_000_000, conflicts_with = "restore")]
    pub steps: u64,
    /// The guest prints a serial progress line every N steps; 0 = never.
    #[arg(long, default_value_t = 0, conflicts_with = "restore")]
    pub report_every: u64,
    /// Skip the guest's final verification of its whole working set.
    #[arg(long, conflicts_with = "restore")]
    pub no_verify_at_end: bool,
    /// Restore the VM from a snapshot written by `tsubame ctl SOCK save path=FILE` instead of
    /// booting a new one (memory, vCPUs and workload come from the snapshot).
    #[arg(long, value_name = "SNAPSHOT")]
    pub restore: Option<PathBuf>,
    /// With --restore: resume at once on empty RAM and fault guest pages in from the snapshot
    /// through userfaultfd while a background thread prefetches the rest (postcopy from a file).
    #[arg(long, requires = "restore")]
    pub lazy: bool,
    /// Be the destination of a postcopy migration: listen on tcp:HOST:PORT (port 0 picks one,
    /// printed on stderr), accept the source's authenticated connections, and run the VM it
    /// sends, with guest pages fetched on demand through userfaultfd. The source starts it with
    /// `tsubame ctl SOCK migrate uri=tcp:HOST:PORT`. With --mem, the source's memory must match,
    /// and the destination faults in a staging area of that size while it waits, which received
    /// pages are moved from into guest memory (no allocation or copy during the migration;
    /// --no-staging-pool turns this off).
    #[arg(long, value_name = "URI", conflicts_with_all = ["restore", "workload", "steps", "vcpus", "report_every", "no_verify_at_end"])]
    pub incoming: Option<String>,
    /// With --incoming --mem: do not prepare the staging pool. Saves memory the size of the
    /// guest for the duration of the migration; received pages are then allocated and copied
    /// into guest memory as they arrive, which is slower where fresh memory is expensive.
    #[arg(long, requires = "incoming")]
    pub no_staging_pool: bool,
    /// Keep at most SIZE of guest memory resident here (e.g. 64M): when the guest's memory
    /// passes it, a background thread writes cold pages (least recently written or faulted
    /// in, by KVM's dirty log) back to the --memserver(s) and drops them; a touch faults them
    /// back in. RAM starts empty under userfaultfd. Needs --memserver and TSUBAME_SECRET;
    /// `tsubame ctl SOCK query-memory` shows resident, evicted and faulted-back pages. A VM
    /// run so cannot be migrated.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "memserver", conflicts_with_all = ["restore", "incoming"])]
    pub local_mem: Option<u64>,
    /// Memserver(s) that hold the pages --local-mem evicts, tcp:HOST:PORT (started with
    /// `tsubame memserver`); repeat the flag or separate with commas to spread pages over
    /// several (2 MiB stripes).
    #[arg(
        long,
        value_name = "URI",
        value_delimiter = ',',
        requires = "local_mem"
    )]
    pub memserver: Vec<String>,
    /// Write each evicted page to this many memservers (1 or 2; 2 needs two --memserver or
    /// more). With 1, a memserver that cannot be reached pauses the VM until it is back (the
    /// guest never runs on a page it lost); with 2, its pages come from the other holder and
    /// the guest stalls only for the switch.
    #[arg(long, default_value_t = 1, requires = "local_mem")]
    pub replicas: usize,
    /// Shared secret of migrations and memservers (both hosts must have the same one).
    #[arg(long, env = "TSUBAME_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Serve the JSON control socket here (see `tsubame ctl --help`).
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// Guest serial output: "stdout", "none", or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Start paused: the guest runs only after `tsubame ctl SOCK cont`.
    #[arg(long, requires = "control")]
    pub paused: bool,
    /// Keep running (and serving the control socket) after the workload finished or the VM
    /// migrated away, until `quit`.
    #[arg(long, requires = "control")]
    pub hold: bool,
    /// No live progress, only the summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Parses a size such as 64M.
fn parse_size(s: &str) -> Result<u64, String> {
    tsubame_vmm::guest::parse_size(s)
}

/// Parses a guest memory size such as 256M or 1G.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let v = tsubame_vmm::guest::parse_size(s)?;
    tsubame_vmm::MemoryLayout::for_size(v).map_err(|e| e.to_string())?;
    Ok(v)
}

fn serial_output(s: &str) -> SerialOutput {
    match s {
        "stdout" => SerialOutput::Stdout,
        "none" | "null" => SerialOutput::Discard,
        path => SerialOutput::File(PathBuf::from(path)),
    }
}

fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2} G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0} ")
    }
}

#[allow(clippy::cast_precision_loss)] // counters shown to people
fn progress_line(vm: &Vm, started: Instant, last: &mut (Instant, u64)) -> String {
    let p = vm.progress();
    let now = Instant::now();
    let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
    let rate = p.steps.saturating_sub(last.1) as f64 / dt;
    *last = (now, p.steps);
    let target = p.target_steps_per_vcpu * p.vcpus.len() as u64;
    let pct = if target > 0 {
        format!(" ({:>3.0}%)", 100.0 * p.steps as f64 / target as f64)
    } else {
        String::new()
    };
    format!(
        "[{:>7.2} s] {:<9} steps {}{}{pct}  {}steps/s  writes {}",
        started.elapsed().as_secs_f64(),
        format!("{:?}", vm.run_state()).to_lowercase(),
        p.steps,
        if target > 0 {
            format!("/{target}")
        } else {
            String::new()
        },
        human(rate),
        p.writes,
    )
}

/// A VM from a snapshot or built fresh (not migrated in).
fn local_vm(a: &RunArgs, serial: SerialOutput) -> Result<Vm> {
    Ok(match &a.restore {
        Some(path) if a.lazy => {
            crate::check::require_userfaultfd()?;
            Vm::restore_lazy(path, &serial)
                .with_context(|| format!("restoring the VM lazily from {}", path.display()))?
        }
        Some(path) => Vm::restore(path, &serial)
            .with_context(|| format!("restoring the VM from {}", path.display()))?,
        None => {
            let config = VmConfig {
                mem_bytes: a.mem.unwrap_or(256 << 20),
                vcpus: a.vcpus as usize,
                workload: a.workload.clone(),
                steps: a.steps,
                report_every: a.report_every,
                verify_at_end: !a.no_verify_at_end,
                serial,
            };
            match a.local_mem {
                Some(local_bytes) => {
                    crate::check::require_userfaultfd()?;
                    let secret = a
                        .secret
                        .as_ref()
                        .ok_or(tsubame_vmm::migration::MigrationError::NoSecret)?;
                    let remote = tsubame_vmm::paging::remote::RemotePagingConfig {
                        local_bytes,
                        memservers: a.memserver.clone(),
                        secret: secret.as_bytes().to_vec(),
                        replicas: a.replicas,
                    };
                    Vm::new_paged(&config, &remote)
                        .context("creating the VM with its memory paged out to memservers")?
                }
                None => Vm::new(&config).context("creating the VM")?,
            }
        }
    })
}

pub fn run(a: RunArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    let serial = serial_output(&a.serial);
    let vm = match (&a.restore, &a.incoming) {
        (None, Some(uri)) => {
            crate::check::require_userfaultfd()?;
            let secret = a
                .secret
                .as_ref()
                .ok_or(tsubame_vmm::migration::MigrationError::NoSecret)?;
            let options = tsubame_vmm::migration::IncomingOptions {
                expect: a.mem.map(tsubame_vmm::MemoryLayout::for_size).transpose()?,
                staging: !a.no_staging_pool,
                // Unless --paused, the VM runs as soon as its state is loaded: this is the
                // migration's downtime.
                resume: !a.paused,
            };
            let arrived = Vm::incoming(uri, secret.as_bytes(), &options, &serial, |addr| {
                eprintln!("tsubame: waiting for an incoming migration on tcp:{addr}");
            });
            match arrived {
                Ok(vm) => vm,
                // The migration was switched to another destination, and this host forwarded
                // what it held there: its part is done.
                Err(tsubame_vmm::Error::Migration(
                    tsubame_vmm::migration::MigrationError::Forwarded { to, pages },
                )) => return Ok(forwarded_summary(&to, pages, a.json)),
                Err(e) => return Err(e).context("receiving the incoming migration"),
            }
        }
        _ => Arc::new(local_vm(&a, serial)?),
    };
    // Pauses the VM while a memserver holding its pages cannot be reached.
    vm.watch_memory()?;
    let resumed_already = a.incoming.is_some() && !a.paused;
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let _server = match &a.control {
        Some(path) => {
            let quit_tx = std::sync::Mutex::new(quit_tx.clone());
            let handler = VmCommands::new(vm.clone(), move || {
                let _ = quit_tx.lock().map(|t| t.send(()));
            })
            .with_secret(a.secret.as_ref().map(|s| s.as_bytes().to_vec()));
            let server = ControlServer::start(path, Arc::new(handler))?;
            // Scripts and tests wait for this line rather than polling for the socket.
            eprintln!("tsubame: control socket ready at {}", path.display());
            Some(server)
        }
        None => None,
    };
    let started = Instant::now();
    if !a.paused && !resumed_already {
        vm.resume()?;
    }
    let tty = std::io::stderr().is_terminal();
    let interval = if tty {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let mut last = (Instant::now(), vm.progress().steps);
    let mut next_report = Instant::now() + interval;
    let mut finished_at = None;
    loop {
        if vm.migrated_away().is_some() && !a.hold {
            break;
        }
        let state = vm.run_state();
        if state == VmRunState::Fenced && vm.fence_settled() && !a.hold {
            break; // a cancellable migration called off: the source runs the VM
        }
        if state == VmRunState::Stuck && a.control.is_none() {
            // Nobody could ask it anything: the summary says why (exit status 3).
            log::error!("{}", vm.status().stuck.unwrap_or_default());
            break;
        }
        // A guest that finished here while its migration can still be rolled back may yet
        // run on at the source: wait until the source hands it over (or takes it back). A
        // source whose guest finished during its precopy rounds waits too: the switchover may
        // still come, and the destination then needs this process to serve the pages.
        if matches!(state, VmRunState::Finished | VmRunState::GuestError)
            && !vm.migration_open()
            && !vm.migration_under_way()
        {
            finished_at.get_or_insert_with(Instant::now);
            if !a.hold || state == VmRunState::GuestError && a.control.is_none() {
                break;
            }
        }
        match quit_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if !a.quiet
            && Instant::now() >= next_report
            && finished_at.is_none()
            && vm
                .migration_status()
                .is_none_or(|m| m["role"] == "destination" || m["phase"] == "cancelled")
        {
            let line = progress_line(&vm, started, &mut last);
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            next_report += interval;
        }
    }
    if tty && !a.quiet {
        eprintln!();
    }
    if vm.migrated_away().is_some() {
        // A switched migration's old destination reports once done: its last word goes in
        // the summary.
        tsubame_vmm::migration::source::finish_chores(Duration::from_secs(2));
    }
    if let Some(m) = vm.migrated_away() {
        return migrated_summary(&m, a.json);
    }
    if vm.run_state() == VmRunState::Fenced {
        return fenced_summary(&vm, a.json);
    }
    summary(&vm, started, finished_at, a.json)
}

/// The destination of a cancellable migration that was called off: the VM runs at the
/// source, from the last checkpoint this host sent back.
fn fenced_summary(vm: &Vm, json: bool) -> Result<i32> {
    let m = vm.migration_status().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"status": "fenced", "migration": m}))?
        );
    } else {
        let c = &m["checkpoints"];
        eprintln!(
            "migration cancelled ({}): the VM stopped here for good and runs at the source again,              from checkpoint {} ({} checkpoints committed, pause p50 {} µs)",
            c["reason"].as_str().unwrap_or("no reason given"),
            c["epoch"],
            c["committed"],
            c["pause_p50_us"],
        );
    }
    Ok(0)
}

#[allow(clippy::cast_precision_loss)]
fn summary(vm: &Vm, started: Instant, finished_at: Option<Instant>, json: bool) -> Result<i32> {
    let elapsed = finished_at
        .unwrap_or_else(Instant::now)
        .duration_since(started);
    // Before the digest, which reads (so faults back) every page.
    let remote = vm.remote_paging_stats();
    // A VM held for unreachable memory (a memserver gone) cannot be read whole: the summary
    // says so instead of waiting for pages that may never come.
    let digest = match vm.digest() {
        Ok((d, _)) => Ok(d.to_string()),
        Err(e @ tsubame_vmm::Error::MemoryUnreachable { .. }) => Err(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    // The digest brought the last pages in: they are counted before the figures below, and
    // what that completes (the migration's source told `Complete`, memservers told to forget
    // the VM's pages) is under way before the process exits (see `main`). A destination that
    // exited before its last `Complete` left its source waiting for a dial back.
    if digest.is_ok() {
        vm.settle(Duration::from_secs(1));
    }
    let p = vm.progress();
    let state = vm.run_state();
    if json {
        let out = serde_json::json!({
            "status": state,
            "elapsed_s": elapsed.as_secs_f64(),
            "progress": p,
            "digest": digest.as_ref().ok(),
            "digest_error": digest.as_ref().err(),
            "memory_hold": vm.status().memory_hold,
            "demand_paging": vm.paging_stats(),
            "remote_paging": remote,
            "migration": vm.migration_status(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        eprintln!(
            "{}: {} steps in {:.3} s ({}steps/s), {} page writes, {} pages verified",
            format!("{state:?}").to_lowercase(),
            p.steps,
            elapsed.as_secs_f64(),
            human(p.steps as f64 / elapsed.as_secs_f64().max(1e-9)),
            p.writes,
            p.verified
        );
        if let Some(e) = &p.verify_error {
            eprintln!(
                "guest verify error on vCPU {}: {} at gfn {:#x} (expected version {}, found {})",
                e.vcpu, e.kind, e.gfn, e.expected_version, e.found_version
            );
        }
        if let Some(l) = vm.paging_stats() {
            let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} µs"));
            eprintln!(
                "demand paging from the {}: {} faults, {} demand requests (fault-to-install p50 {}, \
                 p99 {}), {} pages copied, {} zero, all pages local after {}",
                l.origin,
                l.faults,
                l.demand_requests,
                us(l.demand_p50_us),
                us(l.demand_p99_us),
                l.pages_copied,
                l.pages_zeroed,
                l.all_present_ms
                    .map_or("-".into(), |ms| format!("{ms:.0} ms")),
            );
        }
        if let Some(r) = &remote {
            eprintln!(
                "remote paging: limit {} MiB, {} MiB resident (peak {} MiB), {} pages on \
                 memservers; {} written back, {} dropped clean, {} faulted back, {} evictions \
                 cancelled by writes{}",
                r.limit_bytes >> 20,
                r.resident_bytes >> 20,
                (r.resident_peak_pages * 4096) >> 20,
                r.evicted_pages,
                r.pages_written_back,
                r.clean_drops,
                r.faults_back,
                r.cancelled_evictions,
                r.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; eviction stopped: {e}")),
            );
        }
        for c in vm.status().vcpus.iter().filter(|c| c.guest.is_failure()) {
            eprintln!("vCPU {}: {:?}", c.index, c.guest);
        }
        match &digest {
            Ok(d) => println!("digest {d}"),
            Err(e) => eprintln!("no digest: {e}"),
        }
    }
    Ok(if state == VmRunState::GuestError {
        1
    } else if digest.is_err() {
        3
    } else {
        0
    })
}

/// The old destination's summary once it forwarded its pages to the new destination of a
/// switched migration.
fn forwarded_summary(to: &str, pages: u64, json: bool) -> i32 {
    if json {
        println!(
            "{}",
            serde_json::json!({"status": "forwarded", "to": to, "pages_forwarded": pages})
        );
    } else {
        eprintln!(
            "the migration was switched to {to}: this host forwarded the {pages} pages it held \
             there, and the VM runs there"
        );
    }
    0
}

/// The source's summary once its VM lives on the destination.
fn migrated_summary(m: &tsubame_vmm::migration::MigrationStatus, json: bool) -> Result<i32> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"migration": m}))?
        );
    } else if let Some(e) = &m.error {
        eprintln!("migration to {} failed: {e}", m.destination);
    } else {
        eprintln!(
            "migrated to {}: downtime {} µs at the source, {} pages on demand, {} pushed \
             ({} zero, {} sent twice), {:.1} MiB sent, complete after {:.1} ms",
            m.destination,
            m.downtime_us,
            m.pages_demand,
            m.pages_pushed,
            m.zero_pages,
            m.pages_duplicate,
            m.bytes_sent as f64 / f64::from(1 << 20),
            m.total_ms.unwrap_or(0.0),
        );
        if let Some(sw) = &m.switch {
            eprintln!(
                "switched from {} to {} {:.0} ms into the migration (round {}, in {:.1} ms): \
                 {} held {} pages and forwarded {}{}; the source sent {} pages after the switch",
                sw.from,
                sw.to,
                sw.at_ms,
                sw.precopy_round,
                sw.switch_ms,
                sw.from,
                sw.pages_at_old,
                sw.pages_forwarded,
                match &sw.forwarder_lost {
                    Some(why) =>
                        format!(" before it was lost ({why}: the source took its pages back)"),
                    None => String::new(),
                },
                sw.source_pages_after,
            );
        }
        if m.pages_released > 0 {
            eprintln!(
                "released here as the destination took them: {} pages ({:.1} MiB)",
                m.pages_released,
                (m.pages_released * 4096) as f64 / f64::from(1 << 20)
            );
        }
    }
    Ok(if m.error.is_some() { 1 } else { 0 })
}
