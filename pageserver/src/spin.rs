//! Keeping the demand path awake, and the bulk path out of its way.
//!
//! A guest stalled on demand faults asks again within tens of microseconds of each reply, and
//! a thread sleeping in the kernel on an idle (virtual) CPU takes about as long to wake here as
//! the loopback round trip itself. So the readers on the demand path ([`SpinRead`]) keep
//! retrying for [`DEMAND_SPIN`] after the last activity before they sleep, and the bulk threads
//! (the push, its receiver) run at a lower priority ([`lower_priority`]).

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a demand-path reader keeps looking for the next message after the last activity
/// before it sleeps in the kernel. Measured with `tsubame bench fault` on 2 cores: the
/// server's demand thread spinning took the engine-side demand p50 from 57-65 µs to 33 µs. The
/// destination's fault thread, which also reads the replies, spins as long after each fault
/// (a separate reply reader spinning as well made things worse, with three spinners on two
/// cores).
pub const DEMAND_SPIN: Duration = Duration::from_micros(150);

/// Nanoseconds since a process-wide origin: a timestamp that fits an atomic.
pub fn now_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A socket reader that waits for data by retrying (`recv` with `MSG_DONTWAIT`, yielding the
/// CPU between tries) while the last activity (`busy_since`, [`now_ns`]) is recent, and by
/// sleeping in `poll` otherwise. The socket itself stays blocking for its writers.
#[derive(Debug)]
pub struct SpinRead {
    s: TcpStream,
    busy_since: Arc<AtomicU64>,
}

impl SpinRead {
    /// Reads `s`, spinning for [`DEMAND_SPIN`] after the time in `busy_since`.
    pub fn new(s: TcpStream, busy_since: Arc<AtomicU64>) -> Self {
        Self { s, busy_since }
    }
}

impl std::io::Read for SpinRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::{AsFd, AsRawFd};
        loop {
            match nix::sys::socket::recv(
                self.s.as_raw_fd(),
                buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let idle = now_ns().saturating_sub(self.busy_since.load(Ordering::Relaxed));
            if Duration::from_nanos(idle) < DEMAND_SPIN {
                std::thread::yield_now();
            } else {
                let mut fds = [nix::poll::PollFd::new(
                    self.s.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Makes the calling thread (a bulk one: the push, its receiver) yield the CPU to the demand
/// path: a fault must not wait behind the bulk stream for a CPU any more than on the wire.
/// Nice 10 gives it about a tenth of the weight of a normal thread under contention and
/// costs nothing when a CPU is free.
pub fn lower_priority() {
    set_nice(10);
}

/// Sets the calling thread's nice value (best effort).
pub fn set_nice(nice: i32) {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority has no memory effects; PRIO_PROCESS with a thread id sets that
    // thread's nice value (Linux), here our own thread's.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, u32::try_from(tid).unwrap_or(0), nice) };
    if r != 0 {
        log::debug!(
            "could not set this thread's nice value to {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
}
