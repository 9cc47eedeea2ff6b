//! The memserver: a process that holds pages of VMs for other hosts (S-memV's memserver), keyed
//! by (VM, gfn), and serves them back.
//!
//! It speaks the same sessions as every other endpoint, and is both ends of them over one
//! radix tree of pages per VM ([`MemStore`]), all under one memory [`Budget`]:
//!
//! ```text
//!  a source   ══ Store session ══► PageClient ─► MemStore(vm) ─► PageServer ══ Fetch session ══► a destination
//!  (pages it hands over,           (receive_bulk,                 (demand replies,
//!   or Discards: forget them)       acknowledged as stored)        push of what it holds)
//! ```
//!
//! A fetching host gets the pages it asks for on demand; the memserver pushes everything it
//! holds only when the host says `Resumed` (it takes the VM's pages back: consolidation).
//! A page is held once it arrives (zero pages take no memory) and is served until it is
//! forgotten (a `Discard` in a store session) or the process ends; a later store of the same
//! page replaces it. With a limit (`--max-mem`), a store that would go over it fails, and the
//! storing host is told why (`Error` on its urgent channel); what was stored before stays. A
//! fetch of a VM it holds no pages of is refused; a page it does not hold is never made up (the
//! server fails the request's session with the reason). [`Memserver::usage`] reports, per VM,
//! the pages held and the bytes of data and metadata.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tsubame_pages::{Budget, MemStore, MemUsage, PageStore};

use crate::client::{ClientError, ClientEvents, PageClient};
use crate::flow::BulkWriter;
use crate::frame::ProtocolError;
use crate::message::{Hello, Message, Purpose};
use crate::prepage::{HotPages, Prepage};
use crate::server::{PageServer, PushOptions, ServeState};
use crate::session::{Acceptor, Session};

/// How a memserver refuses a Fetch session for a VM it holds nothing of (see
/// [`lacks_the_vm`]).
const NO_PAGES_OF_VM: &str = "this memserver holds no pages of VM";

/// Whether opening a session failed because the memserver holds nothing of the VM (it
/// restarted, say, and lost what it held): a redial cannot fix that.
pub fn lacks_the_vm(e: &crate::SessionError) -> bool {
    e.to_string().contains(NO_PAGES_OF_VM)
}

/// What a memserver holds for one VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmUsage {
    pub vm: u64,
    pub memory_bytes: u64,
    #[serde(flatten)]
    pub held: MemUsage,
}

/// What a memserver holds in all.
#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    /// Bytes of page data held, all VMs (the sum of `vms`, so the parts always add up;
    /// a page being stored this instant counts once its store is done), and the limit
    /// (`--max-mem`).
    pub data_bytes: u64,
    pub max_bytes: Option<u64>,
    /// Memory allocated and touched ahead of time for pages to come (`--prepare`).
    pub prepared_bytes: u64,
    pub metadata_bytes: u64,
    pub vms: Vec<VmUsage>,
    /// Store sessions that failed for lack of memory.
    pub refused_full: u64,
}

/// A memserver: the VMs' stores, their budget, and the secret sessions must know.
#[derive(Debug)]
pub struct Memserver {
    secret: Vec<u8>,
    budget: Arc<Budget>,
    vms: Mutex<HashMap<u64, Arc<MemStore>>>,
    refused_full: std::sync::atomic::AtomicU64,
}

impl Memserver {
    /// An empty memserver authenticating with `secret`, holding at most `max_bytes` of page
    /// data (`None`: no limit).
    pub fn new(secret: &[u8], max_bytes: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            secret: secret.to_vec(),
            budget: Budget::new(max_bytes),
            vms: Mutex::new(HashMap::new()),
            refused_full: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Prepares `bytes` of memory for pages to come, on a background thread at the lowest
    /// priority (see `tsubame_pages::memstore`): stores then write into memory the host has
    /// already faulted in.
    pub fn prepare(self: &Arc<Self>, bytes: u64) -> std::io::Result<()> {
        let budget = self.budget.clone();
        std::thread::Builder::new()
            .name("memserver-prepare".into())
            .spawn(move || {
                crate::spin::set_nice(19);
                budget.prepare(bytes);
                log::info!(
                    "{} bytes of memory prepared for pages",
                    budget.prepared_pages() * tsubame_pages::PAGE_SIZE
                );
            })?;
        Ok(())
    }

    /// What it holds, per VM and in all.
    pub fn usage(&self) -> Usage {
        let mut vms: Vec<VmUsage> = self
            .vms
            .lock()
            .expect("memserver lock")
            .iter()
            .map(|(vm, t)| VmUsage {
                vm: *vm,
                memory_bytes: t.layout().total_bytes(),
                held: t.usage(),
            })
            .collect();
        vms.sort_by_key(|v| v.vm);
        Usage {
            data_bytes: vms.iter().map(|v| v.held.data_bytes).sum(),
            max_bytes: self.budget.max(),
            prepared_bytes: self.budget.prepared_pages() * tsubame_pages::PAGE_SIZE,
            metadata_bytes: vms.iter().map(|v| v.held.metadata_bytes).sum(),
            vms,
            refused_full: self.refused_full.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Serves sessions on `listener` until it fails, each on threads of its own.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut acceptor = Acceptor::new(listener, &self.secret, "memserver");
        loop {
            let me = self.clone();
            let session = acceptor.next(move |h| me.check(h))?;
            let store = self.store_of(&session.hello);
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("memserver-{:x}", session.hello.vm))
                .spawn(move || me.handle(session, store))?;
        }
    }

    /// Whether a session's Hello asks for something this memserver can do.
    fn check(&self, h: &Hello) -> Result<(), ProtocolError> {
        match h.purpose {
            Purpose::Store => {
                // The VM's store exists once a store session's handshake is accepted, before
                // it has stored anything: a split's destination dials in between.
                let store = self.store_of(h);
                if store.layout() == &h.layout {
                    Ok(())
                } else {
                    Err(ProtocolError::Layout {
                        theirs: h.layout.clone(),
                        ours: store.layout().clone(),
                    })
                }
            }
            Purpose::Fetch => match self.vms.lock().expect("memserver lock").get(&h.vm) {
                None => Err(ProtocolError::Refused(format!(
                    "{NO_PAGES_OF_VM} {:#x}",
                    h.vm
                ))),
                Some(s) if s.layout() != &h.layout => Err(ProtocolError::Layout {
                    theirs: h.layout.clone(),
                    ours: s.layout().clone(),
                }),
                Some(_) => Ok(()),
            },
            // The host that pages its VM out may open this before it stored anything.
            Purpose::Recall => match self.vms.lock().expect("memserver lock").get(&h.vm) {
                Some(s) if s.layout() != &h.layout => Err(ProtocolError::Layout {
                    theirs: h.layout.clone(),
                    ours: s.layout().clone(),
                }),
                _ => Ok(()),
            },
            Purpose::Migrate | Purpose::Switch | Purpose::Resume => Err(ProtocolError::Refused(
                "this is a memserver: migrate to a `tsubame run --incoming` destination".into(),
            )),
        }
    }

    /// The store of the VM `hello` names, made empty if there is none.
    fn store_of(&self, hello: &Hello) -> Arc<MemStore> {
        self.vms
            .lock()
            .expect("memserver lock")
            .entry(hello.vm)
            .or_insert_with(|| Arc::new(MemStore::with_budget(&hello.layout, self.budget.clone())))
            .clone()
    }

    fn handle(self: &Arc<Self>, session: Session, store: Arc<MemStore>) {
        let vm = session.hello.vm;
        match session.hello.purpose {
            Purpose::Store => {
                let log = match session.urgent.try_clone() {
                    Ok(urgent) => Arc::new(StoreLog {
                        urgent: Mutex::new(urgent),
                        memserver: self.clone(),
                    }),
                    Err(e) => return log::warn!("cannot store pages of VM {vm:#x}: {e}"),
                };
                let client = match PageClient::new(
                    &format!("the host storing VM {vm:#x}"),
                    &session.urgent,
                    store.clone(),
                    log,
                ) {
                    Ok(c) => c,
                    Err(e) => return log::warn!("cannot store pages of VM {vm:#x}: {e}"),
                };
                client.receive_bulk(session.bulk);
                log::info!(
                    "VM {vm:#x}: {} pages held after a store session",
                    store.held_pages()
                );
            }
            Purpose::Fetch | Purpose::Recall => match serve_fetch(vm, &store, session) {
                Ok(ServeState::Completed) => {
                    log::info!("VM {vm:#x}: the fetching host has every page");
                }
                Ok(state) => log::warn!("VM {vm:#x}: serving ended: {state:?}"),
                Err(e) => log::warn!("cannot serve pages of VM {vm:#x}: {e}"),
            },
            Purpose::Migrate | Purpose::Switch | Purpose::Resume => {} // refused by `check`
        }
    }
}

/// Serves `store` to a fetching host until it has every page it needs or goes away: demand
/// replies from the start, and once the host says `Resumed` (it wants all of them back:
/// consolidation), a push of every page held.
fn serve_fetch(
    vm: u64,
    store: &Arc<MemStore>,
    s: Session,
) -> Result<ServeState, crate::ServerError> {
    let server = Arc::new(PageServer::new(store.clone()));
    // Only what is held is pushed: the fetching host gets the rest from other owners. Looked
    // at when the push starts: a split migration stores pages after the host dialled.
    let (held, by) = (store.clone(), server.clone());
    let withhold_absent = crate::server::PushHook::new(move |_| {
        held.for_each_absent(|gfn, pages| {
            by.withhold(gfn, pages);
        });
        Ok(())
    });
    let layout = store.layout().clone();
    if s.hello.purpose == Purpose::Recall {
        // Demand replies only: the host recalls a page when its guest touches it.
        for r in &layout.regions {
            server.withhold(r.first_gfn(), r.size / tsubame_pages::PAGE_SIZE);
        }
    }
    let bulk = BulkWriter::new(s.bulk, s.rtt)?;
    server.serve(
        &format!("the host fetching VM {vm:#x}"),
        s.urgent,
        bulk,
        PushOptions {
            prepage: Prepage::Address,
            rate: None,
            hot: HotPages::new(&layout),
            // Pushed only when the fetching host asks for everything (`Resumed`); until then
            // the pages live here and are fetched on demand.
            gate_timeout: None,
            start_on_demand: false,
            before_push: (s.hello.purpose != Purpose::Recall).then_some(withhold_absent),
            after_push: None,
            // The memserver keeps what it holds after serving one host.
            release: false,
        },
    )?;
    Ok(server.wait())
}

/// A store session's events: a failure is logged and told to the storing host (`Error` on
/// its urgent channel), so that it reports why (a full memserver, say) rather than a closed
/// connection.
struct StoreLog {
    urgent: Mutex<std::net::TcpStream>,
    memserver: Arc<Memserver>,
}

impl ClientEvents for StoreLog {
    fn failed(&self, client: &PageClient, error: ClientError) {
        if client.is_push_done() {
            return;
        }
        let message = error.to_string();
        if message.contains("memserver is full") {
            self.memserver
                .refused_full
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        log::warn!("{message}");
        let _ = Message::Error { message }.write_to(&mut *self.urgent.lock().expect("log lock"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Channel;
    use crate::session::open;
    use tsubame_pages::MemoryLayout;

    #[test]
    fn fetches_of_unknown_vms_and_migrations_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", l.local_addr().unwrap());
        let ms = Memserver::new(b"s", None);
        let m = ms.clone();
        std::thread::spawn(move || m.serve(l));
        let hello = |purpose| Hello {
            purpose,
            channel: Channel::Urgent,
            session: 0,
            vm: 0xabc,
            layout: MemoryLayout::for_size(64 << 20).unwrap(),
            vcpus: 1,
            checkpoint_ms: 0,
        };
        let e = open(&uri, b"s", &hello(Purpose::Fetch))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no pages of VM 0xabc"), "{e}");
        let e = open(&uri, b"s", &hello(Purpose::Migrate))
            .unwrap_err()
            .to_string();
        assert!(e.contains("this is a memserver"), "{e}");
        assert!(ms.usage().vms.is_empty());
    }
}
