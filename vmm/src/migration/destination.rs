//! The destination of a migration: takes the session, receives the VM, and fetches its pages
//! from their owners.
//!
//! [`incoming`] listens and accepts an authenticated session from a source; [`Incoming::receive`]
//! creates the memory (empty, under userfaultfd: [`DemandPaging`]) as soon as it is accepted, so
//! precopy pages are installed while the source still runs the guest and the switchover only
//! restores vCPUs. Every page starts owned by the source; an `Owners` announcement gives pages
//! to another page server (a memserver holding part of the VM), which the destination dials
//! at once, before the switchover, or back to the source. Each owner has a page client that
//! installs only what its owner owns ([`OwnedSink`]): a fault sends a `PageRequest` to the
//! page's owner, and the fault thread itself reads and installs the reply; a receiver thread
//! per owner installs its push. Bulk pages are read straight into a slot of the staging pool
//! and moved into guest memory when the destination prepared one (it knew the layout ahead:
//! `--mem`), else copied; demand replies are always copied.
//!
//! Once the state has arrived and the bulk channel has passed `PrecopyDone`, each vCPU thread
//! loads its state and enters the guest at once (one hand-off per vCPU in the downtime), and
//! the downtime ends when the last one does.
//!
//! A split migration names its memservers before the switchover (`Owners` without pages: the
//! destination dials each), and after it hands pages over to them on the source's bulk
//! channel (`Owners` with pages): those not here yet are the memserver's from then on, and any
//! a vCPU waits for is asked for again from it ([`FaultEngine::reroute`]). The source is told
//! `Complete` once it owns no page here, whether every page is local or some stay at
//! memservers (the VM then runs split, fetching them when touched, until `consolidate` asks
//! the memservers to push them all: [`crate::paging::DemandPaging::consolidate`]). Every
//! owner is told `Complete` once every page is local, and each memserver then to forget the
//! VM's pages (the guest writes them here from then on). If an owner goes away, faulting vCPUs
//! wait and the error is reported: pages never become zero behind the guest's back.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tsubame_pages::Gfn;
use tsubame_pageserver::session::{self, Acceptor, Session};
use tsubame_pageserver::spin::{set_nice, DEMAND_SPIN};
use tsubame_pageserver::{
    ClientError, ClientEvents, Hello, Message, PageClient, ProtocolError, Purpose,
};
use tsubame_uffd::{FaultEngine, FetchError, StagingPool};

use super::MigrationError;
use crate::memory::{GuestMemory, MemoryLayout};
use crate::paging::owners::{EndpointId, OwnedSink, Owner, OwnerMap};
use crate::paging::router::{connect_owner, OwnerRouter, Redial, RedialError, RemoteOwner};
use crate::paging::DemandPaging;
use crate::state::VmState;

/// The source is the first endpoint of every incoming migration.
pub(crate) const SOURCE: EndpointId = EndpointId(0);

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

/// An accepted, authenticated incoming migration: the session, before any memory.
pub struct Incoming {
    pub layout: MemoryLayout,
    /// vCPUs of the incoming VM (from the handshake).
    pub vcpus: u32,
    /// A cancellable migration: send a reverse checkpoint this often (ms); 0: not cancellable.
    pub checkpoint_ms: u32,
    session: Session,
    /// The migration listener, kept: if the migration is switched to another destination
    /// before the switchover, that one dials here for the pages this host holds.
    acceptor: Acceptor,
    secret: Vec<u8>,
    staging: Option<Arc<StagingPool>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Listens on `uri`, calls `ready` with the bound address, and accepts connections until an
/// authenticated migration session is there. Refused connections (wrong secret, other version,
/// other layout, another purpose) are logged and the destination keeps waiting.
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
    let addr = session::parse_uri(uri)?;
    let listener = TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    let mut acceptor = Acceptor::new(listener, secret, "migration");
    ready(acceptor.local_addr()?);
    let expected = expect.cloned();
    let session = acceptor.next(move |h| check_hello(h, expected.as_ref()))?;
    if let Some(p) = &staging {
        log::debug!(
            "migration accepted with {} of {} staging pages prepared",
            p.prepared_pages(),
            p.pages()
        );
    }
    Ok(Incoming {
        layout: session.hello.layout.clone(),
        vcpus: session.hello.vcpus,
        checkpoint_ms: session.hello.checkpoint_ms,
        session,
        acceptor,
        secret: secret.to_vec(),
        staging,
    })
}

/// Whether this destination takes what `h` offers: a migration, of a layout it can hold.
fn check_hello(h: &Hello, expect: Option<&MemoryLayout>) -> Result<(), ProtocolError> {
    if h.purpose != Purpose::Migrate {
        return Err(ProtocolError::Refused(format!(
            "this is a migration destination, not a page server ({:?} asked)",
            h.purpose
        )));
    }
    let ours = MemoryLayout::for_size(h.layout.total_bytes()).ok();
    let wanted = expect.or(ours.as_ref());
    if wanted != Some(&h.layout) {
        return Err(ProtocolError::Layout {
            theirs: h.layout.clone(),
            ours: wanted.cloned().unwrap_or(MemoryLayout { regions: vec![] }),
        });
    }
    Ok(())
}

/// What the destination's page clients report to: the switchover's wait for the end of the
/// precopy phase, a split's hand-over of pages to memservers, failures, and completion (the
/// source is told once it owns no page here; every owner once every page is local).
struct Arrival {
    engine: Arc<FaultEngine>,
    owners: Arc<OwnerMap>,
    router: std::sync::Weak<OwnerRouter>,
    /// Every owner's client, the source's first.
    clients: Mutex<Vec<Arc<PageClient>>>,
    /// The page servers the source named, by address, and their endpoints.
    dialled: Mutex<HashMap<String, EndpointId>>,
    /// The source said where to dial back if its session breaks (see `recover`).
    resumable: AtomicBool,
    /// A switched migration's old destinations (forwarders of the pages they hold), by
    /// address, and their endpoints: not memservers (nothing to tell them to forget).
    forwarders: Mutex<HashMap<String, EndpointId>>,
    /// Forwarders lost before the VM state arrived: their pages are taken over at the
    /// switchover (see [`Arrival::take_over`]).
    lost_forwarders: Mutex<Vec<EndpointId>>,
    /// Set once the VM state arrived: before, the precopy rounds may fill memory and empty it
    /// again, and `Complete` would come too early.
    armed: AtomicBool,
    /// The source was told `Complete`: it owns no page here.
    source_done: AtomicBool,
    completed: AtomicBool,
    /// Called when the source is done (the staging pool is retired).
    source_released: Box<dyn Fn() + Send + Sync>,
    /// The secret and the session's Hello, to tell the memservers to forget the VM's pages
    /// once every page is here.
    secret: Vec<u8>,
    hello: Hello,
    done: Box<dyn Fn() + Send + Sync>,
    /// Told once the source's bulk channel passed `PrecopyDone` (or failed first).
    precopy_done: Mutex<Option<crossbeam::channel::Sender<Result<(), String>>>>,
}

impl Arrival {
    /// After the switchover: sends `Complete` to the source once it owns no page here (pages
    /// handed over to memservers stay theirs: the migration is over, the VM runs split), and
    /// to every owner once every page is local.
    fn check_complete(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        if self.owners.owned_by(SOURCE) == 0 && !self.source_done.swap(true, Ordering::AcqRel) {
            log::info!(
                "the source owns no page here any more ({} of {} pages present): telling it \
                 Complete",
                self.engine.present_pages(),
                self.engine.total_pages()
            );
            (self.source_released)();
            if let Some(source) = self.clients.lock().expect("arrival lock").first() {
                source.complete();
            }
        }
        if self.engine.present_pages() == self.engine.total_pages()
            && !self.completed.swap(true, Ordering::AcqRel)
        {
            // Every owner is told, and forgotten: the clients hold this, the cycle ends here.
            for c in self.clients.lock().expect("arrival lock").drain(..) {
                c.complete();
            }
            // Before completion is recorded: a process that exits once it sees it waits for
            // the forget (`finish_chores`), which must be under way by then.
            self.forget_at_memservers();
            (self.done)();
        }
    }

    /// Every page is here, and the guest writes them here from now on: the memservers' copies
    /// would go stale, so each is told to forget the VM's pages (in the background).
    fn forget_at_memservers(&self) {
        let memservers: Vec<String> = self
            .dialled
            .lock()
            .expect("arrival lock")
            .keys()
            .cloned()
            .collect();
        if memservers.is_empty() {
            return;
        }
        let all: Vec<(Gfn, u64)> = self
            .hello
            .layout
            .regions
            .iter()
            .map(|r| (r.first_gfn(), r.pages()))
            .collect();
        let names = memservers.clone();
        super::source::forget_in_background(
            memservers,
            move |_| all.clone(),
            &self.secret,
            &self.hello,
            move |i, _| log::info!("the memserver {} forgot this VM's pages", names[i]),
        );
    }

    /// A second sender (a switched migration's old destination, or the source of one switched
    /// after its switchover) was lost: the pages it still owned here are the source's again.
    /// Its copies were the source's own (clean), so nothing is lost: the pages not here yet are
    /// handed to the source, vCPUs waiting for them ask it, and the source is told to push
    /// them (`Owners{"", runs}` on its urgent channel). Before the VM state arrived the source
    /// takes them back itself (it sees the loss too); whatever is left is taken over once the
    /// state is in.
    fn take_over(&self, id: EndpointId) {
        if !self.armed.load(Ordering::Acquire) {
            self.lost_forwarders.lock().expect("arrival lock").push(id);
            return;
        }
        let runs: Vec<(Gfn, u64)> = self
            .owners
            .all_owned_runs(Owner::Endpoint(id))
            .iter()
            .map(|r| (r.gfn, r.pages))
            .collect();
        if runs.is_empty() {
            return;
        }
        for &(gfn, n) in &runs {
            self.owners.hand_over(gfn, n, id, SOURCE);
            self.engine.reroute(gfn, n);
        }
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        log::warn!("a second sender was lost: its {pages} pages come from the source instead");
        let source = self.clients.lock().expect("arrival lock").first().cloned();
        if let Some(source) = source {
            for chunk in runs.chunks(tsubame_pageserver::message::MAX_OWNER_RUNS as usize) {
                let _ = source.send(&Message::Owners {
                    endpoint: String::new(),
                    runs: chunk.to_vec(),
                });
            }
        }
    }

    fn is_source(&self, client: &PageClient) -> bool {
        self.clients
            .lock()
            .expect("arrival lock")
            .first()
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), client))
    }
}

impl ClientEvents for Arrival {
    fn applied(&self, _: &PageClient) {
        self.check_complete();
    }

    fn precopy_done(&self, _: &PageClient) {
        if let Some(tx) = self.precopy_done.lock().expect("arrival lock").take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// A split's hand-over (from the source only, on its bulk channel): the memserver named
    /// holds these pages now. Pages not here yet are its from now on, and any of them a vCPU
    /// waits for is asked for again, from it (the source's reply, if it still comes, is the
    /// same frozen copy and is dropped or installed once); pages here stay.
    fn owners(
        &self,
        client: &PageClient,
        endpoint: &str,
        runs: &[(Gfn, u64)],
    ) -> Result<(), String> {
        if !self.is_source(client) {
            return Err(format!(
                "a hand-over of pages to {endpoint} from a page server other than the source"
            ));
        }
        let id = *self
            .dialled
            .lock()
            .expect("arrival lock")
            .get(endpoint)
            .ok_or_else(|| format!("a hand-over of pages to {endpoint}, which it never named before the switchover"))?;
        for &(gfn, n) in runs {
            if self.engine.layout().locate(gfn, n).is_none() {
                return Err(format!(
                    "a hand-over of pages outside the VM ({gfn}, {n} pages)"
                ));
            }
        }
        for &(gfn, n) in runs {
            self.owners.hand_over(gfn, n, SOURCE, id);
            self.engine.reroute(gfn, n);
        }
        if self.completed.load(Ordering::Acquire) {
            // Every page is here already (from the source, before the hand-over): the
            // memserver's copies, stored after this host told it to forget, are stale.
            let runs = runs.to_vec();
            super::source::forget_in_background(
                vec![endpoint.to_string()],
                move |_| runs.clone(),
                &self.secret,
                &self.hello,
                |_, _| {},
            );
        }
        Ok(())
    }

    fn failed(&self, client: &PageClient, error: ClientError) {
        if self.completed.load(Ordering::Acquire)
            || (self.source_done.load(Ordering::Acquire) && client.is_completed())
        {
            return; // nobody needs that owner any more
        }
        let why = error.to_string();
        if let Some(router) = self.router.upgrade() {
            if let Some(id) = router.endpoint_of(client) {
                let forwarder = self
                    .forwarders
                    .lock()
                    .expect("arrival lock")
                    .values()
                    .any(|f| *f == id);
                if forwarder {
                    log::warn!("lost a second sender: {why}");
                    self.take_over(id);
                    return;
                }
            }
        }
        let source = self.is_source(client);
        if let Some(router) = self.router.upgrade() {
            match router.endpoint_of(client) {
                // The source after the switchover, if it said where to dial back (see
                // `recover`): lost and dialled again; vCPUs that need none of its pages run on.
                Some(id)
                    if source
                        && self.armed.load(Ordering::Acquire)
                        && self.resumable.load(Ordering::Acquire) =>
                {
                    router.lost(id, &why);
                    return;
                }
                // A memserver's link: lost and dialled again; the VM pauses meanwhile if it
                // owns pages (see `paging::router`).
                Some(id) if !source => {
                    router.lost(id, &why);
                    return;
                }
                // A client replaced since (a redial brought a new one): its end is old news.
                None if !source => {
                    log::debug!("a replaced page client stopped: {why}");
                    return;
                }
                _ => {}
            }
        }
        if let Some(tx) = self.precopy_done.lock().expect("arrival lock").take() {
            let _ = tx.send(Err(why.clone()));
        }
        self.engine.report_fetch_error(FetchError(why));
    }
}

impl Incoming {
    /// Tells the source that this destination cannot take the VM, and why (best effort: the
    /// source reports it and keeps its VM).
    pub fn refuse(&self, why: &str) {
        let _ = Message::Error {
            message: why.to_string(),
        }
        .write_to(&mut &self.session.urgent);
    }

    /// Receives the VM into `memory`: starts demand paging and the source's bulk receiver at
    /// once (precopy rounds arrive while the VM still runs at the source), applies owner
    /// announcements (dialling the page servers named), waits for the VM state on the urgent
    /// channel and for the end of the precopy phase on the bulk channel, and hands the urgent
    /// channel's replies to the fault thread.
    pub fn receive(self, memory: &Arc<GuestMemory>) -> Result<Received, MigrationError> {
        let mut paging = DemandPaging::new(memory, "migration", Owner::Endpoint(SOURCE))?;
        let engine = paging.engine().clone();
        if let Some(p) = &self.staging {
            engine.set_staging(p.clone());
            paging.set_staging(p.clone());
        }
        let (tx, precopy_done) = crossbeam::channel::bounded(1);
        let completion = paging.completion();
        let pool = self.staging.clone();
        let retire = self.staging.clone();
        let arrival = Arc::new(Arrival {
            secret: self.secret.clone(),
            hello: self.session.hello.clone(),
            engine: engine.clone(),
            owners: paging.router().owners().clone(),
            router: Arc::downgrade(paging.router()),
            clients: Mutex::new(Vec::new()),
            dialled: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
            lost_forwarders: Mutex::new(Vec::new()),
            resumable: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            source_done: AtomicBool::new(false),
            completed: AtomicBool::new(false),
            source_released: Box::new(move || {
                if let Some(p) = &retire {
                    let freed = p.retire();
                    if freed > 0 {
                        log::debug!("staging pool retired: {freed} unused pages given back");
                    }
                }
            }),
            done: Box::new(move || {
                completion();
                if let Some(p) = &pool {
                    p.stop_preparing();
                }
            }),
            precopy_done: Mutex::new(Some(tx)),
        });
        let Session {
            hello,
            urgent,
            bulk,
            checkpoint,
            rtt,
        } = self.session;
        let owners = paging.router().owners().clone();
        let sink = Arc::new(OwnedSink::new(engine.clone(), owners.clone(), SOURCE));
        let source = PageClient::new(
            "the migration source",
            &urgent,
            sink.clone(),
            arrival.clone(),
        )
        .map_err(MigrationError::Io)?;
        let id = paging
            .router()
            .add_remote(RemoteOwner::new(source.clone(), sink.clone(), None), None)
            .map_err(|e| MigrationError::SourceLost(e.to_string()))?;
        debug_assert_eq!(id, SOURCE);
        arrival
            .clients
            .lock()
            .expect("arrival lock")
            .push(source.clone());
        // The fault thread waits for the guest's next fault without sleeping for a while, as
        // the source's demand server does for the next request: measured with `tsubame bench
        // fault`, guest stall per page 97-120 µs (median 106) against 111-124 µs (median 120).
        engine.set_spin(DEMAND_SPIN);
        paging.start()?;
        for s in [&urgent, &bulk] {
            paging.own_socket(s.try_clone().map_err(MigrationError::Io)?);
        }
        let rx = source.clone();
        paging.spawn("migrate-bulk-rx", move || rx.receive_bulk(bulk))?;
        let ready = || {
            source
                .send(&Message::Ready)
                .map_err(|e| MigrationError::SourceLost(e.to_string()))
        };
        ready()?;

        // Owner announcements, then the state.
        let mut resume_at = None;
        let json = loop {
            match Message::read_from(&mut &urgent)
                .map_err(|e| MigrationError::SourceLost(e.to_string()))?
            {
                // The source takes pages back that it fetched from another owner after
                // naming that owner here: whatever copy that owner sent here is stale.
                Message::Owners { endpoint, runs } if endpoint.is_empty() => {
                    for (gfn, n) in runs {
                        sink.take_back(gfn, n).map_err(|e| {
                            MigrationError::BadState(format!(
                                "the source took back pages this host cannot drop: {e}"
                            ))
                        })?;
                    }
                }
                // Switched: this host was the destination, and forwards what it holds to
                // the new one (see `switch`).
                Message::Forward { to } => {
                    // The source's channels go quiet and then close: nothing to report.
                    arrival.completed.store(true, Ordering::Release);
                    let mut acceptor = self.acceptor;
                    let pages = super::switch::forward(
                        &to,
                        &mut acceptor,
                        &hello,
                        memory.clone(),
                        engine.clone(),
                        &urgent,
                    )
                    .map_err(|e| MigrationError::Forwarding {
                        to: to.clone(),
                        reason: e.to_string(),
                    })?;
                    return Err(MigrationError::Forwarded { to, pages });
                }
                // Switched to this host: the old destination holds pages, which it pushes
                // here in parallel with the source; the source's copy wins (see
                // `paging::owners`, "two senders").
                Message::Forwarder { endpoint } => {
                    owners.contest();
                    sink.make_senior();
                    let id = dial_owner(
                        &endpoint,
                        "the second sender",
                        &self.secret,
                        &hello,
                        &paging,
                        &arrival,
                    )?;
                    arrival
                        .forwarders
                        .lock()
                        .expect("arrival lock")
                        .insert(endpoint, id);
                    ready()?;
                }
                Message::Owners { endpoint, runs } => {
                    // Another owner sends pages here while the source may still take any of
                    // them back (above): installs and take-backs go under the map's locks.
                    owners.contest();
                    let forwarder = arrival
                        .forwarders
                        .lock()
                        .expect("arrival lock")
                        .get(&endpoint)
                        .copied();
                    let known = forwarder.or_else(|| {
                        arrival
                            .dialled
                            .lock()
                            .expect("arrival lock")
                            .get(&endpoint)
                            .copied()
                    });
                    let id = match known {
                        Some(id) => id,
                        None => {
                            let id = dial_owner(
                                &endpoint,
                                "the page server",
                                &self.secret,
                                &hello,
                                &paging,
                                &arrival,
                            )?;
                            arrival
                                .dialled
                                .lock()
                                .expect("arrival lock")
                                .insert(endpoint.clone(), id);
                            id
                        }
                    };
                    for (gfn, n) in runs {
                        owners.set(gfn, n, Owner::Endpoint(id));
                    }
                    ready()?;
                }
                Message::ResumeAt { uri, within_ms } => resume_at = Some((uri, within_ms)),
                Message::VmState(j) => break j,
                m => return Err(ProtocolError::unexpected("VmState", m).into()),
            }
        };
        let state_received = Instant::now();
        let state =
            VmState::from_bytes(&json).map_err(|e| MigrationError::BadState(e.to_string()))?;
        if state.layout != self.layout || state.vcpus.len() != self.vcpus as usize {
            return Err(MigrationError::BadState(
                "the state's memory layout or vCPU count differs from the handshake's".into(),
            ));
        }
        let parsed = state_received.elapsed();
        match precopy_done.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(MigrationError::SourceLost(why)),
            Err(_) => {
                return Err(MigrationError::SourceLost(
                    "the bulk receiver stopped".into(),
                ))
            }
        }
        log::debug!(
            "switchover: state parsed after {parsed:?}, precopy phase ended after {:?}",
            state_received.elapsed()
        );
        // From here on only demand replies arrive on the urgent channel: the fault thread reads
        // them.
        source.attach_replies(urgent);
        if let Some((uri, within_ms)) = resume_at.filter(|r| r.1 > 0) {
            let events = Arc::downgrade(&arrival);
            let (sockets, owner_sink) = (paging.socket_owner(), sink.clone());
            let dial = super::recover::SourceDial {
                uri,
                secret: self.secret.clone(),
                hello: hello.clone(),
                within: std::time::Duration::from_millis(u64::from(within_ms)),
                rtt,
                owners: owners.clone(),
                source: SOURCE,
                engine: engine.clone(),
                client: Box::new(move |urgent| {
                    let arrival = events
                        .upgrade()
                        .ok_or_else(|| std::io::Error::other("the migration has ended"))?;
                    let client = PageClient::new(
                        "the migration source",
                        urgent,
                        owner_sink.clone(),
                        arrival.clone(),
                    )?;
                    if let Some(first) = arrival.clients.lock().expect("arrival lock").first_mut() {
                        *first = client.clone();
                    }
                    Ok(client)
                }),
                bulk: Box::new(move |client, bulk| {
                    if let Ok(s) = bulk.try_clone() {
                        sockets.lock().expect("sockets lock").push(s);
                    }
                    let spawned = std::thread::Builder::new()
                        .name("migrate-bulk-rx".into())
                        .spawn(move || client.receive_bulk(bulk));
                    if let Err(e) = spawned {
                        log::error!("cannot receive the resumed push: {e}");
                    }
                }),
                lost_at: Mutex::new(None),
            };
            paging.router().set_redial(SOURCE, Arc::new(dial));
            arrival.resumable.store(true, Ordering::Release);
        }
        arrival.armed.store(true, Ordering::Release);
        let lost: Vec<EndpointId> =
            std::mem::take(&mut *arrival.lost_forwarders.lock().expect("arrival lock"));
        for id in lost {
            arrival.take_over(id);
        }
        arrival.check_complete();
        let check = arrival.clone();
        paging.set_completion_check(move || check.check_complete());
        let source_client = source.clone();
        paging.on_resume(move || {
            // The source starts its push on this (if it is gone, its receiver reports it).
            // Memservers push only when the VM consolidates: until then their pages stay there.
            let _ = source_client.send(&Message::Resumed);
        });
        Ok(Received {
            paging,
            state,
            at: state_received,
            checkpoint,
            acceptor: self.acceptor,
            hello,
        })
    }
}

/// A VM received, ready to be restored.
#[derive(Debug)]
pub struct Received {
    pub paging: DemandPaging,
    /// The VM state to restore.
    pub state: VmState,
    /// When the state arrived.
    pub at: Instant,
    /// A cancellable migration's checkpoint channel.
    pub checkpoint: Option<std::net::TcpStream>,
    /// The migration listener: the source may ask, there, that the VM move on (a migration
    /// switched after its switchover, see `switch`).
    pub acceptor: Acceptor,
    /// The session's Hello (the VM's identity and layout).
    pub hello: Hello,
}

/// Dials the page server at `uri`, which the source named as the owner of some of the VM's
/// pages, and makes it an endpoint: a page client of its own, installing only what it owns.
/// Its link is dialled again if it breaks (see `paging::router`): the VM pauses meanwhile.
fn dial_owner(
    uri: &str,
    what: &str,
    secret: &[u8],
    hello: &Hello,
    paging: &DemandPaging,
    arrival: &Arc<Arrival>,
) -> Result<EndpointId, MigrationError> {
    let failed = |reason: String| MigrationError::Owner {
        endpoint: uri.to_string(),
        reason,
    };
    let router = paging.router().clone();
    let id = router.next_id();
    let dial = Arc::new(OwnerDial {
        uri: uri.to_string(),
        secret: secret.to_vec(),
        hello: Hello {
            purpose: Purpose::Fetch,
            ..hello.clone()
        },
        owners: router.owners().clone(),
        id,
        sink: Arc::new(OwnedSink::new(
            paging.engine().clone(),
            router.owners().clone(),
            id,
        )),
        arrival: Arc::downgrade(arrival),
        sockets: paging.socket_owner(),
        name: format!("{what} {uri}"),
    });
    let client = dial.open().map_err(|e| failed(e.to_string()))?;
    let added = router
        .add_remote(
            RemoteOwner::new(client, dial.sink.clone(), Some(uri.to_string())),
            Some(dial),
        )
        .map_err(|e| failed(e.to_string()))?;
    debug_assert_eq!(added, id);
    Ok(id)
}

/// How the destination dials a page server the source named (a memserver), at first and
/// after its link broke: a Fetch session (the server must hold the VM's pages), a page client
/// reporting to the arrival, its bulk channel on a thread of its own.
struct OwnerDial {
    uri: String,
    secret: Vec<u8>,
    hello: Hello,
    owners: Arc<OwnerMap>,
    id: EndpointId,
    sink: Arc<OwnedSink>,
    arrival: std::sync::Weak<Arrival>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// The peer's name in errors ("the page server tcp:...").
    name: String,
}

impl OwnerDial {
    fn open(&self) -> Result<Arc<PageClient>, OwnerDialError> {
        let arrival = self.arrival.upgrade().ok_or(OwnerDialError::Ended)?;
        // Its bulk thread stops when paging ends: its sockets are shut down then.
        let (client, _) = connect_owner(
            &self.uri,
            &self.secret,
            &self.hello,
            &self.name,
            self.sink.clone(),
            arrival.clone(),
            &self.sockets,
            "owner-bulk-rx",
        )
        .map_err(OwnerDialError::Session)?;
        arrival
            .clients
            .lock()
            .expect("arrival lock")
            .push(client.clone());
        Ok(client)
    }
}

/// Why [`OwnerDial::open`] failed.
#[derive(Debug)]
enum OwnerDialError {
    /// The migration (and its arrival) is gone: nobody needs the owner any more.
    Ended,
    Session(tsubame_pageserver::SessionError),
}

impl std::fmt::Display for OwnerDialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ended => f.write_str("the migration has ended"),
            Self::Session(e) => e.fmt(f),
        }
    }
}

impl Redial for OwnerDial {
    fn redial(&self) -> Result<Arc<PageClient>, RedialError> {
        self.open().map_err(|e| match e {
            OwnerDialError::Session(s) if tsubame_pageserver::memserver::lacks_the_vm(&s) => {
                RedialError {
                    why: format!(
                        "{} is back but holds none of this VM's pages (it restarted?): the \
                         {} pages it held are lost and the VM stays paused",
                        self.uri,
                        self.owners.owned_by(self.id)
                    ),
                    permanent: true,
                }
            }
            e => RedialError {
                why: format!("{}: {e}", self.uri),
                permanent: matches!(e, OwnerDialError::Ended),
            },
        })
    }

    fn needed_when_empty(&self) -> bool {
        false // every page it held is here
    }
}
