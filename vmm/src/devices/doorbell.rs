//! The doorbell (port 0xf4): the guest's rare events, per vCPU, with a condition variable so
//! that callers can wait for "all finished" or "something failed" without polling.
//!
//! Like serial output, what the doorbell shows can be *held* (the destination of a cancellable
//! migration): the statuses a user sees (`query-status`, `wait`) are those of the last
//! committed checkpoint, so that a guest that finished here and is then rolled back to the
//! source was never seen finishing. The device's own state, which checkpoints save, is always
//! the latest.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{ExitAction, ParkReason};
use crate::guest::abi;

/// What a vCPU last reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum CpuStatus {
    /// Not yet at CPL3.
    Booting,
    /// Running its workload.
    Running,
    /// Finished its steps (and the final verification).
    Finished,
    /// The in-guest verifier found a bad page (details in the mailbox).
    VerifyFailed,
    /// A CPU exception reached the guest's CPL0 handler.
    Exception { vector: u32, rip: u64 },
    /// The vCPU stopped for another reason.
    Stopped { reason: ParkReason, rip: u64 },
}

impl CpuStatus {
    /// Whether this status means the guest is broken.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Self::VerifyFailed | Self::Exception { .. } | Self::Stopped { .. }
        )
    }
}

/// Saved doorbell state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorbellState {
    pub cpus: Vec<CpuStatus>,
}

/// The doorbell device.
#[derive(Debug)]
pub struct Doorbell {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Debug)]
struct Inner {
    /// What the vCPUs last reported.
    cpus: Vec<CpuStatus>,
    /// Held statuses, while held.
    gate: Option<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    /// What users see: the statuses as of the last committed epoch.
    published: Vec<CpuStatus>,
    /// The statuses at the end of each epoch not committed yet.
    epochs: VecDeque<(u64, Vec<CpuStatus>)>,
    /// Called off: nothing more is published.
    closed: bool,
}

impl Inner {
    /// What users see.
    fn visible(&self) -> &[CpuStatus] {
        self.gate.as_ref().map_or(&self.cpus, |g| &g.published)
    }
}

impl Doorbell {
    pub fn new(vcpus: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                cpus: vec![CpuStatus::Booting; vcpus],
                gate: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("doorbell lock")
    }

    /// From now on users see the statuses of committed epochs only (module docs).
    pub fn hold(&self) {
        let mut s = self.lock();
        s.gate = Some(Gate {
            published: s.cpus.clone(),
            ..Gate::default()
        });
    }

    /// Epoch `epoch` ends now (the vCPUs are paused for its checkpoint).
    pub fn close_epoch(&self, epoch: u64) {
        let mut s = self.lock();
        let now = s.cpus.clone();
        if let Some(g) = s.gate.as_mut() {
            g.epochs.push_back((epoch, now));
        }
    }

    /// The checkpoint of `epoch` is committed: its statuses become visible.
    pub fn release(&self, epoch: u64) {
        let mut s = self.lock();
        if let Some(g) = s.gate.as_mut().filter(|g| !g.closed) {
            while g.epochs.front().is_some_and(|(e, _)| *e <= epoch) {
                if let Some((_, cpus)) = g.epochs.pop_front() {
                    g.published = cpus;
                }
            }
        }
        self.changed.notify_all();
    }

    /// No rollback any more: users see the latest statuses again.
    pub fn release_all(&self) {
        let mut s = self.lock();
        if s.gate.as_ref().is_some_and(|g| !g.closed) {
            s.gate = None;
        }
        self.changed.notify_all();
    }

    /// Called off: users keep seeing the last committed statuses.
    pub fn drop_held(&self) {
        if let Some(g) = self.lock().gate.as_mut() {
            g.closed = true;
            g.epochs.clear();
        }
    }

    fn set(&self, cpu: usize, status: CpuStatus) {
        let mut inner = self.lock();
        if let Some(s) = inner.cpus.get_mut(cpu) {
            *s = status;
        }
        self.changed.notify_all();
    }

    /// A guest write of `value` from vCPU `cpu`.
    pub fn ring(&self, cpu: usize, value: u32) -> ExitAction {
        let code = (value >> 8) & 0xff;
        match code {
            abi::BELL_RUNNING => {
                self.set(cpu, CpuStatus::Running);
                ExitAction::Continue
            }
            abi::BELL_DONE => {
                self.set(cpu, CpuStatus::Finished);
                ExitAction::Park
            }
            abi::BELL_VERIFY => {
                self.set(cpu, CpuStatus::VerifyFailed);
                ExitAction::Park
            }
            abi::BELL_EXCEPTION => {
                // The handler halts next; the vCPU thread records the rip when it parks.
                self.set(
                    cpu,
                    CpuStatus::Exception {
                        vector: value >> 16,
                        rip: 0,
                    },
                );
                ExitAction::Continue
            }
            _ => {
                log::warn!("vCPU {cpu}: unknown doorbell value {value:#x}");
                ExitAction::Continue
            }
        }
    }

    /// Records a vCPU that stopped by itself (halt, triple fault, failed run).
    pub fn stopped(&self, cpu: usize, reason: ParkReason, rip: u64) {
        let mut inner = self.lock();
        if let Some(s) = inner.cpus.get_mut(cpu) {
            *s = match (s.clone(), reason) {
                // the exception handler halts after ringing: keep the exception, add where
                (CpuStatus::Exception { vector, .. }, ParkReason::Halted) => {
                    CpuStatus::Exception { vector, rip }
                }
                (_, reason) => CpuStatus::Stopped { reason, rip },
            };
        }
        self.changed.notify_all();
    }

    /// Status of every vCPU, as users see it (held: as of the last committed checkpoint).
    pub fn statuses(&self) -> Vec<CpuStatus> {
        self.lock().visible().to_vec()
    }

    /// Waits until `done(statuses)` holds or `timeout` passes; returns the statuses then (as
    /// users see them).
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[CpuStatus]) -> bool,
    ) -> (bool, Vec<CpuStatus>) {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if done(inner.visible()) {
                return (true, inner.visible().to_vec());
            }
            let now = Instant::now();
            if now >= deadline {
                return (false, inner.visible().to_vec());
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .expect("doorbell lock")
                .0;
        }
    }

    /// The device's state: the latest statuses, held or not.
    pub fn save(&self) -> DoorbellState {
        DoorbellState {
            cpus: self.lock().cpus.clone(),
        }
    }

    /// Loads a saved state; while held, it is visible at once (it was seen where it was
    /// saved).
    pub fn restore(&self, s: &DoorbellState) {
        let mut inner = self.lock();
        for (c, saved) in inner.cpus.iter_mut().zip(&s.cpus) {
            *c = saved.clone();
        }
        let cpus = inner.cpus.clone();
        if let Some(g) = inner.gate.as_mut() {
            g.published = cpus;
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_statuses_show_only_once_their_epoch_is_committed() {
        let d = Doorbell::new(1);
        d.restore(&DoorbellState {
            cpus: vec![CpuStatus::Running],
        });
        d.hold();
        d.ring(0, abi::BELL_DONE << 8);
        assert_eq!(d.statuses(), [CpuStatus::Running], "not committed yet");
        assert_eq!(
            d.save().cpus,
            [CpuStatus::Finished],
            "checkpoints save the latest"
        );
        d.close_epoch(1);
        d.release(1);
        assert_eq!(d.statuses(), [CpuStatus::Finished]);
        // Called off before a later epoch is committed: never shown.
        d.restore(&DoorbellState {
            cpus: vec![CpuStatus::Running],
        });
        d.ring(0, abi::BELL_DONE << 8);
        d.close_epoch(2);
        d.drop_held();
        d.release(2);
        assert_eq!(d.statuses(), [CpuStatus::Running]);
    }
}
