//! Flow control of a bulk channel.
//!
//! TCP alone keeps the bulk stream moving but not short: on loopback the receive buffer grows
//! to 32 MiB, and a receiver that is slower than the push (it installs every page
//! with `UFFDIO_COPY`) ends up with tens of megabytes of pushed pages queued in its socket. A
//! guest that reaches one of those pages faults on it, and either waits behind the whole
//! queue or, as here, fetches it a second time on the urgent channel; a guest walking memory
//! then does so page after page (measured: 36,700 of 36,800 demand pages were duplicates of
//! queued ones, and the migration took 2-3× as long).
//!
//! So the receiver acknowledges what it has read and installed (`Installed`, on the bulk
//! connection's return direction), and the sender keeps at most a *window* of unacknowledged
//! bytes in flight ([`BulkWriter::wait_for_window`]). The window is twice the bandwidth-delay
//! product, measured: the acknowledged rate over the last few round trips times the round
//! trip the handshake measured, but never below [`WINDOW_MIN`], enough to keep the receiver
//! busy on loopback, nor above [`WINDOW_MAX`]. On a long link the window grows like TCP's
//! slow start: each round trip acknowledges a full window, which doubles it, until the link
//! is full.
//!
//! A channel that no fault waits behind (a write-back to a memserver) may raise the window's
//! floor to a whole batch ([`BulkWriter::set_window_floor`]): its sender then waits once per
//! batch rather than once per window, and each of those waits is a wake-up that a host whose
//! CPUs the guest keeps busy delays.
//!
//! The same measured rate sizes the sender's runs of pages ([`BulkWriter::run_pages`]): what
//! the link delivers in about a millisecond, from 256 KiB up to 2 MiB. Large runs spare the
//! receiver's CPU (one `UFFDIO_MOVE`, and one wait for the other CPUs to flush their TLBs,
//! per page table instead of per 256 KiB); on a slow link a large run would keep its pages
//! from the guest until the whole run has arrived.

use std::collections::VecDeque;
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::frame::ProtocolError;
use crate::message::Message;

/// Smallest window: 1 MiB is about a millisecond of pushing on loopback, enough for the
/// receiver never to run dry between acknowledgements.
pub const WINDOW_MIN: u64 = 1 << 20;
/// Largest window (a 1 Gbit/s link with a 500 ms round trip).
pub const WINDOW_MAX: u64 = 64 << 20;
/// The receiver acknowledges at least every this many bytes (and whenever it has read all
/// it was sent).
pub const ACK_EVERY: u64 = 128 << 10;
/// Fewest pages in a run of pushed pages (256 KiB).
pub const RUN_PAGES_MIN: u64 = 64;
/// Most pages in a run of pushed pages: 2 MiB, one page table's worth. The receiver moves a
/// run in from its staging pool with one `UFFDIO_MOVE`, and the kernel flushes the moved pages
/// from the other CPUs once per batch, a batch ending where a page table does. With 64-page
/// runs on loopback, `perf` put 46 % of the bulk receiver's time in waiting for those flushes'
/// inter-processor interrupts (about 80 µs each on this host, itself a VM); with 512-page runs
/// 7 %, and the push went from 0.74-1.06 to 1.07-1.69 GB/s (9 alternating pairs of `bench
/// migrate`, the three postcopy policies).
pub const RUN_PAGES_MAX: u64 = 512;
/// A run should take about this long on the link: the receiver installs a run only once
/// all of it has arrived, so a guest faulting on one of its pages waits for the rest (on a
/// 16 ms link at 0.25 GB/s, 2 MiB runs raised the demand p50 from about 1 ms to 5-7 ms).
const RUN_TIME: Duration = Duration::from_millis(1);

/// What the bulk writer and the acknowledgement reader share.
#[derive(Debug)]
struct Window {
    /// Bytes the receiver has acknowledged.
    acked: AtomicU64,
    /// Current window in bytes.
    size: AtomicU64,
    /// Acknowledged bytes per second over the last few round trips (0: not measured yet).
    rate: AtomicU64,
    /// The window never shrinks below this ([`BulkWriter::set_window_floor`]).
    floor: AtomicU64,
    /// The acknowledgement reader stopped: the receiver went away (or closed the channel).
    closed: AtomicBool,
    lock: Mutex<()>,
    acked_cv: Condvar,
}

impl Window {
    /// Waits until `ready` holds, woken by each acknowledgement; fails if the acknowledgement
    /// reader stopped first (the receiver went away).
    fn wait_until(&self, ready: impl Fn(&Window) -> bool) -> Result<(), ProtocolError> {
        let mut guard = self.lock.lock().expect("window lock");
        while !ready(self) {
            if self.closed.load(Ordering::Acquire) {
                return Err(ProtocolError::Closed);
            }
            guard = self
                .acked_cv
                .wait_timeout(guard, Duration::from_millis(100))
                .expect("window lock")
                .0;
        }
        Ok(())
    }
}

/// The sending side of a bulk channel: a buffered writer that counts what it sends and, before
/// each run of pages, waits until the receiver has acknowledged enough of it.
#[derive(Debug)]
pub struct BulkWriter {
    w: BufWriter<TcpStream>,
    written: u64,
    window: Arc<Window>,
}

impl BulkWriter {
    /// Wraps the authenticated bulk connection, and starts a thread reading the receiver's
    /// acknowledgements from it. `rtt` is the connection's round trip (from the handshake).
    pub fn new(stream: TcpStream, rtt: Duration) -> std::io::Result<Self> {
        let window = Arc::new(Window {
            acked: AtomicU64::new(0),
            size: AtomicU64::new(WINDOW_MIN),
            rate: AtomicU64::new(0),
            floor: AtomicU64::new(WINDOW_MIN),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            acked_cv: Condvar::new(),
        });
        let (acks, w) = (stream.try_clone()?, window.clone());
        std::thread::Builder::new()
            .name("bulk-acks".into())
            .spawn(move || read_acks(acks, &w, rtt))?;
        Ok(Self {
            // Page runs are larger than this and bypass it (one `writev` each, no copy).
            w: BufWriter::with_capacity(64 << 10, stream),
            written: 0,
            window,
        })
    }

    /// Waits until fewer than a window of bytes are unacknowledged. Flushes first: what sits
    /// in the buffer cannot be acknowledged.
    pub fn wait_for_window(&mut self) -> Result<(), ProtocolError> {
        let w = &self.window;
        let open = |w: &Window| {
            self.written.saturating_sub(w.acked.load(Ordering::Acquire))
                < w.size.load(Ordering::Relaxed)
        };
        if open(w) {
            return Ok(());
        }
        self.w.flush()?;
        w.wait_until(open)
    }

    /// Keeps the window at least `bytes` (within [`WINDOW_MIN`]..=[`WINDOW_MAX`]); a floor
    /// lower than the last one takes effect with the next acknowledgement. For a channel whose queue no one waits behind, such as a write-back to a memserver:
    /// the sender then writes a whole batch and waits once for its acknowledgement, instead
    /// of sleeping for an acknowledgement every window, each a wake-up that a busy host
    /// delays.
    pub fn set_window_floor(&self, bytes: u64) {
        let w = &self.window;
        let floor = bytes.clamp(WINDOW_MIN, WINDOW_MAX);
        if w.floor.swap(floor, Ordering::Relaxed) != floor {
            w.size.fetch_max(floor, Ordering::Relaxed);
        }
    }

    /// Pages the next run should have: what the link delivers in about [`RUN_TIME`] at the
    /// measured rate, within [`RUN_PAGES_MIN`]..=[`RUN_PAGES_MAX`] (the fewest until the rate
    /// is measured, after the first few acknowledgements).
    pub fn run_pages(&self) -> u64 {
        run_pages_for(self.window.rate.load(Ordering::Relaxed))
    }

    /// Flushes, then waits until the receiver has acknowledged everything sent so far: every
    /// page is installed (or stored) there. Fails if the receiver goes away first.
    pub fn wait_all_acknowledged(&mut self) -> Result<(), ProtocolError> {
        self.w.flush()?;
        let written = self.written;
        self.window
            .wait_until(|w| w.acked.load(Ordering::Acquire) >= written)
    }

    /// The connection written to.
    pub fn stream(&self) -> &TcpStream {
        self.w.get_ref()
    }

    /// Bytes written so far (frames after the handshake).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes the receiver has acknowledged so far: it has read and installed every frame
    /// that ends there or before.
    pub fn acknowledged(&self) -> u64 {
        self.window.acked.load(Ordering::Acquire)
    }

    /// Flushes and ends the bulk stream (the receiver reads the end of it): the
    /// acknowledgement reader keeps a handle to the connection, so dropping this one alone
    /// would not close it.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.w.flush()?;
        self.w.get_ref().shutdown(Shutdown::Write)
    }
}

impl Write for BulkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Reads `Installed` acknowledgements until the connection ends, and sizes the window.
fn read_acks(s: TcpStream, w: &Window, rtt: Duration) {
    let mut r = std::io::BufReader::new(s);
    // (when, acknowledged bytes) over the last few round trips, for the delivery rate.
    let mut history: VecDeque<(Instant, u64)> = VecDeque::new();
    let span = (rtt * 4).max(Duration::from_millis(10));
    loop {
        let bytes = match Message::read_from(&mut r) {
            Ok(Message::Installed { bytes }) => bytes,
            Ok(m) => {
                log::warn!("unexpected {} on the bulk channel's return path", m.name());
                break;
            }
            Err(_) => break, // the receiver is done or gone: the writers find out
        };
        let now = Instant::now();
        history.push_back((now, bytes));
        while history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > span)
        {
            history.pop_front();
        }
        let rate = rate_of(&history);
        w.rate.store(rate, Ordering::Relaxed);
        let floor = w.floor.load(Ordering::Relaxed);
        w.size
            .store(window_for(rate, rtt).max(floor), Ordering::Relaxed);
        w.acked.store(bytes, Ordering::Release);
        let _guard = w.lock.lock().expect("window lock");
        w.acked_cv.notify_all();
    }
    w.closed.store(true, Ordering::Release);
    let _guard = w.lock.lock().expect("window lock");
    w.acked_cv.notify_all();
}

/// The acknowledged rate over `history`, in bytes per second (0 if it spans no time).
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
#[allow(clippy::cast_sign_loss)]
fn rate_of(history: &VecDeque<(Instant, u64)>) -> u64 {
    let (Some(first), Some(last)) = (history.front(), history.back()) else {
        return 0;
    };
    let secs = last.0.duration_since(first.0).as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    ((last.1 - first.1) as f64 / secs) as u64
}

/// The window for `rate` bytes per second: twice the bandwidth-delay product, within
/// [`WINDOW_MIN`]..=[`WINDOW_MAX`].
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
#[allow(clippy::cast_sign_loss)]
fn window_for(rate: u64, rtt: Duration) -> u64 {
    ((2.0 * rate as f64 * rtt.as_secs_f64()) as u64).clamp(WINDOW_MIN, WINDOW_MAX)
}

/// Pages per run at `rate` bytes per second (see [`BulkWriter::run_pages`]).
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
#[allow(clippy::cast_sign_loss)]
fn run_pages_for(rate: u64) -> u64 {
    let bytes = rate as f64 * RUN_TIME.as_secs_f64();
    ((bytes / 4096.0) as u64).clamp(RUN_PAGES_MIN, RUN_PAGES_MAX)
}

/// The receiver's side: counts the bulk bytes it has consumed and acknowledges them.
#[derive(Debug)]
pub struct Acknowledger {
    s: TcpStream,
    acked: u64,
}

impl Acknowledger {
    /// Acknowledges on `s` (a handle to the bulk connection).
    pub fn new(s: TcpStream) -> Self {
        Self { s, acked: 0 }
    }

    /// Called after each message is installed: `consumed` bytes of the stream are done, and
    /// `idle` says the receiver has nothing more buffered (it is about to wait for the sender,
    /// which may be waiting for this). Write errors are left to the reader to discover.
    pub fn installed(&mut self, consumed: u64, idle: bool) {
        let due = consumed - self.acked;
        if due >= ACK_EVERY || (idle && due > 0) {
            self.acked = consumed;
            let _ = Message::Installed { bytes: consumed }.write_to(&mut self.s);
        }
    }
}

/// A reader that counts the bytes taken from it (frames consumed, not socket reads).
#[derive(Debug)]
pub struct Counted<R> {
    pub inner: R,
    pub bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_twice_the_measured_bandwidth_delay_product() {
        let t0 = Instant::now();
        let h: VecDeque<_> = [(t0, 0), (t0 + Duration::from_millis(100), 100 << 20)].into();
        let rate = rate_of(&h);
        assert!(rate.abs_diff(1000 << 20) < 1 << 12, "{rate}");
        assert_eq!(rate_of(&VecDeque::new()), 0);
        // 1000 MiB/s × 10 ms × 2 = 20 MiB.
        let w = window_for(rate, Duration::from_millis(10));
        assert!(w.abs_diff(20 << 20) < 1 << 12, "{w}");
        // Not measured yet, or a loopback round trip: the floor; a long fast link: the cap.
        assert_eq!(window_for(0, Duration::from_millis(10)), WINDOW_MIN);
        assert_eq!(window_for(rate, Duration::from_micros(20)), WINDOW_MIN);
        assert_eq!(window_for(rate, Duration::from_secs(1)), WINDOW_MAX);
    }

    #[test]
    fn runs_take_about_a_millisecond_of_the_link() {
        // Not measured yet: the fewest.
        assert_eq!(run_pages_for(0), RUN_PAGES_MIN);
        // 0.25 GB/s (a 16 ms link in the benchmark): 61 pages a millisecond, so the fewest.
        assert_eq!(run_pages_for(250_000_000), RUN_PAGES_MIN);
        // 1 GB/s: 244 pages.
        assert_eq!(run_pages_for(1_000_000_000), 244);
        // Loopback (2-3 GB/s): a page table's worth.
        assert_eq!(run_pages_for(3_000_000_000), RUN_PAGES_MAX);
    }

    #[test]
    fn a_window_floor_lets_a_whole_batch_out_unacknowledged() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut d, _) = l.accept().unwrap();
        let mut w = BulkWriter::new(c, Duration::from_micros(50)).unwrap();
        w.set_window_floor(4 * WINDOW_MIN);
        // Reads what is sent (no acknowledgement), so that the socket never fills.
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            while d.read(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let chunk = vec![7u8; 256 << 10];
        // Four times the smallest window goes out without one acknowledgement (without the
        // floor, `wait_for_window` would wait forever past the first).
        while w.written + chunk.len() as u64 <= 4 * WINDOW_MIN {
            w.wait_for_window().unwrap();
            w.write_all(&chunk).unwrap();
        }
        assert_eq!(w.written, 4 * WINDOW_MIN);
        assert_eq!(w.acknowledged(), 0);
        // Clamped to the largest window.
        w.set_window_floor(u64::MAX);
        assert_eq!(w.window.size.load(Ordering::Relaxed), WINDOW_MAX);
        w.finish().unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn writer_waits_for_acknowledgements_and_fails_when_the_peer_goes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut d, _) = l.accept().unwrap();
        let mut w = BulkWriter::new(c, Duration::from_micros(50)).unwrap();
        let chunk = vec![7u8; 256 << 10];
        // A window's worth goes out without any acknowledgement.
        while w.written < WINDOW_MIN {
            w.wait_for_window().unwrap();
            w.write_all(&chunk).unwrap();
        }
        let waiter = std::thread::spawn(move || w.wait_for_window().map(|()| w));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the window is full until acknowledged"
        );
        let mut ack = Acknowledger::new(d.try_clone().unwrap());
        let mut sink = vec![0u8; usize::try_from(WINDOW_MIN).unwrap()];
        d.read_exact(&mut sink).unwrap();
        ack.installed(WINDOW_MIN, true);
        let mut w = waiter.join().unwrap().unwrap();
        // Fill the window again, then the receiver goes away: the writer is told.
        while w.written < 2 * WINDOW_MIN {
            w.write_all(&chunk).unwrap();
        }
        drop((d, ack));
        assert!(w.wait_for_window().is_err());
    }
}
