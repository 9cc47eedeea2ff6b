//! The host's CPU time as `/proc/stat` counts it, for benchmarks on shared machines.
//!
//! On a virtual machine the hypervisor runs other tenants' work on the physical CPUs behind
//! this machine's vCPUs; the time a runnable vCPU of ours waited for it is *steal*. A
//! migration whose threads lose their CPU for milliseconds shows it in every figure (on the
//! 2-core cloud VM this was written on, one afternoon's series of migrations ran with 9 %
//! steal and downtimes of 1.4-15 ms, where a quieter day gave 0.4-0.9 ms), so benchmarks
//! record the steal share of each run beside its numbers.

/// Cumulative CPU time of all CPUs, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time taken by the hypervisor from this machine's runnable vCPUs.
    pub steal: u64,
    /// All time accounted (user, nice, system, idle, iowait, irq, softirq, steal).
    pub total: u64,
}

impl CpuTimes {
    /// The counters now, or `None` where `/proc/stat` is not readable.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses the summary `cpu` line of `/proc/stat`.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
        // already counted in user and nice.
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (fields.len() == 8).then(|| Self {
            steal: fields[7],
            total: fields.iter().sum(),
        })
    }

    /// The share of CPU time stolen between `earlier` and `self`, in percent (`None` if no
    /// tick passed).
    #[allow(clippy::cast_precision_loss)]
    pub fn steal_pct_since(&self, earlier: &Self) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| 100.0 * steal as f64 / total as f64)
    }
}

/// Percent of CPU time stolen since `start` (taken with [`CpuTimes::now`]), if measurable.
pub fn steal_pct_since(start: Option<CpuTimes>) -> Option<f64> {
    CpuTimes::now()?.steal_pct_since(&start?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_line_and_computes_the_steal_share() {
        let a = CpuTimes::parse(
            "cpu  100 5 50 800 10 0 5 30 7 0\ncpu0 50 2 25 400 5 0 2 15 3 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(
            a,
            CpuTimes {
                steal: 30,
                total: 1000
            }
        );
        let b = CpuTimes {
            steal: 40,
            total: 1200,
        };
        assert_eq!(b.steal_pct_since(&a), Some(5.0));
        assert_eq!(a.steal_pct_since(&a), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("intr 1\n"), None);
        assert!(CpuTimes::now().is_some(), "Linux has /proc/stat");
    }
}
