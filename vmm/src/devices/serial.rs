//! A 16550-style UART, enough for a guest that writes bytes to THR. Output is line-buffered per
//! vCPU so that lines from several vCPUs do not interleave mid-line; the last lines are kept in
//! memory for the control socket (`query-serial`).
//!
//! Output can be *held* (the destination of a cancellable migration, as Remus does): each
//! complete line is tagged with the current checkpoint epoch and leaves the VM only when the
//! checkpoint of that epoch is committed at the source ([`Serial::release`]). If the migration is
//! called off, held lines are dropped: the source resumes from its last committed checkpoint and
//! the guest writes them again, so the outside world never sees a line twice or a line that
//! was rolled back.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// Held output, when output is held.
    gate: Option<Gate>,
    /// How long the last released lines were held (at most [`DELAYS_KEPT`]).
    delays: VecDeque<Duration>,
}

/// Lines waiting for their checkpoint to be committed.
#[derive(Debug, Default)]
struct Gate {
    /// The epoch that lines completed now belong to.
    epoch: u64,
    /// Lines held: epoch, when the guest completed it, the line.
    held: VecDeque<(u64, Instant, String)>,
    /// The migration was called off: nothing more is ever released.
    closed: bool,
}

/// The UART.
#[derive(Debug)]
pub struct Serial {
    inner: Mutex<Inner>,
}

const RECENT_LINES: usize = 1000;
/// Output delays kept for statistics.
const DELAYS_KEPT: usize = 10_000;
const DLAB: u8 = 0x80;

impl Serial {
    pub fn new(sink: SerialSink, vcpus: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                regs: SerialState::default(),
                lines: vec![Vec::new(); vcpus],
                recent: VecDeque::new(),
                sink,
                gate: None,
                delays: VecDeque::new(),
            }),
        }
    }

    /// From now on, complete lines are held, tagged with epoch `epoch` until
    /// [`Self::close_epoch`], and released by [`Self::release`].
    pub fn hold_output(&self, epoch: u64) {
        self.inner.lock().expect("serial lock").gate = Some(Gate {
            epoch,
            ..Gate::default()
        });
    }

    /// The lines held so far belong to the current epoch, which this returns; later lines
    /// belong to the next. (Called with the vCPUs paused, as the checkpoint is taken.)
    pub fn close_epoch(&self) -> u64 {
        let mut s = self.inner.lock().expect("serial lock");
        match s.gate.as_mut() {
            Some(g) => {
                g.epoch += 1;
                g.epoch - 1
            }
            None => 0,
        }
    }

    /// The checkpoint of `epoch` is committed: the lines of that epoch and before leave.
    pub fn release(&self, epoch: u64) {
        let mut s = self.inner.lock().expect("serial lock");
        let mut out = Vec::new();
        if let Some(g) = s.gate.as_mut().filter(|g| !g.closed) {
            while g.held.front().is_some_and(|(e, _, _)| *e <= epoch) {
                out.extend(g.held.pop_front());
            }
        }
        for (_, at, line) in out {
            s.released(at, line);
        }
    }

    /// No more rollback can happen (the migration completed): every held line leaves, and
    /// output is no longer held.
    pub fn release_all(&self) {
        let mut s = self.inner.lock().expect("serial lock");
        let Some(g) = s.gate.take() else { return };
        if g.closed {
            s.gate = Some(g);
            return;
        }
        for (_, at, line) in g.held {
            s.released(at, line);
        }
    }

    /// The migration was called off: held lines are dropped, and nothing is released any more.
    /// Returns how many lines were dropped.
    pub fn drop_held(&self) -> usize {
        let mut s = self.inner.lock().expect("serial lock");
        match s.gate.as_mut() {
            Some(g) => {
                g.closed = true;
                std::mem::take(&mut g.held).len()
            }
            None => 0,
        }
    }

    /// How long the last released lines (up to 10 000) were held before they left.
    pub fn output_delays(&self) -> Vec<Duration> {
        let s = self.inner.lock().expect("serial lock");
        s.delays.iter().copied().collect()
    }

    /// Lines held (not released yet).
    pub fn held_lines(&self) -> usize {
        let s = self.inner.lock().expect("serial lock");
        s.gate.as_ref().map_or(0, |g| g.held.len())
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
        match self.gate.as_mut() {
            Some(g) if !g.closed => g.held.push_back((g.epoch, Instant::now(), line)),
            Some(_) => {} // called off: the source writes it again
            None => self.emit(line),
        }
    }

    /// A held line leaves, `at` being when the guest completed it.
    fn released(&mut self, at: Instant, line: String) {
        if self.delays.len() == DELAYS_KEPT {
            self.delays.pop_front();
        }
        self.delays.push_back(at.elapsed());
        self.emit(line);
    }

    /// Sends a complete line out of the VM.
    fn emit(&mut self, line: String) {
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
    fn held_lines_leave_when_their_epoch_is_committed_and_never_after_a_cancel() {
        let s = Serial::new(SerialSink::Discard, 1);
        let line = |t: &str| {
            for b in t.bytes().chain([b'\n']) {
                s.write(0, 0, b);
            }
        };
        line("before");
        s.hold_output(1);
        line("a");
        assert_eq!(s.close_epoch(), 1);
        line("b");
        assert_eq!(s.close_epoch(), 2);
        line("c");
        assert_eq!(s.held_lines(), 3);
        assert_eq!(s.recent_lines(), ["before"]);
        s.release(1);
        assert_eq!(s.recent_lines(), ["before", "a"]);
        s.release(2);
        assert_eq!(s.recent_lines(), ["before", "a", "b"]);
        assert_eq!(s.drop_held(), 1, "c was never committed");
        line("d");
        s.release(9);
        s.release_all();
        assert_eq!(s.recent_lines(), ["before", "a", "b"]);
        // Without a cancel, completion releases everything and stops holding.
        let t = Serial::new(SerialSink::Discard, 1);
        t.hold_output(1);
        t.write(0, 0, b'x');
        t.write(0, 0, b'\n');
        t.release_all();
        t.write(0, 0, b'y');
        t.write(0, 0, b'\n');
        assert_eq!(t.recent_lines(), ["x", "y"]);
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
