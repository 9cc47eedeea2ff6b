//! The doorbell (port 0xf4): the guest's rare events, per vCPU, with a condition variable so
//! that callers can wait for "all finished" or "something failed" without polling.

use std::sync::{Condvar, Mutex};
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
    cpus: Mutex<Vec<CpuStatus>>,
    changed: Condvar,
}

impl Doorbell {
    pub fn new(vcpus: usize) -> Self {
        Self {
            cpus: Mutex::new(vec![CpuStatus::Booting; vcpus]),
            changed: Condvar::new(),
        }
    }

    fn set(&self, cpu: usize, status: CpuStatus) {
        let mut cpus = self.cpus.lock().expect("doorbell lock");
        if let Some(s) = cpus.get_mut(cpu) {
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
        let mut cpus = self.cpus.lock().expect("doorbell lock");
        if let Some(s) = cpus.get_mut(cpu) {
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

    /// Status of every vCPU.
    pub fn statuses(&self) -> Vec<CpuStatus> {
        self.cpus.lock().expect("doorbell lock").clone()
    }

    /// Waits until `done(statuses)` holds or `timeout` passes; returns the statuses then.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[CpuStatus]) -> bool,
    ) -> (bool, Vec<CpuStatus>) {
        let deadline = Instant::now() + timeout;
        let mut cpus = self.cpus.lock().expect("doorbell lock");
        loop {
            if done(&cpus) {
                return (true, cpus.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return (false, cpus.clone());
            }
            cpus = self
                .changed
                .wait_timeout(cpus, deadline - now)
                .expect("doorbell lock")
                .0;
        }
    }

    pub fn save(&self) -> DoorbellState {
        DoorbellState {
            cpus: self.statuses(),
        }
    }

    pub fn restore(&self, s: &DoorbellState) {
        let mut cpus = self.cpus.lock().expect("doorbell lock");
        for (c, saved) in cpus.iter_mut().zip(&s.cpus) {
            *c = saved.clone();
        }
        self.changed.notify_all();
    }
}
