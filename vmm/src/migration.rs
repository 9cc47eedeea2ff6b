//! Postcopy (and hybrid) migration between two Tsubame processes over TCP.
//!
//! The source ([`Outgoing`]) connects twice to the destination (urgent and bulk channels) and
//! authenticates both connections; nothing about the VM changes until both are accepted and the
//! destination has said `Ready` (its VM is created, its receivers run), so that the downtime
//! never includes the destination's setup.
//!
//! *Precopy rounds* (optional, hybrid migration) come first, while the guest keeps running: with
//! KVM's dirty log on, round 1 sends every page on the bulk channel, each later round drops the
//! destination's stale copies of the pages written since (`Discard`) and sends them again. Each
//! round ends with `RoundDone`, which the destination acknowledges once it has installed it, so
//! the bulk channel is empty when the next round (or the switchover) starts. Rounds never have to
//! converge: whatever the guest wrote after the last one simply goes postcopy.
//!
//! *Switchover*: the source pauses the vCPUs, sends the vCPU and device state on the urgent
//! channel, then tells the destination to drop the pages written since the last round and ends
//! the precopy phase (`PrecopyDone`) on the bulk channel; the destination reads the state while
//! it drops them. Before the pause, discard-only passes have dropped what the guest wrote since
//! the last round, until a pass is small. Without precopy rounds nothing precedes
//! `PrecopyDone` on the bulk channel, and the source sends it before the pause, so that the
//! destination has it when the state arrives. From then on it is the page server of the VM: it
//! answers demand requests on the urgent channel and pushes every other page on the bulk
//! channel (address order, around faults, or hot pages first: [`Prepage`]), skipping pages
//! already sent (a "sent" bitmap), zero pages as markers. A demand request is always answered,
//! even for a page the push has queued: waiting behind the bulk stream would defeat the urgent
//! channel (such duplicates are counted). When the destination says `Complete` (every page is
//! local there), the source is done. Anything that fails before `PrecopyDone` is out leaves the
//! VM running at the source (the destination runs it only after `PrecopyDone`). The bulk
//! channel is flow-controlled ([`crate::flow`]): the destination acknowledges what it has
//! installed and the source keeps about two bandwidth-delay products in flight, so pushed pages
//! never wait long in socket buffers where a guest would fault on them. After the switchover
//! the source sends straight from guest memory (the vCPUs stay paused), and pages
//! `/proc/self/pagemap` shows were never populated go as zero markers without being read.
//!
//! The destination ([`incoming`], [`Incoming::receive`]) creates the memory (empty, under
//! userfaultfd: [`DemandPaging`]) and the KVM VM as soon as the connections are accepted, so
//! precopy pages are installed while the source still runs the guest and the switchover only
//! restores vCPUs. Once the state has arrived and the bulk channel has passed `PrecopyDone`,
//! each vCPU thread loads its state and enters the guest at once (one hand-off per vCPU in the
//! downtime), and the downtime ends when the last one does. A fault sends a `PageRequest` on
//! the urgent channel and the fault thread itself reads and installs the reply; a receiver
//! thread installs the bulk stream. Bulk pages are read straight into a slot of the staging
//! pool and moved into guest memory when the destination prepared one (it knew the layout
//! ahead: `--mem`), else copied; demand replies are always copied (see [`ReplyReader`]). If
//! the source goes away, faulting vCPUs wait and the error is reported: pages never become
//! zero behind the guest's back. The message sequence is in `tsubame_pageserver::protocol`.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pageserver::protocol::{
    self, Channel, Message, ProtocolError, Received, Region, MAX_PAGES_PER_FRAME, PROTOCOL_VERSION,
};
use tsubame_uffd::{AtomicBitmap, FaultEngine, PageSource, SourceError, StagingPool};

use crate::flow::{Acknowledger, BulkWriter, Counted};
use crate::memory::{
    for_each_page_run_hinted, GuestMemory, MemoryLayout, RegionLayout, PAGE_BYTES, PAGE_SIZE,
};
use crate::paging::DemandPaging;
use crate::snapshot::VmState;

/// Errors of migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("bad migration address '{0}': write tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444")]
    Uri(String),
    #[error("cannot connect to the destination {addr}: {source}; is `tsubame run --incoming` listening there?")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("no shared secret: pass secret=... to migrate (or --secret / TSUBAME_SECRET to tsubame run) on both hosts")]
    NoSecret,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination sent a VM state that does not parse: {0}")]
    BadState(String),
    #[error("the migration failed during {stage}: {reason}; the VM keeps running here, and may be migrated again")]
    Aborted { stage: String, reason: String },
    #[error("this VM is already migrating or migrated")]
    AlreadyMigrating,
    #[error(
        "the migration source went away before the VM arrived: {0}; the VM keeps running there"
    )]
    Lost(String),
    #[error("network I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses `tcp:HOST:PORT` into a socket address.
pub fn parse_uri(uri: &str) -> Result<SocketAddr, MigrationError> {
    let bad = || MigrationError::Uri(uri.into());
    let rest = uri.strip_prefix("tcp:").ok_or_else(bad)?;
    rest.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

fn wire_layout(l: &MemoryLayout) -> Vec<Region> {
    l.regions
        .iter()
        .map(|r| Region {
            gpa: r.gpa,
            size: r.size,
        })
        .collect()
}

fn from_wire(l: &[Region]) -> MemoryLayout {
    MemoryLayout {
        regions: l
            .iter()
            .map(|r| RegionLayout {
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
    }
}

/// Source side of the handshake on a fresh connection; returns the round trip it measured
/// (`Hello` sent -> `Accept` read).
fn handshake_source(
    s: &mut TcpStream,
    secret: &[u8],
    channel: Channel,
    session: u64,
    layout: &[Region],
    vcpus: u32,
) -> Result<Duration, MigrationError> {
    let (version, nonce_d) = match Message::read_from(s)? {
        Message::Challenge { version, nonce } => (version, nonce),
        m => return Err(ProtocolError::unexpected("Challenge", m).into()),
    };
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        }
        .into());
    }
    let nonce_s = protocol::nonce()?;
    Message::Hello {
        version: PROTOCOL_VERSION,
        channel,
        session,
        nonce: nonce_s,
        mac: protocol::source_mac(secret, &nonce_d, &nonce_s, channel, session),
        layout: layout.to_vec(),
        vcpus,
    }
    .write_to(s)?;
    let sent = Instant::now();
    match Message::read_from(s)? {
        Message::Accept { mac }
            if protocol::mac_eq(&mac, &protocol::destination_mac(secret, &nonce_s, &nonce_d)) =>
        {
            Ok(sent.elapsed())
        }
        Message::Accept { .. } => Err(ProtocolError::Auth.into()),
        m => Err(ProtocolError::unexpected("Accept", m).into()),
    }
}

/// Destination side of the handshake; returns (channel, session, layout, vCPUs).
fn handshake_destination(
    s: &mut TcpStream,
    secret: &[u8],
    expect: Option<&MemoryLayout>,
) -> Result<(Channel, u64, MemoryLayout, u32), MigrationError> {
    let nonce_d = protocol::nonce()?;
    Message::Challenge {
        version: PROTOCOL_VERSION,
        nonce: nonce_d,
    }
    .write_to(s)?;
    let refuse = |s: &mut TcpStream, e: ProtocolError| {
        let _ = Message::Error {
            message: e.to_string(),
        }
        .write_to(s);
        Err(MigrationError::from(e))
    };
    let (version, channel, session, nonce_s, mac, layout, vcpus) = match Message::read_from(s)? {
        Message::Hello {
            version,
            channel,
            session,
            nonce,
            mac,
            layout,
            vcpus,
        } => (version, channel, session, nonce, mac, layout, vcpus),
        m => {
            return refuse(
                s,
                ProtocolError::Unexpected {
                    expected: "Hello",
                    got: m.name(),
                },
            )
        }
    };
    if version != PROTOCOL_VERSION {
        return refuse(
            s,
            ProtocolError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            },
        );
    }
    if !protocol::mac_eq(
        &mac,
        &protocol::source_mac(secret, &nonce_d, &nonce_s, channel, session),
    ) {
        return refuse(s, ProtocolError::Auth);
    }
    let layout = from_wire(&layout);
    let ours = MemoryLayout::for_size(layout.total_bytes()).ok();
    let mismatch = match expect {
        Some(e) => *e != layout,
        None => ours.as_ref() != Some(&layout),
    };
    if mismatch {
        let destination = wire_layout(
            expect
                .or(ours.as_ref())
                .unwrap_or(&MemoryLayout { regions: vec![] }),
        );
        return refuse(
            s,
            ProtocolError::Layout {
                source_layout: wire_layout(&layout),
                destination,
            },
        );
    }
    Message::Accept {
        mac: protocol::destination_mac(secret, &nonce_s, &nonce_d),
    }
    .write_to(s)?;
    Ok((channel, session, layout, vcpus))
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Precopy rounds: the VM still runs here while its memory is copied.
    Precopy,
    /// State sent; the source serves pages until the destination has them all.
    Postcopy,
    Completed,
    Failed,
}

/// `query-migrate`.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationStatus {
    pub role: &'static str,
    pub phase: Phase,
    pub error: Option<String>,
    pub destination: String,
    /// Precopy rounds asked for, and the one running or last run (0: none yet).
    pub precopy_rounds: u32,
    pub precopy_round: u32,
    /// Pages sent by the precopy rounds (a page written again is sent again).
    pub pages_precopy: u64,
    /// Pages the guest wrote after the last precopy round: dropped at the destination (just
    /// before the switchover, and at it) and served postcopy.
    pub pages_stale: u64,
    /// Migration start -> vCPUs paused (precopy and profiling).
    pub precopy_ms: Option<f64>,
    /// Pause of the vCPUs -> state, last discards and `PrecopyDone` sent (the source's share of
    /// the downtime).
    pub downtime_us: u64,
    /// When the vCPUs paused, µs since the Unix epoch (0: not yet). With the destination's
    /// `resumed_unix_us` on the same host, the whole downtime, network included.
    pub paused_unix_us: u64,
    pub state_bytes: u64,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    /// Demand replies for pages the push had already queued (sent twice).
    pub pages_duplicate: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    /// Page data sent by the background push (zero pages go as markers: not counted).
    pub bytes_pushed: u64,
    pub total_pages: u64,
    pub prepage: Prepage,
    /// `hot`: pages the profile found written (pushed first).
    pub hot_pages: u64,
    /// Switchover -> the background push sent its last page.
    pub push_ms: Option<f64>,
    /// Switchover -> `Complete` from the destination.
    pub total_ms: Option<f64>,
}

/// The order of the background push (prepaging policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prepage {
    /// Guest-physical address order.
    Address,
    /// Around each demand fault first (Yabusame's bubbling): the pages just before it, then
    /// the scan continues from the faulting page onward, wrapping around. The default: a guest
    /// walking through memory gets its pages pushed ahead of it rather than behind.
    #[default]
    Bubble,
    /// The pages the guest wrote during a short profile before switchover first (KVM dirty
    /// log; with precopy rounds, the pages written since the last round), then address order.
    Hot,
    /// No background push: pages move only when the guest faults on them, and the source
    /// serves until the guest has touched every page. For measuring the demand path.
    None,
}

impl std::str::FromStr for Prepage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "address" => Ok(Self::Address),
            "bubble" => Ok(Self::Bubble),
            "hot" => Ok(Self::Hot),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown prepaging policy '{s}': use address, bubble, hot or none"
            )),
        }
    }
}

/// Options of an outgoing migration.
#[derive(Clone, Debug, Default)]
pub struct MigrateOptions {
    /// Cap on the background push and the precopy rounds, in bytes per second (demand replies
    /// are never held back).
    pub max_bandwidth: Option<u64>,
    pub prepage: Prepage,
    /// `Hot` without precopy rounds: how long to record the guest's writes before switchover
    /// (default 100 ms).
    pub profile: Option<Duration>,
    /// Precopy rounds before switchover (hybrid migration): the first copies all memory while
    /// the guest runs, each later one the pages written since the previous round. 0: pure
    /// postcopy.
    pub precopy_rounds: u32,
}

/// Pages before a demand fault that `Prepage::Bubble` pushes at once (the scan then continues
/// after the fault).
const BUBBLE: u64 = 16;

/// How a run of pages is being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendKind {
    /// A demand reply: always sent, even if the push already did.
    Demand,
    /// Background push after switchover: pages not sent yet.
    Push,
    /// A precopy round: pages not sent yet (a page written again has its bit cleared).
    Precopy,
}

/// The pages hot-first prepaging pushes first: a set of gfns, kept as a bitmap so that adding
/// what a drop pass or the switchover found costs only that many pages. (A sorted list would
/// have to be merged or sorted again each time: 6 ms for 480,000 pages, spent either while the
/// guest still writes, letting it dirty more pages that the downtime then drops, or inside the
/// downtime itself.) The push reads them back in address order.
#[derive(Debug)]
pub struct HotPages {
    /// Indexed by gfn, up to the layout's last frame (holes between regions stay clear).
    gfns: AtomicBitmap,
}

impl HotPages {
    /// An empty set for a guest with this memory layout.
    pub fn new(layout: &MemoryLayout) -> Self {
        Self {
            gfns: AtomicBitmap::new(layout.top() / PAGE_SIZE),
        }
    }

    /// Adds `gfns` (guest frames of this layout, sorted; repeats count once).
    pub fn add(&mut self, gfns: &[u64]) {
        for (gfn, n) in gfn_runs(gfns, u64::MAX) {
            self.gfns.set_range(gfn, n);
        }
    }

    /// How many distinct pages there are.
    pub fn len(&self) -> u64 {
        self.gfns.count_ones()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gfns in increasing order.
    pub fn to_sorted(&self) -> Vec<u64> {
        let end = self.gfns.len();
        let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        let mut gfn = self.gfns.next_set(0, end);
        while gfn < end {
            out.push(gfn);
            gfn = self.gfns.next_set(gfn + 1, end);
        }
        out
    }
}

/// The two authenticated connections of a migration.
#[derive(Debug)]
pub struct Channels {
    /// vCPU state, demand requests and their pages; the destination's acknowledgements.
    pub urgent: TcpStream,
    /// Precopy rounds and the background push, flow-controlled.
    pub bulk: BulkWriter,
}

/// Drop passes before the pause (see [`Outgoing::precopy`]) stop once one covers at most this
/// many pages (4 MiB: a few hundred microseconds for the destination to drop)...
const DROP_PASS_SMALL: usize = 1024;
/// ...or after this many passes, for a guest that writes faster than the destination drops.
const DROP_PASSES_MAX: u32 = 8;

/// Longest wait for the destination to create its VM after the handshake.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for the destination's `Ready`: its VM exists and its receivers run.
fn wait_ready(urgent: &TcpStream) -> Result<(), MigrationError> {
    urgent.set_read_timeout(Some(READY_TIMEOUT))?;
    let got = Message::read_from(&mut &*urgent);
    urgent.set_read_timeout(None)?;
    match got {
        Ok(Message::Ready) => Ok(()),
        Ok(m) => Err(ProtocolError::unexpected("Ready", m).into()),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(MigrationError::Lost(format!(
                "the destination did not create its VM within {}s; see its log",
                READY_TIMEOUT.as_secs()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs of consecutive gfns in a sorted list, at most `max` pages each.
fn gfn_runs(mut gfns: &[u64], max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    std::iter::from_fn(move || take_run(&mut gfns, max))
}

/// Takes the first run of consecutive gfns, at most `max` pages, off a sorted list: its first
/// gfn and its length (`None` once the list is empty).
fn take_run(gfns: &mut &[u64], max: u64) -> Option<(u64, u64)> {
    let (&first, _) = gfns.split_first()?;
    let mut n = 1;
    while n < gfns.len() && gfns[n] == first + n as u64 && (n as u64) < max {
        n += 1;
    }
    *gfns = &gfns[n..];
    Some((first, n as u64))
}

/// An outgoing migration: precopy rounds, then the source's page server.
#[derive(Debug)]
pub struct Outgoing {
    destination: String,
    started: Instant,
    /// Pages the destination has been sent (and not told to drop since).
    sent: AtomicBitmap,
    precopy_rounds: u32,
    precopy_round: AtomicU32,
    pages_precopy: AtomicU64,
    pages_stale: AtomicU64,
    /// Start -> pause; pause -> state sent; switchover -> push done.
    switched_at: Mutex<Option<(Instant, Duration, Duration)>>,
    /// Wall-clock time of the pause (µs since the Unix epoch), to compare with the
    /// destination's resume time on the same host.
    paused_unix_us: AtomicU64,
    push_done: Mutex<Option<Duration>>,
    state_bytes: AtomicU64,
    pages_demand: AtomicU64,
    pages_pushed: AtomicU64,
    duplicates: AtomicU64,
    zero_pages: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_pushed: AtomicU64,
    total_pages: u64,
    /// `/proc/self/pagemap`, to tell never-populated pages (None: unreadable, pages are read).
    pagemap: Option<std::fs::File>,
    prepage: Mutex<(Prepage, u64)>,
    outcome: Mutex<(Phase, Option<String>, Option<Duration>)>,
}

impl Outgoing {
    /// Connects and authenticates both channels. Nothing about the VM changes yet: a refused
    /// connection leaves it running where it is.
    pub fn connect(
        uri: &str,
        secret: &[u8],
        layout: &MemoryLayout,
        vcpus: u32,
        precopy_rounds: u32,
    ) -> Result<(Arc<Self>, Channels), MigrationError> {
        let addr = parse_uri(uri)?;
        let session = u64::from_le_bytes(protocol::nonce()?[..8].try_into().expect("8 bytes"));
        let wire = wire_layout(layout);
        let connect = |channel| -> Result<(TcpStream, Duration), MigrationError> {
            let mut s = TcpStream::connect(addr).map_err(|source| MigrationError::Connect {
                addr: addr.to_string(),
                source,
            })?;
            s.set_nodelay(true)?;
            let rtt = handshake_source(&mut s, secret, channel, session, &wire, vcpus)?;
            Ok((s, rtt))
        };
        let (urgent, rtt_urgent) = connect(Channel::Urgent)?;
        let (bulk, rtt_bulk) = connect(Channel::Bulk)?;
        wait_ready(&urgent)?;
        let bulk = BulkWriter::new(bulk, rtt_urgent.min(rtt_bulk))?;
        let out = Arc::new(Self {
            destination: addr.to_string(),
            started: Instant::now(),
            sent: AtomicBitmap::new(layout.total_pages()),
            precopy_rounds,
            precopy_round: AtomicU32::new(0),
            pages_precopy: AtomicU64::new(0),
            pages_stale: AtomicU64::new(0),
            switched_at: Mutex::new(None),
            paused_unix_us: AtomicU64::new(0),
            push_done: Mutex::new(None),
            state_bytes: AtomicU64::new(0),
            pages_demand: AtomicU64::new(0),
            pages_pushed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_pushed: AtomicU64::new(0),
            total_pages: layout.total_pages(),
            pagemap: std::fs::File::open("/proc/self/pagemap")
                .inspect_err(|e| log::warn!("zero pages will be found by reading them: {e}"))
                .ok(),
            prepage: Mutex::new((Prepage::Address, 0)),
            outcome: Mutex::new((Phase::Precopy, None, None)),
        });
        Ok((out, Channels { urgent, bulk }))
    }

    /// Runs the precopy rounds while the guest keeps running: round 1 sends every page, each
    /// later round the pages `dirty()` reports written since the previous call (after telling
    /// the destination to drop their old copies). Each round ends with `RoundDone`, and the
    /// next starts once the destination has installed all of it, so the bulk channel is empty
    /// at switchover. The caller starts the dirty log before round 1. Stops early when a round
    /// finds nothing written. The pages the drop passes (below) find written are added to
    /// `hot`, if given (hot-first prepaging pushes them first).
    pub fn precopy(
        &self,
        memory: &GuestMemory,
        channels: &mut Channels,
        rate: Option<u64>,
        mut hot: Option<&mut HotPages>,
        mut dirty: impl FnMut() -> Result<Vec<u64>, MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut push = Pusher::new(self, memory, rate);
        for round in 1..=self.precopy_rounds {
            self.precopy_round.store(round, Ordering::Relaxed);
            let w = &mut channels.bulk;
            if round == 1 {
                for r in &memory.layout().regions {
                    let end = r.first_gfn() + r.pages();
                    let mut gfn = r.first_gfn();
                    while gfn < end {
                        let n = w.run_pages().min(end - gfn);
                        push.send(w, gfn, n, SendKind::Precopy)?;
                        gfn += n;
                    }
                }
            } else {
                let written = dirty()?;
                if written.is_empty() {
                    break;
                }
                let mut rest = &written[..];
                while let Some((gfn, n)) = take_run(&mut rest, w.run_pages()) {
                    self.unsend(memory, gfn, n);
                    Message::Discard { gfn, count: n }.write_to(w)?;
                    push.send(w, gfn, n, SendKind::Precopy)?;
                }
            }
            self.end_round(channels, round)?;
        }
        // Passes that drop, while the guest still runs here, what it wrote since the last
        // round, without sending it again: those pages go postcopy. The discards made at the
        // switchover, inside the downtime, then cover only the last moments: dropping a page
        // costs the destination about half a microsecond, so a fast writer's last round would
        // otherwise take tens of milliseconds of downtime. A guest writing while a pass is
        // dropped leaves the next pass less to do (it writes slower than the destination
        // drops), so passes repeat until one is small. Nothing between the last pass and the
        // pause may take long (see `HotPages`).
        for pass in 1..=DROP_PASSES_MAX {
            let dirtied = dirty()?;
            if dirtied.is_empty() {
                break;
            }
            for (gfn, n) in gfn_runs(&dirtied, u64::MAX) {
                let dropped = self.unsend(memory, gfn, n);
                self.pages_stale.fetch_add(dropped, Ordering::Relaxed);
                Message::Discard { gfn, count: n }.write_to(&mut channels.bulk)?;
            }
            self.end_round(channels, self.precopy_rounds + pass)?;
            if let Some(h) = hot.as_deref_mut() {
                h.add(&dirtied);
            }
            if dirtied.len() <= DROP_PASS_SMALL {
                break;
            }
        }
        Ok(())
    }

    /// Ends round `round` on the bulk channel and waits until the destination has applied it.
    fn end_round(&self, channels: &mut Channels, round: u32) -> Result<(), MigrationError> {
        Message::RoundDone { round }.write_to(&mut channels.bulk)?;
        channels.bulk.flush()?;
        match Message::read_from(&mut channels.urgent)? {
            Message::RoundDone { round: r } if r == round => Ok(()),
            m => Err(ProtocolError::unexpected("RoundDone", m).into()),
        }
    }

    /// Clears the "sent" bits of `[gfn, gfn + n)`, pages inside one region; returns how many
    /// were set (pages the destination had been sent).
    fn unsend(&self, memory: &GuestMemory, gfn: u64, n: u64) -> u64 {
        let Some(first) = memory.layout().page_index(gfn) else {
            return 0;
        };
        self.sent.clear_range(first, n)
    }

    /// Ends the precopy phase ahead of the pause when there were no precopy rounds: nothing
    /// precedes `PrecopyDone` on the bulk channel then (no pages, no discards), and the
    /// destination, which resumes the VM only after reading it, has it in hand when the state
    /// arrives instead of waiting inside the downtime for its bulk receiver to wake and read
    /// it. `bench migrate`, the three postcopy policies, 3 alternating rounds (9 runs each):
    /// downtime median 973 -> 684 µs, longest 1136 -> 831 µs. An error leaves the VM running
    /// here.
    pub fn end_precopy_early(&self, channels: &mut Channels) -> Result<(), MigrationError> {
        debug_assert_eq!(
            self.precopy_rounds, 0,
            "precopy rounds end at the switchover"
        );
        Message::PrecopyDone.write_to(&mut channels.bulk)?;
        channels.bulk.flush()?;
        Ok(())
    }

    /// Switchover with the vCPUs paused since `paused_at`: sends the VM state and, after
    /// precopy rounds, tells the destination to drop the `stale` pages (written since the last
    /// round; sorted) and ends the precopy phase (without rounds, [`Self::end_precopy_early`]
    /// did), then serves the memory on two threads until the destination has every page. The
    /// state goes first so that the destination reads it while it drops the stale pages; it
    /// resumes only after `PrecopyDone`. An error before both the state and `PrecopyDone` are
    /// out leaves the destination unable to run the VM: the caller may resume it here.
    #[allow(clippy::too_many_arguments)]
    pub fn switch_over(
        self: &Arc<Self>,
        state: &VmState,
        memory: Arc<GuestMemory>,
        channels: Channels,
        paused_at: Instant,
        options: &MigrateOptions,
        hot: HotPages,
        stale: &[u64],
    ) -> Result<(), MigrationError> {
        *self.prepage.lock().expect("migration lock") = (options.prepage, hot.len());
        let Channels {
            mut urgent,
            mut bulk,
        } = channels;
        let json =
            serde_json::to_vec(state).map_err(|e| MigrationError::BadState(e.to_string()))?;
        self.state_bytes.store(json.len() as u64, Ordering::Relaxed);
        let encoded = paused_at.elapsed();
        Message::VmState(json).write_to(&mut urgent)?;
        let sent = paused_at.elapsed();
        if self.precopy_rounds > 0 {
            for (gfn, n) in gfn_runs(stale, u64::MAX) {
                // Pages dropped before the pause and not sent since need no second drop.
                let dropped = self.unsend(&memory, gfn, n);
                self.pages_stale.fetch_add(dropped, Ordering::Relaxed);
                if dropped > 0 {
                    Message::Discard { gfn, count: n }.write_to(&mut bulk)?;
                }
            }
            Message::PrecopyDone.write_to(&mut bulk)?;
            bulk.flush()?;
        }
        let now = Instant::now();
        log::debug!(
            "switchover: state encoded after {encoded:?}, sent after {sent:?}, switchover messages out after {:?}",
            now.duration_since(paused_at)
        );
        let since_pause = now.duration_since(paused_at);
        self.paused_unix_us.store(
            unix_us().saturating_sub(u64::try_from(since_pause.as_micros()).unwrap_or(0)),
            Ordering::Relaxed,
        );
        *self.switched_at.lock().expect("migration lock") = Some((
            now,
            paused_at.duration_since(self.started),
            now.duration_since(paused_at),
        ));
        self.outcome.lock().expect("migration lock").0 = Phase::Postcopy;
        // Bubble: the demand thread tells the push thread where the guest faults. It also
        // opens the gate when the destination has resumed (or asked for a page).
        let (fault_tx, faults) = crossbeam::channel::unbounded();
        let fault_tx = (options.prepage == Prepage::Bubble).then_some(fault_tx);
        let (gate_tx, gate) = crossbeam::channel::bounded(1);
        let (me, mem) = (self.clone(), memory.clone());
        std::thread::Builder::new()
            .name("migrate-urgent".into())
            .spawn(move || me.serve_demand(&mem, urgent, fault_tx.as_ref(), &gate_tx))?;
        let me = self.clone();
        let order = PushOrder {
            gate,
            demand_only: options.prepage == Prepage::None,
            rate: options.max_bandwidth,
            hot,
            faults,
        };
        std::thread::Builder::new()
            .name("migrate-bulk".into())
            .spawn(move || me.push_all(&memory, bulk, &order))?;
        Ok(())
    }

    /// Whether the VM state went out: from then on the VM runs at the destination.
    pub fn switched_over(&self) -> bool {
        self.switched_at.lock().expect("migration lock").is_some()
    }

    /// Records a failure before switchover (the VM stays here) and returns the error to
    /// report, saying where it happened.
    pub fn abort(&self, e: &dyn std::fmt::Display) -> MigrationError {
        self.finish(Phase::Failed, Some(e.to_string()));
        let round = self.precopy_round.load(Ordering::Relaxed);
        MigrationError::Aborted {
            stage: if round == 0 {
                "the switchover".into()
            } else {
                format!("precopy round {round} of {}", self.precopy_rounds)
            },
            reason: e.to_string(),
        }
    }

    fn finish(&self, phase: Phase, error: Option<String>) {
        let mut o = self.outcome.lock().expect("migration lock");
        if matches!(o.0, Phase::Precopy | Phase::Postcopy) {
            let since_switch = self
                .switched_at
                .lock()
                .expect("migration lock")
                .map(|(at, ..)| at.elapsed());
            *o = (phase, error, since_switch);
        }
    }

    /// Sends pages `[gfn, gfn + count)`: zero runs as markers, data runs as pages. The push and
    /// precopy rounds skip pages already sent. A demand reply always goes out: the destination
    /// faulted, so it does not have the page yet, and a page the push marked may still sit in
    /// its queue, behind up to megabytes of bulk data; such a page is sent twice and counted in
    /// `duplicates`.
    fn send_pages(
        &self,
        w: &mut impl Write,
        memory: &GuestMemory,
        buf: &mut Vec<u8>,
        gfn: u64,
        count: u64,
        kind: SendKind,
    ) -> Result<(), MigrationError> {
        let counter = match kind {
            SendKind::Demand => &self.pages_demand,
            SendKind::Push => &self.pages_pushed,
            SendKind::Precopy => &self.pages_precopy,
        };
        let layout = memory.layout();
        let max_run = u64::from(MAX_PAGES_PER_FRAME);
        let (mut take, mut populated) = (Vec::new(), Vec::new());
        let mut g = gfn;
        while g < gfn + count {
            let Some(first) = layout.page_index(g) else {
                g += 1; // not RAM (a hole between regions)
                continue;
            };
            // A run of consecutive pages inside one region, read from guest memory at once.
            let mut n = 1;
            while g + n < gfn + count && n < max_run && layout.page_index(g + n) == Some(first + n)
            {
                n += 1;
            }
            take.clear();
            for k in 0..n {
                let already = self.sent.test_and_set(first + k);
                if already && kind == SendKind::Demand {
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                take.push(!already || kind == SendKind::Demand);
            }
            if !take.iter().any(|t| *t) {
                g += n;
                continue;
            }
            let len = usize::try_from(n).expect("run fits usize") * PAGE_BYTES;
            let bad = |e: crate::memory::MemoryError| MigrationError::BadState(e.to_string());
            let buf: &[u8] = if kind == SendKind::Precopy {
                // The guest runs: take a copy (whatever it writes meanwhile is resent).
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                memory.read(g * PAGE_SIZE, &mut buf[..len]).map_err(bad)?;
                &buf[..len]
            } else {
                // SAFETY: demand replies and the push run after the switchover: the vCPUs are
                // paused for good, and nothing else writes the source's guest memory.
                unsafe { memory.frozen_slice(g * PAGE_SIZE, len) }.map_err(bad)?
            };
            // Never-populated pages are zero markers without being read (which would map them).
            // Not for a demand reply: one page the guest wants, where reading it costs less
            // than asking the pagemap (a system call on the fault's critical path); a
            // never-populated page reads as zeros and still goes as a marker.
            populated.clear();
            if let Some(pm) = self.pagemap.as_ref().filter(|_| kind != SendKind::Demand) {
                memory
                    .populated(pm, g * PAGE_SIZE, len / PAGE_BYTES, &mut populated)
                    .map_err(bad)?;
            }
            // Taken pages go out as runs of zero markers and runs of data, straight from memory.
            for_each_page_run_hinted(
                buf,
                |k| take[k],
                |k| populated.get(k) == Some(&false),
                |a, b, zero| {
                    let (at, pages) = (g + a as u64, (b - a) as u64);
                    counter.fetch_add(pages, Ordering::Relaxed);
                    if zero {
                        self.zero_pages.fetch_add(pages, Ordering::Relaxed);
                        Message::ZeroPages {
                            gfn: at,
                            count: pages,
                        }
                        .write_to(w)?;
                    } else {
                        let data = &buf[a * PAGE_BYTES..b * PAGE_BYTES];
                        self.bytes_sent
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        if kind == SendKind::Push {
                            self.bytes_pushed
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        protocol::write_pages(w, at, data)?;
                    }
                    Ok::<(), MigrationError>(())
                },
            )?;
            g += n;
        }
        Ok(())
    }

    fn serve_demand(
        &self,
        memory: &GuestMemory,
        urgent: TcpStream,
        faults: Option<&crossbeam::channel::Sender<u64>>,
        gate: &crossbeam::channel::Sender<()>,
    ) {
        let result = (|| -> Result<(), MigrationError> {
            let served_at = Arc::new(AtomicU64::new(0));
            let mut reader = BufReader::new(SpinRead {
                s: urgent.try_clone()?,
                busy_since: served_at.clone(),
            });
            let mut writer = urgent;
            let mut buf = Vec::new();
            loop {
                match Message::read_from(&mut reader)? {
                    Message::Resumed => {
                        let _ = gate.try_send(());
                    }
                    Message::PageRequest { gfn, count } => {
                        let _ = gate.try_send(());
                        served_at.store(now_ns(), Ordering::Relaxed);
                        self.send_pages(
                            &mut writer,
                            memory,
                            &mut buf,
                            gfn,
                            u64::from(count),
                            SendKind::Demand,
                        )?;
                        writer.flush()?;
                        if let Some(f) = faults {
                            let _ = f.send(gfn);
                        }
                    }
                    Message::Complete => return Ok(()),
                    m => return Err(ProtocolError::unexpected("PageRequest", m).into()),
                }
            }
        })();
        match result {
            Ok(()) => self.finish(Phase::Completed, None),
            Err(e) => self.finish(Phase::Failed, Some(format!("lost the destination: {e}"))),
        }
    }

    fn push_all(&self, memory: &GuestMemory, mut w: BulkWriter, order: &PushOrder) {
        lower_priority();
        let hot = order.hot.to_sorted();
        // Until the destination runs the VM (bounded, in case its message is lost).
        let _ = order.gate.recv_timeout(Duration::from_millis(500));
        let result = (|| -> Result<(), MigrationError> {
            let mut push = Pusher::new(self, memory, order.rate);
            if order.demand_only {
                Message::PushDone.write_to(&mut w)?;
                w.finish()?;
                return Ok(());
            }
            // Hot pages first, in runs of consecutive gfns.
            let mut rest = &hot[..];
            while let Some((gfn, n)) = take_run(&mut rest, w.run_pages()) {
                push.send(&mut w, gfn, n, SendKind::Push)?;
            }
            // Then a scan in address order, wrapping around. Bubble: each demand fault moves
            // the scan to just past the faulting page (after the few pages before it), so the
            // push streams ahead of a guest walking through memory instead of behind it; one
            // full lap after the last move, every page has been sent (the "sent" bitmap makes
            // passing over sent pages cheap).
            // (first gfn, end gfn, index of the first page in the "sent" bitmap)
            let mut base = 0;
            let regions: Vec<(u64, u64, u64)> = memory
                .layout()
                .regions
                .iter()
                .map(|r| {
                    base += r.pages();
                    (r.first_gfn(), r.first_gfn() + r.pages(), base - r.pages())
                })
                .collect();
            let (mut region, mut gfn) = (0, regions[0].0);
            let mut lap_left = self.total_pages;
            while lap_left > 0 {
                for g in order.faults.try_iter() {
                    push.send(
                        &mut w,
                        g.saturating_sub(BUBBLE),
                        BUBBLE.min(g),
                        SendKind::Push,
                    )?;
                    if let Some(r) = regions.iter().position(|r| (r.0..r.1).contains(&(g + 1))) {
                        (region, gfn, lap_left) = (r, g + 1, self.total_pages);
                    }
                }
                // Pass over sent pages a bitmap word at a time.
                let (first, end, base) = regions[region];
                let unsent = self.sent.next_clear(base + gfn - first, base + end - first);
                let skipped = unsent - (base + gfn - first);
                lap_left = lap_left.saturating_sub(skipped);
                gfn += skipped;
                let n = w.run_pages().min(end - gfn);
                push.send(&mut w, gfn, n, SendKind::Push)?;
                lap_left = lap_left.saturating_sub(n);
                gfn += n;
                if gfn == end {
                    region = (region + 1) % regions.len();
                    gfn = regions[region].0;
                }
            }
            Message::PushDone.write_to(&mut w)?;
            w.finish()?;
            let at = self
                .switched_at
                .lock()
                .expect("migration lock")
                .map(|s| s.0);
            *self.push_done.lock().expect("migration lock") = at.map(|t| t.elapsed());
            Ok(())
        })();
        if let Err(e) = result {
            self.finish(Phase::Failed, Some(format!("pushing pages failed: {e}")));
        }
    }

    /// `query-migrate` on the source.
    pub fn status(&self) -> MigrationStatus {
        let o = self.outcome.lock().expect("migration lock").clone();
        let (prepage, hot_pages) = *self.prepage.lock().expect("migration lock");
        let switched = *self.switched_at.lock().expect("migration lock");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        MigrationStatus {
            role: "source",
            phase: o.0,
            error: o.1,
            destination: self.destination.clone(),
            precopy_rounds: self.precopy_rounds,
            precopy_round: self.precopy_round.load(Ordering::Relaxed),
            pages_precopy: self.pages_precopy.load(Ordering::Relaxed),
            pages_stale: self.pages_stale.load(Ordering::Relaxed),
            precopy_ms: switched.map(|s| ms(s.1)),
            downtime_us: switched
                .map(|s| u64::try_from(s.2.as_micros()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            paused_unix_us: self.paused_unix_us.load(Ordering::Relaxed),
            state_bytes: self.state_bytes.load(Ordering::Relaxed),
            pages_demand: self.pages_demand.load(Ordering::Relaxed),
            pages_pushed: self.pages_pushed.load(Ordering::Relaxed),
            pages_duplicate: self.duplicates.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_pushed: self.bytes_pushed.load(Ordering::Relaxed),
            total_pages: self.total_pages,
            prepage,
            hot_pages,
            push_ms: self.push_done.lock().expect("migration lock").map(ms),
            total_ms: o.2.map(ms),
        }
    }
}

/// What the push sends first, and how fast.
struct PushOrder {
    /// Opens when the destination has resumed the VM (or faulted): pushing during the
    /// switchover would take CPU time from it on a shared machine.
    gate: crossbeam::channel::Receiver<()>,
    /// `Prepage::None`: push nothing.
    demand_only: bool,
    rate: Option<u64>,
    /// Pages to push before anything else.
    hot: HotPages,
    /// Demand faults, for bubbling (empty unless `Prepage::Bubble`).
    faults: crossbeam::channel::Receiver<u64>,
}

/// Sends runs of pages for the precopy rounds and the push, with optional pacing.
struct Pusher<'a> {
    out: &'a Outgoing,
    memory: &'a GuestMemory,
    buf: Vec<u8>,
    rate: Option<u64>,
    pushed_bytes: u64,
    t0: Instant,
}

impl<'a> Pusher<'a> {
    fn new(out: &'a Outgoing, memory: &'a GuestMemory, rate: Option<u64>) -> Self {
        Self {
            out,
            memory,
            buf: Vec::new(),
            rate: rate.filter(|r| *r > 0),
            pushed_bytes: 0,
            t0: Instant::now(),
        }
    }

    /// Sends the pages of `[gfn, gfn + n)` not sent yet, then waits if over the rate.
    #[allow(clippy::cast_precision_loss)] // pacing arithmetic in seconds
    fn send(
        &mut self,
        w: &mut BulkWriter,
        gfn: u64,
        n: u64,
        kind: SendKind,
    ) -> Result<(), MigrationError> {
        if n == 0 {
            return Ok(());
        }
        w.wait_for_window()?;
        self.out
            .send_pages(w, self.memory, &mut self.buf, gfn, n, kind)?;
        // Zero markers are tiny: without a flush they would wait in the buffer while a guest
        // faults on them one by one.
        w.flush()?;
        if let Some(rate) = self.rate {
            // n pages may leave only after n * 4 KiB / rate seconds.
            self.pushed_bytes += n * PAGE_SIZE;
            let due = Duration::from_secs_f64(self.pushed_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.t0.elapsed()) {
                w.flush()?;
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// How long the source's demand server keeps looking for the next request after a reply
/// before it sleeps in the kernel: a guest stalled on demand faults asks again within tens of
/// microseconds, and a sleeping thread on an idle (virtual) CPU takes about as long to wake
/// here as the loopback round trip itself. Measured with `tsubame bench fault` on 2 cores:
/// engine-side demand p50 33 µs with it, 57-65 µs without. The destination's fault thread,
/// which also reads the replies, spins as long after each fault (a separate urgent receiver
/// spinning as well made things worse, with three spinners on two cores).
const DEMAND_SPIN: Duration = Duration::from_micros(150);

/// Makes the calling thread (a bulk one: the push, its receiver) yield the CPU to the demand
/// path: a fault must not wait behind the bulk stream for a CPU any more than on the wire.
/// Nice 10 gives it about a tenth of the weight of a normal thread under contention and
/// costs nothing when a CPU is free.
fn lower_priority() {
    set_nice(10);
}

/// Sets the calling thread's nice value (best effort).
fn set_nice(nice: i32) {
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

/// Wall-clock microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Nanoseconds since a process-wide origin: a timestamp that fits an atomic.
fn now_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A socket reader that waits for data by retrying (`recv` with `MSG_DONTWAIT`, yielding the
/// CPU between tries) while the last activity (`busy_since`, [`now_ns`]) is recent, and by
/// sleeping in `poll` otherwise. The socket itself stays blocking for its writers.
struct SpinRead {
    s: TcpStream,
    busy_since: Arc<AtomicU64>,
}

impl std::io::Read for SpinRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsFd;
        use std::os::fd::AsRawFd;
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

/// Demand requests go to the source on the urgent channel, and the fault thread itself reads
/// the replies (every request gets exactly one reply frame) and installs them: a reply does not
/// have to wake another thread first. While a reply is due the thread keeps trying to read for
/// up to [`DEMAND_SPIN`] before it sleeps: the source answers within about a round trip.
struct NetworkSource {
    urgent: Arc<Mutex<TcpStream>>,
    rx: Arc<Receiver>,
    /// The urgent channel's reader, from when the VM state has been read off it.
    replies: Mutex<Option<ReplyReader<SpinRead>>>,
    /// Requests sent since the last `flush`.
    outstanding: AtomicU64,
    /// When the last request went out ([`now_ns`]): the reader spins for a while after it.
    asked_at: Arc<AtomicU64>,
}

impl PageSource for NetworkSource {
    fn request(&self, gfn: u64, _: &FaultEngine) -> Result<(), SourceError> {
        let mut s = self.urgent.lock().expect("urgent lock");
        self.asked_at.store(now_ns(), Ordering::Relaxed);
        Message::PageRequest { gfn, count: 1 }
            .write_to(&mut *s)
            .map_err(|e| SourceError(format!("lost the migration source: {e}")))?;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self, _: &FaultEngine) -> Result<(), SourceError> {
        let due = self.outstanding.swap(0, Ordering::Relaxed);
        let mut replies = self.replies.lock().expect("replies lock");
        let Some(r) = replies.as_mut() else {
            return Ok(()); // no VM state yet, so no vCPU to fault either
        };
        for _ in 0..due {
            match self.rx.receive_one(r, None) {
                Ok(()) => {}
                Err(Stop::Lost(_)) if self.rx.completed.load(Ordering::Acquire) => return Ok(()),
                Err(Stop::Lost(e)) => {
                    return Err(SourceError(format!("lost the migration source: {e}")))
                }
                Err(Stop::Failed(why)) => return Err(SourceError(why)),
            }
        }
        Ok(())
    }
}

/// An accepted, authenticated incoming migration: both channels, before any memory.
pub struct Incoming {
    pub layout: MemoryLayout,
    /// vCPUs of the incoming VM (from the handshake).
    pub vcpus: u32,
    urgent: TcpStream,
    bulk: TcpStream,
    staging: Option<Arc<StagingPool>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// How a destination takes in a migration.
#[derive(Clone, Debug)]
pub struct IncomingOptions {
    /// The memory layout the source must have (e.g. from `--mem`); `None` takes the source's.
    pub expect: Option<MemoryLayout>,
    /// With `expect`: prepare a staging pool the size of guest memory while waiting (see
    /// [`incoming`]). Without it, received pages are allocated and copied into guest memory
    /// during the migration, which is slower where fresh memory is expensive.
    pub staging: bool,
    /// Run the VM as soon as its state is loaded; otherwise it arrives paused.
    pub resume: bool,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            expect: None,
            staging: true,
            resume: true,
        }
    }
}

/// Listens on `uri`, calls `ready` with the bound address, and accepts connections until an
/// authenticated urgent + bulk pair of one session is there. Refused connections (wrong secret,
/// other version, other layout) are logged and the destination keeps waiting.
///
/// With the layout known ahead (`options.expect`) and `options.staging`, a staging pool the
/// size of guest memory is faulted in on a background thread meanwhile (lowest priority, until
/// the migration completes), so that received pages are later moved into guest memory instead
/// of allocated and copied there (see `tsubame_uffd::staging`). It costs the memory the
/// guest's pages would take anyway, but for the whole migration, and pages that arrive as zero
/// pages leave their share unused until the migration ends.
pub fn incoming(
    uri: &str,
    secret: &[u8],
    options: &IncomingOptions,
    ready: impl FnOnce(SocketAddr),
) -> Result<Incoming, MigrationError> {
    let expect = options.expect.as_ref();
    let pool_layout = expect.filter(|_| options.staging);
    let staging = match pool_layout.map(|l| StagingPool::new(l.total_pages())) {
        Some(Ok(pool)) => {
            let pool = Arc::new(pool);
            let p = pool.clone();
            std::thread::Builder::new()
                .name("staging-prepare".into())
                .spawn(move || {
                    set_nice(19);
                    p.prepare();
                })?;
            Some(pool)
        }
        Some(Err(e)) => {
            log::warn!("no staging pool, pages will be copied in: {e}");
            None
        }
        None => None,
    };
    let addr = parse_uri(uri)?;
    let listener = TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    ready(listener.local_addr()?);
    let mut urgent: Option<(u64, TcpStream, MemoryLayout, u32)> = None;
    let mut bulk: Option<(u64, TcpStream)> = None;
    loop {
        let (mut s, peer) = listener.accept()?;
        s.set_nodelay(true)?;
        match handshake_destination(&mut s, secret, expect) {
            Ok((Channel::Urgent, session, layout, vcpus)) => {
                urgent = Some((session, s, layout, vcpus));
            }
            Ok((Channel::Bulk, session, ..)) => bulk = Some((session, s)),
            Err(e) => {
                log::warn!("refused a migration connection from {peer}: {e}");
                eprintln!("tsubame: refused a migration connection from {peer}: {e}");
                continue;
            }
        }
        if let (Some((a, ..)), Some((b, _))) = (&urgent, &bulk) {
            if a == b {
                break;
            }
        }
    }
    let (_, urgent, layout, vcpus) = urgent.expect("checked above");
    let (_, bulk) = bulk.expect("checked above");
    if let Some(p) = &staging {
        log::debug!(
            "migration accepted with {} of {} staging pages prepared",
            p.prepared_pages(),
            p.pages()
        );
    }
    Ok(Incoming {
        layout,
        vcpus,
        urgent,
        bulk,
        staging,
    })
}

/// Why a receiver stopped reading.
enum Stop {
    /// The connection failed or closed.
    Lost(ProtocolError),
    /// What arrived could not be applied.
    Failed(String),
}

/// A channel's reader: counts the bytes of the frames taken from it (for acknowledgements), and
/// a buffer for pages that are not received into the staging pool.
///
/// Only the bulk channel's pages go through the pool. `UFFDIO_MOVE` takes the staging page out
/// of this process's page tables, so the kernel flushes it from every CPU that may cache it:
/// an inter-processor interrupt that the mover waits for, and on this kind of host (itself a
/// VM) a slow one. The bulk stream moves runs of up to 2 MiB and pays it once per batch, at most
/// three per run (a batch ends where a page table of the staging pool or of guest memory does,
/// see [`crate::flow::RUN_PAGES_MAX`]); a demand reply is one page on the guest's critical
/// path, where the flush landed on the CPU of another thread of ours (the bulk receiver, or a
/// vCPU that ran there) every time. Copying a demand reply in (`UFFDIO_COPY` into a page that
/// was never mapped) needs no flush. In `tsubame bench fault` the engine's p50 went from 45 to
/// 41 µs (medians of 8 alternating runs). Under the push (`bench migrate`, bubble, 12 runs
/// each alternating with the code before this and the bitmap's set-bit count) the push went
/// from 1.09 to 1.25 GB/s and the total from 675 to 587 ms (medians), with fewer interrupts on
/// the receiver's CPU; the demand p50 stayed within the noise (74 against 78 µs).
struct ReplyReader<S> {
    r: Counted<BufReader<S>>,
    spare: Vec<u8>,
    /// Receive page payloads into the staging pool (if there is one) and move them in.
    staged: bool,
}

impl<S: std::io::Read> ReplyReader<S> {
    fn new(stream: S, staged: bool) -> Self {
        Self {
            // A page payload bypasses the buffer once it is empty; what a header read brought
            // in of the payload after it (up to 64 KiB) is copied out of it: in perf, that copy
            // cost the push's receiver a quarter as much as the socket's own. A 4 KiB buffer
            // copied less but gave the same push rate in 18 alternating runs, so it stays.
            r: Counted {
                inner: BufReader::with_capacity(64 << 10, stream),
                bytes: 0,
            },
            spare: Vec::new(),
            staged,
        }
    }
}

/// What the receiver threads share.
struct Receiver {
    engine: Arc<FaultEngine>,
    /// The urgent channel's write half: demand requests, round acknowledgements, `Complete`.
    writer: Arc<Mutex<TcpStream>>,
    push_done: AtomicBool,
    completed: AtomicBool,
    done: Box<dyn Fn() + Send + Sync>,
    /// Told once the bulk channel passed `PrecopyDone` (or failed first).
    precopy_done: Mutex<Option<crossbeam::channel::Sender<Result<(), String>>>>,
    /// Memory faulted in ahead of time that page batches are received into and moved from.
    staging: Option<Arc<StagingPool>>,
}

impl Receiver {
    /// Reads the bulk channel until it closes, installing what arrives; `acks` acknowledges
    /// what has been installed (flow control). (Demand replies on the urgent channel are read
    /// by the fault thread: [`NetworkSource`].)
    fn run_bulk(&self, stream: impl std::io::Read, mut acks: Acknowledger) {
        let mut r = ReplyReader::new(stream, true);
        loop {
            match self.receive_one(&mut r, Some(&mut acks)) {
                Ok(()) => {}
                Err(Stop::Lost(e)) => {
                    // The source closes the bulk channel after `PushDone`: expected.
                    let after_push = matches!(e, ProtocolError::Closed)
                        && self.push_done.load(Ordering::Acquire);
                    if !self.completed.load(Ordering::Acquire) && !after_push {
                        self.fail(format!("lost the migration source: {e}"));
                    }
                    return;
                }
                Err(Stop::Failed(why)) => {
                    self.fail(why);
                    return;
                }
            }
        }
    }

    /// Reads one frame and applies it, acknowledges it if `acks` is given, and sends `Complete`
    /// once every page is local. Page payloads are read straight into a slot of the staging
    /// pool, whose pages are then moved into guest memory (the only copy is the socket's), or
    /// else (no pool, or a reader that does not use it) into a buffer `UFFDIO_COPY` installs
    /// from.
    fn receive_one<S: std::io::Read>(
        &self,
        r: &mut ReplyReader<S>,
        acks: Option<&mut Acknowledger>,
    ) -> Result<(), Stop> {
        let mut slot = None;
        let spare = &mut r.spare;
        let pool = self.staging.as_deref().filter(|_| r.staged);
        let got = Message::read_into(&mut r.r, |len| {
            let pages = (len / PAGE_BYTES) as u64;
            match pool.and_then(|p| p.take(pages)) {
                Some(s) => slot.insert(s).as_mut_slice(),
                None => {
                    spare.resize(len, 0);
                    &mut spare[..]
                }
            }
        })
        .map_err(Stop::Lost)?;
        let applied = match (got, slot.as_mut()) {
            (Received::Pages { gfn, .. }, Some(slot)) => self
                .engine
                .install_staged(gfn, slot)
                .map(drop)
                .map_err(|e| format!("installing pages: {e}")),
            (Received::Pages { gfn, len }, None) => self
                .engine
                .install(gfn, &r.spare[..len])
                .map(drop)
                .map_err(|e| format!("installing pages: {e}")),
            (Received::Message(m), _) => self.handle(m),
        };
        if let Some(a) = acks {
            a.installed(r.r.bytes, r.r.inner.buffer().is_empty());
        }
        applied.map_err(Stop::Failed)?;
        if self.push_done.load(Ordering::Acquire)
            && self.engine.present_pages() == self.engine.total_pages()
            && !self.completed.swap(true, Ordering::AcqRel)
        {
            (self.done)();
            let _ = Message::Complete.write_to(&mut *self.writer.lock().expect("urgent lock"));
        }
        Ok(())
    }

    fn handle(&self, m: Message) -> Result<(), String> {
        let installing = |e: tsubame_uffd::UffdError| format!("installing pages: {e}");
        match m {
            // (`Pages` never gets here: `receive_one` reads it into its buffer itself.)
            Message::ZeroPages { gfn, count } => self
                .engine
                .install_zero(gfn, count)
                .map(drop)
                .map_err(installing),
            Message::Discard { gfn, count } => self
                .engine
                .forget(gfn, count)
                .map_err(|e| format!("dropping stale pages: {e}")),
            Message::RoundDone { round } => Message::RoundDone { round }
                .write_to(&mut *self.writer.lock().expect("urgent lock"))
                .map_err(|e| format!("acknowledging precopy round {round}: {e}")),
            Message::PrecopyDone => {
                if let Some(tx) = self.precopy_done.lock().expect("rx lock").take() {
                    let _ = tx.send(Ok(()));
                }
                // The VM resumes now: from here on the bulk stream yields to demand faults.
                // (Not before: the switchover waits for this very message.)
                lower_priority();
                Ok(())
            }
            Message::PushDone => {
                self.push_done.store(true, Ordering::Release);
                Ok(())
            }
            m => Err(format!("unexpected {} from the source", m.name())),
        }
    }

    fn fail(&self, why: String) {
        if let Some(tx) = self.precopy_done.lock().expect("rx lock").take() {
            let _ = tx.send(Err(why.clone()));
        }
        self.engine.report_source_error(SourceError(why));
    }
}

impl Incoming {
    /// Tells the source that this destination cannot take the VM, and why (best effort: the
    /// source reports it and keeps its VM).
    pub fn refuse(&self, why: &str) {
        let _ = Message::Error {
            message: why.to_string(),
        }
        .write_to(&mut &self.urgent);
    }

    /// Receives the VM into `memory`: starts demand paging and the bulk receiver at once
    /// (precopy rounds arrive while the VM still runs at the source), then waits for the VM
    /// state on the urgent channel and for the end of the precopy phase on the bulk channel,
    /// and hands the urgent channel to the fault thread. Afterwards a fault sends a
    /// `PageRequest` and the fault thread installs the reply, the bulk receiver installs the
    /// push, and `Complete` goes out once every page is local.
    /// Returns the paging, the VM state to restore, and when the state arrived.
    pub fn receive(
        self,
        memory: &GuestMemory,
    ) -> Result<(DemandPaging, VmState, Instant), crate::Error> {
        let mut paging = DemandPaging::new(memory, "migration")?;
        let engine = paging.engine().clone();
        let writer = Arc::new(Mutex::new(
            self.urgent.try_clone().map_err(MigrationError::Io)?,
        ));
        let (tx, precopy_done) = crossbeam::channel::bounded(1);
        let completion = paging.completion();
        let pool = self.staging.clone();
        let rx = Arc::new(Receiver {
            engine,
            writer,
            push_done: AtomicBool::new(false),
            completed: AtomicBool::new(false),
            done: Box::new(move || {
                completion();
                if let Some(p) = &pool {
                    p.stop_preparing();
                }
            }),
            precopy_done: Mutex::new(Some(tx)),
            staging: self.staging.clone(),
        });
        if let Some(p) = &self.staging {
            paging.set_staging(p.clone());
        }
        let asked_at = Arc::new(AtomicU64::new(0));
        let source = Arc::new(NetworkSource {
            urgent: rx.writer.clone(),
            rx: rx.clone(),
            replies: Mutex::new(None),
            outstanding: AtomicU64::new(0),
            asked_at: asked_at.clone(),
        });
        // The fault thread waits for the guest's next fault without sleeping for a while, as
        // the source's demand server does for the next request: measured with `tsubame bench
        // fault`, guest stall per page 97-120 µs (median 106) against 111-124 µs (median 120).
        rx.engine.set_spin(DEMAND_SPIN);
        rx.engine.start(source.clone())?;
        for s in [&self.urgent, &self.bulk] {
            paging.own_socket(s.try_clone().map_err(MigrationError::Io)?);
        }
        let bulk_rx = rx.clone();
        let bulk = self.bulk;
        let acks = Acknowledger::new(bulk.try_clone().map_err(MigrationError::Io)?);
        paging.spawn("migrate-bulk-rx", move || {
            bulk_rx.run_bulk(bulk, acks);
        })?;

        let urgent = self.urgent;
        Message::Ready
            .write_to(&mut *rx.writer.lock().expect("urgent lock"))
            .map_err(MigrationError::from)?;
        let json = match Message::read_from(&mut &urgent)
            .map_err(|e| MigrationError::Lost(e.to_string()))?
        {
            Message::VmState(j) => j,
            m => return Err(MigrationError::from(ProtocolError::unexpected("VmState", m)).into()),
        };
        let state_received = Instant::now();
        let state: VmState =
            serde_json::from_slice(&json).map_err(|e| MigrationError::BadState(e.to_string()))?;
        if state.layout != self.layout || state.vcpus.len() != self.vcpus as usize {
            return Err(MigrationError::BadState(
                "the state's memory layout or vCPU count differs from the handshake's".into(),
            )
            .into());
        }
        let parsed = state_received.elapsed();
        match precopy_done.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(MigrationError::Lost(why).into()),
            Err(_) => return Err(MigrationError::Lost("the bulk receiver stopped".into()).into()),
        }
        log::debug!(
            "switchover: state parsed after {parsed:?}, precopy phase ended after {:?}",
            state_received.elapsed()
        );
        let writer = rx.writer.clone();
        // From here on only demand replies arrive on the urgent channel: the fault thread reads
        // them (see `NetworkSource`).
        *source.replies.lock().expect("replies lock") = Some(ReplyReader::new(
            SpinRead {
                s: urgent,
                busy_since: asked_at,
            },
            false,
        ));
        paging.on_resume(move || {
            // The source starts its push on this; if it is gone, the receivers report it.
            let _ = Message::Resumed.write_to(&mut *writer.lock().expect("urgent lock"));
        });
        Ok((paging, state, state_received))
    }
}

#[cfg(test)]
mod tests {
    use super::{gfn_runs, take_run, HotPages};
    use crate::memory::MemoryLayout;

    #[test]
    fn hot_pages_count_once_and_come_back_sorted() {
        let layout = MemoryLayout::for_size(1 << 30).unwrap();
        let mut h = HotPages::new(&layout);
        assert!(h.is_empty());
        h.add(&[3, 63, 64, 900]);
        h.add(&[0, 3, 64, 65, 200_000]);
        assert_eq!(h.len(), 7);
        assert_eq!(h.to_sorted(), vec![0, 3, 63, 64, 65, 900, 200_000]);
    }

    #[test]
    fn gfn_runs_split_at_gaps_and_at_max() {
        let runs: Vec<_> = gfn_runs(&[1, 2, 3, 7, 8, 20], 2).collect();
        assert_eq!(runs, [(1, 2), (3, 1), (7, 2), (20, 1)]);
        assert_eq!(gfn_runs(&[], 4).count(), 0);
        let mut rest: &[u64] = &[1, 2, 3, 7, 8, 20];
        assert_eq!(take_run(&mut rest, 8), Some((1, 3)));
        assert_eq!(rest, [7, 8, 20]);
    }
}
