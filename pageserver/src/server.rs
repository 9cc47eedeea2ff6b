//! The page server: serves one receiver the pages of a [`PageStore`].
//!
//! ```text
//!             urgent:  PageRequest{gfn} ──► reply at once, even if the push sent it ──► Pages
//!  receiver ◄─────────────────────────────────────────────────────────────────────────────
//!             bulk:    push every page not sent yet, in the prepaging order, flow-controlled
//! ```
//!
//! A "sent" bitmap (by page index) records what the receiver has been sent, so the push never
//! sends a page twice; pages the receiver gets from another owner are marked in it up front
//! ([`PageServer::withhold`]), and pages whose copy went stale are cleared from it
//! ([`PageServer::unsend`]). A demand request is always answered, even for a page the push
//! has queued: waiting behind the bulk stream would defeat the urgent channel (such duplicates
//! are counted). Zero pages travel as markers; the store may tell them without reading them
//! ([`PageStore::known_zero`]), except on the demand path, where reading one page costs less
//! than asking.
//!
//! [`PageServer::serve`] runs the two threads until the receiver says `Complete` (it has every
//! page) or goes away; [`PageServer::status`] reports where it is. Precopy rounds, which a
//! migration source runs before it serves, send through a [`BulkSender`] with
//! [`SendKind::Precopy`].
//!
//! ## Release mode
//!
//! With [`PushOptions::release`] the server frees the store's copy of each page once the
//! receiver holds it ([`PageStore::release`]): the source of an evicted VM gives its memory
//! back as the migration goes. Only what is known to be installed at the receiver goes:
//! - a pushed run, once the receiver has acknowledged the bulk stream past the run's end
//!   (`Installed` counts the bytes it has read *and installed*). The push keeps the runs it
//!   sent with their end positions, releases the acknowledged ones after each run it sends,
//!   and the rest once everything is acknowledged after `PushDone`;
//! - pages sent before serving (a migration's precopy rounds: each ended with the receiver's
//!   acknowledgement, and pages written since were unsent), once the push has sent its last
//!   page: the push's time goes to the pages the receiver still lacks first;
//! - demand replies are not acknowledged: they, and every other page, go at `Complete`.
//!
//! A released page is never read again: the push skips it, and a demand request for one is
//! answered `Released`, never with page data. Such a request is not necessarily a confused
//! receiver: a request and the acknowledgement of the run that brought the page cross on
//! different connections. The receiver checks that it holds the pages. Releases run on the
//! push thread only, between its own sends; demand replies, on the other thread, never read a
//! page while it is released ([`Reading`]).

use std::collections::VecDeque;
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{
    for_each_page_run_hinted, AtomicBitmap, Gfn, MemoryLayout, PageError, PageStore, PAGE_BYTES,
    PAGE_SIZE,
};

use crate::flow::BulkWriter;
use crate::frame::{write_pages, ProtocolError};
use crate::message::{Message, MAX_PAGES_PER_FRAME};
use crate::prepage::{HotPages, Prepage, BUBBLE};
use crate::spin::{lower_priority, now_ns, SpinRead};

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("reading pages to send failed: {0}")]
    Store(#[from] PageError),
    #[error("the receiver asked for {gfn} (+{count} pages), which is not this VM's memory")]
    BadRequest { gfn: Gfn, count: u64 },
    #[error("cannot start a server thread: {0}")]
    Thread(std::io::Error),
    #[error("serving was stopped")]
    Stopped,
}

impl From<std::io::Error> for ServerError {
    fn from(e: std::io::Error) -> Self {
        Self::Protocol(e.into())
    }
}

/// How a run of pages is being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendKind {
    /// A demand reply: always sent, even if the push already did.
    Demand,
    /// The background push: pages not sent yet.
    Push,
    /// A precopy round: pages not sent yet (a page written again has its bit cleared).
    Precopy,
}

/// Where a server is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "error")]
pub enum ServeState {
    /// Not serving yet (precopy rounds may run).
    Idle,
    Serving,
    /// The receiver has every page.
    Completed,
    Failed(String),
}

/// The server's counters.
#[derive(Clone, Debug, Serialize)]
pub struct ServerStats {
    #[serde(flatten)]
    pub state: ServeState,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    pub pages_precopy: u64,
    /// Demand replies for pages the push had already queued (sent twice).
    pub pages_duplicate: u64,
    pub zero_pages: u64,
    /// Pages the receiver gets from other owners ([`PageServer::withhold`]).
    pub pages_withheld: u64,
    pub bytes_sent: u64,
    /// Page data sent by the background push (zero pages go as markers: not counted).
    pub bytes_pushed: u64,
    /// Release mode: pages the store released, the receiver holding them.
    pub pages_released: u64,
    /// Release mode: pages asked for on demand after their release (answered `Released`).
    pub pages_asked_after_release: u64,
    /// Serving started -> the push sent its last page.
    pub push_ms: Option<f64>,
    /// Serving started -> `Complete` (or the failure).
    pub serve_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct Counters {
    demand: AtomicU64,
    pushed: AtomicU64,
    precopy: AtomicU64,
    duplicates: AtomicU64,
    zero: AtomicU64,
    withheld: AtomicU64,
    bytes: AtomicU64,
    bytes_pushed: AtomicU64,
    released: AtomicU64,
    asked_after_release: AtomicU64,
}

#[derive(Debug)]
struct Progress {
    state: ServeState,
    since: Option<Instant>,
    push_done: Option<Duration>,
    ended: Option<Duration>,
}

/// What the push does, besides the order.
#[derive(Debug)]
pub struct PushOptions {
    pub prepage: Prepage,
    /// Bytes per second of the push (demand replies are never held back).
    pub rate: Option<u64>,
    /// Pages pushed before anything else ([`Prepage::Hot`]; may be empty).
    pub hot: HotPages,
    /// The push starts when the receiver says `Resumed` (or, with `start_on_demand`, first
    /// asks for a page): pushing while it assembles its VM would take CPU time from that.
    /// `Some(t)`: after `t` at the latest (a receiver that stays paused still gets its pages).
    pub gate_timeout: Option<Duration>,
    /// Whether a demand request opens the gate too. A migration's destination may fault
    /// before its `Resumed` arrives; a memserver hosting a VM's pages pushes them only when
    /// the host asks for all of them (`Resumed`: consolidation), never because of a fault.
    pub start_on_demand: bool,
    /// Runs once the gate opens, before the first page is pushed (a memserver marks the
    /// pages it does not hold then: it may have been given more since serving began).
    pub before_push: Option<PushHook>,
    /// Writes what goes after the last pushed page and before `PushDone` (a split's
    /// ownership handover: the pages memservers now hold).
    pub after_push: Option<PushHook>,
    /// Release mode (see the module docs): free each page at the store once the receiver
    /// holds it. Pages marked sent before serving (precopy rounds) must be installed at the
    /// receiver by then, and the store's pages must not change any more.
    pub release: bool,
}

/// A step of the push thread, given the bulk channel (see [`PushOptions`]).
pub struct PushHook(pub Box<PushStep>);

/// What a [`PushHook`] runs.
pub type PushStep = dyn FnOnce(&mut BulkWriter) -> Result<(), ServerError> + Send;

impl PushHook {
    pub fn new(
        f: impl FnOnce(&mut BulkWriter) -> Result<(), ServerError> + Send + 'static,
    ) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for PushHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushHook")
    }
}

/// Reusable buffers of one sending thread.
#[derive(Debug, Default)]
pub struct Scratch {
    data: Vec<u8>,
    take: Vec<bool>,
    zero: Vec<bool>,
    /// The stretches the last [`PageServer::send`] sent (as data or zero markers).
    sent: Vec<(Gfn, u64)>,
}

/// The pages a demand reply is reading, so that the push never releases them meanwhile: a
/// handshake without a lock, so that a reply never waits for the push (which runs at a lower
/// priority). The reply publishes its pages ([`Self::begin`]), then checks their "released"
/// bits; a release sets the bits, then waits until no reply reads its pages
/// ([`Self::wait_clear`]). Each side fences (sequentially consistent) between its write and
/// its read, so at least one sees the other: the reply finds a page released and does not
/// read it, or the release waits until the reply is written.
#[derive(Debug, Default)]
struct Reading(AtomicU64);

impl Reading {
    /// Publishes that pages `[index, index + pages)` (at most [`MAX_PAGES_PER_FRAME`]) are
    /// being read, until the guard drops.
    fn begin(&self, index: u64, pages: u64) -> ReadingGuard<'_> {
        assert!(
            index < 1 << 48 && (1..1 << 16).contains(&pages),
            "a run of one frame"
        );
        self.0.store(index << 16 | pages, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        ReadingGuard(self)
    }

    /// Waits until no demand reply reads a page of `[index, index + pages)`, whose "released"
    /// bits the caller has just set.
    fn wait_clear(&self, index: u64, pages: u64) {
        std::sync::atomic::fence(Ordering::SeqCst);
        loop {
            let r = self.0.load(Ordering::SeqCst);
            let (from, n) = (r >> 16, r & 0xffff);
            if n == 0 || from + n <= index || index + pages <= from {
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// Ends a [`Reading::begin`].
struct ReadingGuard<'a>(&'a Reading);

impl Drop for ReadingGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.store(0, Ordering::SeqCst);
    }
}

/// A page server over a store `S`, for one receiver.
#[derive(Debug)]
pub struct PageServer<S> {
    store: S,
    /// Once its pages are pushed, the push waits for more ([`Self::linger`]) until serving
    /// ends: a receiver may hand pages back (`Owners{"", runs}`: another owner of them is
    /// lost), and they are pushed again.
    linger: std::sync::atomic::AtomicBool,
    /// The push yields to everything else on its host (nice 10), unless told it is the
    /// host's main work ([`Self::push_first`]).
    push_first: std::sync::atomic::AtomicBool,
    repush: (
        crossbeam::channel::Sender<()>,
        crossbeam::channel::Receiver<()>,
    ),
    layout: MemoryLayout,
    sent: AtomicBitmap,
    /// Pages the precopy rounds sent whose copy is still current (not unsent since).
    precopied: AtomicBitmap,
    /// Release mode: pages the store released (never read again).
    released: AtomicBitmap,
    /// The pages a demand reply is reading (release mode).
    reading: Reading,
    counters: Counters,
    progress: Mutex<Progress>,
    /// Signalled when serving ends.
    ended: std::sync::Condvar,
    /// Held (shared) while a stretch of pages is read from the store and written out; taken
    /// exclusively by [`PageServer::exclusive`], to change the store's memory safely.
    sending: std::sync::RwLock<()>,
    /// Set by [`PageServer::stop`]: a paced push stops waiting.
    stopped: std::sync::atomic::AtomicBool,
    /// The serving threads, for [`PageServer::stop_and_wait`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The connections being served (urgent, bulk), shut down when serving ends.
    sockets: Mutex<Vec<TcpStream>>,
}

impl<S: PageStore + 'static> PageServer<S> {
    /// A server of `store`'s pages; nothing is sent yet.
    pub fn new(store: S) -> Self {
        let layout = store.layout().clone();
        Self {
            linger: std::sync::atomic::AtomicBool::new(false),
            push_first: std::sync::atomic::AtomicBool::new(false),
            repush: crossbeam::channel::unbounded(),
            sent: AtomicBitmap::new(layout.total_pages()),
            precopied: AtomicBitmap::new(layout.total_pages()),
            released: AtomicBitmap::new(layout.total_pages()),
            reading: Reading::default(),
            layout,
            store,
            counters: Counters::default(),
            progress: Mutex::new(Progress {
                state: ServeState::Idle,
                since: None,
                push_done: None,
                ended: None,
            }),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            sending: std::sync::RwLock::new(()),
            ended: std::sync::Condvar::new(),
        }
    }

    /// Makes the push wait, once it has sent everything, for pages the receiver hands back
    /// (see the field), until serving ends: for a receiver with another owner of some pages,
    /// which may be lost (a switched migration's old destination).
    pub fn linger(&self) {
        self.linger
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Keeps the push at its thread's normal priority: on a host where pushing is the main
    /// work (a switched migration's old destination forwarding what it holds), not something to
    /// do when the guest and the demand path leave time.
    pub fn push_first(&self) {
        self.push_first
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The store served.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Marks `[gfn, gfn + count)` as not this server's to push: the receiver gets those pages
    /// from another owner. Returns how many were not marked yet.
    pub fn withhold(&self, gfn: Gfn, count: u64) -> u64 {
        let mut n = 0;
        for run in self.layout.split(gfn, count, u64::MAX) {
            n += self.sent.set_range(run.index, run.pages);
        }
        self.counters.withheld.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Clears the "sent" marks of `[gfn, gfn + count)`: the receiver's copies went stale (or
    /// the pages are this server's again). Returns how many were marked. (A released page
    /// stays released: it cannot be sent again.)
    pub fn unsend(&self, gfn: Gfn, count: u64) -> u64 {
        self.layout
            .split(gfn, count, u64::MAX)
            .map(|run| {
                self.precopied.clear_range(run.index, run.pages);
                self.sent.clear_range(run.index, run.pages)
            })
            .sum()
    }

    /// Runs `f` while no page is being read from the store or written out: a store that lends
    /// its memory (a frozen guest memory) may be changed inside `f` (a cancellable migration's
    /// source commits reverse checkpoints so). Sending waits meanwhile.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _only = self
            .sending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// The runs of pages marked sent (or withheld), in layout order.
    pub fn sent_runs(&self) -> Vec<(Gfn, u64)> {
        let total = self.layout.total_pages();
        let mut runs = Vec::new();
        let mut index = 0;
        while index < total {
            let first = self.sent.next_set(index, total);
            if first >= total {
                break;
            }
            let end = self.sent.next_clear(first, total);
            let mut at = first;
            // A run of indices may span regions: one run per region.
            while let Some(run) = self.layout.run_at(at, end - at).filter(|_| at < end) {
                runs.push((run.gfn, run.pages));
                at += run.pages;
            }
            index = end;
        }
        runs
    }

    /// Pages marked sent (or withheld).
    pub fn pages_sent(&self) -> u64 {
        self.sent.count_ones()
    }

    /// Sends pages `[gfn, gfn + count)` on `w`: zero runs as markers, data runs as pages, each
    /// run straight from the store. The push and precopy rounds skip pages already sent; a
    /// demand reply sends them all (see the module docs) and fails for frames that are not
    /// this VM's memory. Released pages are never read: a demand reply says `Released` for
    /// them, the others skip them.
    pub fn send(
        &self,
        w: &mut impl Write,
        scratch: &mut Scratch,
        gfn: Gfn,
        count: u64,
        kind: SendKind,
    ) -> Result<(), ServerError> {
        let counter = match kind {
            SendKind::Demand => &self.counters.demand,
            SendKind::Push => &self.counters.pushed,
            SendKind::Precopy => &self.counters.precopy,
        };
        if kind == SendKind::Demand
            && self
                .layout
                .split(gfn, count, u64::MAX)
                .map(|r| r.pages)
                .sum::<u64>()
                != count
        {
            return Err(ServerError::BadRequest { gfn, count });
        }
        scratch.sent.clear();
        for run in self
            .layout
            .split(gfn, count, u64::from(MAX_PAGES_PER_FRAME))
        {
            // Only the push releases pages, between its own sends: a demand reply, on another
            // thread, says which pages it reads before it looks at what is released.
            let _reading =
                (kind == SendKind::Demand).then(|| self.reading.begin(run.index, run.pages));
            scratch.take.clear();
            for k in 0..run.pages {
                let take = !self.released.get(run.index + k) && {
                    let already = self.sent.test_and_set(run.index + k);
                    if already && kind == SendKind::Demand {
                        self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    !already || kind == SendKind::Demand
                };
                scratch.take.push(take);
            }
            // Each stretch of pages to send is read on its own: a store may not hold the
            // others (a memserver holds only what it was given).
            let mut k = 0;
            while k < scratch.take.len() {
                let (start, take) = (k, scratch.take[k]);
                while k < scratch.take.len() && scratch.take[k] == take {
                    k += 1;
                }
                let (at, pages) = (run.gfn + start as u64, (k - start) as u64);
                if take {
                    self.send_stretch(w, scratch, at, pages, kind, counter)?;
                    scratch.sent.push((at, pages));
                    if kind == SendKind::Precopy {
                        self.precopied.set_range(run.index + start as u64, pages);
                    }
                } else if kind == SendKind::Demand {
                    // Not taken on demand: released.
                    self.counters
                        .asked_after_release
                        .fetch_add(pages, Ordering::Relaxed);
                    Message::Released {
                        gfn: at,
                        count: pages,
                    }
                    .write_to(w)?;
                }
            }
        }
        Ok(())
    }

    /// Releases `[gfn, gfn + pages)` at the store (release mode): the receiver holds these
    /// pages. Called by the push thread only. A store that fails to release keeps the pages,
    /// which costs memory, not correctness: the failure is logged.
    fn release(&self, gfn: Gfn, pages: u64) {
        for run in self.layout.split(gfn, pages, u64::MAX) {
            let newly = self.released.set_range(run.index, run.pages);
            if newly == 0 {
                continue;
            }
            self.reading.wait_clear(run.index, run.pages);
            // SAFETY: slices of the store's memory live only inside `send_stretch`, and a
            // thread sending is either this one (the push, between its sends), or a demand
            // reply, which no longer reads these pages: they are marked released, and it has
            // finished any reply that read them before it saw that ([`Reading`]). Nothing
            // else sends while serving in release mode.
            match unsafe { self.store.release(run.gfn, run.pages) } {
                Ok(()) => {
                    self.counters.released.fetch_add(newly, Ordering::Relaxed);
                }
                Err(e) => log::warn!(
                    "pages {} (+{}) stay in memory, though the receiver holds them: {e}",
                    run.gfn,
                    run.pages
                ),
            }
        }
    }

    /// Releases every page whose bit in `pages` is `set` (release mode, the push thread).
    fn release_where(&self, pages: &AtomicBitmap, set: bool) {
        for run in self.layout.runs_where(pages, set) {
            self.release(run.gfn, run.pages);
        }
    }

    /// Sends `[gfn, gfn + pages)`, all of it, read from the store at once: zero runs as
    /// markers, data runs as pages.
    fn send_stretch(
        &self,
        w: &mut impl Write,
        scratch: &mut Scratch,
        gfn: Gfn,
        pages: u64,
        kind: SendKind,
        counter: &AtomicU64,
    ) -> Result<(), ServerError> {
        let _sending = self
            .sending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kind == SendKind::Demand {
            scratch.zero.clear();
        } else {
            self.store.known_zero(gfn, pages, &mut scratch.zero)?;
        }
        let data = self.store.read(gfn, pages, &mut scratch.data)?;
        let zero = &scratch.zero;
        for_each_page_run_hinted(
            data,
            |_| true,
            |k| zero.get(k) == Some(&true),
            |a, b, is_zero| {
                let (at, pages) = (gfn + a as u64, (b - a) as u64);
                counter.fetch_add(pages, Ordering::Relaxed);
                if is_zero {
                    self.counters.zero.fetch_add(pages, Ordering::Relaxed);
                    Message::ZeroPages {
                        gfn: at,
                        count: pages,
                    }
                    .write_to(w)?;
                } else {
                    let bytes = &data[a * PAGE_BYTES..b * PAGE_BYTES];
                    let n = bytes.len() as u64;
                    self.counters.bytes.fetch_add(n, Ordering::Relaxed);
                    if kind == SendKind::Push {
                        self.counters.bytes_pushed.fetch_add(n, Ordering::Relaxed);
                    }
                    write_pages(w, at, bytes)?;
                }
                Ok::<(), ServerError>(())
            },
        )
    }

    /// Serves the receiver on its session's two connections, on two threads of its own
    /// (`serve-urgent`, `serve-push`), until it says `Complete` or goes away
    /// ([`Self::status`]). `peer` names it in errors.
    pub fn serve(
        self: &Arc<Self>,
        peer: &str,
        urgent: TcpStream,
        bulk: BulkWriter,
        options: PushOptions,
    ) -> Result<(), ServerError> {
        {
            let mut p = self.progress.lock().expect("server lock");
            p.state = ServeState::Serving;
            // A resumed session counts from the first.
            p.since.get_or_insert_with(Instant::now);
        }
        {
            crate::session::notice_silence(&urgent)?;
            crate::session::notice_silence(bulk.stream())?;
            let mut sockets = self.sockets.lock().expect("server lock");
            sockets.push(urgent.try_clone()?);
            sockets.push(bulk.stream().try_clone()?);
        }
        // The demand thread tells the push where the guest faults (bubbling), and opens the
        // gate when the receiver has resumed (or asked for a page).
        let (fault_tx, faults) = crossbeam::channel::unbounded();
        let fault_tx = (options.prepage == Prepage::Bubble).then_some(fault_tx);
        let (gate_tx, gate) = crossbeam::channel::bounded(1);
        let (me, who) = (self.clone(), peer.to_string());
        let on_demand = options.start_on_demand.then_some(gate_tx.clone());
        let urgent_thread = std::thread::Builder::new()
            .name("serve-urgent".into())
            .spawn(move || {
                let result =
                    me.serve_demand(urgent, fault_tx.as_ref(), &gate_tx, on_demand.as_ref());
                me.end(match result {
                    Ok(()) => ServeState::Completed,
                    Err(e) => ServeState::Failed(format!("lost {who}: {e}")),
                });
            })
            .map_err(ServerError::Thread)?;
        let me = self.clone();
        let push_thread = std::thread::Builder::new()
            .name("serve-push".into())
            .spawn(move || {
                if let Err(e) = me.push(bulk, options, &gate, &faults) {
                    me.end(ServeState::Failed(format!("pushing pages failed: {e}")));
                }
            })
            .map_err(ServerError::Thread)?;
        self.threads
            .lock()
            .expect("server lock")
            .extend([urgent_thread, push_thread]);
        Ok(())
    }

    /// Serves a new session after the last one broke (a receiver that lost the link and
    /// dialled back, see `Purpose::Resume`): the old session's connections are shut down and
    /// its threads joined, the pages the receiver `lacks` are this server's to send again,
    /// and serving starts over on `urgent` and `bulk` (the push sends only what is not sent).
    /// Not after `Complete` or [`Self::stop`]. (Not from a server thread.)
    pub fn resume(
        self: &Arc<Self>,
        peer: &str,
        urgent: TcpStream,
        bulk: BulkWriter,
        options: PushOptions,
        lacks: &[(Gfn, u64)],
    ) -> Result<(), ServerError> {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire)
            || self.status().state == ServeState::Completed
        {
            return Err(ServerError::Stopped);
        }
        for s in self.sockets.lock().expect("server lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.join_threads();
        for &(gfn, count) in lacks {
            self.unsend(gfn, count);
        }
        {
            let mut p = self.progress.lock().expect("server lock");
            p.state = ServeState::Idle; // `serve` starts it again
            p.ended = None;
        }
        self.serve(peer, urgent, bulk, options)
    }

    /// Stops serving and waits until both threads have ended: nothing reads the store after
    /// this returns. (Not from a server thread.)
    pub fn stop_and_wait(&self) {
        self.stop();
        self.join_threads();
    }

    /// Waits for the serving threads to end.
    fn join_threads(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("server lock")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Records the end of serving, the first time only. A failure closes both connections (the
    /// other thread stops, and the receiver sees the end at once); after `Complete` only the
    /// urgent one is closed, so that the push can still say `PushDone` on the bulk one.
    fn end(&self, state: ServeState) {
        let completed = state == ServeState::Completed;
        {
            let mut p = self.progress.lock().expect("server lock");
            if p.state != ServeState::Serving {
                return;
            }
            p.ended = p.since.map(|t| t.elapsed());
            p.state = state;
            self.ended.notify_all();
        }
        let sockets = self.sockets.lock().expect("server lock");
        let close = if completed {
            &sockets[..1]
        } else {
            &sockets[..]
        };
        for s in close {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Waits until serving ends (`Completed` or `Failed`) and returns how.
    pub fn wait(&self) -> ServeState {
        let mut p = self.progress.lock().expect("server lock");
        while matches!(p.state, ServeState::Idle | ServeState::Serving) {
            p = self.ended.wait(p).expect("server lock");
        }
        p.state.clone()
    }

    /// Stops serving: the connections are shut down, so both threads end soon.
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.end(ServeState::Failed("stopped".into()));
        for s in self.sockets.lock().expect("server lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn serve_demand(
        &self,
        urgent: TcpStream,
        faults: Option<&crossbeam::channel::Sender<Gfn>>,
        gate: &crossbeam::channel::Sender<()>,
        gate_on_demand: Option<&crossbeam::channel::Sender<()>>,
    ) -> Result<(), ServerError> {
        let served_at = Arc::new(AtomicU64::new(0));
        let mut reader = BufReader::new(SpinRead::new(urgent.try_clone()?, served_at.clone()));
        let mut writer = urgent;
        let mut scratch = Scratch::default();
        loop {
            match Message::read_from(&mut reader)? {
                Message::Resumed => {
                    let _ = gate.try_send(());
                }
                Message::PageRequest { gfn, count } => {
                    if let Some(g) = gate_on_demand {
                        let _ = g.try_send(());
                    }
                    served_at.store(now_ns(), Ordering::Relaxed);
                    let sent = self.send(
                        &mut writer,
                        &mut scratch,
                        gfn,
                        u64::from(count),
                        SendKind::Demand,
                    );
                    if let Err(e @ ServerError::BadRequest { .. }) = &sent {
                        let _ = Message::Error {
                            message: e.to_string(),
                        }
                        .write_to(&mut writer);
                    }
                    sent?;
                    writer.flush()?;
                    if let Some(f) = faults {
                        let _ = f.send(gfn);
                    }
                }
                Message::Complete => return Ok(()),
                // Pages the receiver hands back: another owner of them is lost, and they are
                // this server's to send again.
                Message::Owners { endpoint, runs } if endpoint.is_empty() => {
                    let mut pages = 0;
                    for (gfn, count) in runs {
                        pages += self.unsend(gfn, count);
                    }
                    log::info!("the receiver handed {pages} pages back: pushing them again");
                    let _ = self.repush.0.send(());
                }
                m => return Err(ProtocolError::unexpected("PageRequest", m).into()),
            }
        }
    }

    /// The push thread: [`Self::push_all`], then in release mode, once the receiver says
    /// `Complete`, releases every page not released yet (it holds them all).
    fn push(
        &self,
        w: BulkWriter,
        mut options: PushOptions,
        gate: &crossbeam::channel::Receiver<()>,
        faults: &crossbeam::channel::Receiver<Gfn>,
    ) -> Result<(), ServerError> {
        let pushed = self.push_all(w, &mut options, gate, faults);
        if options.release {
            // A failed push ends serving (the caller says so) unless it completed already.
            let end = match pushed {
                Ok(()) => self.wait(),
                Err(_) => self.progress.lock().expect("server lock").state.clone(),
            };
            if end == ServeState::Completed {
                self.release_where(&self.released, false);
            }
        }
        pushed
    }

    fn push_all(
        &self,
        mut w: BulkWriter,
        options: &mut PushOptions,
        gate: &crossbeam::channel::Receiver<()>,
        faults: &crossbeam::channel::Receiver<Gfn>,
    ) -> Result<(), ServerError> {
        if !self.push_first.load(std::sync::atomic::Ordering::Acquire) {
            lower_priority();
        }
        let hot = options.hot.runs(u64::MAX);
        let _ = match options.gate_timeout {
            Some(t) => gate.recv_timeout(t).is_ok(),
            None => gate.recv().is_ok(),
        };
        log::debug!(
            "push: the gate opened ({} pages not sent)",
            self.layout.total_pages() - self.sent.count_ones()
        );
        if let Some(PushHook(f)) = options.before_push.take() {
            f(&mut w)?;
        }
        let mut sender = BulkSender::new(self, options.rate);
        if options.release {
            sender = sender.releasing();
        }
        if options.prepage != Prepage::None {
            // Hot pages first, in runs of consecutive pages.
            for run in hot {
                sender.send_run(&mut w, run.gfn, run.pages, SendKind::Push)?;
            }
            self.scan(&mut w, &mut sender, faults)?;
            log::debug!(
                "push: scanned, {} pages not sent",
                self.layout.total_pages() - self.sent.count_ones()
            );
        }
        if let Some(PushHook(f)) = options.after_push.take() {
            f(&mut w)?;
        }
        {
            let mut p = self.progress.lock().expect("server lock");
            p.push_done = p.since.map(|t| t.elapsed());
        }
        if self.linger.load(std::sync::atomic::Ordering::Acquire) {
            w.flush()?;
            loop {
                match self.repush.1.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => {
                        while self.repush.1.try_recv().is_ok() {}
                        self.scan(&mut w, &mut sender, faults)?;
                        w.flush()?;
                    }
                    Err(_)
                        if self.progress.lock().expect("server lock").state
                            != ServeState::Serving =>
                    {
                        break
                    }
                    Err(_) => {}
                }
            }
        }
        // From here on the receiver may have every page and be gone already, its `Complete`
        // still on its way on the urgent channel: failing to end the stream is not the end of
        // serving (the urgent channel says how serving ends: `Complete`, or a lost receiver).
        // Seen in the drill campaign: a resumed session's receiver completed and exited while
        // the push was ending its stream, and the push's ENOTCONN failed the migration.
        let ended = |e: &dyn std::fmt::Display| {
            log::debug!("push: ending the bulk stream: {e}; the urgent channel tells the end");
        };
        if let Err(e) = Message::PushDone.write_to(&mut w) {
            ended(&e);
            return Ok(());
        }
        if options.release {
            if let Err(e) = w.flush() {
                ended(&e);
                return Ok(());
            }
            self.release_where(&self.precopied, true);
            // A receiver that completed may go away without acknowledging the end: what is
            // left then goes at `Complete`.
            if w.wait_all_acknowledged().is_ok() {
                sender.release_acknowledged(&w);
            }
        }
        if let Err(e) = w.finish() {
            ended(&e);
        }
        Ok(())
    }

    /// Pushes every page not sent yet, scanning in page-index order and wrapping around.
    /// Bubble: each demand fault moves the scan to just past the faulting page (after the few
    /// pages before it), so the push streams ahead of a guest walking through memory instead of
    /// behind it; one full lap after the last move, every page has been sent (the "sent"
    /// bitmap makes passing over sent pages cheap, a word at a time).
    fn scan(
        &self,
        w: &mut BulkWriter,
        sender: &mut BulkSender<'_, S>,
        faults: &crossbeam::channel::Receiver<Gfn>,
    ) -> Result<(), ServerError> {
        let total = self.layout.total_pages();
        let (mut at, mut lap_left) = (0, total);
        while lap_left > 0 {
            for g in faults.try_iter() {
                let before = g.saturating_sub(BUBBLE);
                sender.send(w, before, g - before, SendKind::Push)?;
                if let Some(next) = self.layout.page_index(g + 1) {
                    (at, lap_left) = (next, total);
                }
            }
            let unsent = self.sent.next_clear(at, total);
            lap_left = lap_left.saturating_sub(unsent - at);
            at = unsent;
            if at == total {
                at = 0;
                continue;
            }
            let run = self
                .layout
                .run_at(at, w.run_pages())
                .expect("an index below the total is a page");
            sender.send(w, run.gfn, run.pages, SendKind::Push)?;
            lap_left = lap_left.saturating_sub(run.pages);
            at = (at + run.pages) % total;
        }
        Ok(())
    }

    /// Where serving is, and the counters.
    #[allow(clippy::cast_precision_loss)] // milliseconds for people
    pub fn status(&self) -> ServerStats {
        let c = &self.counters;
        let p = self.progress.lock().expect("server lock");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        ServerStats {
            state: p.state.clone(),
            pages_demand: c.demand.load(Ordering::Relaxed),
            pages_pushed: c.pushed.load(Ordering::Relaxed),
            pages_precopy: c.precopy.load(Ordering::Relaxed),
            pages_duplicate: c.duplicates.load(Ordering::Relaxed),
            zero_pages: c.zero.load(Ordering::Relaxed),
            pages_withheld: c.withheld.load(Ordering::Relaxed),
            bytes_sent: c.bytes.load(Ordering::Relaxed),
            bytes_pushed: c.bytes_pushed.load(Ordering::Relaxed),
            pages_released: c.released.load(Ordering::Relaxed),
            pages_asked_after_release: c.asked_after_release.load(Ordering::Relaxed),
            push_ms: p.push_done.map(ms),
            serve_ms: p.ended.map(ms),
        }
    }
}

/// Sends runs of pages on a bulk channel for one thread (the push, precopy rounds, a
/// write-back): waits for the flow-control window before each run, flushes after it, and
/// paces to a rate if asked. The push in release mode also releases what the receiver has
/// acknowledged ([`Self::releasing`]).
#[derive(Debug)]
pub struct BulkSender<'a, S> {
    server: &'a PageServer<S>,
    scratch: Scratch,
    rate: Option<u64>,
    paced_bytes: u64,
    t0: Instant,
    /// Release mode: the stretches sent and not acknowledged yet, each with the position in
    /// the bulk stream where the run that carried it ends.
    unacknowledged: Option<VecDeque<(u64, Gfn, u64)>>,
}

impl<'a, S: PageStore + 'static> BulkSender<'a, S> {
    /// A sender for `server`, at most `rate` bytes per second (`None` or 0: unlimited).
    pub fn new(server: &'a PageServer<S>, rate: Option<u64>) -> Self {
        Self {
            server,
            scratch: Scratch::default(),
            rate: rate.filter(|r| *r > 0),
            paced_bytes: 0,
            t0: Instant::now(),
            unacknowledged: None,
        }
    }

    /// Releases what it sends once the receiver has acknowledged it (the push in release
    /// mode; the server's thread that releases, see the module docs).
    fn releasing(mut self) -> Self {
        self.unacknowledged = Some(VecDeque::new());
        self
    }

    /// Releases the stretches sent that the receiver has acknowledged so far on `w`.
    fn release_acknowledged(&mut self, w: &BulkWriter) {
        let Some(sent) = self.unacknowledged.as_mut() else {
            return;
        };
        let acknowledged = w.acknowledged();
        while let Some(&(end, gfn, pages)) = sent.front() {
            if end > acknowledged {
                break;
            }
            sent.pop_front();
            self.server.release(gfn, pages);
        }
    }

    /// Sends the pages of `[gfn, gfn + n)` not sent yet, however many, in pieces of the
    /// writer's run size (so that flow control and pacing act between them).
    pub fn send_run(
        &mut self,
        w: &mut BulkWriter,
        gfn: Gfn,
        n: u64,
        kind: SendKind,
    ) -> Result<(), ServerError> {
        let mut done = 0;
        while done < n {
            let piece = w.run_pages().min(n - done);
            self.send(w, gfn + done, piece, kind)?;
            done += piece;
        }
        Ok(())
    }

    /// Sends the pages of `[gfn, gfn + n)` not sent yet, then waits if over the rate.
    #[allow(clippy::cast_precision_loss)] // pacing arithmetic in seconds
    pub fn send(
        &mut self,
        w: &mut BulkWriter,
        gfn: Gfn,
        n: u64,
        kind: SendKind,
    ) -> Result<(), ServerError> {
        if n == 0 {
            return Ok(());
        }
        w.wait_for_window()?;
        self.server.send(w, &mut self.scratch, gfn, n, kind)?;
        // What left, not what was asked: a run over pages mostly sent already (a push that
        // starts again after a resume, or passes pages demand replies sent) is paced for the
        // pages it sent. (Pacing the run asked for held a resumed push at a few pages a
        // second.)
        let sent_pages: u64 = self.scratch.sent.iter().map(|s| s.1).sum();
        // Zero markers are tiny: without a flush they would wait in the buffer while a guest
        // faults on them one by one.
        w.flush()?;
        if let Some(sent) = self.unacknowledged.as_mut() {
            let end = w.written();
            sent.extend(
                self.scratch
                    .sent
                    .drain(..)
                    .map(|(gfn, pages)| (end, gfn, pages)),
            );
            self.release_acknowledged(w);
        }
        if let Some(rate) = self.rate {
            // n pages may leave only after n * 4 KiB / rate seconds.
            self.paced_bytes += sent_pages * PAGE_SIZE;
            let due = Duration::from_secs_f64(self.paced_bytes as f64 / rate as f64);
            // In slices, so that a stop is not kept waiting.
            while let Some(wait) = due.checked_sub(self.t0.elapsed()) {
                if self
                    .server
                    .stopped
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    return Err(ServerError::Stopped);
                }
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
        Ok(())
    }
}
