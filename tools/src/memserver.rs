//! `tsubame memserver`: a process that holds part of VMs' memory for other hosts.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tsubame_pageserver::session::parse_uri;
use tsubame_pageserver::Memserver;
use tsubame_vmm::control::{CommandError, CommandHandler, ControlServer};

/// Hold pages of VMs for other hosts (a memserver), and serve them back.
///
/// A migration source hands it part of a VM's memory (`tsubame ctl SOCK migrate uri=...
/// split=tcp:HOST:PORT[,...]:AMOUNT`) after the switchover, in parallel with sending the rest
/// to the destination, which then fetches those pages from it when its guest touches them,
/// until it takes them all back (`tsubame ctl SOCK consolidate`). A VM run with
/// `--local-mem SIZE --memserver tcp:HOST:PORT` evicts its cold pages here and faults them
/// back. Pages are kept in memory in a
/// radix tree per VM, keyed by the VM's identity, until they are forgotten or the memserver
/// exits; zero pages take no memory and are sent as markers. With --max-mem, a store that
/// would take the page data over the limit is refused, and the storing host is told why.
/// Sessions are authenticated with the shared secret, as migrations are.
///
/// With --control SOCKET it answers, one JSON object per line like a VM's control socket
/// (`tsubame ctl SOCKET COMMAND`): query-usage (per VM: pages held, data and metadata bytes;
/// in all, the limit and the memory prepared), quit.
///
/// Not yet: replicas, and surviving the loss of a memserver (its pages are waited for).
///
/// Examples:
///   TSUBAME_SECRET=... tsubame memserver --listen tcp:0.0.0.0:5555
///   TSUBAME_SECRET=... tsubame memserver --listen tcp:0.0.0.0:5555 --max-mem 8G --prepare 8G --control /tmp/ms.sock
///   tsubame ctl /tmp/ms.sock query-usage
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MemserverArgs {
    /// Where to listen, tcp:HOST:PORT (port 0 picks one, printed on stderr).
    #[arg(long, value_name = "URI")]
    pub listen: String,
    /// Shared secret of the sessions (the hosts that store and fetch must have the same).
    #[arg(long, env = "TSUBAME_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Most page data to hold, all VMs together (e.g. 512M, 8G); unlimited if not given.
    #[arg(long, value_name = "SIZE", value_parser = tsubame_vmm::guest::parse_size)]
    pub max_mem: Option<u64>,
    /// Allocate and touch this much memory for pages ahead of time, in the background at the
    /// lowest priority (e.g. 4G): stores then write into memory the host has already faulted
    /// in. On a host that is itself a VM, fresh memory costs a fault at the hypervisor per
    /// page on first touch (here ~16 µs, a store rate of ~0.25 GB/s without it). At most
    /// --max-mem.
    #[arg(long, value_name = "SIZE", value_parser = tsubame_vmm::guest::parse_size)]
    pub prepare: Option<u64>,
    /// Serve a control socket here (query-usage, quit).
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
}

/// The memserver's control commands.
const COMMANDS: &[&str] = &["query-usage", "quit"];

struct Commands {
    memserver: Arc<Memserver>,
    quit: Mutex<mpsc::Sender<()>>,
}

impl CommandHandler for Commands {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn after_reply(&self, command: &str) {
        if command == "quit" {
            let _ = self.quit.lock().map(|q| q.send(()));
        }
    }

    fn execute(&self, command: &str, _args: &Value) -> Result<Value, CommandError> {
        match command {
            "query-usage" => serde_json::to_value(self.memserver.usage())
                .map_err(|e| CommandError::generic(e.to_string())),
            // Quits once the reply is out (`after_reply`).
            "quit" => Ok(json!({})),
            other => Err(CommandError {
                class: "CommandNotFound",
                desc: format!(
                    "unknown command '{other}'; a memserver knows: {}",
                    COMMANDS.join(", ")
                ),
            }),
        }
    }
}

pub fn memserver(a: &MemserverArgs) -> Result<i32> {
    let addr = parse_uri(&a.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {}", a.listen))?;
    let bound = listener.local_addr()?;
    let memserver = Memserver::new(a.secret.as_bytes(), a.max_mem);
    if let Some(bytes) = a.prepare {
        memserver
            .prepare(bytes)
            .context("starting the thread that prepares memory")?;
    }
    let (quit_tx, quit) = mpsc::channel();
    let _control = match &a.control {
        Some(path) => {
            let handler = Commands {
                memserver: memserver.clone(),
                quit: Mutex::new(quit_tx.clone()),
            };
            let server = ControlServer::start(path, Arc::new(handler))?;
            eprintln!("tsubame: control socket ready at {}", path.display());
            Some(server)
        }
        None => None,
    };
    eprintln!("tsubame: memserver listening on tcp:{bound}");
    let serving = std::thread::Builder::new()
        .name("memserver".into())
        .spawn(move || {
            let r = memserver.serve(listener);
            let _ = quit_tx.send(());
            r
        })?;
    let _ = quit.recv();
    if serving.is_finished() {
        serving
            .join()
            .map_err(|_| anyhow::anyhow!("the memserver thread panicked"))?
            .context("accepting sessions")?;
    }
    Ok(0)
}
