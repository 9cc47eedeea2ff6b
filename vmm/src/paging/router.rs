//! The fault path: fault → owner → fetch → install, one way for every kind of owner.
//!
//! The engine hands each first fault on a page to the [`OwnerRouter`], which looks the page up
//! in the [`OwnerMap`] and asks that owner's endpoint: a page client of a remote page server
//! ([`RemoteOwner`]), or a store in this process ([`LocalOwner`], e.g. a snapshot file). A
//! zero page is installed at once. Endpoints that answer on the fault thread (a remote page
//! server's demand replies) are each given the chance after a batch of faults.
//!
//! **Lost links.** A remote owner whose connection breaks, or that leaves a waiting fault
//! unanswered for [`SILENT_LINK`] ([`OwnerRouter::check_silent`]), is marked down ([`OwnerRouter::lost`]):
//! faults on its pages are not sent anywhere (the vCPUs that touch them wait; nothing ever
//! installs a zero or stale copy in their place), and, if it was given a [`Redial`], a thread
//! dials it again with backoff. Once it answers, its new client replaces the old one and every
//! page a vCPU waits for is asked for again. A redial that can never succeed (a memserver that
//! restarted and lost the VM's pages) leaves it down for good, with the reason (the VM then
//! reports itself stuck). Whoever must act on a change (the VM, which pauses while an owner of
//! its pages is unreachable) waits for it with [`OwnerRouter::wait_change`] and reads
//! [`OwnerRouter::unreachable`].
//!
//! **Heartbeats.** A link that goes silent while no vCPU waits for one of its pages would go
//! unnoticed, and a push over it would stall for ever. So a link that should be streaming (an
//! owner that pushes on its own, [`Redial::streams`], or one asked to push) and has said
//! nothing for a quarter of [`SILENT_LINK`] (500 ms) is probed: the engine asks for one page
//! the owner holds as if a thread had faulted on it ([`FaultEngine::probe`]), and the
//! silent-link check takes it from there. The probed page is one the VM lacks, so a probe is
//! never wasted, and an answer costs no more than the page. Owners that only answer requests
//! (a memserver the VM pages out to) are quiet for hours when the guest asks nothing and are
//! not probed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsubame_pages::{copy_run, Gfn, PageStore};
use tsubame_pageserver::message::Hello;
use tsubame_pageserver::{session, ClientEvents, ClientStats, PageClient, SessionError};
use tsubame_uffd::{FaultEngine, FetchError, Fetcher};

use super::owners::{EndpointId, OwnedSink, Owner, OwnerMap};

/// One owner of pages, as `query-migrate` and `query-status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct OwnerStats {
    /// What it is: "the migration source", "the page server tcp:...", "snapshot FILE".
    pub endpoint: String,
    /// Pages it still owns: not here yet.
    pub pages_owned: u64,
    /// Pages installed from it.
    pub pages_installed: u64,
    /// Copies it sent of pages already here (a demand reply racing its push): dropped.
    pub pages_already_local: u64,
    /// Copies it sent of pages another owner owned: dropped.
    pub pages_not_owned: u64,
    /// A remote owner's page client: requests sent, pages received.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientStats>,
    /// A remote owner's link: up, down since when and why, outages so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
}

/// A remote owner's link, as `query-status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkStatus {
    pub up: bool,
    /// How long it has been down, and why (while down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// Down for good: no redial can bring its pages back.
    pub lost_for_good: bool,
    /// Times the link went down, and the longest outage that ended, in ms.
    pub outages: u64,
    pub longest_outage_ms: Option<u64>,
    /// Successful redials.
    pub redials: u64,
}

/// How long a waiting fault may go unanswered before its owner's link counts as lost.
pub const SILENT_LINK: Duration = Duration::from_secs(2);

/// An owner of pages that cannot be reached now, as [`OwnerRouter::unreachable`] gives it.
#[derive(Clone, Debug, Serialize)]
pub struct Unreachable {
    pub endpoint: String,
    /// Pages it owns: the guest cannot have them until it is back.
    pub pages_owned: u64,
    pub down_ms: u64,
    pub why: String,
    pub lost_for_good: bool,
    /// Whether the VM pauses for it (not for a migration's source: see [`Redial::holds_vm`]).
    pub holds_vm: bool,
}

/// Why a redial failed.
#[derive(Debug)]
pub struct RedialError {
    pub why: String,
    /// It can never succeed (e.g. the memserver restarted and holds none of the VM's pages):
    /// stop trying.
    pub permanent: bool,
}

/// How to dial a remote owner again after its link broke: a new session, a new page client
/// (installing into the same sink), its receivers started.
pub trait Redial: Send + Sync {
    /// Called once per outage, on the redial thread, before the first dial: whatever can be
    /// done without the link (handing its pages to other holders) is done here.
    fn lost(&self) {}
    fn redial(&self) -> Result<Arc<PageClient>, RedialError>;
    /// Whether it is worth dialling while it owns no pages (a memserver a VM pages out to is;
    /// a split's memserver whose pages have all arrived is not).
    fn needed_when_empty(&self) -> bool;
    /// Whether the VM pauses while it is lost (see [`OwnerRouter::unreachable`]). A migration's
    /// source is not worth a pause: its pages are missing ones the guest may never touch, and
    /// the vCPUs that do touch one wait on their fault alone.
    fn holds_vm(&self) -> bool {
        true
    }
    /// The longest wait between two dials (the backoff starts at 20 ms and doubles up to
    /// this).
    fn max_backoff(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// Whether the owner streams its pages on its own until it has sent them all (a
    /// migration's source pushing): a link of such an owner that says nothing for a while is
    /// probed ([`OwnerRouter::check_silent`]). An owner that only answers requests is quiet
    /// for hours when the guest asks nothing; it is probed only once asked to push.
    fn streams(&self) -> bool {
        false
    }
}

#[derive(Default)]
struct Link {
    down_since: Option<Instant>,
    why: Option<String>,
    lost_for_good: bool,
    outages: u64,
    longest: Option<Duration>,
    redials: u64,
    /// A redial thread runs.
    dialling: bool,
    /// When the last redial brought it back (every waiting fault was asked again then).
    up_since: Option<Instant>,
    /// When it was last probed: asked for a page only to hear from it.
    probed_at: Option<Instant>,
    /// Its [`Redial::lost`] (handing pages to other holders) has not finished yet: the VM
    /// does not pause for pages that may not wait at all.
    failing_over: bool,
}

struct Endpoint {
    name: String,
    /// Where a remote owner can be dialled (a memserver's `tcp:HOST:PORT`), if another host
    /// can dial it too, and whether it is a memserver (or a migration's source serving the
    /// VM's pages to a host the VM moves on to: see [`Self::set_source_address`]).
    address: Option<(String, bool)>,
    fetcher: Arc<dyn Fetcher>,
    sink: Arc<OwnedSink>,
    remote: Option<Arc<RemoteOwner>>,
    link: Arc<Mutex<Link>>,
    /// Set while the link is down: faults on its pages wait.
    down: Arc<AtomicBool>,
    redial: Option<Arc<dyn Redial>>,
    /// It was asked to push all it owns (consolidation): asked again after a redial.
    asked_push: Arc<AtomicBool>,
}

/// Sends each fault to its page's owner.
pub struct OwnerRouter {
    owners: Arc<OwnerMap>,
    endpoints: RwLock<Vec<Endpoint>>,
    /// The engine faults come from (for re-requests after a redial).
    engine: Mutex<Weak<FaultEngine>>,
    /// Bumped at every change of a link; waited on by [`Self::wait_change`].
    changes: Mutex<u64>,
    changed: Condvar,
    closing: AtomicBool,
    /// Itself, for the redial threads.
    me: Weak<OwnerRouter>,
}

impl std::fmt::Debug for OwnerRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerRouter")
            .field(
                "endpoints",
                &self.endpoints.read().expect("router lock").len(),
            )
            .finish_non_exhaustive()
    }
}

impl OwnerRouter {
    /// A router over `owners`, with no endpoints yet.
    pub fn new(owners: Arc<OwnerMap>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            owners,
            endpoints: RwLock::new(Vec::new()),
            engine: Mutex::new(Weak::new()),
            changes: Mutex::new(0),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
        })
    }

    /// The engine whose waiting faults are asked for again after a redial.
    pub fn attach_engine(&self, engine: &Arc<FaultEngine>) {
        *self.engine.lock().expect("router lock") = Arc::downgrade(engine);
    }

    /// Stops every redial: the VM's paging ends.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.notify();
    }

    fn notify(&self) {
        *self.changes.lock().expect("router lock") += 1;
        self.changed.notify_all();
    }

    /// Waits until a link changed after change number `seen` (or `timeout`); returns the
    /// latest change number.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        let n = self.changes.lock().expect("router lock");
        let (n, _) = self
            .changed
            .wait_timeout_while(n, timeout, |n| *n == seen)
            .expect("router lock");
        *n
    }

    /// The remote owners that own pages and cannot be reached now.
    pub fn unreachable(&self) -> Vec<Unreachable> {
        let endpoints = self.endpoints.read().expect("router lock");
        endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let holds_vm = e.redial.as_ref().is_none_or(|r| r.holds_vm());
                let l = e.link.lock().expect("link lock");
                let since = l.down_since.filter(|_| !l.failing_over)?;
                let id = id_at(i);
                let owned = self.owners.owned_by(id);
                (owned > 0).then(|| Unreachable {
                    endpoint: e.name.clone(),
                    pages_owned: owned,
                    down_ms: u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    why: l.why.clone().unwrap_or_default(),
                    lost_for_good: l.lost_for_good,
                    holds_vm,
                })
            })
            .collect()
    }

    /// Why part of the memory is gone for good, if it is: owners whose link is lost for good
    /// (a migration source that is gone, a memserver that lost the pages) while they still
    /// own pages here, which nobody can bring any more. Cheap while no link is lost for good.
    pub fn lost_for_good(&self) -> Option<String> {
        let endpoints = self.endpoints.read().expect("router lock");
        let lost: Vec<String> = endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let l = e.link.lock().expect("link lock");
                if !l.lost_for_good {
                    return None;
                }
                let owned = self.owners.owned_by(id_at(i));
                (owned > 0).then(|| {
                    format!(
                        "{} pages owned by {} ({})",
                        owned,
                        e.name,
                        l.why.as_deref().unwrap_or("lost")
                    )
                })
            })
            .collect();
        (!lost.is_empty()).then(|| lost.join("; "))
    }

    /// The endpoint whose page client `client` is now.
    pub fn endpoint_of(&self, client: &PageClient) -> Option<EndpointId> {
        self.endpoints
            .read()
            .expect("router lock")
            .iter()
            .position(|e| {
                e.remote
                    .as_ref()
                    .is_some_and(|r| std::ptr::eq(Arc::as_ptr(&r.client()), client))
            })
            .map(id_at)
    }

    /// Whether endpoint `id`'s link is up (local endpoints always are).
    pub fn is_up(&self, id: EndpointId) -> bool {
        self.endpoints
            .read()
            .expect("router lock")
            .get(usize::from(id.0))
            .is_some_and(|e| !e.down.load(Ordering::Acquire))
    }

    /// Gives endpoint `id` a way to be dialled again once its link breaks (the migration
    /// source, once it said where: see `crate::migration::destination`).
    pub fn set_redial(&self, id: EndpointId, redial: Arc<dyn Redial>) {
        if let Some(e) = self
            .endpoints
            .write()
            .expect("router lock")
            .get_mut(usize::from(id.0))
        {
            e.redial = Some(redial);
        }
    }

    /// Endpoint `id`'s link broke (`why`): faults on its pages wait from now on, and its
    /// [`Redial`], if it has one, dials it again in the background. Called by whoever notices
    /// first (a receiver thread, the fault thread); later calls for the same outage do nothing.
    pub fn lost(&self, id: EndpointId, why: &str) {
        let Some((name, link, down, redial)) = self
            .endpoints
            .read()
            .expect("router lock")
            .get(usize::from(id.0))
            .map(|e| {
                (
                    e.name.clone(),
                    e.link.clone(),
                    e.down.clone(),
                    e.redial.clone(),
                )
            })
        else {
            return;
        };
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        {
            let mut l = link.lock().expect("link lock");
            if l.down_since.is_some() {
                return;
            }
            down.store(true, Ordering::Release);
            l.down_since = Some(Instant::now());
            l.why = Some(why.to_string());
            l.outages += 1;
            log::error!(
                "{name}: {why}; the {} pages it owns wait until it is back",
                self.owners.owned_by(id)
            );
            if let (Some(r), Some(me)) = (redial.filter(|_| !l.dialling), self.me.upgrade()) {
                l.dialling = true;
                l.failing_over = true;
                let link = link.clone();
                let spawned = std::thread::Builder::new()
                    .name("redial".into())
                    .spawn(move || {
                        r.lost();
                        link.lock().expect("link lock").failing_over = false;
                        me.notify();
                        me.redial_loop(id, &r);
                    });
                if let Err(e) = spawned {
                    l.dialling = false;
                    l.failing_over = false;
                    log::error!("{name}: cannot start the redial thread: {e}");
                }
            }
        }
        self.notify();
    }

    /// Dials endpoint `id` again until it answers, it can never answer, nobody needs it any
    /// more, or paging ends; backoff from 20 ms to 1 s.
    fn redial_loop(&self, id: EndpointId, r: &Arc<dyn Redial>) {
        let (link, down, name) = {
            let e = self.endpoints.read().expect("router lock");
            let e = &e[usize::from(id.0)];
            (e.link.clone(), e.down.clone(), e.name.clone())
        };
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u64;
        loop {
            if self.closing.load(Ordering::Acquire)
                || (self.owners.owned_by(id) == 0 && !r.needed_when_empty())
            {
                link.lock().expect("link lock").dialling = false;
                return;
            }
            attempts += 1;
            match r.redial() {
                Ok(client) => {
                    self.reconnected(id, &client);
                    let mut l = link.lock().expect("link lock");
                    let outage = l.down_since.take().map(|t| t.elapsed());
                    l.longest = l.longest.max(outage);
                    l.why = None;
                    l.redials += 1;
                    l.dialling = false;
                    l.up_since = Some(Instant::now());
                    down.store(false, Ordering::Release);
                    drop(l);
                    log::warn!(
                        "{name}: back after {:?} ({attempts} dials); waiting faults asked again",
                        outage.unwrap_or_default()
                    );
                    self.ask_again_all();
                    self.notify();
                    return;
                }
                Err(RedialError {
                    why,
                    permanent: true,
                }) => {
                    let mut l = link.lock().expect("link lock");
                    l.lost_for_good = true;
                    l.why = Some(why.clone());
                    l.dialling = false;
                    drop(l);
                    log::error!("{name}: {why}");
                    self.notify();
                    return;
                }
                Err(e) => {
                    if attempts.is_power_of_two() {
                        log::warn!("{name}: redial {attempts} failed: {}", e.why);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(r.max_backoff());
                }
            }
        }
    }

    /// Gives up on the links that leave a waiting fault unanswered for longer than `silent`
    /// (a network that drops everything without a reset tells TCP nothing): each such link
    /// that can be dialled again is disconnected and lost, so that the VM pauses and the
    /// redial brings the page once the network is back. Called periodically (see
    /// [`crate::Vm::watch_memory`]).
    pub fn check_silent(&self, silent: Duration) {
        let Some(engine) = self.engine.lock().expect("router lock").upgrade() else {
            return;
        };
        self.probe_quiet(&engine, silent / 4, silent);
        let mut quiet: Vec<(EndpointId, Gfn)> = Vec::new();
        for gfn in engine.pending_longer_than(silent) {
            if let Some(Owner::Endpoint(id)) = self.owners.get(gfn) {
                if !quiet.iter().any(|(q, _)| *q == id) {
                    quiet.push((id, gfn));
                }
            }
        }
        for (id, gfn) in quiet {
            let client = {
                let e = self.endpoints.read().expect("router lock");
                let Some(e) = e.get(usize::from(id.0)) else {
                    continue;
                };
                if e.redial.is_none() || e.down.load(Ordering::Acquire) {
                    continue;
                }
                // A redial asked again for every waiting fault: count from then.
                let l = e.link.lock().expect("link lock");
                if l.up_since.is_some_and(|t| t.elapsed() < silent) {
                    continue;
                }
                e.remote.as_ref().map(|r| r.client())
            };
            // Lost first: the disconnect makes its readers fail, with a less telling reason.
            self.lost(
                id,
                &format!("no reply to a request for page {gfn} in {silent:?}: the link is silent"),
            );
            if let Some(c) = client {
                c.disconnect();
            }
        }
    }

    /// Heartbeats for links that should be streaming: a link given a [`Redial`] whose owner
    /// streams its pages ([`Redial::streams`], or it was asked to push), has not pushed them
    /// all, and has said nothing for `quiet`, is asked for one page it owns (at most once per
    /// `silent`). The probe waits like a fault, so a link that went silent without a reset
    /// while no vCPU needed it is given up `silent` later ([`Self::check_silent`]) and dialled
    /// again, instead of leaving the push stalled for ever. The page is one the VM lacks, so
    /// the probe is never wasted.
    fn probe_quiet(&self, engine: &FaultEngine, quiet: Duration, silent: Duration) {
        let endpoints = self.endpoints.read().expect("router lock");
        for (i, e) in endpoints.iter().enumerate() {
            let (Some(redial), Some(remote)) = (&e.redial, &e.remote) else {
                continue;
            };
            if e.down.load(Ordering::Acquire)
                || !(redial.streams() || e.asked_push.load(Ordering::Acquire))
            {
                continue;
            }
            let client = remote.client();
            if client.is_completed() || client.is_push_done() || client.heard_ago() < quiet {
                continue;
            }
            let mut l = e.link.lock().expect("link lock");
            if l.up_since.is_some_and(|t| t.elapsed() < quiet)
                || l.probed_at.is_some_and(|t| t.elapsed() < silent)
            {
                continue;
            }
            let id = id_at(i);
            let Some(run) = self.owners.layout().regions.iter().find_map(|r| {
                self.owners
                    .owned_runs(r.first_gfn(), r.pages(), Owner::Endpoint(id))
                    .into_iter()
                    .next()
            }) else {
                continue;
            };
            l.probed_at = Some(Instant::now());
            drop(l);
            log::debug!(
                "{}: nothing heard for {:?}; probing with page {}",
                e.name,
                client.heard_ago(),
                run.gfn
            );
            engine.probe(run.gfn);
        }
    }

    /// Endpoint `id` answers again through `client` (asked again to push, if it was).
    fn reconnected(&self, id: EndpointId, client: &Arc<PageClient>) {
        let e = self.endpoints.read().expect("router lock");
        let Some(e) = e.get(usize::from(id.0)) else {
            return;
        };
        if let Some(remote) = &e.remote {
            *remote.client.write().expect("owner lock") = client.clone();
        }
        if e.asked_push.load(Ordering::Acquire) {
            if let Err(err) = client.send(&tsubame_pageserver::Message::Resumed) {
                log::warn!("{}: asking it again for its pages: {err}", e.name);
            }
        }
    }

    /// Every page a vCPU waits for is asked for again, from its owner now.
    pub fn ask_again_all(&self) {
        let Some(engine) = self.engine.lock().expect("router lock").upgrade() else {
            return;
        };
        engine.clear_fetch_error();
        for r in &self.owners.layout().regions {
            engine.reroute(r.first_gfn(), r.pages());
        }
    }

    /// The owner map.
    pub fn owners(&self) -> &Arc<OwnerMap> {
        &self.owners
    }

    /// The id the next endpoint added will get.
    pub fn next_id(&self) -> EndpointId {
        let n = self.endpoints.read().expect("router lock").len();
        id_at(n)
    }

    /// Adds a store in this process called `name` as an endpoint; pages the owner map gives
    /// its id are fetched from it.
    pub fn add_local<S: PageStore + 'static>(
        &self,
        name: &str,
        local: Arc<LocalOwner<S>>,
    ) -> Result<EndpointId, FetchError> {
        self.add(Endpoint {
            name: name.to_string(),
            address: None,
            sink: local.sink.clone(),
            fetcher: local,
            remote: None,
            link: Arc::default(),
            down: Arc::default(),
            redial: None,
            asked_push: Arc::default(),
        })
    }

    /// Adds a remote owner; pages the owner map gives its id are fetched from it. With a
    /// `redial`, a broken link is dialled again (see the module docs); without, it stays down.
    pub fn add_remote(
        &self,
        remote: RemoteOwner,
        redial: Option<Arc<dyn Redial>>,
    ) -> Result<EndpointId, FetchError> {
        let remote = Arc::new(remote);
        self.add(Endpoint {
            name: remote.client().peer().to_string(),
            address: remote.address.clone().map(|a| (a, true)),
            sink: remote.sink.clone(),
            remote: Some(remote.clone()),
            fetcher: remote,
            link: Arc::default(),
            down: Arc::default(),
            redial,
            asked_push: Arc::default(),
        })
    }

    fn add(&self, endpoint: Endpoint) -> Result<EndpointId, FetchError> {
        let mut e = self.endpoints.write().expect("router lock");
        if e.len() >= EndpointId::MAX {
            return Err(FetchError(format!(
                "a VM's pages can be spread over at most {} endpoints",
                EndpointId::MAX
            )));
        }
        e.push(endpoint);
        Ok(EndpointId(
            u8::try_from(e.len() - 1).expect("checked above"),
        ))
    }

    /// Asks every remote owner that still owns pages here to push all of them now
    /// (`Resumed`; a memserver pushes only when asked); returns their names and the pages
    /// they own. An owner that cannot push (a local store) or cannot be reached is an error:
    /// pages would stay behind.
    pub fn ask_every_push(&self) -> Result<Vec<(String, u64)>, FetchError> {
        let endpoints = self.endpoints.read().expect("router lock");
        let mut asked = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let id = id_at(i);
            let owned = self.owners.owned_by(id);
            if owned == 0 {
                continue;
            }
            let client = e.remote.as_ref().map(|r| r.client()).ok_or_else(|| {
                FetchError(format!(
                    "{} owns {owned} pages but cannot push them",
                    e.name
                ))
            })?;
            e.asked_push.store(true, Ordering::Release);
            if e.down.load(Ordering::Acquire) {
                // Asked once its link is back.
                asked.push((e.name.clone(), owned));
                continue;
            }
            match client.send(&tsubame_pageserver::Message::Resumed) {
                // Its link just broke: asked again once the redial brings it back.
                Err(err) if e.redial.is_some() => {
                    log::warn!(
                        "asking {} for its pages: {err}; asked again after the redial",
                        e.name
                    );
                }
                Err(err) => {
                    return Err(FetchError(format!(
                        "asking {} for its pages: {err}",
                        e.name
                    )))
                }
                Ok(()) => {}
            }
            asked.push((e.name.clone(), owned));
        }
        Ok(asked)
    }

    /// The remote owners another host could dial, with their addresses and whether each is
    /// a memserver (else a migration source that serves pages to where the VM goes next).
    pub fn dialable(&self) -> Vec<(EndpointId, String, bool)> {
        self.endpoints
            .read()
            .expect("router lock")
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let id = id_at(i);
                e.address.clone().map(|(a, memserver)| (id, a, memserver))
            })
            .collect()
    }

    /// Makes endpoint `id` (a migration's source) dialable at `uri` by another host: the one
    /// this VM moves on to (a migration switched after its switchover).
    /// `None`: not dialable any more (the move failed).
    pub fn set_source_address(&self, id: EndpointId, uri: Option<&str>) {
        if let Some(e) = self
            .endpoints
            .write()
            .expect("router lock")
            .get_mut(usize::from(id.0))
        {
            e.address = uri.map(|u| (u.to_string(), false));
        }
    }

    /// Every owner, with what it owns and has sent.
    pub fn owner_stats(&self) -> Vec<OwnerStats> {
        self.endpoints
            .read()
            .expect("router lock")
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let sink = e.sink.stats();
                OwnerStats {
                    endpoint: e.name.clone(),
                    pages_owned: self.owners.count(Owner::Endpoint(EndpointId(
                        u8::try_from(i).expect("few endpoints"),
                    ))),
                    pages_installed: sink.pages_installed,
                    pages_already_local: sink.pages_already_local,
                    pages_not_owned: sink.pages_not_owned,
                    client: e.remote.as_ref().map(|r| r.client().stats()),
                    link: e.remote.as_ref().map(|_| {
                        let l = e.link.lock().expect("link lock");
                        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                        LinkStatus {
                            up: l.down_since.is_none(),
                            down_ms: l.down_since.map(|t| ms(t.elapsed())),
                            why: l.why.clone(),
                            lost_for_good: l.lost_for_good,
                            outages: l.outages,
                            longest_outage_ms: l.longest.map(ms),
                            redials: l.redials,
                        }
                    }),
                }
            })
            .collect()
    }
}

impl OwnerRouter {
    /// A request to or a reply from endpoint `id` failed: a link that can be dialled again is
    /// lost (its faults wait for the redial); any other failure is the fetch's error.
    fn lost_or_fail(&self, id: EndpointId, e: FetchError) -> Result<(), FetchError> {
        let redialable = self
            .endpoints
            .read()
            .expect("router lock")
            .get(usize::from(id.0))
            .is_some_and(|e| e.redial.is_some());
        if redialable {
            self.lost(id, &e.0);
            Ok(())
        } else {
            Err(e)
        }
    }
}

impl Fetcher for OwnerRouter {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        match self.owners.get(gfn) {
            Some(Owner::Zero) => {
                engine
                    .install_zero(gfn, 1)
                    .map_err(|e| FetchError(e.to_string()))?;
                self.owners.set(gfn, 1, Owner::Local);
                Ok(())
            }
            // Installed between the fault and now: the install woke the faulting thread.
            Some(Owner::Local) if engine.is_present(gfn) => Ok(()),
            Some(Owner::Local) => Err(FetchError(format!(
                "page {gfn} is missing, yet no endpoint owns it: the guest waits rather than \
                 run on a page nobody has"
            ))),
            Some(Owner::Endpoint(id)) => {
                let (endpoint, down) = self
                    .endpoints
                    .read()
                    .expect("router lock")
                    .get(usize::from(id.0))
                    .map(|e| (e.fetcher.clone(), e.down.load(Ordering::Acquire)))
                    .ok_or_else(|| {
                        FetchError(format!(
                            "page {gfn} belongs to endpoint {id:?}, which is not connected"
                        ))
                    })?;
                if down {
                    // Asked again once its link is back (or once another owner has it).
                    return Ok(());
                }
                endpoint
                    .request(gfn, engine)
                    .or_else(|e| self.lost_or_fail(id, e))
            }
            None => Err(FetchError(format!(
                "a fault on {gfn}, which is not guest RAM"
            ))),
        }
    }

    fn flush(&self, engine: &FaultEngine) -> Result<(), FetchError> {
        let endpoints: Vec<_> = self
            .endpoints
            .read()
            .expect("router lock")
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.down.load(Ordering::Acquire))
            .map(|(i, e)| {
                let id = id_at(i);
                (id, e.fetcher.clone())
            })
            .collect();
        let mut first_error = None;
        for (id, e) in endpoints {
            if let Err(err) = e.flush(engine).or_else(|e| self.lost_or_fail(id, e)) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Opens a session with the remote owner at `uri` (saying `hello`) and starts a page client
/// of it called `peer`, installing into `sink` and reporting to `events`: demand replies are
/// read on the fault thread, the bulk channel on a thread of its own named `thread`. The
/// session's connections are recorded in `sockets` (shut down when paging ends, which stops
/// that thread). Returns the client and its bulk thread.
#[allow(clippy::too_many_arguments)] // one call per kind of owner, each naming its parts
pub fn connect_owner(
    uri: &str,
    secret: &[u8],
    hello: &Hello,
    peer: &str,
    sink: Arc<dyn tsubame_pages::PageSink>,
    events: Arc<dyn ClientEvents>,
    sockets: &Mutex<Vec<std::net::TcpStream>>,
    thread: &str,
) -> Result<(Arc<PageClient>, std::thread::JoinHandle<()>), SessionError> {
    let s = session::open(uri, secret, hello)?;
    let io = |source: std::io::Error| SessionError::Connect {
        addr: uri.to_string(),
        source,
    };
    let client = PageClient::new(peer, &s.urgent, sink, events).map_err(io)?;
    client.attach_replies(s.urgent.try_clone().map_err(io)?);
    {
        let mut sockets = sockets.lock().expect("paging lock");
        for c in [&s.urgent, &s.bulk] {
            sockets.push(c.try_clone().map_err(io)?);
        }
    }
    let (rx, bulk) = (client.clone(), s.bulk);
    let t = std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || rx.receive_bulk(bulk))
        .map_err(io)?;
    Ok((client, t))
}

/// The id of the endpoint at `index` of the router's list.
fn id_at(index: usize) -> EndpointId {
    EndpointId(u8::try_from(index).expect("few endpoints"))
}

/// A remote page server, through its page client: requests go out on the urgent channel, and
/// the replies are read and installed (into `sink`) on the fault thread, in `flush`.
#[derive(Debug)]
pub struct RemoteOwner {
    /// Replaced when a redial brings the link back.
    client: RwLock<Arc<PageClient>>,
    pub sink: Arc<OwnedSink>,
    /// Where another host can dial it (a memserver), `None` for a migration source.
    pub address: Option<String>,
}

impl RemoteOwner {
    pub fn new(client: Arc<PageClient>, sink: Arc<OwnedSink>, address: Option<String>) -> Self {
        Self {
            client: RwLock::new(client),
            sink,
            address,
        }
    }

    /// Its page client now.
    pub fn client(&self) -> Arc<PageClient> {
        self.client.read().expect("owner lock").clone()
    }
}

impl Fetcher for RemoteOwner {
    fn request(&self, gfn: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        self.client
            .read()
            .expect("owner lock")
            .request(gfn)
            .map_err(|e| FetchError(e.to_string()))
    }

    fn flush(&self, _: &FaultEngine) -> Result<(), FetchError> {
        self.client
            .read()
            .expect("owner lock")
            .read_replies()
            .map_err(|e| FetchError(e.to_string()))
    }
}

/// A store in this process (a snapshot file): a fault reads the page and installs it at once,
/// into `sink` (the engine, for the pages this endpoint owns).
#[derive(Debug)]
pub struct LocalOwner<S> {
    store: S,
    sink: Arc<OwnedSink>,
    scratch: Mutex<Vec<u8>>,
}

impl<S: PageStore> LocalOwner<S> {
    pub fn new(store: S, sink: Arc<OwnedSink>) -> Self {
        Self {
            store,
            sink,
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Copies `[gfn, gfn + pages)` from the store into the sink: the pages this endpoint owns
    /// are installed.
    pub fn copy(&self, gfn: Gfn, pages: u64) -> Result<u64, tsubame_pages::PageError> {
        let mut scratch = self.scratch.lock().expect("scratch lock");
        copy_run(&self.store, self.sink.as_ref(), gfn, pages, &mut scratch)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: PageStore> Fetcher for LocalOwner<S> {
    fn request(&self, gfn: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        self.copy(gfn, 1)
            .map(drop)
            .map_err(|e| FetchError(e.to_string()))
    }
}
