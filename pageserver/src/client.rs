//! The page client: the receiving side of a session, feeding a [`PageSink`].
//!
//! ```text
//!  fault thread:  request(gfn) ──PageRequest──► server        (urgent channel)
//!                 read_replies() ◄──Pages / ZeroPages── one reply per request, installed here
//!                                ◄──Released────────── (a page already here, see `server`)
//!  bulk thread:   receive_bulk() ◄──Pages / ZeroPages / Discard / RoundDone / PushDone──
//!                 ──Installed{bytes}──► (flow control, on the bulk connection's return path)
//! ```
//!
//! Demand replies are read by the thread that asked (the fault engine's thread, in
//! [`PageClient::read_replies`]): a reply wakes no other thread first, and while one is due
//! the reader spins for a while before it sleeps ([`crate::spin`]). Bulk pages are received
//! straight into memory the sink hands out ([`PageSink::receive`]), e.g. a staging pool they
//! are then moved in from. Whatever happens to the connection, the sink never gets a page
//! that did not arrive whole: a failure is reported ([`ClientEvents::failed`]) and the pages
//! stay missing.

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tsubame_pages::{Delivery, Gfn, PageError, PageSink};

use crate::flow::{Acknowledger, Counted};
use crate::frame::{read_head, read_payload, Head, ProtocolError};
use crate::message::Message;
use crate::spin::{lower_priority, now_ns, SpinRead};

/// Why a client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("lost {peer}: {source}")]
    Lost {
        peer: String,
        #[source]
        source: ProtocolError,
    },
    #[error("pages from {peer} could not be installed: {source}")]
    Install {
        peer: String,
        #[source]
        source: PageError,
    },
    #[error("{peer} sent {what}")]
    Unexpected { peer: String, what: String },
}

/// What the client's owner hears about.
pub trait ClientEvents: Send + Sync {
    /// A frame was applied: pages installed, or a control message handled.
    fn applied(&self, client: &PageClient) {
        let _ = client;
    }
    /// The bulk channel passed `PrecopyDone`: everything of the precopy phase is installed.
    fn precopy_done(&self, client: &PageClient) {
        let _ = client;
    }
    /// The client stopped receiving: the connection was lost, or what arrived could not be
    /// applied. Pages not installed stay missing.
    fn failed(&self, client: &PageClient, error: ClientError);
    /// The server says that `endpoint` now holds `runs` of the pages it serves (`Owners` on
    /// the bulk channel: a split migration's handover to memservers). `Err` says why that
    /// cannot be taken; receivers that expect no such news refuse it.
    fn owners(
        &self,
        client: &PageClient,
        endpoint: &str,
        runs: &[(Gfn, u64)],
    ) -> Result<(), String> {
        let _ = (client, runs);
        Err(format!("an unexpected hand-over of pages to {endpoint}"))
    }
}

/// The client's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientStats {
    pub requests: u64,
    pub pages_received: u64,
    pub zero_pages: u64,
    pub pages_discarded: u64,
    pub bytes_received: u64,
    pub push_done: bool,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    pages: AtomicU64,
    zero: AtomicU64,
    discarded: AtomicU64,
    bytes: AtomicU64,
}

/// A reader of one channel: counts the bytes of the frames taken from it (for
/// acknowledgements), and keeps a buffer for pages the sink does not receive in place.
#[derive(Debug)]
struct ChannelReader<R> {
    r: Counted<BufReader<Heard<R>>>,
    scratch: Vec<u8>,
}

/// A socket reader that records when it last got bytes ([`now_ns`]): a frame that takes
/// seconds on a slow link still shows the link alive.
#[derive(Debug)]
struct Heard<R> {
    inner: R,
    at: Arc<AtomicU64>,
}

impl<R: Read> Read for Heard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.at.store(now_ns(), Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl<R: Read> ChannelReader<R> {
    fn new(stream: R, heard_at: Arc<AtomicU64>) -> Self {
        let stream = Heard {
            inner: stream,
            at: heard_at,
        };
        Self {
            // A page payload bypasses the buffer once it is empty; what a header read brought
            // in of the payload after it (up to 64 KiB) is copied out of it: in perf, that copy
            // cost the push's receiver a quarter as much as the socket's own. A 4 KiB buffer
            // copied less but gave the same push rate in 18 alternating runs, so it stays.
            r: Counted {
                inner: BufReader::with_capacity(64 << 10, stream),
                bytes: 0,
            },
            scratch: Vec::new(),
        }
    }
}

/// Why a reader stopped reading.
enum Stop {
    Lost(ProtocolError),
    Failed(ClientError),
}

/// The receiving side of one session with a page server.
pub struct PageClient {
    peer: String,
    sink: Arc<dyn PageSink>,
    events: Arc<dyn ClientEvents>,
    /// The urgent channel's write half: requests, acknowledgements, `Resumed`, `Complete`.
    writer: Mutex<TcpStream>,
    /// The urgent channel's reader, once demand replies are due on it.
    replies: Mutex<Option<ChannelReader<SpinRead>>>,
    /// Requests sent since the last [`Self::read_replies`].
    outstanding: AtomicU64,
    /// When the last request went out ([`now_ns`]): the reply reader spins for a while after.
    asked_at: Arc<AtomicU64>,
    push_done: AtomicBool,
    completed: AtomicBool,
    counters: Counters,
    /// The bulk channel, once [`Self::receive_bulk`] reads it (for [`Self::disconnect`]).
    bulk: Mutex<Option<TcpStream>>,
    /// When the server was last heard, on either channel ([`now_ns`]; at first, when the
    /// client was made, the session's handshake just done).
    heard_at: Arc<AtomicU64>,
}

impl std::fmt::Debug for PageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageClient")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PageClient {
    /// A client of the server at the other end of `urgent`, called `peer` in errors, that
    /// installs into `sink`. Demand replies are read only after [`Self::attach_replies`]
    /// (the caller may have other messages to read off the urgent channel first).
    pub fn new(
        peer: &str,
        urgent: &TcpStream,
        sink: Arc<dyn PageSink>,
        events: Arc<dyn ClientEvents>,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            peer: peer.to_string(),
            sink,
            events,
            writer: Mutex::new(urgent.try_clone()?),
            replies: Mutex::new(None),
            outstanding: AtomicU64::new(0),
            asked_at: Arc::new(AtomicU64::new(0)),
            push_done: AtomicBool::new(false),
            completed: AtomicBool::new(false),
            counters: Counters::default(),
            bulk: Mutex::new(None),
            heard_at: Arc::new(AtomicU64::new(now_ns())),
        }))
    }

    /// The server's name, as given.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// From now on, demand replies are read off `urgent`.
    pub fn attach_replies(&self, urgent: TcpStream) {
        *self.replies.lock().expect("client lock") = Some(ChannelReader::new(
            SpinRead::new(urgent, self.asked_at.clone()),
            self.heard_at.clone(),
        ));
    }

    /// Sends `m` on the urgent channel.
    pub fn send(&self, m: &Message) -> Result<(), ClientError> {
        m.write_to(&mut *self.writer.lock().expect("client lock"))
            .map_err(|source| self.lost(source))
    }

    /// Asks for page `gfn` on the urgent channel; its reply is read by
    /// [`Self::read_replies`]. After [`Self::complete`] (every page is here) it asks nothing.
    pub fn request(&self, gfn: Gfn) -> Result<(), ClientError> {
        if self.is_completed() {
            return Ok(());
        }
        let mut w = self.writer.lock().expect("client lock");
        self.asked_at.store(now_ns(), Ordering::Relaxed);
        Message::PageRequest { gfn, count: 1 }
            .write_to(&mut *w)
            .map_err(|source| self.lost(source))?;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads and installs the replies to every request sent since the last call (exactly one
    /// reply frame per request).
    pub fn read_replies(&self) -> Result<(), ClientError> {
        let due = self.outstanding.swap(0, Ordering::Relaxed);
        if due == 0 {
            return Ok(());
        }
        let mut replies = self.replies.lock().expect("client lock");
        let Some(r) = replies.as_mut() else {
            return Ok(()); // not attached: nobody can be waiting on a reply yet
        };
        for _ in 0..due {
            match self.receive_one(r, Delivery::Demand, None) {
                Ok(()) => {}
                Err(Stop::Lost(_)) if self.completed.load(Ordering::Acquire) => return Ok(()),
                Err(Stop::Lost(source)) => return Err(self.lost(source)),
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives the bulk channel until it ends, installing what arrives and acknowledging
    /// what is installed (flow control). Reports a failure to the events, unless it came
    /// after the server's `PushDone` (the server closes the channel then) or after
    /// [`Self::complete`].
    pub fn receive_bulk(&self, bulk: TcpStream) {
        let mut acks = match bulk.try_clone() {
            Ok(s) => Acknowledger::new(s),
            Err(e) => return self.events.failed(self, self.lost(e.into())),
        };
        *self.bulk.lock().expect("client lock") = bulk.try_clone().ok();
        let mut r = ChannelReader::new(bulk, self.heard_at.clone());
        loop {
            match self.receive_one(&mut r, Delivery::Bulk, Some(&mut acks)) {
                Ok(()) => {}
                Err(Stop::Lost(e)) => {
                    let after_push = matches!(e, ProtocolError::Closed)
                        && self.push_done.load(Ordering::Acquire);
                    if !self.completed.load(Ordering::Acquire) && !after_push {
                        self.events.failed(self, self.lost(e));
                    }
                    return;
                }
                Err(Stop::Failed(e)) => {
                    self.events.failed(self, e);
                    return;
                }
            }
        }
    }

    /// Tells the server this side has every page it needs (once): it stops serving.
    pub fn complete(&self) {
        if !self.completed.swap(true, Ordering::AcqRel) {
            let _ = self.send(&Message::Complete);
        }
    }

    /// Whether [`Self::complete`] was called.
    pub fn is_completed(&self) -> bool {
        self.completed.load(Ordering::Acquire)
    }

    /// Whether the server has pushed everything it is going to push.
    pub fn is_push_done(&self) -> bool {
        self.push_done.load(Ordering::Acquire)
    }

    /// How long ago the server last sent anything (a byte of a reply or of the bulk stream,
    /// or, before any, the handshake). A link whose push has not ended and that says nothing
    /// for long may have gone silent: the receiver probes it with a request (see
    /// `OwnerRouter::check_silent` in the VMM).
    pub fn heard_ago(&self) -> std::time::Duration {
        let at = self.heard_at.load(Ordering::Relaxed);
        std::time::Duration::from_nanos(now_ns().saturating_sub(at))
    }

    /// The counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            pages_received: c.pages.load(Ordering::Relaxed),
            zero_pages: c.zero.load(Ordering::Relaxed),
            pages_discarded: c.discarded.load(Ordering::Relaxed),
            bytes_received: c.bytes.load(Ordering::Relaxed),
            push_done: self.is_push_done(),
        }
    }

    /// Shuts both channels down: a link given up on (silent too long) stops here, and its
    /// readers end, rather than wait for a peer that may never answer.
    pub fn disconnect(&self) {
        let _ = self
            .writer
            .lock()
            .expect("client lock")
            .shutdown(std::net::Shutdown::Both);
        if let Some(b) = self.bulk.lock().expect("client lock").as_ref() {
            let _ = b.shutdown(std::net::Shutdown::Both);
        }
    }

    fn lost(&self, source: ProtocolError) -> ClientError {
        ClientError::Lost {
            peer: self.peer.clone(),
            source,
        }
    }

    fn install_failed(&self, source: PageError) -> ClientError {
        ClientError::Install {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Reads one frame and applies it, then acknowledges it if `acks` is given.
    fn receive_one<R: Read>(
        &self,
        r: &mut ChannelReader<R>,
        delivery: Delivery,
        acks: Option<&mut Acknowledger>,
    ) -> Result<(), Stop> {
        let applied = match read_head(&mut r.r).map_err(Stop::Lost)? {
            Head::Pages { gfn, pages } => {
                let reader = &mut r.r;
                let got = self
                    .sink
                    .receive(gfn, pages, delivery, &mut r.scratch, &mut |buf| {
                        read_payload(reader, buf)
                    });
                match got {
                    Ok(_) => {
                        self.counters.pages.fetch_add(pages, Ordering::Relaxed);
                        self.counters
                            .bytes
                            .fetch_add(pages * tsubame_pages::PAGE_SIZE, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(PageError::Payload(e)) => {
                        return Err(Stop::Lost(match e.kind() {
                            std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
                            _ => e.into(),
                        }))
                    }
                    Err(e) => Err(self.install_failed(e)),
                }
            }
            Head::Message(m) => self.handle(m),
        };
        // Only what is applied is acknowledged: a server in release mode frees its copy of
        // whatever is.
        applied.map_err(Stop::Failed)?;
        if let Some(a) = acks {
            a.installed(r.r.bytes, r.r.inner.buffer().is_empty());
        }
        self.events.applied(self);
        Ok(())
    }

    fn handle(&self, m: Message) -> Result<(), ClientError> {
        match m {
            // (`Pages` never gets here: `receive_one` reads it into the sink itself.)
            Message::ZeroPages { gfn, count } => {
                self.counters.zero.fetch_add(count, Ordering::Relaxed);
                self.sink
                    .install_zero(gfn, count)
                    .map(drop)
                    .map_err(|e| self.install_failed(e))
            }
            Message::Discard { gfn, count } => {
                self.counters.discarded.fetch_add(count, Ordering::Relaxed);
                self.sink
                    .forget(gfn, count)
                    .map_err(|e| self.install_failed(e))
            }
            Message::RoundDone { round } => self.send(&Message::RoundDone { round }),
            Message::PrecopyDone => {
                self.events.precopy_done(self);
                // The VM resumes now: from here on the bulk stream yields to demand faults.
                // (Not before: the switchover waits for this very message.)
                lower_priority();
                Ok(())
            }
            Message::PushDone => {
                self.push_done.store(true, Ordering::Release);
                Ok(())
            }
            // A request that crossed the acknowledgement of the pages it asked for: they are
            // here already, or something is badly wrong (the server can never send them).
            Message::Released { gfn, count } => match self.sink.all_installed(gfn, count) {
                Some(false) => Err(ClientError::Unexpected {
                    peer: self.peer.clone(),
                    what: format!(
                        "that it released {gfn} (+{count} pages) after this side acknowledged \
                         them, but they are not installed here: it cannot send them again \
                         (release=on); this is a bug, please report it"
                    ),
                }),
                Some(true) | None => Ok(()),
            },
            Message::Owners { endpoint, runs } => self
                .events
                .owners(self, &endpoint, &runs)
                .map_err(|what| ClientError::Unexpected {
                    peer: self.peer.clone(),
                    what,
                }),
            Message::Error { message } => Err(ClientError::Unexpected {
                peer: self.peer.clone(),
                what: format!("an error: {message}"),
            }),
            m => Err(ClientError::Unexpected {
                peer: self.peer.clone(),
                what: format!("an unexpected {}", m.name()),
            }),
        }
    }
}
