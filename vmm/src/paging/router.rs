//! The fault path: fault → owner → fetch → install, one way for every kind of owner.
//!
//! The engine hands each first fault on a page to the [`OwnerRouter`], which looks the page up
//! in the [`OwnerMap`] and asks that owner's endpoint: a page client of a remote page server
//! ([`RemoteOwner`]), or a store in this process ([`LocalOwner`], e.g. a snapshot file). A
//! zero page is installed at once. Endpoints that answer on the fault thread (a remote page
//! server's demand replies) are each given the chance after a batch of faults.

use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tsubame_pages::{copy_run, Gfn, PageStore};
use tsubame_pageserver::{ClientStats, PageClient};
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
}

struct Endpoint {
    name: String,
    /// Where a remote owner can be dialled (a memserver's `tcp:HOST:PORT`), if another host
    /// can dial it too.
    address: Option<String>,
    fetcher: Arc<dyn Fetcher>,
    sink: Arc<OwnedSink>,
    client: Option<Arc<PageClient>>,
}

/// Sends each fault to its page's owner.
pub struct OwnerRouter {
    owners: Arc<OwnerMap>,
    endpoints: RwLock<Vec<Endpoint>>,
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
    pub fn new(owners: Arc<OwnerMap>) -> Self {
        Self {
            owners,
            endpoints: RwLock::new(Vec::new()),
        }
    }

    /// The owner map.
    pub fn owners(&self) -> &Arc<OwnerMap> {
        &self.owners
    }

    /// The id the next endpoint added will get.
    pub fn next_id(&self) -> EndpointId {
        let n = self.endpoints.read().expect("router lock").len();
        EndpointId(u8::try_from(n).expect("few endpoints"))
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
            client: None,
        })
    }

    /// Adds a remote owner; pages the owner map gives its id are fetched from it.
    pub fn add_remote(&self, remote: RemoteOwner) -> Result<EndpointId, FetchError> {
        let remote = Arc::new(remote);
        self.add(Endpoint {
            name: remote.client.peer().to_string(),
            address: remote.address.clone(),
            sink: remote.sink.clone(),
            client: Some(remote.client.clone()),
            fetcher: remote,
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
            let id = EndpointId(u8::try_from(i).expect("few endpoints"));
            let owned = self.owners.owned_by(id);
            if owned == 0 {
                continue;
            }
            let client = e.client.as_ref().ok_or_else(|| {
                FetchError(format!(
                    "{} owns {owned} pages but cannot push them",
                    e.name
                ))
            })?;
            client
                .send(&tsubame_pageserver::Message::Resumed)
                .map_err(|err| FetchError(format!("asking {} for its pages: {err}", e.name)))?;
            asked.push((e.name.clone(), owned));
        }
        Ok(asked)
    }

    /// The remote owners another host could dial (memservers), with their addresses.
    pub fn dialable(&self) -> Vec<(EndpointId, String)> {
        self.endpoints
            .read()
            .expect("router lock")
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let id = EndpointId(u8::try_from(i).expect("few endpoints"));
                e.address.clone().map(|a| (id, a))
            })
            .collect()
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
                    client: e.client.as_ref().map(|c| c.stats()),
                }
            })
            .collect()
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
                let endpoint = self
                    .endpoints
                    .read()
                    .expect("router lock")
                    .get(usize::from(id.0))
                    .map(|e| e.fetcher.clone())
                    .ok_or_else(|| {
                        FetchError(format!(
                            "page {gfn} belongs to endpoint {id:?}, which is not connected"
                        ))
                    })?;
                endpoint.request(gfn, engine)
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
            .map(|e| e.fetcher.clone())
            .collect();
        let mut first_error = None;
        for e in endpoints {
            if let Err(err) = e.flush(engine) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A remote page server, through its page client: requests go out on the urgent channel, and
/// the replies are read and installed (into `sink`) on the fault thread, in `flush`.
#[derive(Debug)]
pub struct RemoteOwner {
    pub client: Arc<PageClient>,
    pub sink: Arc<OwnedSink>,
    /// Where another host can dial it (a memserver), `None` for a migration source.
    pub address: Option<String>,
}

impl Fetcher for RemoteOwner {
    fn request(&self, gfn: Gfn, _: &FaultEngine) -> Result<(), FetchError> {
        self.client
            .request(gfn)
            .map_err(|e| FetchError(e.to_string()))
    }

    fn flush(&self, _: &FaultEngine) -> Result<(), FetchError> {
        self.client
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
