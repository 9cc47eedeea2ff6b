//! `tsubame linkem`: a user-space TCP link emulator (these hosts have no `tc netem`), used to give
//! benchmarks wide-area links with a one-way delay and a bandwidth limit.
//!
//! Design. An acceptor thread takes connections on the listening socket; for each one a setup
//! thread connects to the target (a failure closes only that connection) and then runs the pair as
//! two independent directions, each made of a reader thread, a bounded queue and a writer thread:
//!
//! ```text
//!   client ──read──> [reader] ──(release, bytes)──> queue ──> [writer] ──write──> server
//!   client <──write── [writer] <── queue <──(release, bytes)── [reader] <──read── server
//! ```
//!
//! The reader stamps each chunk with its release time. With a rate, the chunk is serialised onto
//! the emulated wire of its direction, which is free again at `wire_free` (`start = max(now,
//! wire_free)`, `wire_free = start + len × 8 / rate`), and leaves `delay` after its last bit went
//! onto the wire, so delay and rate compose like a real pipe. The wire is shared by all
//! connections of the link (one wire per direction, like `tc netem rate` on an interface), so two
//! connections together get the rate, and a chunk of one waits behind what the other already put
//! on the wire (a FIFO bottleneck queue). Without a rate the release time is simply `read time +
//! delay`. The writer sleeps on the queue's condition variable until shortly before the head
//! chunk's release time (with a 1 ns timer slack) and spins the rest; how early it wakes is
//! learned from how late its timed waits return ([`WakeMargin`]), so chunks leave a few
//! microseconds late, not a timer tick late. Chunks are at most 64 KiB and at most ~1 ms of
//! serialisation time, so a slow link releases bytes smoothly rather than in bursts.
//!
//! Each queue (one per connection and direction) holds at most `buffer` bytes (default
//! max(4 MiB, 2 × rate × delay)); when it is full the reader stops reading, so TCP backpressure
//! reaches the sender and nothing is dropped. Without `--rate` the throughput of one connection
//! in one direction is therefore at most `buffer / delay`.
//! EOF on one side becomes `shutdown(SHUT_WR)` on the other once the queued bytes are written
//! (half-close); an error on any socket closes both sockets of the pair and is logged.
//!
//! [`spawn`] runs a link in-process and returns a [`LinkHandle`]; dropping it (or
//! [`LinkHandle::stop`]) closes the listener and every connection and joins all threads.
//!
//! Faults, for failure drills, at run time: from Rust with the [`LinkHandle`] methods, or over a
//! Unix control socket (`--control PATH`, the VM's protocol: one JSON object per line, served by
//! [`ControlServer`], so `tsubame ctl PATH COMMAND k=v` talks to it). Every command replies
//! with what `query-link` reports: params, state, connections, bytes per direction, faults.
//!
//! - `cut ms=N`: nothing moves in either direction for N ms, then the link carries on by
//!   itself. Readers stop reading and writers stop writing, so the senders' TCP backs up
//!   (their writes block once the socket buffers are full); connections stay open and no byte
//!   is lost. Bytes that were already in linkem's queues go out when the cut ends (their
//!   release time has passed), like segments retransmitted after an outage.
//! - `blackhole`: the same silence without an end, until `restore`. The peers are told
//!   nothing (no FIN, no RST, no byte); only their own timeouts notice. Bytes are neither
//!   read nor discarded: a silent network does not acknowledge what it does not deliver,
//!   so the senders see their writes stall, as they would, and a restored link delivers
//!   everything (TCP would have retransmitted it).
//! - `drop`: every connection is closed (FIN to both peers) and new ones are accepted and
//!   reset at once, until `restore`.
//! - `reset`: both sockets of every open connection are closed with SO_LINGER 0, so both peers
//!   get an RST (ECONNRESET); the link stays up for new connections.
//! - `restore`: ends a cut, a blackhole or a drop.
//! - `set delay=D rate=R`: a new delay and/or rate (`rate=none`: unlimited) for the bytes read
//!   from then on; bytes already queued keep their release times.
//! - `query-link`: the state alone.
//!
//! The state the forwarding threads look at is one atomic per link, read once per chunk (the
//! fault's details sit behind a mutex only a faulted link touches); a command that changes it
//! wakes every thread waiting on a queue, under that queue's lock, so none misses it. The
//! readers copy the params and look at them again only when a generation counter has moved.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use log::{debug, info, warn};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};
use tsubame_vmm::control::{CommandError, CommandHandler, ControlServer};

/// Emulate a wide-area TCP link: one-way delay and bandwidth in each direction.
///
/// Accepts any number of TCP connections on --listen and forwards each one to --connect. Each
/// direction delays every byte by --delay and, with --rate, serialises it at that bandwidth, so a
/// request/response round trip costs 2 x delay plus serialisation, like a real link. The rate is
/// per direction and shared by all connections, as on one physical link. When a connection's
/// buffer is full, linkem stops reading it (TCP backpressure) instead of dropping.
/// Prints one line on stderr once it listens (after one for the control socket, if any); runs
/// until SIGINT or SIGTERM.
///
/// With --control PATH, faults can be injected at run time with `tsubame ctl PATH COMMAND`:
///   query-link         params, state, connections, bytes per direction, faults so far
///   cut ms=N           nothing moves either way for N ms (senders back up, nothing is lost)
///   blackhole          the same silence until restore: no byte, no FIN, no RST
///   drop               close every connection; reset new ones at once until restore
///   reset              send an RST to both peers of every open connection (ECONNRESET)
///   restore            end a cut, a blackhole or a drop
///   set [delay=D] [rate=R|none]   change the delay and/or rate for bytes read from now on
///
/// Examples:
///   tsubame linkem --listen 127.0.0.1:5444 --connect 127.0.0.1:4444 --delay 16ms --rate 1Gbit
///   tsubame linkem --listen 127.0.0.1:0 --connect 10.0.0.2:4444 --delay 500us   (prints the port)
///   tsubame ctl /tmp/src.sock migrate uri=tcp:127.0.0.1:5444   (migrate through the link)
///   tsubame linkem --listen 127.0.0.1:5444 --connect 127.0.0.1:4444 --delay 16ms \
///     --control /tmp/link.sock
///   tsubame ctl /tmp/link.sock cut ms=2000          (a 2 s outage during the migration)
///   tsubame ctl /tmp/link.sock set delay=50ms rate=100Mbit
///   tsubame ctl /tmp/link.sock drop                 (... then: restore)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct LinkemArgs {
    /// Address to accept connections on, HOST:PORT; port 0 picks a free port (printed).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Address each accepted connection is forwarded to, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: String,
    /// One-way delay added in each direction: 0, 500us, 4ms, 1.5ms, 1s.
    #[arg(long, value_parser = parse_delay)]
    pub delay: Duration,
    /// Bandwidth of each direction, shared by all connections: 100Mbit, 1Gbit, 10Gbit
    /// (bits/s), or 500MB (bytes/s); decimal multiples. Unlimited when not given.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Bytes queued per connection and direction before linkem stops reading, e.g. 4M, 64M
    /// [default: max(4M, 2 x rate x delay)]. Without --rate it bounds throughput to
    /// buffer / delay.
    #[arg(long, value_parser = parse_buffer)]
    pub buffer: Option<usize>,
    /// Serve the fault-injection commands (above) on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// What a link does to the bytes that cross it, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// One-way delay added to every byte.
    pub delay: Duration,
    /// Bandwidth of each direction in bits per second, shared by all connections; `None` =
    /// unlimited.
    pub rate: Option<u64>,
    /// Bytes queued per connection and direction before reading stops; `None` = max(4 MiB,
    /// 2 × rate × delay).
    pub buffer: Option<usize>,
}

impl LinkParams {
    /// The queue bound of one connection in one direction (at least 4 KiB).
    pub fn buffer_bytes(&self) -> usize {
        let buffer = self.buffer.unwrap_or_else(|| {
            let bdp = self.rate.map_or(0, |bps| {
                let bytes = u128::from(bps) / 8 * self.delay.as_nanos() / 1_000_000_000;
                usize::try_from(bytes.saturating_mul(2)).unwrap_or(usize::MAX)
            });
            bdp.max(DEFAULT_BUFFER)
        });
        buffer.max(MIN_BUFFER)
    }

    /// The largest chunk read at once: 64 KiB, or ~1 ms of serialisation at the rate, and never
    /// more than the buffer.
    fn chunk_bytes(&self) -> usize {
        let by_rate = self.rate.map_or(MAX_CHUNK, |bps| {
            usize::try_from(bps / 8 / 1000).unwrap_or(MAX_CHUNK)
        });
        by_rate.clamp(MIN_CHUNK, MAX_CHUNK).min(self.buffer_bytes())
    }

    /// Serialisation time of `len` bytes at the rate (zero when unlimited), rounded up.
    fn serialisation(&self, len: usize) -> Duration {
        self.rate.map_or(Duration::ZERO, |bps| {
            let bits = u128::try_from(len).unwrap_or(u128::MAX).saturating_mul(8);
            let nanos = bits.saturating_mul(1_000_000_000).div_ceil(u128::from(bps));
            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        })
    }
}

impl fmt::Display for LinkParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} one-way delay", format_delay(self.delay))?;
        if let Some(bps) = self.rate {
            write!(f, ", rate {}", format_rate(bps))?;
        }
        Ok(())
    }
}

const DEFAULT_BUFFER: usize = 4 << 20;
const MIN_BUFFER: usize = 4 << 10;
const MAX_CHUNK: usize = 64 << 10;
const MIN_CHUNK: usize = 1500;
/// How long a connection to the target may take before the client's connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DELAY: Duration = Duration::from_secs(60);

/// Parses a one-way delay: `0`, or a number with a unit `ns`, `us`, `ms` or `s` (e.g. `500us`,
/// `4ms`, `1.5ms`, `1s`).
pub fn parse_delay(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("'{s}' is not a delay; write 0 or a number with a unit: 500us, 4ms, 1.5ms or 1s")
    };
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit_ns) = [
        ("ns", 1.0),
        ("us", 1e3),
        ("µs", 1e3),
        ("ms", 1e6),
        ("s", 1e9),
    ]
    .into_iter()
    .find_map(|(unit, ns)| t.strip_suffix(unit).map(|n| (n, ns)))
    .ok_or_else(bad)?;
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    let nanos = (v * unit_ns).round();
    #[allow(clippy::cast_precision_loss)] // a 60 s bound in nanoseconds is exact in f64
    if nanos > MAX_DELAY.as_nanos() as f64 {
        return Err(format!(
            "delay '{s}' is longer than {}s",
            MAX_DELAY.as_secs()
        ));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // finite, 0..=60e9
    Ok(Duration::from_nanos(nanos as u64))
}

/// Parses a bandwidth into bits per second: a number with `bit`, `Kbit`, `Mbit`, `Gbit`
/// (bits/s) or `B`, `KB`, `MB`, `GB` (bytes/s), decimal multiples, e.g. `100Mbit`, `1Gbit`,
/// `500MB`, `1.5Gbit`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "'{s}' is not a rate; write a number with a unit: 100Mbit, 1Gbit, 10Gbit (bits/s) \
             or 500MB (bytes/s)"
        )
    };
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (rest, unit_bits) = if let Some(r) = lower.strip_suffix("bit") {
        (&t[..r.len()], 1.0)
    } else if let Some(r) = t.strip_suffix('B') {
        (r, 8.0)
    } else {
        return Err(bad());
    };
    let (num, mult) = match rest.chars().last() {
        Some('k' | 'K') => (&rest[..rest.len() - 1], 1e3),
        Some('m' | 'M') => (&rest[..rest.len() - 1], 1e6),
        Some('g' | 'G') => (&rest[..rest.len() - 1], 1e9),
        Some('t' | 'T') => (&rest[..rest.len() - 1], 1e12),
        _ => (rest, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let bps = (v * mult * unit_bits).round();
    if !bps.is_finite() || bps < 8000.0 {
        return Err(format!(
            "rate '{s}' is too low: at least 8Kbit (1KB); leave --rate out for an unlimited link"
        ));
    }
    if bps > 1e13 {
        return Err(format!("rate '{s}' is above 10Tbit"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // finite, 8e3..=1e13
    Ok(bps as u64)
}

fn parse_buffer(s: &str) -> Result<usize, String> {
    let v = tsubame_vmm::guest::parse_size(s)?;
    let v = usize::try_from(v).map_err(|_| format!("buffer '{s}' is too large"))?;
    if v < MIN_BUFFER {
        return Err(format!("buffer '{s}' is too small: at least 4K"));
    }
    Ok(v)
}

fn format_delay(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0ms".into()
    } else if ns % 1_000_000 == 0 {
        format!("{}ms", ns / 1_000_000)
    } else if ns % 1000 == 0 && ns > 1_000_000 {
        #[allow(clippy::cast_precision_loss)] // whole microseconds below 60 s are exact in f64
        let ms = ns as f64 / 1e6;
        format!("{ms}ms")
    } else if ns % 1000 == 0 {
        format!("{}us", ns / 1000)
    } else {
        format!("{ns}ns")
    }
}

fn format_rate(bps: u64) -> String {
    for (div, unit) in [(1_000_000_000, "Gbit"), (1_000_000, "Mbit"), (1000, "Kbit")] {
        if bps % div == 0 {
            return format!("{}{unit}", bps / div);
        }
    }
    format!("{bps}bit")
}

fn resolve(what: &str, s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| {
            format!("{what} {s}: not an address; write HOST:PORT, e.g. 127.0.0.1:4444")
        })?
        .next()
        .ok_or_else(|| anyhow!("{what} {s}: the name has no address"))
}

/// `tsubame linkem`: forward until SIGINT or SIGTERM.
pub fn linkem(a: &LinkemArgs) -> Result<i32> {
    let listen = resolve("--listen", &a.listen)?;
    let connect = resolve("--connect", &a.connect)?;
    let params = LinkParams {
        delay: a.delay,
        rate: a.rate,
        buffer: a.buffer,
    };
    // Block the signals before any thread exists, so every thread inherits the mask and only
    // the sigwait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;
    let (bound, link) = spawn(listen, connect, params)?;
    let control = match &a.control {
        Some(path) => {
            let server = link.serve_control(path)?;
            eprintln!("tsubame linkem: control socket ready at {}", path.display());
            Some(server)
        }
        None => None,
    };
    eprintln!("tsubame linkem: forwarding {bound} -> {connect} with {params}");
    let signal = signals.wait().context("waiting for SIGINT or SIGTERM")?;
    drop(control);
    link.stop();
    eprintln!("tsubame linkem: stopped by {signal}");
    Ok(0)
}

/// A running link; dropping it (or [`LinkHandle::stop`]) closes the listener and every
/// connection and joins all its threads. That takes a moment, except while a connection to the
/// target is still being set up (up to the 5 s connect timeout).
#[derive(Debug)]
pub struct LinkHandle {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

// The fault-injection methods are the API of Rust drills; the binary itself only uses the
// control socket, which serves the same operations.
#[allow(dead_code)]
impl LinkHandle {
    /// Where it is now and what it has done: params, state, connections, bytes, faults.
    pub fn status(&self) -> LinkStatus {
        self.shared.status()
    }

    /// Cuts the link for `d`: no byte moves in either direction (the senders' TCP backs up,
    /// connections stay open), then everything queued flows on. A later fault or `restore`
    /// ends the cut early.
    pub fn cut(&self, d: Duration) {
        self.shared.cut(d);
    }

    /// Closes every connection (FIN) and resets new ones at once, until [`Self::restore`].
    pub fn drop_link(&self) {
        self.shared.drop_link();
    }

    /// Sends an RST to both peers of every open connection; new connections still work.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Silence until [`Self::restore`]: like a cut without an end.
    pub fn blackhole(&self) {
        self.shared.blackhole();
    }

    /// Ends a cut, a blackhole or a drop.
    pub fn restore(&self) {
        self.shared.restore();
    }

    /// Changes the delay and/or the rate (`Some(None)`: unlimited) for bytes read from now on.
    pub fn set(&self, delay: Option<Duration>, rate: Option<Option<u64>>) -> LinkParams {
        self.shared.set_params(delay, rate)
    }

    /// Serves the link's commands (`query-link`, `cut`, ...) on a Unix socket at `path`.
    pub fn serve_control(&self, path: &Path) -> Result<ControlServer> {
        let handler = Arc::new(LinkCommands(Arc::clone(&self.shared)));
        ControlServer::start(path, handler).map_err(Into::into)
    }

    /// Stops the link: no new connections, every open one is closed (queued bytes are dropped).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return; // stopped already
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket makes a blocked accept() fail with EINVAL on Linux.
        if let Err(e) = nix::sys::socket::shutdown(
            self.shared.listener.as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        ) {
            warn!("linkem: shutting down the listening socket: {e}");
        }
        if acceptor.join().is_err() {
            warn!("linkem: the acceptor thread panicked");
        }
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Commands of a link's control socket.
pub const LINK_COMMANDS: &[&str] = &[
    "query-link",
    "cut",
    "drop",
    "reset",
    "blackhole",
    "restore",
    "set",
];

/// Serves a link's control socket.
#[derive(Debug)]
struct LinkCommands(Arc<Shared>);

/// A string argument (numbers are taken as written, so `delay=0` works from `tsubame ctl`).
fn arg_str(args: &Value, key: &str) -> Option<String> {
    match args.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some("none".into()),
        other => Some(other.to_string()),
    }
}

impl CommandHandler for LinkCommands {
    fn commands(&self) -> Vec<&'static str> {
        LINK_COMMANDS.to_vec()
    }

    fn execute(&self, command: &str, args: &Value) -> Result<Value, CommandError> {
        let link = &self.0;
        match command {
            "query-link" => {}
            "cut" => {
                let ms = args.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                    CommandError::invalid("cut needs 'ms', how long in milliseconds, e.g. ms=2000")
                })?;
                link.cut(Duration::from_millis(ms));
            }
            "drop" => link.drop_link(),
            "reset" => link.reset(),
            "blackhole" => link.blackhole(),
            "restore" => link.restore(),
            "set" => {
                let delay = arg_str(args, "delay")
                    .map(|d| parse_delay(&d))
                    .transpose()
                    .map_err(CommandError::invalid)?;
                let rate = arg_str(args, "rate")
                    .map(|r| match r.as_str() {
                        "none" | "unlimited" => Ok(None),
                        r => parse_rate(r).map(Some),
                    })
                    .transpose()
                    .map_err(CommandError::invalid)?;
                if delay.is_none() && rate.is_none() {
                    return Err(CommandError::invalid(
                        "set needs 'delay' (e.g. 16ms) and/or 'rate' (e.g. 1Gbit, or none)",
                    ));
                }
                link.set_params(delay, rate);
            }
            other => {
                return Err(CommandError {
                    class: "CommandNotFound",
                    desc: format!(
                        "unknown command '{other}'; known commands: {}",
                        LINK_COMMANDS.join(", ")
                    ),
                })
            }
        }
        Ok(link.status().to_json())
    }
}

/// Starts a link that accepts on `listen` and forwards every connection to `connect`. Returns
/// the bound address (useful with port 0) and the handle that keeps it running.
pub fn spawn(
    listen: SocketAddr,
    connect: SocketAddr,
    params: LinkParams,
) -> Result<(SocketAddr, LinkHandle)> {
    let listener = TcpListener::bind(listen).with_context(|| {
        format!("cannot listen on {listen}: pick another address or port (port 0 picks a free one)")
    })?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let shared = Arc::new(Shared {
        listener,
        connect,
        params: Mutex::new(params),
        params_gen: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        conns: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(1),
        wire_free: [Mutex::new(Instant::now()), Mutex::new(Instant::now())],
        state: AtomicU8::new(UP),
        fault: Mutex::new(Fault::default()),
        forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
    });
    let acceptor = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("linkem-accept".into())
            .spawn(move || accept_loop(&shared))
            .context("starting the linkem acceptor thread")?
    };
    Ok((
        bound,
        LinkHandle {
            shared,
            acceptor: Some(acceptor),
        },
    ))
}

#[derive(Debug)]
struct Shared {
    listener: TcpListener,
    connect: SocketAddr,
    /// Changed at run time by `set`; readers copy them and look again when `params_gen` moves.
    params: Mutex<LinkParams>,
    params_gen: AtomicU64,
    stopping: AtomicBool,
    /// Established pairs, to close them on stop.
    conns: Mutex<Vec<Weak<Conn>>>,
    next_id: AtomicU64,
    /// When the emulated wire of each direction ([`Dir`] as index) has serialised everything
    /// reserved on it so far: all connections share the link's bandwidth, as on a real link.
    wire_free: [Mutex<Instant>; 2],
    /// [`UP`], [`PAUSED`] or [`DROPPED`]: the one thing the forwarding threads look at per chunk.
    state: AtomicU8,
    /// The details of the fault, changed only under this lock.
    fault: Mutex<Fault>,
    /// Bytes written out per direction ([`Dir`] as index).
    forwarded: [AtomicU64; 2],
}

/// The link carries bytes.
const UP: u8 = 0;
/// Cut or blackholed: no thread reads or writes ([`Fault::until`] says until when).
const PAUSED: u8 = 1;
/// Dropped: no connections at all until `restore`.
const DROPPED: u8 = 2;

#[derive(Debug, Default)]
struct Fault {
    /// While [`PAUSED`]: the end of the cut, or `None` for a blackhole (until `restore`).
    until: Option<Instant>,
    counts: FaultCounts,
}

/// How many faults a link has been given so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FaultCounts {
    pub cuts: u64,
    pub drops: u64,
    pub resets: u64,
    pub blackholes: u64,
    pub restores: u64,
    pub sets: u64,
}

/// What a link is doing to its connections right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Carrying bytes.
    Up,
    /// Cut: nothing moves for `left` more, then the link comes back by itself.
    Cut { left: Duration },
    /// Silent until `restore`: nothing moves, connections stay open, nobody is told.
    Blackhole,
    /// Every connection closed, new ones reset at once, until `restore`.
    Dropped,
}

impl LinkState {
    /// The name `query-link` reports: `up`, `cut`, `blackhole` or `dropped`.
    pub fn name(&self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Cut { .. } => "cut",
            LinkState::Blackhole => "blackhole",
            LinkState::Dropped => "dropped",
        }
    }
}

/// A snapshot of a link, as `query-link` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub listen: SocketAddr,
    pub connect: SocketAddr,
    pub params: LinkParams,
    pub state: LinkState,
    /// Connections open now, and accepted since the start (not counting those reset at once
    /// while the link was dropped).
    pub open_connections: usize,
    pub accepted_connections: u64,
    /// Bytes delivered client -> target and target -> client.
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
    pub faults: FaultCounts,
}

impl LinkStatus {
    /// The `query-link` reply.
    pub fn to_json(&self) -> Value {
        let cut_left_ms = match self.state {
            LinkState::Cut { left } => Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
            _ => None,
        };
        json!({
            "listen": self.listen.to_string(),
            "connect": self.connect.to_string(),
            "delay": format_delay(self.params.delay),
            "rate": self.params.rate.map(format_rate),
            "buffer": self.params.buffer_bytes(),
            "state": self.state.name(),
            "cut_left_ms": cut_left_ms,
            "connections": {"open": self.open_connections, "accepted": self.accepted_connections},
            "bytes": {"to_target": self.bytes_to_target, "to_client": self.bytes_to_client},
            "faults": self.faults,
        })
    }
}

impl Shared {
    /// `Some(end)` while the link is cut (`end` = `Some`) or blackholed (`None`). One atomic
    /// load when the link is up; an expired cut is cleared here.
    fn paused(&self) -> Option<Option<Instant>> {
        if self.state.load(Ordering::Acquire) != PAUSED {
            return None;
        }
        let mut f = lock(&self.fault);
        match f.until {
            Some(end) if end <= Instant::now() => {
                let _ =
                    self.state
                        .compare_exchange(PAUSED, UP, Ordering::AcqRel, Ordering::Acquire);
                f.until = None;
                None
            }
            until if self.state.load(Ordering::Acquire) == PAUSED => Some(until),
            _ => None,
        }
    }

    fn open_conns(&self) -> Vec<Arc<Conn>> {
        lock(&self.conns).iter().filter_map(Weak::upgrade).collect()
    }

    /// Wakes every forwarding thread waiting on a queue, so it looks at the state again.
    fn wake_all(&self) {
        for conn in self.open_conns() {
            conn.up.wake();
            conn.down.wake();
        }
    }

    fn set_state(&self, state: u8, until: Option<Instant>, count: impl FnOnce(&mut FaultCounts)) {
        {
            let mut f = lock(&self.fault);
            f.until = until;
            count(&mut f.counts);
            self.state.store(state, Ordering::Release);
        }
        self.wake_all();
    }

    fn cut(&self, d: Duration) {
        info!("linkem: cut for {}", format_delay(d));
        self.set_state(PAUSED, Some(Instant::now() + d), |c| c.cuts += 1);
    }

    fn blackhole(&self) {
        info!("linkem: blackhole until restore");
        self.set_state(PAUSED, None, |c| c.blackholes += 1);
    }

    fn restore(&self) {
        info!("linkem: restored");
        self.set_state(UP, None, |c| c.restores += 1);
    }

    fn drop_link(&self) {
        info!("linkem: dropped: closing every connection, refusing new ones until restore");
        self.set_state(DROPPED, None, |c| c.drops += 1);
        for conn in self.open_conns() {
            conn.abort();
        }
    }

    fn reset(&self) {
        let conns = self.open_conns();
        info!("linkem: resetting {} connections", conns.len());
        lock(&self.fault).counts.resets += 1;
        for conn in conns {
            conn.reset();
        }
    }

    fn set_params(&self, delay: Option<Duration>, rate: Option<Option<u64>>) -> LinkParams {
        let mut p = lock(&self.params);
        if let Some(d) = delay {
            p.delay = d;
        }
        if let Some(r) = rate {
            p.rate = r;
        }
        lock(&self.fault).counts.sets += 1;
        self.params_gen.fetch_add(1, Ordering::Release);
        info!("linkem: now {p}");
        *p
    }

    fn status(&self) -> LinkStatus {
        let (state, counts) = {
            let f = lock(&self.fault);
            let state = match (self.state.load(Ordering::Acquire), f.until) {
                (DROPPED, _) => LinkState::Dropped,
                (PAUSED, None) => LinkState::Blackhole,
                (PAUSED, Some(end)) if end > Instant::now() => LinkState::Cut {
                    left: end - Instant::now(),
                },
                _ => LinkState::Up,
            };
            (state, f.counts)
        };
        LinkStatus {
            listen: self.listener.local_addr().unwrap_or(self.connect),
            connect: self.connect,
            params: *lock(&self.params),
            state,
            open_connections: self.open_conns().len(),
            accepted_connections: self.next_id.load(Ordering::Relaxed) - 1,
            bytes_to_target: self.forwarded[Dir::Up as usize].load(Ordering::Relaxed),
            bytes_to_client: self.forwarded[Dir::Down as usize].load(Ordering::Relaxed),
            faults: counts,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking forwarding thread must not take the others down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(shared: &Arc<Shared>) {
    let mut setups: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match shared.listener.accept() {
            Ok((client, peer)) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if shared.state.load(Ordering::Acquire) == DROPPED {
                    debug!("linkem: dropped: resetting the connection from {peer}");
                    set_linger_zero(&client);
                    continue; // dropping `client` sends the RST
                }
                setups.retain(|h| !h.is_finished());
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let s = Arc::clone(shared);
                match std::thread::Builder::new()
                    .name(format!("linkem-{id}"))
                    .spawn(move || run_connection(&s, id, client, peer))
                {
                    Ok(h) => setups.push(h),
                    Err(e) => warn!("linkem: connection {id} from {peer}: no thread for it: {e}"),
                }
            }
            Err(_) if shared.stopping.load(Ordering::SeqCst) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on the same error.
                warn!("linkem: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for conn in shared.open_conns() {
        conn.abort();
    }
    for h in setups {
        let _ = h.join();
    }
}

/// One forwarded connection: the client's socket, the target's socket and a queue per direction.
#[derive(Debug)]
struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    /// client -> server
    up: Queue,
    /// server -> client
    down: Queue,
    aborted: AtomicBool,
}

impl Conn {
    /// Closes both sockets and wakes every thread of the pair.
    fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
        self.up.abort();
        self.down.abort();
    }

    /// Resets both sockets: the peers see ECONNRESET, not an EOF. SO_LINGER 0 makes the close
    /// send an RST; shutdown(SHUT_RD) wakes the readers without sending anything, and the
    /// sockets close (with the RST) once the four threads of the pair have let go of them. A
    /// writer blocked in write(2) towards a peer that does not read holds on until it can write.
    fn reset(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in [&self.client, &self.server] {
            set_linger_zero(s);
        }
        self.up.abort();
        self.down.abort();
        for s in [&self.client, &self.server] {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// Logs why the pair ends (unless it is ending already) and aborts it.
    fn fail(&self, what: &str, e: &io::Error) {
        if !self.aborted.load(Ordering::SeqCst) {
            // A reset or a write to a closed socket is how a peer that does not read to the end
            // says goodbye: worth a line at info level, not a warning.
            let level = match e.kind() {
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => log::Level::Info,
                _ => log::Level::Warn,
            };
            log::log!(
                level,
                "linkem: connection {}: {what}: {e}; closing it",
                self.id
            );
        }
        self.abort();
    }
}

/// SO_LINGER 0: closing the socket sends an RST instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger) {
        warn!("linkem: setting SO_LINGER: {e}");
    }
}

fn run_connection(shared: &Arc<Shared>, id: u64, client: TcpStream, peer: SocketAddr) {
    let server = match TcpStream::connect_timeout(&shared.connect, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            warn!(
                "linkem: connection {id} from {peer}: cannot connect to {}: {e}; closing it",
                shared.connect
            );
            return;
        }
    };
    for s in [&client, &server] {
        if let Err(e) = s.set_nodelay(true) {
            warn!("linkem: connection {id}: setting TCP_NODELAY: {e}");
        }
    }
    info!("linkem: connection {id}: {peer} -> {}", shared.connect);
    let conn = Arc::new(Conn {
        id,
        client,
        server,
        up: Queue::new(),
        down: Queue::new(),
        aborted: AtomicBool::new(false),
    });
    {
        let mut conns = lock(&shared.conns);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    // Registered before this check, so a stop (or drop) either sees the connection or is seen
    // here.
    if shared.stopping.load(Ordering::SeqCst) || shared.state.load(Ordering::Acquire) == DROPPED {
        return;
    }
    let mut workers = Vec::with_capacity(4);
    for (name, dir, writer) in [
        ("up-rd", Dir::Up, false),
        ("up-wr", Dir::Up, true),
        ("dn-rd", Dir::Down, false),
        ("dn-wr", Dir::Down, true),
    ] {
        let c = Arc::clone(&conn);
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("lk{id}-{name}"))
            .spawn(move || {
                if writer {
                    write_loop(&c, dir, &s);
                } else {
                    read_loop(&c, dir, &s);
                }
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                conn.fail("starting a forwarding thread", &e);
                break;
            }
        }
    }
    drop(conn);
    for w in workers {
        let _ = w.join();
    }
    debug!("linkem: connection {id} closed");
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up = 0,
    Down = 1,
}

impl Conn {
    /// (source socket, destination socket, queue) of a direction.
    fn dir(&self, d: Dir) -> (&TcpStream, &TcpStream, &Queue) {
        match d {
            Dir::Up => (&self.client, &self.server, &self.up),
            Dir::Down => (&self.server, &self.client, &self.down),
        }
    }
}

#[derive(Debug)]
struct Chunk {
    release: Instant,
    data: Vec<u8>,
}

/// The bytes in flight in one direction.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when the queue gets its first chunk, EOF, or is aborted (the writer waits).
    ready: Condvar,
    /// Signalled when bytes leave the queue, or it is aborted (the reader waits).
    space: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    chunks: VecDeque<Chunk>,
    /// Bytes read and not yet written, including the chunk being written.
    bytes: usize,
    eof: bool,
    aborted: bool,
}

impl Queue {
    fn new() -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            space: Condvar::new(),
        }
    }

    /// Wakes the reader and the writer. Under the lock, so that a thread that has just seen the
    /// old link state and is about to wait cannot miss it.
    fn wake(&self) {
        let _st = lock(&self.state);
        self.ready.notify_all();
        self.space.notify_all();
    }

    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.ready.notify_all();
        self.space.notify_all();
    }
}

/// Waits on `cv` until `end` (`None`: until notified).
fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    end: Option<Instant>,
) -> MutexGuard<'a, T> {
    match end {
        Some(end) => {
            cv.wait_timeout(guard, end.saturating_duration_since(Instant::now()))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0
        }
        None => cv
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    }
}

fn read_loop(conn: &Conn, dir: Dir, shared: &Shared) {
    let (mut src, _, queue) = conn.dir(dir);
    let wire_free = &shared.wire_free[dir as usize];
    let mut gen = shared.params_gen.load(Ordering::Acquire);
    let mut params = *lock(&shared.params);
    let mut capacity = params.buffer_bytes();
    let mut chunk = params.chunk_bytes();
    let mut buf = vec![0u8; chunk];
    loop {
        buf.resize(chunk, 0); // no-op unless `set` changed the chunk size
        {
            let mut st = lock(&queue.state);
            loop {
                if st.aborted {
                    return;
                }
                if let Some(end) = shared.paused() {
                    // Cut or blackholed: stop reading, so the sender's TCP backs up.
                    st = wait_until(&queue.space, st, end);
                } else if st.bytes + chunk > capacity {
                    st = queue
                        .space
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                } else {
                    break;
                }
            }
        }
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return conn.fail("reading", &e),
        };
        if shared.params_gen.load(Ordering::Acquire) != gen {
            // `set` changed the delay or the rate: bytes read from now on get the new ones
            // (checked after the read, which may have waited long for them).
            gen = shared.params_gen.load(Ordering::Acquire);
            params = *lock(&shared.params);
            capacity = params.buffer_bytes();
            chunk = params.chunk_bytes();
        }
        let now = Instant::now();
        let release = if params.rate.is_some() && n > 0 {
            // Reserve the chunk's serialisation time on the wire, after what is already on it.
            let mut free = lock(wire_free);
            *free = (*free).max(now) + params.serialisation(n);
            *free + params.delay
        } else {
            now + params.delay
        };
        let mut st = lock(&queue.state);
        let was_empty = st.chunks.is_empty();
        if n == 0 {
            st.eof = true;
        } else {
            st.bytes += n;
            st.chunks.push_back(Chunk {
                release,
                data: buf[..n].to_vec(),
            });
        }
        drop(st);
        if was_empty {
            queue.ready.notify_one();
        }
        if n == 0 {
            return;
        }
    }
}

fn write_loop(conn: &Conn, dir: Dir, shared: &Shared) {
    let (_, mut dst, queue) = conn.dir(dir);
    // Timers of this thread fire on time rather than up to 50 us late (the default slack).
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        debug!("linkem: PR_SET_TIMERSLACK: {e}");
    }
    let mut margin = WakeMargin::new();
    loop {
        let chunk = {
            let mut st = lock(&queue.state);
            loop {
                if st.aborted {
                    return;
                }
                if let Some(end) = shared.paused() {
                    // Cut or blackholed: hold the queued bytes (and a pending half-close).
                    st = wait_until(&queue.ready, st, end);
                    continue;
                }
                let now = Instant::now();
                match st.chunks.front() {
                    Some(c) if c.release <= now + margin.get() => break,
                    Some(c) => {
                        let wake = c.release - margin.get();
                        let (guard, timeout) = queue
                            .ready
                            .wait_timeout(st, wake - now)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        st = guard;
                        if timeout.timed_out() {
                            margin.observe(Instant::now().saturating_duration_since(wake));
                        }
                    }
                    None if st.eof => {
                        drop(st);
                        debug!("linkem: connection {}: {dir:?} half-closed", conn.id);
                        if let Err(e) = dst.shutdown(Shutdown::Write) {
                            conn.fail("passing on the half-close", &e);
                        }
                        return;
                    }
                    None => {
                        st = queue
                            .ready
                            .wait(st)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
            }
            st.chunks.pop_front().expect("the head chunk checked above")
        };
        while Instant::now() < chunk.release {
            std::hint::spin_loop();
        }
        if let Err(e) = dst.write_all(&chunk.data) {
            return conn.fail("writing", &e);
        }
        shared.forwarded[dir as usize].fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
        lock(&queue.state).bytes -= chunk.data.len();
        queue.space.notify_one();
    }
}

/// How long before a release time the writer stops sleeping and starts spinning. Learned from
/// how late this thread's timed waits really return (idle states and, in a VM, the host's timer
/// make that 5-150 us), so the spin absorbs the wake-up latency without burning more CPU than
/// it must.
#[derive(Debug)]
struct WakeMargin {
    late_ns: u64,
}

impl WakeMargin {
    const MIN: u64 = 20_000;
    const MAX: u64 = 1_000_000;

    fn new() -> Self {
        Self { late_ns: 50_000 }
    }

    /// 1.5 x the average lateness plus 20 us.
    fn get(&self) -> Duration {
        Duration::from_nanos((self.late_ns * 3 / 2 + Self::MIN).min(Self::MAX))
    }

    /// Records how late a timed wait returned (a moving average over ~8 waits).
    fn observe(&mut self, late: Duration) {
        let late = u64::try_from(late.as_nanos())
            .unwrap_or(u64::MAX)
            .min(Self::MAX);
        self.late_ns = (self.late_ns * 7 + late) / 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse() {
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert_eq!(parse_delay("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_delay("4ms"), Ok(Duration::from_millis(4)));
        assert_eq!(parse_delay("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_delay("1s"), Ok(Duration::from_secs(1)));
        for bad in ["5", "5 parsecs", "-1ms", "ms", "1h", "nanms", "100s"] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
        assert!(parse_delay("5 parsecs").unwrap_err().contains("500us, 4ms"));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("10gbit"), Ok(10_000_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("500MB"), Ok(4_000_000_000));
        for bad in ["1G", "100Mb", "fast", "0Mbit", "1bit", "Gbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    /// A link with `delay` to a fresh target, and one connection through it: (the link's
    /// address, the link, the client's end, the target's end).
    fn connected(delay: Duration) -> (SocketAddr, LinkHandle, TcpStream, TcpStream) {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let params = LinkParams {
            delay,
            rate: None,
            buffer: None,
        };
        let (addr, link) = spawn(
            "127.0.0.1:0".parse().unwrap(),
            target.local_addr().unwrap(),
            params,
        )
        .unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = target.accept().unwrap();
        (addr, link, client, server)
    }

    #[test]
    fn stopping_closes_open_connections() {
        let (addr, link, mut client, mut server) = connected(Duration::from_secs(1));
        client.write_all(b"still in flight").unwrap();
        // Joins every thread, although the writer waits for a release a second away.
        link.stop();
        let mut buf = [0u8; 32];
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
        assert!(matches!(server.read(&mut buf), Ok(0) | Err(_)));
        assert!(TcpStream::connect(addr).is_err(), "still accepting");
    }

    /// The in-process handle offers the faults of the control socket.
    #[test]
    fn the_handle_injects_faults() {
        let (_, link, mut client, mut server) = connected(Duration::ZERO);
        link.blackhole();
        assert_eq!(link.status().state, LinkState::Blackhole);
        client.write_all(b"held").unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(server.read(&mut buf).is_err(), "bytes crossed a blackhole");
        link.cut(Duration::from_millis(100));
        assert!(matches!(link.status().state, LinkState::Cut { .. }));
        server.set_read_timeout(None).unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"held");
        assert_eq!(link.status().state, LinkState::Up);
        let p = link.set(Some(Duration::from_millis(2)), Some(Some(80_000_000)));
        assert_eq!(p.to_string(), "2ms one-way delay, rate 80Mbit");
        link.reset();
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        link.drop_link();
        assert_eq!(link.status().state, LinkState::Dropped);
        link.restore();
        let s = link.status();
        assert_eq!(s.state, LinkState::Up);
        assert_eq!(s.bytes_to_target, 4);
        assert_eq!(
            (
                s.faults.blackholes,
                s.faults.cuts,
                s.faults.resets,
                s.faults.drops
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn params_size_the_queue_and_chunks() {
        let p = LinkParams {
            delay: Duration::from_millis(64),
            rate: Some(10_000_000_000),
            buffer: None,
        };
        // 2 x 1.25 GB/s x 64 ms
        assert_eq!(p.buffer_bytes(), 160_000_000);
        assert_eq!(p.chunk_bytes(), MAX_CHUNK);
        assert_eq!(p.serialisation(1250), Duration::from_micros(1));
        let slow = LinkParams {
            delay: Duration::from_millis(4),
            rate: Some(80_000_000),
            buffer: None,
        };
        assert_eq!(slow.buffer_bytes(), DEFAULT_BUFFER);
        assert_eq!(slow.chunk_bytes(), 10_000);
        let odd = LinkParams {
            delay: Duration::from_micros(1500),
            ..slow
        };
        assert_eq!(odd.to_string(), "1.5ms one-way delay, rate 80Mbit");
        assert_eq!(
            slow.to_string(),
            "4ms one-way delay, rate 80Mbit".to_string()
        );
    }
}
