//! `tsubame memserver`: a process that holds part of VMs' memory for other hosts.

use std::net::TcpListener;

use anyhow::{Context, Result};
use tsubame_pageserver::session::parse_uri;
use tsubame_pageserver::Memserver;

/// Hold pages of VMs for other hosts (a memserver), and serve them back.
///
/// A migration source hands it part of a VM's memory (`tsubame ctl SOCK migrate uri=...
/// split=tcp:HOST:PORT:SHARE`), and the destination fetches those pages from it, on demand and
/// in the background, while it gets the rest from the source. Pages are kept in memory, keyed
/// by the VM's identity, until the memserver exits; zero pages take no memory. Sessions are
/// authenticated with the shared secret, as migrations are.
///
/// Not yet: a memory limit, forgetting pages, a control socket, remote paging under a local
/// limit.
///
/// Example:
///   TSUBAME_SECRET=... tsubame memserver --listen tcp:0.0.0.0:5555
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MemserverArgs {
    /// Where to listen, tcp:HOST:PORT (port 0 picks one, printed on stderr).
    #[arg(long, value_name = "URI")]
    pub listen: String,
    /// Shared secret of the sessions (the hosts that store and fetch must have the same).
    #[arg(long, env = "TSUBAME_SECRET", hide_env_values = true)]
    pub secret: String,
}

pub fn memserver(a: &MemserverArgs) -> Result<i32> {
    let addr = parse_uri(&a.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {}", a.listen))?;
    let bound = listener.local_addr()?;
    eprintln!("tsubame: memserver listening on tcp:{bound}");
    Memserver::new(a.secret.as_bytes())
        .serve(listener)
        .context("accepting sessions")?;
    Ok(0)
}
