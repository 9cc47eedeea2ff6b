//! The orchestration: [`QemuMigration`] starts both QEMUs, migrates the guest and measures it
//! (the steps in the [module docs](super)); [`run_unmigrated`] is the reference run that never
//! migrates.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::results::{
    step_rate, time_to_full_speed, EventRecord, ProgressSample, QemuMigrationResult, RamStats,
    UnmigratedRun, BASELINE_WINDOW_S,
};
use super::vm::{wait_for_done_line, wait_for_workload, Prepared, QemuVm, Warmup};
use super::{
    MigrateAt, QemuMigrationConfig, QemuMigrationError, Result, Side, UNLIMITED_BANDWIDTH,
};
use tsubame_vmm::guest::abi;

/// How often the source's `query-migrate` is read during the migration, besides the events.
const STATUS_POLL: Duration = Duration::from_millis(200);

/// `tcp:HOST:PORT` → `HOST:PORT`.
fn tcp_address<'a>(what: &str, uri: &'a str) -> Result<&'a str> {
    uri.strip_prefix("tcp:")
        .filter(|rest| rest.rsplit_once(':').is_some())
        .ok_or_else(|| {
            QemuMigrationError::Config(format!(
                "{what} '{uri}' is not a tcp:HOST:PORT URI (e.g. tcp:127.0.0.1:4444)"
            ))
        })
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Two QEMU processes ready to migrate the built-in guest: the source booting it, the
/// destination listening. Dropping it kills both.
#[derive(Debug)]
pub struct QemuMigration {
    config: QemuMigrationConfig,
    // Field order is drop order: both QEMUs go before the image they run.
    src: QemuVm,
    dst: QemuVm,
    prep: Prepared,
    qemu_version: String,
    listen_uri: String,
    connect_uri: String,
}

impl QemuMigration {
    /// Starts both QEMUs: the source boots the guest at once; the destination gets the mode's
    /// capabilities and listens on `config.listen`. Fails with
    /// [`QemuMigrationError::Unsupported`] if this QEMU lacks a capability the mode needs.
    pub fn start(config: &QemuMigrationConfig) -> Result<Self> {
        validate(config)?;
        let listen_addr = tcp_address("listen address", &config.listen)?;
        if let Some(connect) = &config.connect {
            tcp_address("connect address", connect)?;
        }
        let prep = Prepared::new(config)?;
        let mut src = QemuVm::spawn(&prep, config, Side::Source, false)?;
        let mut dst = QemuVm::spawn(&prep, config, Side::Destination, true)?;
        let qemu_version = src.qmp.qemu_version();

        let mut caps = vec!["events"];
        caps.extend(config.mode.capabilities());
        for vm in [&mut src, &mut dst] {
            let known = vm.capabilities()?;
            if let Some(missing) = caps.iter().find(|c| !known.iter().any(|k| k == *c)) {
                return Err(QemuMigrationError::Unsupported {
                    version: qemu_version,
                    capability: (*missing).into(),
                    mode: config.mode,
                });
            }
            let list: Vec<Value> = caps
                .iter()
                .map(|c| json!({ "capability": c, "state": true }))
                .collect();
            vm.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": list })),
            )?;
        }
        let bandwidth = config.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
        let mut params = json!({ "max-bandwidth": bandwidth });
        if config.mode.is_postcopy() {
            // 0 is QEMU's "unlimited" here.
            params["max-postcopy-bandwidth"] = json!(config.max_bandwidth.unwrap_or(0));
        }
        if let Some(ms) = config.downtime_limit_ms {
            params["downtime-limit"] = json!(ms);
        }
        src.execute("migrate-set-parameters", Some(params))?;

        dst.execute("migrate-incoming", Some(json!({ "uri": config.listen })))?;
        let listen_uri = actual_listen_uri(&mut dst, listen_addr)?;
        let connect_uri = config.connect.clone().unwrap_or_else(|| listen_uri.clone());
        Ok(Self {
            config: config.clone(),
            src,
            dst,
            prep,
            qemu_version,
            listen_uri,
            connect_uri,
        })
    }

    /// Where the destination listens (`tcp:HOST:PORT`, with the port it got for port 0).
    pub fn listen_uri(&self) -> &str {
        &self.listen_uri
    }

    /// QEMU's version, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// Waits for the guest's workload, migrates, measures, lets the guest finish and digests
    /// the destination's memory; kills both QEMUs at the end.
    pub fn run(mut self) -> Result<QemuMigrationResult> {
        let config = self.config.clone();
        let deadline = self.src.started + config.timeout;

        // 1. The guest boots and starts its workload.
        let Warmup {
            samples: pre,
            first_step,
        } = wait_for_workload(
            &mut self.src,
            &config,
            deadline,
            |steps, first| match config.migrate_at {
                MigrateAt::Steps(n) => steps >= n.max(1),
                MigrateAt::Running(d) => first.is_some_and(|t| t.elapsed() >= d),
            },
        )?;

        // 2. Migrate. Times are relative to this instant (and its wall-clock twin, for QEMU's
        // event timestamps).
        let t0 = Instant::now();
        let t0_unix = now_unix();
        let cpu_at_migrate = crate::hoststat::CpuTimes::now();
        let rel = |at: Instant| {
            if at >= t0 {
                (at - t0).as_secs_f64()
            } else {
                -(t0 - at).as_secs_f64()
            }
        };
        let mut samples: Vec<ProgressSample> = pre
            .iter()
            .map(|&(at, steps)| ProgressSample {
                t: rel(at),
                steps,
                side: Side::Source,
            })
            .collect();
        let steps_at_migrate = pre.last().map_or(0, |&(_, s)| s);
        let boot_s = first_step.map(|t| (t - self.src.started).as_secs_f64());
        self.src
            .execute("migrate", Some(json!({ "uri": self.connect_uri })))?;

        let mut events = Vec::new();
        let mut postcopy_requested = None;
        let mut src_status = String::from("setup");
        let mut dst_status = String::from("setup");
        let mut switchover = None;
        let mut resumed = None;
        let mut last_status_poll = Instant::now();
        let mut next_sample = Instant::now();
        // 3. Until both sides completed and the destination runs.
        loop {
            for (side, vm) in [
                (Side::Source, &mut self.src),
                (Side::Destination, &mut self.dst),
            ] {
                for e in vm.qmp.take_events() {
                    let t = e.timestamp - t0_unix;
                    match (side, e.event.as_str()) {
                        (Side::Source, "STOP") => {
                            switchover.get_or_insert(t);
                        }
                        (Side::Destination, "RESUME") => {
                            resumed.get_or_insert(t);
                        }
                        (_, "MIGRATION") => {
                            let status = e.data["status"].as_str().unwrap_or("").to_owned();
                            match side {
                                Side::Source => src_status = status,
                                Side::Destination => dst_status = status,
                            }
                        }
                        _ => {}
                    }
                    events.push(EventRecord {
                        t,
                        side,
                        event: e.event,
                        data: e.data,
                    });
                }
            }
            for (side, status) in [
                (Side::Source, &src_status),
                (Side::Destination, &dst_status),
            ] {
                if matches!(
                    status.as_str(),
                    "failed" | "cancelled" | "postcopy-paused" | "postcopy-recover"
                ) {
                    let vm = match side {
                        Side::Source => &mut self.src,
                        Side::Destination => &mut self.dst,
                    };
                    let q = vm.execute("query-migrate", None).unwrap_or_default();
                    return Err(QemuMigrationError::MigrationFailed {
                        side,
                        status: status.clone(),
                        desc: q["error-desc"]
                            .as_str()
                            .unwrap_or("QEMU gave no error-desc; see its stderr")
                            .into(),
                    });
                }
            }
            self.src.check_alive()?;
            self.dst.check_alive()?;
            if src_status == "completed" && dst_status == "completed" && resumed.is_some() {
                break;
            }
            if config.mode.is_postcopy()
                && postcopy_requested.is_none()
                && t0.elapsed() >= config.postcopy_after
                && !matches!(src_status.as_str(), "completed" | "device")
                && switchover.is_none()
            {
                let at = Instant::now();
                self.src.execute("migrate-start-postcopy", None)?;
                postcopy_requested = Some(rel(at));
            }
            if last_status_poll.elapsed() >= STATUS_POLL {
                // Events say it all; this only catches a QEMU that stopped reporting.
                last_status_poll = Instant::now();
                let q = self.src.execute("query-migrate", None)?;
                if let Some(s) = q["status"].as_str() {
                    if s == "failed" {
                        src_status = s.into();
                        continue;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(QemuMigrationError::Timeout {
                    what: format!(
                        "migrating (source {src_status}, destination {dst_status}, resumed: {})",
                        resumed.is_some()
                    ),
                    after: config.timeout,
                });
            }
            if Instant::now() >= next_sample {
                // A slow probe (HMP) makes the samples sparser, never bunched.
                next_sample = (next_sample + config.sample_every).max(Instant::now());
                let running = if resumed.is_some() {
                    Some((Side::Destination, &mut self.dst))
                } else if switchover.is_none() {
                    Some((Side::Source, &mut self.src))
                } else {
                    None // nobody runs the guest: the downtime
                };
                if let Some((side, vm)) = running {
                    if let Some((_, steps, at)) = vm.progress()? {
                        samples.push(ProgressSample {
                            t: rel(at),
                            steps,
                            side,
                        });
                    }
                }
            }
            let wake = next_sample.min(Instant::now() + config.sample_every);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }

        // 4. Statistics.
        let steal_pct = crate::hoststat::steal_pct_since(cpu_at_migrate);
        let source_query = self.src.execute("query-migrate", None)?;
        let destination_query = self.dst.execute("query-migrate", None)?;
        let params = self.src.execute("query-migrate-parameters", None)?;
        let completed_at = |side: Side| {
            events
                .iter()
                .find(|e| {
                    e.side == side && e.event == "MIGRATION" && e.data["status"] == "completed"
                })
                .map(|e| e.t)
        };
        let source_completed = completed_at(Side::Source);
        let destination_completed = completed_at(Side::Destination);
        let postcopy_active = events
            .iter()
            .find(|e| {
                e.side == Side::Source
                    && e.event == "MIGRATION"
                    && e.data["status"] == "postcopy-active"
            })
            .map(|e| e.t);

        // 5. The destination runs on: observe it, and let it finish.
        let observe_until = Instant::now() + config.observe_after;
        let mut final_steps = samples.last().map_or(0, |s| s.steps);
        loop {
            if let Some((state, steps, at)) = self.dst.progress()? {
                final_steps = steps;
                samples.push(ProgressSample {
                    t: rel(at),
                    steps,
                    side: Side::Destination,
                });
                // Nothing changes once the guest is done.
                if state == abi::state::DONE || (!config.digest && Instant::now() >= observe_until)
                {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(QemuMigrationError::Timeout {
                    what: format!(
                        "waiting for the guest to finish on the destination ({final_steps} of \
                         {} steps; {} unreadable samples)",
                        config.steps, self.dst.unreadable
                    ),
                    after: config.timeout,
                });
            }
            self.dst.check_alive()?;
            std::thread::sleep(config.sample_every);
        }
        let digests = if config.digest {
            // The line may have begun on the source before the switchover.
            wait_for_done_line(&[&self.src, &self.dst], deadline, config.timeout)?;
            Some(self.dst.digest(&self.prep)?)
        } else {
            None
        };

        let series: Vec<(f64, u64)> = samples.iter().map(|s| (s.t, s.steps)).collect();
        let baseline_rate = step_rate(&series, -BASELINE_WINDOW_S, 0.0);
        let time_to_full_speed = match (baseline_rate, switchover) {
            (Some(rate), Some(at)) => time_to_full_speed(&series, at, rate),
            _ => None,
        };
        let sample_cost_us = {
            let n = self.src.probes + self.dst.probes;
            let total = self.src.probe_time + self.dst.probe_time;
            if n == 0 {
                0.0
            } else {
                total.as_secs_f64() * 1e6 / n as f64
            }
        };
        Ok(QemuMigrationResult {
            qemu_version: self.qemu_version.clone(),
            mode: config.mode,
            mem_bytes: config.mem_bytes,
            workload: config.workload.to_string(),
            steps: config.steps,
            listen_uri: self.listen_uri.clone(),
            connect_uri: self.connect_uri.clone(),
            max_bandwidth: params["max-bandwidth"].as_u64(),
            downtime_limit_ms: params["downtime-limit"].as_u64(),
            boot_s,
            steps_at_migrate,
            baseline_rate,
            postcopy_requested,
            postcopy_started: postcopy_active.is_some(),
            postcopy_active,
            switchover,
            resumed,
            downtime_observed_ms: switchover
                .zip(resumed)
                .map(|(stop, run)| (run - stop) * 1e3),
            source_completed,
            destination_completed,
            steal_pct,
            total_time_ms: source_query["total-time"].as_u64(),
            downtime_ms: source_query["downtime"].as_u64(),
            setup_time_ms: source_query["setup-time"].as_u64(),
            ram: RamStats::from_query(&source_query),
            postcopy_blocktime_ms: destination_query["postcopy-blocktime"].as_u64(),
            postcopy_vcpu_blocktime_ms: destination_query["postcopy-vcpu-blocktime"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect()),
            time_to_full_speed,
            probe: self.src.probe_kind(),
            sample_cost_us,
            unreadable_samples: self.src.unreadable + self.dst.unreadable,
            samples,
            events,
            final_steps,
            digests,
            source_query,
            destination_query,
        })
    }
}

fn validate(config: &QemuMigrationConfig) -> Result<()> {
    let bad = |why: String| Err(QemuMigrationError::Config(why));
    if config.digest && config.steps == 0 {
        return bad("a digest needs a guest that finishes: set steps > 0".into());
    }
    if let MigrateAt::Steps(n) = config.migrate_at {
        if config.steps > 0 && n >= config.steps {
            return bad(format!(
                "migrating at {n} steps of {}: the guest would be done before; migrate earlier",
                config.steps
            ));
        }
    }
    if config.sample_every.is_zero() {
        return bad("sample_every must be above zero".into());
    }
    if !config.work_dir.is_dir() {
        return bad(format!(
            "work dir {} does not exist",
            config.work_dir.display()
        ));
    }
    Ok(())
}

/// The destination's listen address after `migrate-incoming` (QEMU reports the port it got
/// for port 0 in `query-migrate`'s `socket-address`).
fn actual_listen_uri(dst: &mut QemuVm, requested: &str) -> Result<String> {
    let q = dst.execute("query-migrate", None)?;
    let addr = q["socket-address"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| Some((a["host"].as_str()?, a["port"].as_str()?)));
    Ok(match addr {
        Some((host, port)) if host.contains(':') => format!("tcp:[{host}]:{port}"),
        Some((host, port)) => format!("tcp:{host}:{port}"),
        None => format!("tcp:{requested}"),
    })
}

/// Runs the same guest in one QEMU without migrating it, to the end, and digests its memory:
/// the reference for [`QemuMigrationResult::digests`]. Uses `config`'s QEMU, memory, workload,
/// steps and work dir.
pub fn run_unmigrated(config: &QemuMigrationConfig) -> Result<UnmigratedRun> {
    if config.steps == 0 {
        return Err(QemuMigrationError::Config(
            "an unmigrated reference run needs a guest that finishes: set steps > 0".into(),
        ));
    }
    let config = QemuMigrationConfig {
        migrate_at: MigrateAt::Steps(u64::MAX),
        ..config.clone()
    };
    let prep = Prepared::new(&config)?;
    let mut vm = QemuVm::spawn(&prep, &config, Side::Source, false)?;
    let qemu_version = vm.qmp.qemu_version();
    let deadline = vm.started + config.timeout;
    let mut last = None;
    let result = wait_for_workload(&mut vm, &config, deadline, |steps, _| {
        last = Some(steps);
        steps >= config.steps
    });
    // The guest reaching its last step before verifying is not "done"; wait for the state.
    let Warmup {
        samples,
        first_step,
    } = match result {
        Ok(w) => w,
        Err(QemuMigrationError::FinishedTooEarly { .. }) => Warmup {
            samples: Vec::new(),
            first_step: None,
        },
        Err(e) => return Err(e),
    };
    loop {
        if let Some((abi::state::DONE, steps, _)) = vm.progress()? {
            last = Some(steps);
            break;
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: "waiting for the unmigrated guest to finish".into(),
                after: config.timeout,
            });
        }
        vm.check_alive()?;
        std::thread::sleep(config.sample_every);
    }
    let end = Instant::now();
    wait_for_done_line(&[&vm], deadline, config.timeout)?;
    let digests = vm.digest(&prep)?;
    let series: Vec<(f64, u64)> = samples
        .iter()
        .map(|&(at, s)| ((at - vm.started).as_secs_f64(), s))
        .collect();
    Ok(UnmigratedRun {
        qemu_version,
        boot_s: first_step.map(|t| (t - vm.started).as_secs_f64()),
        run_s: (end - vm.started).as_secs_f64(),
        rate: step_rate(&series, f64::MIN, f64::MAX),
        final_steps: last.unwrap_or(0),
        digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris_are_checked() {
        assert_eq!(
            tcp_address("listen", "tcp:127.0.0.1:4444").unwrap(),
            "127.0.0.1:4444"
        );
        assert!(tcp_address("listen", "unix:/tmp/x").is_err());
        assert!(tcp_address("listen", "tcp:localhost").is_err());
    }
}
