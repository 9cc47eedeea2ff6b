//! A 16550-style UART, enough for a guest that writes bytes to THR. Output is line-buffered per
//! vCPU so that lines from several vCPUs do not interleave mid-line; the last lines are kept in
//! memory for the control socket (`query-serial`).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    Stdout,
    File(std::fs::File),
    Discard,
}

/// Saved UART state (registers and unfinished lines).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub partial_lines: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    regs: SerialState,
    lines: Vec<Vec<u8>>,
    recent: VecDeque<String>,
    sink: SerialSink,
}

/// The UART.
#[derive(Debug)]
pub struct Serial {
    inner: Mutex<Inner>,
}

const RECENT_LINES: usize = 1000;
const DLAB: u8 = 0x80;

impl Serial {
    pub fn new(sink: SerialSink, vcpus: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                regs: SerialState::default(),
                lines: vec![Vec::new(); vcpus],
                recent: VecDeque::new(),
                sink,
            }),
        }
    }

    /// A guest write to register `offset`.
    pub fn write(&self, cpu: usize, offset: u16, b: u8) {
        let mut s = self.inner.lock().expect("serial lock");
        let dlab = s.regs.lcr & DLAB != 0;
        match (offset, dlab) {
            (0, false) => s.push(cpu, b),
            (0, true) => s.regs.dll = b,
            (1, true) => s.regs.dlm = b,
            (1, false) => s.regs.ier = b & 0x0f,
            (3, _) => s.regs.lcr = b,
            (4, _) => s.regs.mcr = b,
            (7, _) => s.regs.scr = b,
            _ => {}
        }
    }

    /// A guest read of register `offset`: the transmitter is always ready, nothing is received.
    pub fn read(&self, offset: u16) -> u8 {
        let s = self.inner.lock().expect("serial lock");
        let dlab = s.regs.lcr & DLAB != 0;
        match (offset, dlab) {
            (0, true) => s.regs.dll,
            (1, true) => s.regs.dlm,
            (1, false) => s.regs.ier,
            (2, _) => 0x01, // IIR: no interrupt pending
            (3, _) => s.regs.lcr,
            (4, _) => s.regs.mcr,
            (5, _) => 0x60, // LSR: THR empty, transmitter empty
            (6, _) => 0xb0, // MSR: CTS, DSR, DCD
            (7, _) => s.regs.scr,
            _ => 0,
        }
    }

    /// The last complete lines the guest wrote (at most 1000).
    pub fn recent_lines(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("serial lock")
            .recent
            .iter()
            .cloned()
            .collect()
    }

    pub fn save(&self) -> SerialState {
        let s = self.inner.lock().expect("serial lock");
        let mut st = s.regs.clone();
        st.partial_lines = s
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        st
    }

    pub fn restore(&self, st: &SerialState) {
        let mut s = self.inner.lock().expect("serial lock");
        s.regs = SerialState {
            partial_lines: Vec::new(),
            ..st.clone()
        };
        for (line, saved) in s.lines.iter_mut().zip(&st.partial_lines) {
            *line = saved.as_bytes().to_vec();
        }
    }
}

impl Inner {
    fn push(&mut self, cpu: usize, b: u8) {
        if cpu >= self.lines.len() {
            self.lines.resize(cpu + 1, Vec::new());
        }
        if b != b'\n' {
            self.lines[cpu].push(b);
            return;
        }
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.lines[cpu])).into_owned();
        let res = match &mut self.sink {
            SerialSink::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
            SerialSink::File(f) => writeln!(f, "{line}"),
            SerialSink::Discard => Ok(()),
        };
        if let Err(e) = res {
            log::warn!("serial output lost: {e}");
        }
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_per_cpu_do_not_interleave() {
        let s = Serial::new(SerialSink::Discard, 2);
        for (cpu, b) in [(0, b'a'), (1, b'x'), (0, b'b'), (1, b'\n'), (0, b'\n')] {
            s.write(cpu, 0, b);
        }
        assert_eq!(s.recent_lines(), vec!["x".to_string(), "ab".to_string()]);
        assert_eq!(s.read(5) & 0x20, 0x20);
    }

    #[test]
    fn save_restore_keeps_partial_lines() {
        let s = Serial::new(SerialSink::Discard, 1);
        s.write(0, 0, b'h');
        s.write(0, 7, 0x42);
        let st = s.save();
        let t = Serial::new(SerialSink::Discard, 1);
        t.restore(&st);
        t.write(0, 0, b'i');
        t.write(0, 0, b'\n');
        assert_eq!(t.recent_lines(), vec!["hi".to_string()]);
        assert_eq!(t.read(7), 0x42);
    }
}
