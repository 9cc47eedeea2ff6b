//! Wall-clock timestamps that two processes on one host can compare (a migration's downtime is
//! the source's pause time to the destination's resume time).

/// Wall-clock microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
