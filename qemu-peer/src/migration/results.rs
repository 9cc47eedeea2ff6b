//! What a QEMU run reports ([`QemuMigrationResult`], [`UnmigratedRun`] and their parts), and
//! the step-rate helpers that turn progress samples into figures ([`step_rate`],
//! [`time_to_full_speed`], [`time_to_rate`]; they work on Tsubame's samples too).

use serde::Serialize;
use serde_json::Value;

use super::{MemoryDigests, MigrationMode, ProgressProbe, Side};

/// The share of the pre-migration step rate that counts as "full speed".
pub const FULL_SPEED_FRACTION: f64 = 0.9;
/// The window (seconds) over which [`time_to_full_speed`] measures the step rate.
pub const FULL_SPEED_WINDOW_S: f64 = 0.1;
/// How much of the run before `migrate` (seconds) gives the baseline step rate.
pub const BASELINE_WINDOW_S: f64 = 1.0;

/// One reading of the guest's step counter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ProgressSample {
    /// Seconds since the `migrate` command (negative before it).
    pub t: f64,
    /// Steps of the guest's vCPU (mailbox slot of CPU 0).
    pub steps: u64,
    /// The QEMU it was read from.
    pub side: Side,
}

/// A QMP event of either QEMU, as the result keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    /// Seconds since the `migrate` command, from QEMU's timestamp.
    pub t: f64,
    pub side: Side,
    pub event: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// RAM statistics of the source's `query-migrate` (QEMU's units).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RamStats {
    /// Bytes sent (`ram.transferred`), page headers included.
    pub transferred: Option<u64>,
    /// Guest RAM size (`ram.total`).
    pub total: Option<u64>,
    /// Pages sent with their data (`ram.normal`).
    pub normal: Option<u64>,
    /// Pages sent as "all zero" markers (`ram.duplicate`).
    pub duplicate: Option<u64>,
    pub normal_bytes: Option<u64>,
    /// Pages the destination asked for after a fault (`ram.postcopy-requests`).
    pub postcopy_requests: Option<u64>,
    /// Bytes sent before the stop, while stopped, and in postcopy (QEMU 7.0+).
    pub precopy_bytes: Option<u64>,
    pub downtime_bytes: Option<u64>,
    pub postcopy_bytes: Option<u64>,
    /// Dirty-bitmap syncs (`ram.dirty-sync-count`): precopy rounds + 1.
    pub dirty_sync_count: Option<u64>,
    /// Throughput of the last period in megabits/s (`ram.mbps`).
    pub mbps: Option<f64>,
}

impl RamStats {
    pub(super) fn from_query(q: &Value) -> Self {
        let ram = &q["ram"];
        let u = |k: &str| ram[k].as_u64();
        Self {
            transferred: u("transferred"),
            total: u("total"),
            normal: u("normal"),
            duplicate: u("duplicate"),
            normal_bytes: u("normal-bytes"),
            postcopy_requests: u("postcopy-requests"),
            precopy_bytes: u("precopy-bytes"),
            downtime_bytes: u("downtime-bytes"),
            postcopy_bytes: u("postcopy-bytes"),
            dirty_sync_count: u("dirty-sync-count"),
            mbps: ram["mbps"].as_f64(),
        }
    }
}

/// What one QEMU migration did and cost. Times are seconds since the `migrate` command unless
/// named `_ms` (QEMU's own milliseconds).
#[derive(Clone, Debug, Serialize)]
pub struct QemuMigrationResult {
    pub qemu_version: String,
    pub mode: MigrationMode,
    pub mem_bytes: u64,
    pub workload: String,
    /// The guest's step target (0 = forever).
    pub steps: u64,
    /// The destination's actual listen address and where the source connected.
    pub listen_uri: String,
    pub connect_uri: String,
    /// `max-bandwidth` and `downtime-limit` in effect on the source.
    pub max_bandwidth: Option<u64>,
    pub downtime_limit_ms: Option<u64>,
    /// From starting the source QEMU to the guest's first step.
    pub boot_s: Option<f64>,
    /// Guest steps when `migrate` was issued.
    pub steps_at_migrate: u64,
    /// Guest steps/s over the last [`BASELINE_WINDOW_S`] before `migrate`.
    pub baseline_rate: Option<f64>,
    /// When `migrate-start-postcopy` was issued (our clock); `None` for precopy.
    pub postcopy_requested: Option<f64>,
    /// Whether QEMU entered postcopy (its `postcopy-active` state).
    pub postcopy_started: bool,
    /// The source's `postcopy-active` event.
    pub postcopy_active: Option<f64>,
    /// The source's `STOP` event: the guest stops running there (the switchover).
    pub switchover: Option<f64>,
    /// The destination's `RESUME` event: the guest runs there.
    pub resumed: Option<f64>,
    /// Downtime as the events tell it: source `STOP` → destination `RESUME`, in ms.
    pub downtime_observed_ms: Option<f64>,
    /// The source's `completed` event (all memory sent), and the destination's.
    pub source_completed: Option<f64>,
    pub destination_completed: Option<f64>,
    /// CPU time the hypervisor took from this machine from `migrate` until both sides
    /// completed, in percent (see [`crate::hoststat`]).
    pub steal_pct: Option<f64>,
    /// QEMU's own figures from the source's `query-migrate`: `total-time`, `downtime` (for
    /// postcopy only the time to send the device state, not until the destination runs),
    /// `setup-time`.
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub ram: RamStats,
    /// From the destination's `query-migrate` (ms; postcopy with `postcopy-blocktime` only):
    /// time when all vCPUs were blocked on missing pages, and per vCPU.
    pub postcopy_blocktime_ms: Option<u64>,
    pub postcopy_vcpu_blocktime_ms: Option<Vec<u64>>,
    /// First time after the switchover from which the guest ran at [`FULL_SPEED_FRACTION`] of
    /// its baseline rate ([`time_to_full_speed`]), seconds after `switchover`.
    pub time_to_full_speed: Option<f64>,
    pub probe: ProgressProbe,
    /// Mean cost of one progress sample, µs.
    pub sample_cost_us: f64,
    /// Samples skipped because the destination's mailbox page had not arrived yet.
    pub unreadable_samples: u64,
    pub samples: Vec<ProgressSample>,
    pub events: Vec<EventRecord>,
    /// Guest steps at the end (its target if it finished).
    pub final_steps: u64,
    /// The destination's memory once the guest finished; `None` without `digest`.
    pub digests: Option<MemoryDigests>,
    /// The raw `query-migrate` answers after completion.
    pub source_query: Value,
    pub destination_query: Value,
}

impl QemuMigrationResult {
    /// `(t, steps)` of all samples, the input of [`time_to_full_speed`].
    pub fn series(&self) -> Vec<(f64, u64)> {
        self.samples.iter().map(|s| (s.t, s.steps)).collect()
    }
}

/// A QEMU run of the same guest that never migrated: the reference of the digests.
#[derive(Clone, Debug, Serialize)]
pub struct UnmigratedRun {
    pub qemu_version: String,
    /// From starting QEMU to the guest's first step, and to its last.
    pub boot_s: Option<f64>,
    pub run_s: f64,
    /// Steps/s over the whole workload.
    pub rate: Option<f64>,
    pub final_steps: u64,
    pub digests: MemoryDigests,
}

/// The step rate (steps/s) between the first and the last sample in `[from, to]`; `None`
/// with fewer than two samples there or no time between them.
pub fn step_rate(samples: &[(f64, u64)], from: f64, to: f64) -> Option<f64> {
    let mut inside = samples.iter().filter(|(t, _)| (from..=to).contains(t));
    let first = inside.next()?;
    let last = inside.next_back()?;
    let dt = last.0 - first.0;
    (dt > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / dt)
}

/// Seconds from `switchover` to the first sample at or after it from which the guest's step
/// rate over the next [`FULL_SPEED_WINDOW_S`] reaches [`FULL_SPEED_FRACTION`] of
/// `baseline_rate`; `None` if that never happens in `samples` (time-ordered `(seconds,
/// steps)`, any clock as long as `switchover` uses the same). Works on Tsubame's samples too.
pub fn time_to_full_speed(
    samples: &[(f64, u64)],
    switchover: f64,
    baseline_rate: f64,
) -> Option<f64> {
    time_to_rate(
        samples,
        switchover,
        baseline_rate * FULL_SPEED_FRACTION,
        FULL_SPEED_WINDOW_S,
    )
}

/// [`time_to_full_speed`] with an explicit target rate and window: the window starts at a
/// sample and ends at the first sample at least `window` seconds later.
pub fn time_to_rate(samples: &[(f64, u64)], from: f64, rate: f64, window: f64) -> Option<f64> {
    let start = samples.iter().position(|&(t, _)| t >= from)?;
    for i in start..samples.len() {
        let (t0, s0) = samples[i];
        let (t1, s1) = *samples[i + 1..].iter().find(|&&(t, _)| t - t0 >= window)?;
        let r = s1.saturating_sub(s0) as f64 / (t1 - t0);
        if r >= rate {
            return Some(t0 - from);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_rate_and_full_speed() {
        // 1000 steps/s before 0; nothing until 0.5 s; 500/s until 1.0 s; then 1000/s.
        let mut s = Vec::new();
        let mut steps = 0u64;
        for i in -100..=300i32 {
            let t = f64::from(i) * 0.01;
            s.push((t, steps));
            steps += match t {
                t if t < 0.0 => 10,
                t if t < 0.5 => 0,
                t if t < 1.0 => 5,
                _ => 10,
            };
        }
        let base = step_rate(&s, -1.0, 0.0).unwrap();
        assert!((base - 1000.0).abs() < 1.0, "{base}");
        let t = time_to_full_speed(&s, 0.0, base).unwrap();
        assert!((t - 1.0).abs() < 0.015, "{t}");
        // Half speed is reached at 0.5 s.
        let half = time_to_rate(&s, 0.0, 450.0, 0.1).unwrap();
        assert!((half - 0.5).abs() < 0.015, "{half}");
        // Never at double speed; no samples after the end.
        assert_eq!(time_to_rate(&s, 0.0, 2000.0, 0.1), None);
        assert_eq!(time_to_full_speed(&s, 5.0, base), None);
        assert_eq!(step_rate(&s, 10.0, 11.0), None);
    }
}
