//! Devices of the built-in guest's machine, all port I/O:
//! - `serial`: a 16550-style UART at 0x3f8 whose output goes to a file, stdout or nowhere;
//! - `doorbell`: port 0xf4, where the guest reports rare events (entered CPL3, finished, found a
//!   bad page, took an exception). Frequent progress goes through the mailbox page instead, which
//!   the VMM reads without exits (see [`crate::Vm::progress`]).

mod doorbell;
mod serial;

pub use doorbell::{CpuStatus, Doorbell, DoorbellState};
pub use serial::{Serial, SerialSink, SerialState};

use serde::{Deserialize, Serialize};

use crate::guest::abi;

/// What the vCPU thread does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    /// Stop running this vCPU: the guest said it is finished or broken.
    Park,
}

/// Why a vCPU stopped by itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParkReason {
    Halted,
    TripleFault,
    UnexpectedExit(String),
    RunFailed(String),
}

/// All devices of a VM, and what the vCPU threads check before they enter the guest.
#[derive(Debug)]
pub struct Devices {
    pub serial: Serial,
    pub doorbell: Doorbell,
    /// Whether the vCPUs may run here at all (the destination of a cancellable migration runs
    /// on a lease; see [`crate::fence`]). Checked before every entry into the guest.
    pub lease: crate::fence::Lease,
}

/// Saved state of all devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub doorbell: DoorbellState,
}

impl Devices {
    pub fn new(sink: SerialSink, vcpus: usize) -> Self {
        Self {
            serial: Serial::new(sink, vcpus),
            doorbell: Doorbell::new(vcpus),
            lease: crate::fence::Lease::default(),
        }
    }

    /// Handles an `out` from vCPU `cpu`.
    pub fn io_out(&self, cpu: usize, port: u16, data: &[u8]) -> ExitAction {
        match port {
            p if (abi::SERIAL_PORT..abi::SERIAL_PORT + 8).contains(&p) => {
                if let Some(&b) = data.first() {
                    self.serial.write(cpu, p - abi::SERIAL_PORT, b);
                }
                ExitAction::Continue
            }
            abi::DOORBELL_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                self.doorbell.ring(cpu, u32::from_le_bytes(v))
            }
            _ => ExitAction::Continue, // unclaimed ports are ignored, as on a PC
        }
    }

    /// Handles an `in`: unclaimed ports read as all ones, as on a PC.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if (abi::SERIAL_PORT..abi::SERIAL_PORT + 8).contains(&port) {
            if let Some(b) = data.first_mut() {
                *b = self.serial.read(port - abi::SERIAL_PORT);
            }
        } else {
            data.fill(0xff);
        }
    }

    /// Records that vCPU `cpu` stopped by itself at `rip`.
    pub fn vcpu_stopped(&self, cpu: usize, reason: ParkReason, rip: u64) {
        self.doorbell.stopped(cpu, reason, rip);
    }

    /// Holds the output users can observe (serial lines, doorbell statuses) until the
    /// checkpoint that covers it is committed (the destination of a cancellable migration).
    pub fn hold_output(&self) {
        self.serial.hold_output(1);
        self.doorbell.hold();
    }

    /// Ends the current output epoch (the vCPUs are paused for its checkpoint); returns it.
    pub fn close_epoch(&self) -> u64 {
        let epoch = self.serial.close_epoch();
        self.doorbell.close_epoch(epoch);
        epoch
    }

    /// The checkpoint of `epoch` is committed: its output leaves.
    pub fn release(&self, epoch: u64) {
        self.serial.release(epoch);
        self.doorbell.release(epoch);
    }

    /// No rollback any more: all held output leaves, and output is no longer held.
    pub fn release_all(&self) {
        self.serial.release_all();
        self.doorbell.release_all();
    }

    /// Called off: held output is dropped (the source runs the guest again from its last
    /// checkpoint, and it produces that output again there).
    pub fn drop_held(&self) {
        self.serial.drop_held();
        self.doorbell.drop_held();
    }

    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.save(),
            doorbell: self.doorbell.save(),
        }
    }

    pub fn restore(&self, s: &DevicesState) {
        self.serial.restore(&s.serial);
        self.doorbell.restore(&s.doorbell);
    }
}
