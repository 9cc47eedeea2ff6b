//! Picking a postcopy migration up again after its session broke (a cut, a reset, a silent
//! network), without losing the guest and without an operator.
//!
//! After the switchover neither host has the whole VM: the destination runs it, the source
//! holds the pages it has not sent. If the session between them breaks, the destination's
//! faulting vCPUs wait (never on a zero or stale page) and the other vCPUs run on; the
//! source keeps its frozen memory and waits to be dialled back:
//!
//! - before the switchover the source opens a *resume listener* next to its link to the
//!   destination and names it (`ResumeAt{uri, within_ms}`, before the VM state);
//! - the destination notices the loss (the connection fails, or a fault waits 2 s for a reply:
//!   `paging::router`'s silent-link check; a link that has said nothing for 0.5 s while the push
//!   is not done is probed with a request, its heartbeat, so an idle link that went silent is
//!   noticed too) and dials the source there again every 20 ms, each connect bounded by 4
//!   round trips (at least 20 ms) and each handshake by 8 (at least 200 ms) ([`SourceDial`],
//!   a `paging::router::Redial`), in a `Resume` session authenticated like any other (the
//!   shared secret; the source checks the VM's identity);
//! - it says which pages it still lacks (`Owners{"", runs}` ... `Ready`): the pages the source
//!   still owns in its owner map, whatever was in flight when the link broke;
//! - the source shuts the old session down, marks those pages unsent, serves the new session
//!   ([`PageServer::resume`]) and says `Ready`; the destination swaps its page client, asks
//!   again for every page a vCPU waits for, and says `Resumed`: the push goes on from there.
//!
//! The source notices a silent network by itself too: its serving connections carry the
//! kernel's heartbeats (TCP keepalive after 1 s of quiet, and data unacknowledged for 4 s ends
//! the connection: `session::notice_silence`), so its outage, and the `recover_ms` bound,
//! count from about 4 s into the silence even if the destination never dials back. (Only
//! where the network itself is silent: a user-space relay such as `linkem` answers them.)
//! A destination about to exit makes sure its last `Complete` went out first (its final digest
//! reads the last pages; `DemandPaging::settle`), so that the source never waits for a dial
//! back from a destination that finished.
//!
//! `within_ms` (`migrate ... recover_ms=N`, default 60 s; 0: no recovery) bounds an outage:
//! after it the source gives the migration up (`failed`, with the reason) and the destination
//! reports its VM `stuck` in `query-status`, with the reason (as when the source is gone).
//! `query-migrate` shows the outages at both ends (the source's `recovery`; the destination's
//! source `link`: outages, longest, redials).

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{Gfn, PageStore};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::session::{self, Acceptor, Session};
use tsubame_pageserver::{
    Hello, HotPages, Message, PageClient, PageServer, Prepage, ProtocolError, Purpose, PushOptions,
    ServeState,
};

use super::source::GuestMemoryStore;
use super::MigrationError;
use crate::paging::owners::{EndpointId, Owner, OwnerMap};
use crate::paging::router::{Redial, RedialError};

/// The default bound on an outage before the migration is given up.
pub const DEFAULT_RECOVER_MS: u32 = 60_000;
/// How long one redial attempt may wait for its connection: 4 round trips of the session,
/// within these bounds. Short, so that SYNs go out often while the network is down: the
/// first after it is back gets through.
const REDIAL_CONNECT: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));
/// How long a connected redial may take to authenticate: 8 round trips, within these bounds.
const REDIAL_HANDSHAKE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));
/// The wait between two redials: an attempt costs a SYN, and the sooner one goes out after
/// the network is back, the sooner the guest runs again.
const REDIAL_BACKOFF: Duration = Duration::from_millis(20);
/// How long a resume handshake may take (the lacking pages, the answer).
const RESUME_HANDSHAKE: Duration = Duration::from_secs(10);

/// `query-migrate`'s `recovery` at the source.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RecoveryStatus {
    /// Where the destination dials back.
    pub listen: String,
    /// How long an outage may last before the migration is given up.
    pub within_ms: u32,
    /// Sessions broken after the switchover, and picked up again.
    pub outages: u64,
    pub resumed: u64,
    /// The session is down now: since when (ms), and why.
    pub down_ms: Option<u64>,
    pub why: Option<String>,
    /// The longest outage so far, broken -> dialled back (ms).
    pub longest_outage_ms: Option<f64>,
    /// Pages the destination lacked at its last resume.
    pub pages_lacking_at_resume: u64,
    /// The outage outlasted `within_ms`: the migration is given up.
    pub gave_up: bool,
}

/// The source's side: its resume listener and what it saw.
#[derive(Debug)]
pub(crate) struct Recovery {
    status: Mutex<RecoveryStatus>,
    down_since: Mutex<Option<Instant>>,
    /// The push as it was (resumed sessions push the same way).
    push: (Prepage, Option<u64>, bool),
}

impl Recovery {
    pub fn status(&self) -> RecoveryStatus {
        let mut s = self.status.lock().expect("recovery lock").clone();
        s.down_ms = self
            .down_since
            .lock()
            .expect("recovery lock")
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        s
    }

    /// Whether the migration is given up (an outage outlasted the bound).
    pub fn gave_up(&self) -> bool {
        self.status.lock().expect("recovery lock").gave_up
    }
}

/// Opens the source's resume listener on `ip` (its address on the link to the destination)
/// and starts its thread, which takes `Resume` sessions for the VM `hello` names once `server`
/// has served (the switchover), notes when serving breaks, and gives up after `within`.
pub(crate) fn listen(
    ip: IpAddr,
    secret: &[u8],
    hello: &Hello,
    weak: Weak<PageServer<GuestMemoryStore>>,
    within: Duration,
    push: (Prepage, Option<u64>, bool),
) -> Result<(Arc<Recovery>, String), MigrationError> {
    let listener = TcpListener::bind((ip, 0)).map_err(|source| MigrationError::Listen {
        addr: format!("{ip}:0"),
        source,
    })?;
    let uri = format!("tcp:{}", listener.local_addr()?);
    let recovery = Arc::new(Recovery {
        status: Mutex::new(RecoveryStatus {
            listen: uri.clone(),
            within_ms: u32::try_from(within.as_millis()).unwrap_or(u32::MAX),
            ..RecoveryStatus::default()
        }),
        down_since: Mutex::new(None),
        push,
    });
    let mut acceptor = Acceptor::new(listener, secret, "resume");
    let (vm, layout) = (hello.vm, hello.layout.clone());
    let r = recovery.clone();
    std::thread::Builder::new()
        .name("resume-listen".into())
        .spawn(move || loop {
            let Some(server) = weak.upgrade() else {
                return;
            };
            // Note the outage; give up once it lasted too long.
            match server.status().state {
                ServeState::Completed => return,
                ServeState::Failed(why) => {
                    let mut down = r.down_since.lock().expect("recovery lock");
                    let since = *down.get_or_insert_with(|| {
                        let mut s = r.status.lock().expect("recovery lock");
                        s.outages += 1;
                        s.why = Some(why.clone());
                        log::warn!("the migration's session broke ({why}): waiting for the destination to dial back");
                        Instant::now()
                    });
                    if since.elapsed() > within {
                        r.status.lock().expect("recovery lock").gave_up = true;
                        log::error!(
                            "the destination did not dial back within {within:?}: the migration is given up ({why})"
                        );
                        return;
                    }
                }
                ServeState::Idle | ServeState::Serving => {}
            }
            drop(server);
            let layout = layout.clone();
            let got = acceptor.next_until(Some(Instant::now() + Duration::from_millis(100)), move |h| {
                if h.purpose != Purpose::Resume || h.vm != vm || h.layout != layout {
                    return Err(ProtocolError::Refused(
                        "this source resumes one VM's migration, with its destination only".into(),
                    ));
                }
                Ok(())
            });
            match got {
                Ok(Some(session)) => {
                    if let Some(server) = weak.upgrade() {
                        if let Err(e) = resume(&r, &server, session) {
                            log::warn!("a resume of the migration failed: {e}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => return log::error!("the resume listener failed: {e}"),
            }
        })?;
    Ok((recovery, uri))
}

/// Serves a destination that dialled back (module docs).
fn resume(
    r: &Recovery,
    server: &Arc<PageServer<GuestMemoryStore>>,
    session: Session,
) -> Result<(), MigrationError> {
    let Session {
        urgent, bulk, rtt, ..
    } = session;
    urgent.set_read_timeout(Some(RESUME_HANDSHAKE))?;
    let mut lacks = Vec::new();
    loop {
        match Message::read_from(&mut &urgent)? {
            Message::Owners { endpoint, runs } if endpoint.is_empty() => lacks.extend(runs),
            Message::Ready => break,
            m => return Err(ProtocolError::unexpected("Owners or Ready", m).into()),
        }
    }
    urgent.set_read_timeout(None)?;
    if server.status().state == ServeState::Idle {
        let _ = Message::Error {
            message: "the migration has not switched over yet: nothing to resume".into(),
        }
        .write_to(&mut &urgent);
        return Ok(());
    }
    let (prepage, rate, release) = r.push;
    Message::Ready.write_to(&mut &urgent)?;
    let layout = server.store().layout().clone();
    server.resume(
        "the destination (resumed)",
        urgent,
        BulkWriter::new(bulk, rtt)?,
        PushOptions {
            prepage,
            rate,
            hot: HotPages::new(&layout),
            gate_timeout: Some(Duration::from_millis(500)),
            start_on_demand: true,
            before_push: None,
            after_push: None,
            release,
        },
        &lacks,
    )?;
    let outage = r.down_since.lock().expect("recovery lock").take();
    let mut s = r.status.lock().expect("recovery lock");
    if outage.is_none() {
        s.outages += 1; // broken without a word here (a silent network)
    }
    s.resumed += 1;
    s.why = None;
    s.pages_lacking_at_resume = lacks.iter().map(|r| r.1).sum();
    let ms = outage.map(|t| t.elapsed().as_secs_f64() * 1e3);
    s.longest_outage_ms = match (s.longest_outage_ms, ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    log::warn!(
        "the destination dialled back after {:.0} ms, lacking {} pages: serving again",
        ms.unwrap_or(0.0),
        s.pages_lacking_at_resume
    );
    Ok(())
}

/// Makes the page client of a resumed session, on its urgent channel.
pub(crate) type NewClient = dyn Fn(&TcpStream) -> std::io::Result<Arc<PageClient>> + Send + Sync;

/// The destination's side: dials the source's resume listener again after the session broke
/// (module docs).
pub(crate) struct SourceDial {
    pub uri: String,
    pub secret: Vec<u8>,
    /// The migration's Hello (a `Resume` one is made of it).
    pub hello: Hello,
    pub within: Duration,
    /// The session's round trip (from its handshake).
    pub rtt: Duration,
    pub owners: Arc<OwnerMap>,
    pub source: EndpointId,
    /// Makes the new page client, with its events, and records it as the source's.
    pub client: Box<NewClient>,
    /// Receives the bulk channel of the new session (on a thread of its own).
    pub bulk: Box<dyn Fn(Arc<PageClient>, TcpStream) + Send + Sync>,
    pub lost_at: Mutex<Option<Instant>>,
    /// Told why, if the source cannot be reached in time.
    pub engine: Arc<tsubame_uffd::FaultEngine>,
}

impl SourceDial {
    /// What a failed dial means: the source is gone for good if nothing listens at its resume
    /// address any more (a network that is down does not refuse: it times out or finds no
    /// route) or if it refuses this VM (an authenticated peer that is not this VM's source);
    /// anything else is worth another dial.
    fn dial_failed(&self, e: tsubame_pageserver::SessionError) -> RedialError {
        use tsubame_pageserver::SessionError;
        match e {
            SessionError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                self.give_up(format!(
                    "lost the migration source: nothing listens at its resume address {} any \
                     more (its process is gone?)",
                    self.uri
                ))
            }
            SessionError::Handshake {
                source: ProtocolError::Refused(why),
                ..
            } => self.give_up(format!(
                "lost the migration source: {} refused to resume this VM's migration ({why})",
                self.uri
            )),
            e => RedialError {
                why: format!("{}: {e}", self.uri),
                permanent: false,
            },
        }
    }

    /// Stops dialling, for `why`: the VM is stuck, and says so.
    fn give_up(&self, why: String) -> RedialError {
        let why = format!(
            "{why}; the VM waits for the {} pages only it held",
            self.owners.owned_by(self.source)
        );
        self.engine
            .report_fetch_error(tsubame_uffd::FetchError(why.clone()));
        RedialError {
            why,
            permanent: true,
        }
    }
}

impl Redial for SourceDial {
    fn streams(&self) -> bool {
        true // it pushes every page the VM lacks
    }

    fn lost(&self) {
        *self.lost_at.lock().expect("dial lock") = Some(Instant::now());
    }

    fn redial(&self) -> Result<Arc<PageClient>, RedialError> {
        let since = self
            .lost_at
            .lock()
            .expect("dial lock")
            .unwrap_or_else(Instant::now);
        if since.elapsed() > self.within {
            return Err(self.give_up(format!(
                "lost the migration source: {} could not be reached again within {:?} (the \
                 source gives the migration up too)",
                self.uri, self.within
            )));
        }
        let transient = |why: String| RedialError {
            why: format!("{}: {why}", self.uri),
            permanent: false,
        };
        let hello = Hello {
            purpose: Purpose::Resume,
            checkpoint_ms: 0,
            ..self.hello.clone()
        };
        // Each attempt gives up soon, and the next sends a fresh SYN: once the network is back
        // the link is picked up within an attempt and a backoff, not after the kernel's next
        // SYN retry (1, 3, 7 s apart).
        let connect = (self.rtt * 4).clamp(REDIAL_CONNECT.0, REDIAL_CONNECT.1);
        let handshake = (self.rtt * 8).clamp(REDIAL_HANDSHAKE.0, REDIAL_HANDSHAKE.1);
        let s = session::open_dialling(&self.uri, &self.secret, &hello, connect, handshake)
            .map_err(|e| self.dial_failed(e))?;
        let lacks: Vec<(Gfn, u64)> = self
            .owners
            .all_owned_runs(Owner::Endpoint(self.source))
            .iter()
            .map(|r| (r.gfn, r.pages))
            .collect();
        let told = (|| -> Result<(), ProtocolError> {
            let mut w = &s.urgent;
            super::source::announce_owners(&mut w, "", &lacks)?;
            Message::Ready.write_to(&mut w)?;
            s.urgent.set_read_timeout(Some(RESUME_HANDSHAKE))?;
            match Message::read_from(&mut w)? {
                Message::Ready => Ok(()),
                m => Err(ProtocolError::unexpected("Ready", m)),
            }
        })();
        told.map_err(|e| transient(e.to_string()))?;
        s.urgent
            .set_read_timeout(None)
            .map_err(|e| transient(e.to_string()))?;
        let client = (self.client)(&s.urgent).map_err(|e| transient(e.to_string()))?;
        client.attach_replies(s.urgent.try_clone().map_err(|e| transient(e.to_string()))?);
        (self.bulk)(client.clone(), s.bulk);
        // The push starts again on this.
        client
            .send(&Message::Resumed)
            .map_err(|e| transient(e.to_string()))?;
        if lacks.is_empty() {
            // Every page came before the link was lost: the `Complete` said then may never
            // have reached the source, which would wait for a dial back and give up.
            log::info!("dialled the source back lacking no page of its: telling it Complete");
            client.complete();
        } else {
            log::info!(
                "dialled the source back lacking {} of its pages",
                lacks.iter().map(|r| r.1).sum::<u64>()
            );
        }
        Ok(client)
    }

    fn needed_when_empty(&self) -> bool {
        // Dialled back even with every page here: the source must hear `Complete` (a link
        // lost just as the last pages came may have lost it), or it gives the migration up.
        true
    }

    /// A source migrating its VM is not worth a pause (see the trait).
    fn holds_vm(&self) -> bool {
        false
    }

    fn max_backoff(&self) -> Duration {
        REDIAL_BACKOFF
    }
}
