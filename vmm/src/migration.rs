//! Postcopy migration between two Tsubame processes over TCP.
//!
//! The source ([`Outgoing`]) connects twice to the destination (urgent and bulk channels) and
//! authenticates both connections; only then does it pause the vCPUs and send their state on the
//! urgent channel. From then on it is the page server of the VM: it answers demand requests on
//! the urgent channel and pushes every other page in address order on the bulk channel, skipping
//! pages already sent (a shared "sent" bitmap), zero pages as markers. A demand request is always
//! answered, even for a page the push has queued: waiting behind the bulk stream would defeat the
//! urgent channel (such duplicates are counted). When the destination says
//! `Complete` (every page is local there), the source is done.
//!
//! The destination ([`incoming`]) creates the VM with empty RAM under userfaultfd
//! ([`DemandPaging`]), restores the vCPUs and resumes them at once. A fault sends a
//! `PageRequest` on the urgent channel; receiver threads install pages from both channels.
//! If the source goes away, faulting vCPUs wait and the error is reported: pages never become
//! zero behind the guest's back. The message sequence is in `tsubame_pageserver::protocol`.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pageserver::protocol::{
    self, Channel, Message, ProtocolError, Region, MAX_PAGES_PER_FRAME, PROTOCOL_VERSION,
};
use tsubame_uffd::{AtomicBitmap, FaultEngine, PageSource, SourceError};

use crate::memory::{
    for_each_page_run, GuestMemory, MemoryLayout, RegionLayout, PAGE_BYTES, PAGE_SIZE,
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
    #[error("this VM is already migrating or migrated")]
    AlreadyMigrating,
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

/// Source side of the handshake on a fresh connection.
fn handshake_source(
    s: &mut TcpStream,
    secret: &[u8],
    channel: Channel,
    session: u64,
    layout: &[Region],
) -> Result<(), MigrationError> {
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
    }
    .write_to(s)?;
    match Message::read_from(s)? {
        Message::Accept { mac }
            if protocol::mac_eq(&mac, &protocol::destination_mac(secret, &nonce_s, &nonce_d)) =>
        {
            Ok(())
        }
        Message::Accept { .. } => Err(ProtocolError::Auth.into()),
        m => Err(ProtocolError::unexpected("Accept", m).into()),
    }
}

/// Destination side of the handshake; returns (channel, session, layout).
fn handshake_destination(
    s: &mut TcpStream,
    secret: &[u8],
    expect: Option<&MemoryLayout>,
) -> Result<(Channel, u64, MemoryLayout), MigrationError> {
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
    let (version, channel, session, nonce_s, mac, layout) = match Message::read_from(s)? {
        Message::Hello {
            version,
            channel,
            session,
            nonce,
            mac,
            layout,
        } => (version, channel, session, nonce, mac, layout),
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
    Ok((channel, session, layout))
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
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
    /// Pause of the vCPUs -> state sent (the source's share of the downtime).
    pub downtime_us: u64,
    pub state_bytes: u64,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    /// Demand replies for pages the push had already queued (sent twice).
    pub pages_duplicate: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    pub total_pages: u64,
    pub prepage: Prepage,
    /// `hot`: pages the profile found written (pushed first).
    pub hot_pages: u64,
    /// Switchover -> `Complete` from the destination.
    pub total_ms: Option<f64>,
}

/// The order of the background push (prepaging policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prepage {
    /// Guest-physical address order.
    #[default]
    Address,
    /// Around each demand fault first, outward from the faulting page (Yabusame's bubbling),
    /// then address order.
    Bubble,
    /// The pages the guest wrote during a short profile before switchover first (KVM dirty
    /// log), then address order.
    Hot,
}

impl std::str::FromStr for Prepage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "address" => Ok(Self::Address),
            "bubble" => Ok(Self::Bubble),
            "hot" => Ok(Self::Hot),
            _ => Err(format!(
                "unknown prepaging policy '{s}': use address, bubble or hot"
            )),
        }
    }
}

/// Options of an outgoing migration.
#[derive(Clone, Debug, Default)]
pub struct MigrateOptions {
    /// Cap on the background push, in bytes per second (demand replies are never held back).
    pub max_bandwidth: Option<u64>,
    pub prepage: Prepage,
    /// `Hot`: how long to record the guest's writes before switchover (default 100 ms).
    pub profile: Option<Duration>,
}

/// Pages around a demand fault that `Prepage::Bubble` pushes, on each side.
const BUBBLE: u64 = 64;

/// The two authenticated connections of a migration.
#[derive(Debug)]
pub struct Channels {
    /// vCPU state, demand requests and their pages.
    pub urgent: TcpStream,
    /// The background push.
    pub bulk: TcpStream,
}

/// An outgoing migration: the source's page server.
#[derive(Debug)]
pub struct Outgoing {
    destination: String,
    started: Instant,
    downtime: Mutex<Duration>,
    state_bytes: AtomicU64,
    pages_demand: AtomicU64,
    pages_pushed: AtomicU64,
    duplicates: AtomicU64,
    zero_pages: AtomicU64,
    bytes_sent: AtomicU64,
    total_pages: u64,
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
    ) -> Result<(Arc<Self>, Channels), MigrationError> {
        let addr = parse_uri(uri)?;
        let session = u64::from_le_bytes(protocol::nonce()?[..8].try_into().expect("8 bytes"));
        let wire = wire_layout(layout);
        let connect = |channel| -> Result<TcpStream, MigrationError> {
            let mut s = TcpStream::connect(addr).map_err(|source| MigrationError::Connect {
                addr: addr.to_string(),
                source,
            })?;
            s.set_nodelay(true)?;
            handshake_source(&mut s, secret, channel, session, &wire)?;
            Ok(s)
        };
        let urgent = connect(Channel::Urgent)?;
        let bulk = connect(Channel::Bulk)?;
        let out = Arc::new(Self {
            destination: addr.to_string(),
            started: Instant::now(),
            downtime: Mutex::new(Duration::ZERO),
            state_bytes: AtomicU64::new(0),
            pages_demand: AtomicU64::new(0),
            pages_pushed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            total_pages: layout.total_pages(),
            prepage: Mutex::new((Prepage::Address, 0)),
            outcome: Mutex::new((Phase::Postcopy, None, None)),
        });
        Ok((out, Channels { urgent, bulk }))
    }

    /// Sends the paused VM's state, then serves its memory on two threads until the
    /// destination has every page. `paused_at` is when the vCPUs were paused.
    pub fn switch_over(
        self: &Arc<Self>,
        state: &VmState,
        memory: Arc<GuestMemory>,
        channels: Channels,
        paused_at: Instant,
        options: &MigrateOptions,
        hot: Vec<u64>,
    ) -> Result<(), MigrationError> {
        *self.prepage.lock().expect("migration lock") = (options.prepage, hot.len() as u64);
        let Channels { mut urgent, bulk } = channels;
        let json =
            serde_json::to_vec(state).map_err(|e| MigrationError::BadState(e.to_string()))?;
        self.state_bytes.store(json.len() as u64, Ordering::Relaxed);
        Message::VmState(json).write_to(&mut urgent)?;
        *self.downtime.lock().expect("migration lock") = paused_at.elapsed();
        let sent = Arc::new(AtomicBitmap::new(memory.layout().total_pages()));
        // Bubble: the demand thread tells the push thread where the guest faults.
        let (fault_tx, faults) = crossbeam::channel::unbounded();
        let fault_tx = (options.prepage == Prepage::Bubble).then_some(fault_tx);
        let (me, mem, s) = (self.clone(), memory.clone(), sent.clone());
        std::thread::Builder::new()
            .name("migrate-urgent".into())
            .spawn(move || me.serve_demand(&mem, &s, urgent, fault_tx.as_ref()))?;
        let me = self.clone();
        let order = PushOrder {
            rate: options.max_bandwidth,
            hot,
            faults,
        };
        std::thread::Builder::new()
            .name("migrate-bulk".into())
            .spawn(move || me.push_all(&memory, &sent, bulk, &order))?;
        Ok(())
    }

    fn finish(&self, phase: Phase, error: Option<String>) {
        let mut o = self.outcome.lock().expect("migration lock");
        if o.0 == Phase::Postcopy {
            *o = (phase, error, Some(self.started.elapsed()));
        }
    }

    /// Sends pages `[gfn, gfn + count)`: zero runs as markers, data runs as pages. The push
    /// (`demand == false`) skips pages already sent. A demand reply always goes out: the
    /// destination faulted, so it does not have the page yet, and a page the push marked may
    /// still sit in its queue, behind up to megabytes of bulk data; such a page is sent twice
    /// and counted in `duplicates`.
    fn send_pages(
        &self,
        w: &mut impl Write,
        memory: &GuestMemory,
        sent: &AtomicBitmap,
        gfn: u64,
        count: u64,
        demand: bool,
    ) -> Result<(), MigrationError> {
        let counter = if demand {
            &self.pages_demand
        } else {
            &self.pages_pushed
        };
        let layout = memory.layout();
        let max_run = u64::from(MAX_PAGES_PER_FRAME);
        let mut buf = Vec::new();
        let mut take = Vec::new();
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
                let already = sent.test_and_set(first + k);
                if already && demand {
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                take.push(!already || demand);
            }
            let len = usize::try_from(n).expect("run fits usize") * PAGE_BYTES;
            buf.resize(len, 0);
            memory
                .read(g * PAGE_SIZE, &mut buf)
                .map_err(|e| MigrationError::BadState(e.to_string()))?;
            // Taken pages go out as runs of zero markers and runs of data, straight from buf.
            for_each_page_run(
                &buf,
                |k| take[k],
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
        sent: &AtomicBitmap,
        urgent: TcpStream,
        faults: Option<&crossbeam::channel::Sender<u64>>,
    ) {
        let result = (|| -> Result<(), MigrationError> {
            let mut reader = BufReader::new(urgent.try_clone()?);
            let mut writer = urgent;
            loop {
                match Message::read_from(&mut reader)? {
                    Message::PageRequest { gfn, count } => {
                        self.send_pages(&mut writer, memory, sent, gfn, u64::from(count), true)?;
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

    fn push_all(
        &self,
        memory: &GuestMemory,
        sent: &AtomicBitmap,
        bulk: TcpStream,
        order: &PushOrder,
    ) {
        const RUN: u64 = 256;
        let result = (|| -> Result<(), MigrationError> {
            let mut push = Pusher {
                out: self,
                memory,
                sent,
                w: BufWriter::with_capacity(1 << 20, bulk),
                rate: order.rate,
                pushed_bytes: 0,
                t0: Instant::now(),
            };
            // Hot pages first, in runs of consecutive gfns.
            let mut i = 0;
            while i < order.hot.len() {
                let mut j = i + 1;
                while j < order.hot.len()
                    && order.hot[j] == order.hot[j - 1] + 1
                    && ((j - i) as u64) < RUN
                {
                    j += 1;
                }
                push.send(order.hot[i], (j - i) as u64)?;
                i = j;
            }
            for r in &memory.layout().regions.clone() {
                let mut gfn = r.first_gfn();
                while gfn < r.first_gfn() + r.pages() {
                    // Bubble: around each new fault first, outward from it.
                    for g in order.faults.try_iter() {
                        push.send(g + 1, BUBBLE)?;
                        push.send(g.saturating_sub(BUBBLE), BUBBLE.min(g))?;
                    }
                    let n = RUN.min(r.first_gfn() + r.pages() - gfn);
                    push.send(gfn, n)?;
                    gfn += n;
                }
            }
            Message::PushDone.write_to(&mut push.w)?;
            push.w.flush()?;
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
        MigrationStatus {
            role: "source",
            phase: o.0,
            error: o.1,
            destination: self.destination.clone(),
            downtime_us: u64::try_from(self.downtime.lock().expect("migration lock").as_micros())
                .unwrap_or(u64::MAX),
            state_bytes: self.state_bytes.load(Ordering::Relaxed),
            pages_demand: self.pages_demand.load(Ordering::Relaxed),
            pages_pushed: self.pages_pushed.load(Ordering::Relaxed),
            pages_duplicate: self.duplicates.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            total_pages: self.total_pages,
            prepage,
            hot_pages,
            total_ms: o.2.map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

/// What the push sends first, and how fast.
struct PushOrder {
    rate: Option<u64>,
    /// Sorted gfns to push before anything else.
    hot: Vec<u64>,
    /// Demand faults, for bubbling (empty unless `Prepage::Bubble`).
    faults: crossbeam::channel::Receiver<u64>,
}

/// The push thread's writer, with optional pacing.
struct Pusher<'a> {
    out: &'a Outgoing,
    memory: &'a GuestMemory,
    sent: &'a AtomicBitmap,
    w: BufWriter<TcpStream>,
    rate: Option<u64>,
    pushed_bytes: u64,
    t0: Instant,
}

impl Pusher<'_> {
    /// Pushes the pages of `[gfn, gfn + n)` not sent yet, then waits if over the rate.
    #[allow(clippy::cast_precision_loss)] // pacing arithmetic in seconds
    fn send(&mut self, gfn: u64, n: u64) -> Result<(), MigrationError> {
        if n == 0 {
            return Ok(());
        }
        self.out
            .send_pages(&mut self.w, self.memory, self.sent, gfn, n, false)?;
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            // n pages may leave only after n * 4 KiB / rate seconds.
            self.pushed_bytes += n * PAGE_SIZE;
            let due = Duration::from_secs_f64(self.pushed_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.t0.elapsed()) {
                self.w.flush()?;
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Demand requests go to the source on the urgent channel.
struct NetworkSource {
    urgent: Arc<Mutex<TcpStream>>,
}

impl PageSource for NetworkSource {
    fn request(&self, gfn: u64, _: &FaultEngine) -> Result<(), SourceError> {
        let mut s = self.urgent.lock().expect("urgent lock");
        Message::PageRequest { gfn, count: 1 }
            .write_to(&mut *s)
            .map_err(|e| SourceError(format!("lost the migration source: {e}")))
    }
}

/// An accepted, authenticated incoming migration, up to the VM state.
pub struct Incoming {
    pub layout: MemoryLayout,
    pub state: VmState,
    urgent: TcpStream,
    bulk: TcpStream,
    /// When the VM state arrived.
    pub state_received: Instant,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Listens on `uri`, calls `ready` with the bound address, and accepts connections until an
/// authenticated urgent + bulk pair of one session has sent the VM state. Refused connections
/// (wrong secret, other version, other layout) are logged and the destination keeps waiting.
pub fn incoming(
    uri: &str,
    secret: &[u8],
    expect: Option<&MemoryLayout>,
    ready: impl FnOnce(SocketAddr),
) -> Result<Incoming, MigrationError> {
    let addr = parse_uri(uri)?;
    let listener = TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    ready(listener.local_addr()?);
    let mut urgent: Option<(u64, TcpStream, MemoryLayout)> = None;
    let mut bulk: Option<(u64, TcpStream)> = None;
    loop {
        let (mut s, peer) = listener.accept()?;
        s.set_nodelay(true)?;
        match handshake_destination(&mut s, secret, expect) {
            Ok((Channel::Urgent, session, layout)) => urgent = Some((session, s, layout)),
            Ok((Channel::Bulk, session, _)) => bulk = Some((session, s)),
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
    let (_, mut urgent, layout) = urgent.expect("checked above");
    let (_, bulk) = bulk.expect("checked above");
    let json = match Message::read_from(&mut urgent)? {
        Message::VmState(j) => j,
        m => return Err(ProtocolError::unexpected("VmState", m).into()),
    };
    let state_received = Instant::now();
    let state: VmState =
        serde_json::from_slice(&json).map_err(|e| MigrationError::BadState(e.to_string()))?;
    if state.layout != layout {
        return Err(MigrationError::BadState(
            "the state's memory layout differs from the handshake's".into(),
        ));
    }
    Ok(Incoming {
        layout,
        state,
        urgent,
        bulk,
        state_received,
    })
}

impl Incoming {
    /// Starts demand paging over the two channels: the engine requests faulting pages from the
    /// source, receiver threads install what arrives, and `Complete` is sent once every page
    /// is local. Returns the paging and the VM state to restore.
    pub fn start_paging(
        self,
        memory: &GuestMemory,
    ) -> Result<(DemandPaging, VmState), crate::Error> {
        let mut paging = DemandPaging::new(memory, "migration")?;
        let engine = paging.engine().clone();
        let writer = Arc::new(Mutex::new(
            self.urgent.try_clone().map_err(MigrationError::Io)?,
        ));
        engine.start(Arc::new(NetworkSource {
            urgent: writer.clone(),
        }))?;
        let push_done = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(paging.completion());
        for (name, stream) in [
            ("migrate-urgent-rx", self.urgent),
            ("migrate-bulk-rx", self.bulk),
        ] {
            paging.own_socket(stream.try_clone().map_err(MigrationError::Io)?);
            let (engine, writer, push_done, completed, done) = (
                engine.clone(),
                writer.clone(),
                push_done.clone(),
                completed.clone(),
                done.clone(),
            );
            paging.spawn(name, move || {
                let mut r = BufReader::with_capacity(1 << 20, stream);
                let check_complete = || {
                    if push_done.load(Ordering::Acquire)
                        && engine.present_pages() == engine.total_pages()
                        && !completed.swap(true, Ordering::AcqRel)
                    {
                        done();
                        let _ =
                            Message::Complete.write_to(&mut *writer.lock().expect("urgent lock"));
                    }
                };
                loop {
                    let installed = match Message::read_from(&mut r) {
                        Ok(Message::Pages { gfn, data }) => engine.install(gfn, &data).map(drop),
                        Ok(Message::ZeroPages { gfn, count }) => {
                            engine.install_zero(gfn, count).map(drop)
                        }
                        Ok(Message::PushDone) => {
                            push_done.store(true, Ordering::Release);
                            Ok(())
                        }
                        Ok(m) => {
                            engine.report_source_error(SourceError(format!(
                                "unexpected {} from the source",
                                m.name()
                            )));
                            return;
                        }
                        Err(e) => {
                            if !completed.load(Ordering::Acquire) {
                                engine.report_source_error(SourceError(format!(
                                    "lost the migration source: {e}"
                                )));
                            }
                            return;
                        }
                    };
                    if let Err(e) = installed {
                        engine.report_source_error(SourceError(format!(
                            "installing pages from the source: {e}"
                        )));
                    }
                    check_complete();
                }
            })?;
        }
        Ok((paging, self.state))
    }
}
