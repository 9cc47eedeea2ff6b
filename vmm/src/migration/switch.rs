//! Switching a migration's destination without starting over (DCmigrate, paper 000): the
//! operator who picked the wrong destination, or whose destination degrades, redirects the
//! running migration (`migrate-switch uri=tcp:NEW` at the source).
//!
//! Three processes: the source S (where the VM ran), the old destination A, the new
//! destination B (`run --incoming`, waiting).
//!
//! **Before the switchover** (precopy rounds running; A has part of the memory, the VM runs
//! at S). The source's worker takes the request between two runs of pages, and:
//!
//! 1. opens a session to B and waits for its `Ready` (B unreachable: the request fails with
//!    the reason, and the migration goes on to A as if nothing happened);
//! 2. makes A current: ends the round there (acknowledged: A has installed everything sent)
//!    and takes KVM's dirty log: the pages written since they were sent are the source's
//!    again (unsent). The pages still marked sent at the source's page server are exactly the
//!    pages A holds that are the same as the source's copy;
//! 3. tells A to `Forward`, with the written pages (`Owners{"", runs}`, ended by `Ready`):
//!    A stops being a destination and serves the other pages it holds to B ([`forward`]: a
//!    page server over its memory on its migration listener, pushing at once, at normal
//!    priority: it is that host's main work now), and says `Ready`. (Marking the written
//!    pages not A's to forward costs a bitmap write each; dropping them at A, as a precopy
//!    round does, cost a `madvise` per page, most of the switch's time);
//! 4. names A to B as a `Forwarder` and announces A's pages (`Owners`): B dials A (a Fetch
//!    session), receives from both senders in parallel, each over its own channels, and says
//!    `Ready`;
//! 5. goes on with the precopy rounds to B, which skip what A holds (marked sent), and sends
//!    B the pages written during the switch at once.
//!
//! From then on the migration is an ordinary one to B with a second owner. The source sends a
//! page A holds only if the guest wrote it since: its `Discard` makes the page the source's at
//! B, whichever copy B has or is receiving (see `crate::paging::owners`, "two senders"), and
//! the page is sent again like any written page. After the switchover B fetches what it still
//! lacks from each owner, on demand and by both pushes, and says `Complete` to each.
//!
//! **After the switchover** (the VM runs at A, postcopy, S serving it): A moves the VM on to
//! B, postcopy, like any migration, and the pages A still lacks come straight from S to B:
//!
//! 1. S listens on a port of its own, on its address on the link to A ([`move_on`]), and
//!    asks A, in a `Switch` session on A's migration listener ([`listen_for_switch`]), to
//!    move on to B (`SwitchTo`, with that address);
//! 2. A migrates the VM to B ([`crate::Vm::move_on`]), naming S, at that address, as the
//!    owner of the pages S still owns at A (a `Forwarder`, then `Owners`); B dials S there;
//! 3. S serves B with a second page server over its frozen memory, which pushes at once
//!    every page it had not sent A yet; S's push to A stops (A asks for what it needs until
//!    it pauses); pages A fetched meanwhile are A's again at its pause and go from A;
//! 4. A says `Ready` to S once the VM runs at B. Nobody waits for A to have all the pages.
//!
//! S's migration is over when B has every page (B's `Complete` on the second server).
//!
//! Failures. A switched during the precopy rounds and lost (killed, unreachable) before the
//! switchover: the source sees its session break and takes every page A held back (`Discard`
//! of A's runs at B), and sends them itself. A lost after the switchover, while it still holds
//! pages B lacks: B hands them back to the source (`Owners{"", runs}` on the source's urgent
//! channel; the source's push waits for such news until B completes, see
//! `PageServer::linger`), and the source pushes them; vCPUs waiting for them ask the source.
//! A's copies were the source's own, so nothing is lost either way. B failing after A started
//! forwarding fails the migration: the VM keeps running at the source, which may migrate it
//! again. A switch after the switchover to a B that is unreachable or refuses leaves the VM
//! running at A, and the migration goes on to A. Not built yet: a second switch, and switching
//! a cancellable (`cancellable=on`) or split migration.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{Gfn, MemoryLayout, PageError, PageStore};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::session::{Acceptor, Session};
use tsubame_pageserver::{
    HotPages, Message, PageServer, Prepage, ProtocolError, Purpose, PushOptions, ServeState,
};
use tsubame_uffd::FaultEngine;

use super::source::GuestMemoryStore;
use super::MigrationError;
use crate::memory::GuestMemory;

/// How long the old destination waits for the new one to come for its pages.
const FETCH_WAIT: Duration = Duration::from_secs(30);
/// How often the old destination reports its progress to the source.
const REPORT_EVERY: Duration = Duration::from_millis(20);

/// A `migrate-switch` request, for the source's worker to take between two runs of pages.
#[derive(Debug)]
pub struct SwitchRequest {
    pub uri: String,
    pub secret: Vec<u8>,
    pub asked: Instant,
    pub reply: crossbeam::channel::Sender<Result<SwitchStatus, MigrationError>>,
}

/// A switch, in `query-migrate` at the source (`switch`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwitchStatus {
    /// The old destination, now a forwarder of the pages it holds.
    pub from: String,
    /// The new destination.
    pub to: String,
    /// Migration start -> the switch command.
    pub at_ms: f64,
    /// The precopy round under way then (0: after the switchover).
    pub precopy_round: u32,
    /// Switched after the switchover: the old destination moved the VM on, postcopy, and the
    /// new one fetches what the old one lacked straight from the source.
    pub after_switchover: bool,
    /// The switch command -> the new destination receiving from both senders.
    pub switch_ms: f64,
    /// Pages the old destination held, clean, when it began forwarding: the new destination's
    /// to fetch from it.
    pub pages_at_old: u64,
    /// Pages the old destination had received that the guest had written since (the dirty
    /// log at the switch): not forwarded, the source sends them.
    pub pages_not_forwarded: u64,
    /// Of the old destination's pages, those the source took back (written since at the
    /// source, or all that were left if the old destination was lost).
    pub pages_taken_back: u64,
    /// Pages written again at the source after the switch (each time), sent again by it.
    pub pages_written_since: u64,
    /// Pages the old destination has sent to the new one (it reports every 20 ms).
    pub pages_forwarded: u64,
    /// The switch -> the old destination has pushed every page it holds.
    pub forwarder_pushed_ms: Option<f64>,
    /// The switch -> the old destination done (the new destination has every page).
    pub forwarder_done_ms: Option<f64>,
    /// Why the old destination stopped forwarding before it was done (its pages were taken
    /// back: the source sends them).
    pub forwarder_lost: Option<String>,
    /// Pages and bytes the source sent after the switch (precopy, push and demand).
    pub source_pages_after: u64,
    pub source_bytes_after: u64,
}

/// The source's side of a switch that happened: the forwarder's reports, and A's pages.
#[derive(Debug)]
pub(crate) struct Switched {
    pub status: Mutex<SwitchStatus>,
    /// A's announced runs (the pages it held when it began forwarding).
    pub runs: Vec<(Gfn, u64)>,
    /// The forwarder's session broke before it was done...
    pub lost: AtomicBool,
    /// ...and its pages were taken back.
    pub taken_back: AtomicBool,
    pub at: Instant,
    /// The source's page server counters at the switch: (pages, bytes).
    pub sent_before: (u64, u64),
}

impl Switched {
    /// The status, with the source's pages sent since the switch given its totals now.
    pub fn status(&self, pages_now: u64, bytes_now: u64) -> SwitchStatus {
        let mut s = self.status.lock().expect("switch lock").clone();
        s.source_pages_after = pages_now.saturating_sub(self.sent_before.0);
        s.source_bytes_after = bytes_now.saturating_sub(self.sent_before.1);
        s
    }

    /// Whether the forwarder was lost and its pages are still to be taken back; marks them
    /// taken.
    pub fn take_back_due(&self) -> bool {
        self.lost.load(Ordering::Acquire) && !self.taken_back.swap(true, Ordering::AcqRel)
    }
}

/// Reads the old destination's reports (`Forwarded`) until it is done or its session breaks
/// (then marks it lost, for the worker to take its pages back), on a thread of its own. Keeps
/// its session's connections open until then.
pub(crate) fn watch_forwarder(
    switched: Arc<Switched>,
    urgent: TcpStream,
    bulk: BulkWriter,
) -> std::io::Result<()> {
    let watcher = std::thread::Builder::new()
        .name("switch-forwarder".into())
        .spawn(move || {
            let _bulk = bulk;
            let why = loop {
                match Message::read_from(&mut &urgent) {
                    Ok(Message::Forwarded {
                        pages,
                        pushed,
                        done,
                    }) => {
                        let mut s = switched.status.lock().expect("switch lock");
                        s.pages_forwarded = pages;
                        if pushed && s.forwarder_pushed_ms.is_none() {
                            s.forwarder_pushed_ms = Some(switched.at.elapsed().as_secs_f64() * 1e3);
                        }
                        if done {
                            s.forwarder_done_ms = Some(switched.at.elapsed().as_secs_f64() * 1e3);
                            return;
                        }
                    }
                    Ok(Message::Error { message }) => break message,
                    Ok(m) => break ProtocolError::unexpected("Forwarded", m).to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            log::warn!("the old destination stopped forwarding: {why}; the source sends its pages");
            switched.status.lock().expect("switch lock").forwarder_lost = Some(why);
            switched.lost.store(true, Ordering::Release);
        })?;
    // Its last report says when it was done: a source about to exit waits a little for it.
    super::source::add_chore(watcher);
    Ok(())
}

/// The old destination's pages, as a page store: its guest memory, frozen (its vCPUs never
/// ran, and nothing installs pages any more), of which only the pages present may be read.
#[derive(Debug)]
struct HeldPages {
    memory: GuestMemoryStore,
    engine: Arc<FaultEngine>,
}

impl PageStore for HeldPages {
    fn layout(&self) -> &MemoryLayout {
        self.memory.layout()
    }

    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError> {
        if !self.engine.all_present(gfn, pages) {
            return Err(PageError::backend(
                "reading the old destination's pages",
                format!("it does not hold all of {gfn} (+{pages} pages): ask the source"),
            ));
        }
        self.memory.read(gfn, pages, scratch)
    }

    /// Pages never populated read as zero, but a missing page is not zero: it is not here.
    fn known_zero(&self, gfn: Gfn, pages: u64, zero: &mut Vec<bool>) -> Result<(), PageError> {
        self.memory.known_zero(gfn, pages, zero)?;
        for (k, z) in zero.iter_mut().enumerate() {
            if *z && !self.engine.all_present(gfn + k as u64, 1) {
                *z = false; // read, and refused
            }
        }
        Ok(())
    }
}

/// The old destination's part (module docs, step 3): reads from the source the pages it must
/// not forward (written again there: `Owners{"", runs}` up to `Ready`), serves the other pages
/// it holds to the new destination `to`, which dials it on its migration listener, pushing
/// them all at once, and reports its progress to the source until the new destination has
/// every page. Returns the pages sent.
pub(crate) fn forward(
    to: &str,
    acceptor: &mut Acceptor,
    hello: &tsubame_pageserver::Hello,
    memory: Arc<GuestMemory>,
    engine: Arc<FaultEngine>,
    mut source: &TcpStream,
) -> Result<u64, MigrationError> {
    let store = GuestMemoryStore::new(memory);
    // The vCPUs never ran here, and the source sends nothing more: memory stays as it is.
    store.freeze();
    let layout = hello.layout.clone();
    let server = Arc::new(PageServer::new(HeldPages {
        memory: store,
        engine: engine.clone(),
    }));
    let mut stale = 0;
    loop {
        match Message::read_from(&mut source)? {
            Message::Owners { endpoint, runs } if endpoint.is_empty() => {
                for (gfn, n) in runs {
                    stale += server.withhold(gfn, n);
                }
            }
            Message::Ready => break,
            m => return Err(ProtocolError::unexpected("Owners or Ready", m).into()),
        }
    }
    let mut held = 0;
    for run in layout.runs(u64::MAX) {
        let mut k = 0;
        while k < run.pages {
            let present = engine.all_present(run.gfn + k, 1);
            let mut n = 1;
            while k + n < run.pages && engine.all_present(run.gfn + k + n, 1) == present {
                n += 1;
            }
            if present {
                held += n;
            } else {
                server.withhold(run.gfn + k, n);
            }
            k += n;
        }
    }
    server.push_first();
    log::info!(
        "forwarding the pages held here ({held}, {stale} of them written again at the source: \
         not forwarded) to the new destination {to}"
    );
    Message::Ready.write_to(&mut source)?;
    let (vm, want) = (hello.vm, layout.clone());
    let session = acceptor
        .next_until(Some(Instant::now() + FETCH_WAIT), move |h| {
            if h.purpose != Purpose::Fetch || h.vm != vm || h.layout != want {
                return Err(ProtocolError::Refused(
                    "this old destination forwards one VM's pages to its new destination only"
                        .into(),
                ));
            }
            Ok(())
        })?
        .ok_or_else(|| {
            MigrationError::Unsupported(format!(
                "the new destination {to} did not come for this host's pages within {} s",
                FETCH_WAIT.as_secs()
            ))
        })?;
    let Session {
        urgent, bulk, rtt, ..
    } = session;
    server.serve(
        &format!("the new destination {to}"),
        urgent,
        BulkWriter::new(bulk, rtt)?,
        push_at_once(&layout),
    )?;
    let sent = |s: &tsubame_pageserver::ServerStats| s.pages_pushed + s.pages_demand;
    loop {
        std::thread::sleep(REPORT_EVERY);
        let s = server.status();
        if s.state != ServeState::Serving {
            break;
        }
        // A source gone changes nothing here: the new destination still needs the pages.
        let _ = Message::Forwarded {
            pages: sent(&s),
            pushed: s.push_ms.is_some(),
            done: false,
        }
        .write_to(&mut source);
    }
    let s = server.status();
    match s.state {
        ServeState::Completed => {
            let _ = Message::Forwarded {
                pages: sent(&s),
                pushed: true,
                done: true,
            }
            .write_to(&mut source);
            Ok(sent(&s))
        }
        ServeState::Failed(why) => {
            let _ = Message::Error {
                message: format!("the old destination stopped forwarding: {why}"),
            }
            .write_to(&mut source);
            Err(MigrationError::Unsupported(format!(
                "forwarding pages to {to} failed: {why}"
            )))
        }
        ServeState::Idle | ServeState::Serving => unreachable!("serving ended"),
    }
}

/// How a second sender pushes (an old destination forwarding, or the source serving where the
/// VM moved on): every page it holds, in address order, from the start, for the new
/// destination receives from both senders in parallel.
pub(crate) fn push_at_once(layout: &MemoryLayout) -> PushOptions {
    PushOptions {
        prepage: Prepage::Address,
        rate: None,
        hot: HotPages::new(layout),
        gate_timeout: Some(Duration::ZERO),
        start_on_demand: true,
        before_push: None,
        after_push: None,
        release: false,
    }
}

/// How long the source waits for the VM to run at the new destination after `SwitchTo`.
const MOVE_ON_WAIT: Duration = Duration::from_secs(120);

/// At a migration's destination, once the VM runs here: keeps taking sessions on the
/// migration listener, on a thread of its own, from the source of this VM's migration asking
/// that it move on (`Switch` sessions, `SwitchTo`; module docs, "after the switchover").
/// Anything else is refused.
pub(crate) fn listen_for_switch(
    mut acceptor: Acceptor,
    hello: tsubame_pageserver::Hello,
    vm: std::sync::Weak<crate::Vm>,
    secret: &[u8],
) -> std::io::Result<()> {
    let secret = secret.to_vec();
    std::thread::Builder::new()
        .name("switch-listen".into())
        .spawn(move || loop {
            let (id, layout) = (hello.vm, hello.layout.clone());
            let session = match acceptor.next(move |h| {
                if h.purpose != Purpose::Switch || h.vm != id || h.layout != layout {
                    return Err(ProtocolError::Refused(
                        "this destination runs the VM already; only its source may ask it to move on"
                            .into(),
                    ));
                }
                Ok(())
            }) {
                Ok(s) => s,
                Err(e) => return log::warn!("no more switch requests taken: {e}"),
            };
            let Some(vm) = vm.upgrade() else { return };
            let mut urgent = &session.urgent;
            let reply = match Message::read_from(&mut urgent) {
                Ok(Message::SwitchTo { to, source }) => {
                    log::info!("the source asks to move the VM on to {to}");
                    match vm.move_on(&to, &source, &secret) {
                        Ok(_) => Message::Ready,
                        Err(e) => Message::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(m) => Message::Error {
                    message: ProtocolError::unexpected("SwitchTo", m).to_string(),
                },
                Err(e) => {
                    log::warn!("a switch request broke off: {e}");
                    continue;
                }
            };
            let _ = reply.write_to(&mut urgent);
        })
        .map(drop)
}

/// The source's part of a switch after the switchover (module docs): serves, at a listener
/// of its own next to its link to the old destination, the pages the old destination still
/// lacks to the new destination, which the old one names when it migrates the VM on; tells
/// the old destination to move the VM on (`SwitchTo`); returns once the VM runs at `to`.
/// `serve` is given the new destination's session once it dials in.
pub(crate) fn move_on(
    old: &str,
    to: &str,
    local_ip: std::net::IpAddr,
    secret: &[u8],
    hello: &tsubame_pageserver::Hello,
    serve: impl FnOnce(Session) + Send + 'static,
) -> Result<(), MigrationError> {
    let listener =
        std::net::TcpListener::bind((local_ip, 0)).map_err(|source| MigrationError::Listen {
            addr: format!("{local_ip}:0"),
            source,
        })?;
    let source = format!("tcp:{}", listener.local_addr()?);
    let mut acceptor = Acceptor::new(listener, secret, "switch");
    let (id, layout) = (hello.vm, hello.layout.clone());
    std::thread::Builder::new()
        .name("switch-accept".into())
        .spawn(move || {
            let got = acceptor.next_until(Some(Instant::now() + MOVE_ON_WAIT), move |h| {
                if h.purpose != Purpose::Fetch || h.vm != id || h.layout != layout {
                    return Err(ProtocolError::Refused(
                        "this source serves one VM's pages to where it moves on, only".into(),
                    ));
                }
                Ok(())
            });
            match got {
                Ok(Some(session)) => serve(session),
                Ok(None) => log::warn!("the new destination never came for the source's pages"),
                Err(e) => log::warn!("cannot take the new destination's session: {e}"),
            }
        })?;
    let ask = tsubame_pageserver::Hello {
        purpose: Purpose::Switch,
        checkpoint_ms: 0,
        ..hello.clone()
    };
    let s = tsubame_pageserver::session::open(old, secret, &ask)
        .map_err(|e| MigrationError::opening("old destination", "tsubame run --incoming", e))?;
    Message::SwitchTo {
        to: to.to_string(),
        source,
    }
    .write_to(&mut &s.urgent)?;
    s.urgent.set_read_timeout(Some(MOVE_ON_WAIT))?;
    match Message::read_from(&mut &s.urgent)? {
        Message::Ready => Ok(()),
        Message::Error { message } => Err(MigrationError::Switch {
            to: to.to_string(),
            reason: format!("{old} could not move the VM on: {message}"),
        }),
        m => Err(ProtocolError::unexpected("Ready", m).into()),
    }
}
