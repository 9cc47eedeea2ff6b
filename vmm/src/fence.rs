//! [`Lease`]: whether this VMM may run its vCPUs, for the destination of a cancellable
//! migration.
//!
//! Once a cancellable migration has switched over, two hosts could run the VM: the destination,
//! and the source, which resumes it from the last reverse checkpoint it committed if the
//! destination is cancelled, dies or goes silent. They must never both run it. The destination
//! therefore runs on a *lease*:
//!
//! - Every checkpoint it sends at time `t` (its clock) carries a lease length `L`; when the
//!   source acknowledges that checkpoint, the destination may run until `t + L`. Before the
//!   first acknowledgement it may run until `received + L - margin` (`received`: when the VM
//!   state arrived).
//! - The source resumes the VM only after the destination said it is fenced, or once its own
//!   clock passes `r + L + margin`, `r` being when it received the last checkpoint it
//!   acknowledged (`r >= t`), or `sent + L + margin` before any (`sent`: when it sent the state;
//!   safe as long as the state reaches the destination within twice the margin, 100 ms, or not
//!   at all). Clocks need only run at the same rate, not agree.
//! - A vCPU thread checks [`Lease::may_run`] every time before it enters the guest, and a
//!   watchdog pauses running vCPUs a little before the deadline, so a destination whose
//!   process was stopped (SIGSTOP) or starved, then continues, never re-enters the guest late.
//!
//! States: `Unlimited` (no cancellable migration, or the source handed the VM over for good:
//! `Complete`), `Leased` (until the deadline), `Suspended` (the lease ran out: the source may
//! have resumed; only the source's `Complete` can lift it, because the source sends that only
//! if it never resumed), `Fenced` (cancelled: final).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Where a lease stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Unlimited = 0,
    Leased = 1,
    Suspended = 2,
    Fenced = 3,
}

impl LeaseState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Unlimited,
            1 => Self::Leased,
            2 => Self::Suspended,
            _ => Self::Fenced,
        }
    }
}

/// The right to run the vCPUs (module docs).
#[derive(Debug)]
pub struct Lease {
    state: AtomicU8,
    /// While `Leased`: the deadline, in nanoseconds of [`now_ns`].
    deadline_ns: AtomicU64,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(LeaseState::Unlimited as u8),
            deadline_ns: AtomicU64::new(u64::MAX),
        }
    }
}

/// Monotonic nanoseconds since the first call in this process.
pub fn now_ns() -> u64 {
    at_ns(Instant::now())
}

/// `t` in the nanoseconds of [`now_ns`] (0 for instants before the first call).
pub fn at_ns(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

impl Lease {
    /// The current state.
    pub fn state(&self) -> LeaseState {
        LeaseState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether a vCPU may enter the guest now (the hot path: two loads and a clock read).
    pub fn may_run(&self) -> bool {
        match self.state() {
            LeaseState::Unlimited => true,
            LeaseState::Leased => now_ns() < self.deadline_ns.load(Ordering::Acquire),
            LeaseState::Suspended | LeaseState::Fenced => false,
        }
    }

    /// Starts leasing: the VM may run until `until`.
    pub fn start(&self, until: Instant) {
        self.deadline_ns.store(at_ns(until), Ordering::Release);
        self.state
            .store(LeaseState::Leased as u8, Ordering::Release);
    }

    /// Extends a lease that has not run out to `until` (never shortens it). Returns false if
    /// the lease is no longer `Leased` (ran out, fenced, or unlimited): nothing changes.
    pub fn renew(&self, until: Instant) -> bool {
        if self.state() != LeaseState::Leased {
            return false;
        }
        let until = at_ns(until);
        let mut cur = self.deadline_ns.load(Ordering::Acquire);
        loop {
            if now_ns() >= cur {
                return false; // ran out already: the watchdog suspends it
            }
            if until <= cur {
                return true;
            }
            match self.deadline_ns.compare_exchange_weak(
                cur,
                until,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// How long until the deadline (`None` unless `Leased`; zero once passed).
    pub fn remaining(&self) -> Option<Duration> {
        (self.state() == LeaseState::Leased).then(|| {
            Duration::from_nanos(
                self.deadline_ns
                    .load(Ordering::Acquire)
                    .saturating_sub(now_ns()),
            )
        })
    }

    /// The lease ran out: suspended until the source hands the VM over. Returns false if it
    /// was not `Leased`.
    pub fn suspend(&self) -> bool {
        self.state
            .compare_exchange(
                LeaseState::Leased as u8,
                LeaseState::Suspended as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The VM is this host's for good (the source's `Complete`): lifts a lease or a
    /// suspension. Returns false if fenced (nothing changes).
    pub fn own(&self) -> bool {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur == LeaseState::Fenced as u8 {
                return false;
            }
            match self.state.compare_exchange_weak(
                cur,
                LeaseState::Unlimited as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Stops the VM here for good (a cancel). Returns false if it was already fenced.
    pub fn fence(&self) -> bool {
        self.state.swap(LeaseState::Fenced as u8, Ordering::AcqRel) != LeaseState::Fenced as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_until_its_deadline_and_only_complete_lifts_a_suspension() {
        let l = Lease::default();
        assert!(l.may_run(), "no lease: unlimited");
        l.start(Instant::now() + Duration::from_secs(60));
        assert!(l.may_run());
        assert!(l.renew(Instant::now() + Duration::from_secs(120)));
        assert!(l.remaining().unwrap() > Duration::from_secs(100));
        assert!(l.renew(Instant::now()), "never shortens");
        assert!(l.remaining().unwrap() > Duration::from_secs(100));

        l.start(Instant::now());
        assert!(!l.may_run(), "past the deadline");
        assert!(
            !l.renew(Instant::now() + Duration::from_secs(60)),
            "too late"
        );
        assert!(l.suspend());
        assert!(!l.may_run());
        assert!(!l.renew(Instant::now() + Duration::from_secs(60)));
        assert!(l.own(), "the source's Complete lifts a suspension");
        assert!(l.may_run());

        assert!(l.fence());
        assert!(!l.may_run());
        assert!(!l.own(), "a fence is final");
        assert!(!l.fence());
        assert_eq!(l.state(), LeaseState::Fenced);
    }
}
