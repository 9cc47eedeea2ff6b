//! Migration between Tsubame processes over TCP: postcopy first, optionally hybrid (precopy
//! rounds first), optionally split (part of the memory handed to a memserver on the way).
//!
//! The roles:
//! - [`source`]: the VM's host. A worker thread ([`source::Outgoing`]) opens the session to the
//!   destination, runs the precopy rounds and the split, pauses the VM, sends its state, and
//!   from then on the source is a page server ([`tsubame_pageserver::PageServer`]) over the
//!   frozen guest memory ([`source::GuestMemoryStore`]) until the destination has every page.
//!   A [`CancelToken`] stops it at any point before the switchover; the VM keeps running here.
//! - [`destination`]: takes the VM. Its memory is empty under userfaultfd
//!   ([`crate::paging::DemandPaging`]); every page has an owner (the source, or a page server
//!   the source named), each owner has a page client
//!   ([`tsubame_pageserver::PageClient`]) feeding the fault engine, and a fault goes to its
//!   page's owner.
//! - [`checkpoint`]: a cancellable migration (`cancellable=on`). The destination sends reverse
//!   checkpoints back (dirty pages and state, every interval), holds the guest's output until
//!   they are committed, and runs on a lease ([`crate::fence`]); the source commits them into
//!   its copy of the memory and resumes the VM from the last one if the migration is called
//!   off at either end, or the destination dies, until the destination has every page.
//! - [`switch`]: redirecting a running migration to another destination (`migrate-switch`):
//!   before the switchover the old destination forwards the pages it holds and the source
//!   sends the rest; after it the old destination moves the VM on and the source serves the
//!   new one what the old one lacks. The new destination merges both senders by owner.
//!
//! ```text
//!   source host                                   destination host
//!   GuestMemory ─► GuestMemoryStore ─► PageServer ══ urgent + bulk ══► PageClient ─┐
//!        │  (split: stripes of memory, while the guest runs)                       ├─► OwnedSink ─► FaultEngine
//!        └─► PageServer ══ store ══► memserver (MemStore) ══ fetch ══► PageClient ─┘      ▲
//!                                                                 OwnerRouter ◄─ faults ─┘
//! ```
//!
//! The message sequence is in `tsubame_pageserver`'s docs. Fail closed throughout: anything
//! that fails before the state is sent leaves the VM running at the source; once the
//! destination runs it, a lost owner leaves faulting vCPUs waiting (never on a zero or stale
//! page) and the error is reported, and in a cancellable migration the source takes the VM
//! back.

pub mod checkpoint;
pub mod destination;
pub mod recover;
pub mod source;
pub mod switch;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
pub use tsubame_pageserver::{HotPages, Prepage};
use tsubame_pageserver::{ProtocolError, ServerError, SessionError};

pub use destination::{incoming, Incoming, IncomingOptions};
pub use source::Outgoing;

/// Errors of migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot connect to the {what} {addr}: {source}; is `{command}` listening there?")]
    Connect {
        what: &'static str,
        addr: String,
        command: &'static str,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("no shared secret: pass secret=... to migrate (or --secret / TSUBAME_SECRET to tsubame run) on both hosts")]
    NoSecret,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("serving pages failed: {0}")]
    Serve(#[from] ServerError),
    #[error("the VM state is unusable: {0}")]
    BadState(String),
    #[error("the destination did not create its VM within {secs} s; see its log")]
    NotReady { secs: u64 },
    #[error("the migration failed during {stage}: {reason}; the VM keeps running here, and may be migrated again")]
    Aborted { stage: String, reason: String },
    #[error("this VM is already migrating or migrated")]
    AlreadyMigrating,
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("too late to cancel: the VM runs at the destination, which has all of its memory (or the migration was not cancellable: migrate with cancellable=on to keep it so until it completes)")]
    TooLateToCancel,
    #[error("no migration is under way")]
    NotMigrating,
    #[error(
        "the migration source went away before the VM arrived: {0}; the VM keeps running there"
    )]
    SourceLost(String),
    #[error("cannot fetch pages from {endpoint}, which the source named as their owner: {reason}")]
    Owner { endpoint: String, reason: String },
    #[error("bad split '{0}': write split=tcp:HOST:PORT[,tcp:HOST:PORT...]:AMOUNT with AMOUNT a share between 0 and 1 or a size, e.g. split=tcp:10.0.0.3:5555:0.5 or split=tcp:10.0.0.3:5555,tcp:10.0.0.4:5555:512M")]
    BadSplit(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("this host was the old destination of a switched migration: it forwarded the {pages} pages it held to {to}, which runs the VM")]
    Forwarded { to: String, pages: u64 },
    #[error("forwarding this host's pages to the new destination {to} failed: {reason}; the source still has every page")]
    Forwarding { to: String, reason: String },
    #[error("cannot switch the migration to {to}: {reason}")]
    Switch { to: String, reason: String },
    #[error("the VM failed: {0}")]
    Vm(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Paging(#[from] crate::paging::PagingError),
    #[error("network I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Precopy rounds (and the split): the VM still runs here while its memory is copied.
    Precopy,
    /// State sent; the source serves pages until the destination has them all.
    Postcopy,
    Completed,
    Failed,
    /// A cancellable migration called off after its switchover (or whose destination died):
    /// the VM runs here again.
    Cancelled,
}

/// Part of the VM's memory handed to memservers on the way: the source stores it there while
/// the guest still runs, and the destination fetches it from there.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// The memservers, `tcp:HOST:PORT` each: the stripes are dealt to them in turn.
    pub uris: Vec<String>,
    /// How much of the memory is handed over, in 2 MiB stripes spread evenly over it.
    pub amount: SplitAmount,
}

/// How much memory a split hands over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitAmount {
    /// A share of the VM's memory, 0 to 1.
    Share(f64),
    /// About this many bytes (rounded to whole stripes, at most all of the memory).
    Bytes(u64),
}

impl Split {
    /// The share of a VM of `total` bytes handed over.
    #[allow(clippy::cast_precision_loss)]
    pub fn share(&self, total: u64) -> f64 {
        match self.amount {
            SplitAmount::Share(s) => s,
            SplitAmount::Bytes(b) => (b as f64 / total.max(1) as f64).min(1.0),
        }
    }
}

impl std::str::FromStr for Split {
    type Err = MigrationError;
    /// `tcp:HOST:PORT[,tcp:HOST:PORT...]:SHARE_OR_SIZE` (`0.5`, or `512M`).
    fn from_str(s: &str) -> Result<Self, MigrationError> {
        let bad = || MigrationError::BadSplit(s.into());
        let (uris, amount) = s.rsplit_once(':').ok_or_else(bad)?;
        let amount = match amount.parse::<f64>() {
            Ok(share) if (0.0..=1.0).contains(&share) => SplitAmount::Share(share),
            Ok(_) => return Err(bad()),
            Err(_) => SplitAmount::Bytes(crate::guest::parse_size(amount).map_err(|_| bad())?),
        };
        let uris: Vec<String> = uris.split(',').map(str::to_string).collect();
        if uris
            .iter()
            .any(|u| tsubame_pageserver::session::parse_uri(u).is_err())
        {
            return Err(bad());
        }
        Ok(Self { uris, amount })
    }
}

/// Options of an outgoing migration.
#[derive(Clone, Debug, Default)]
pub struct MigrateOptions {
    /// Cap on the background push and the precopy rounds, in bytes per second (demand replies
    /// are never held back).
    pub max_bandwidth: Option<u64>,
    pub prepage: Prepage,
    /// `Hot` without precopy rounds: how long to record the guest's writes before switchover
    /// (default 100 ms).
    pub profile: Option<Duration>,
    /// Precopy rounds before switchover (hybrid migration): the first copies all memory while
    /// the guest runs, each later one the pages written since the previous round. 0: pure
    /// postcopy.
    pub precopy_rounds: u32,
    /// Hand part of the memory to a memserver on the way.
    pub split: Option<Split>,
    /// Cancellable postcopy: reverse checkpoints this often (ms), `None`: not cancellable
    /// (see [`checkpoint`]).
    pub checkpoint_ms: Option<u32>,
    /// Eviction: from the switchover on, free each page of the source's memory once the
    /// destination holds it, so the source host gets its memory back as the migration goes
    /// (precopy rounds free nothing: the guest still runs here then). Not with
    /// `checkpoint_ms`: resuming the VM here needs that memory.
    pub release: bool,
    /// After the switchover, how long the destination may take to dial back once the session
    /// broke (see [`recover`]); `None`: [`recover::DEFAULT_RECOVER_MS`], `Some(0)`: no
    /// recovery (a broken session fails the migration).
    pub recover_ms: Option<u32>,
}

impl MigrateOptions {
    /// Refuses combinations that cannot work, saying why.
    pub fn check(&self) -> Result<(), MigrationError> {
        if self.split.is_some() && self.precopy_rounds > 0 {
            return Err(MigrationError::Unsupported(
                "split and precopy rounds cannot be combined yet: use one or the other".into(),
            ));
        }
        if self.split.is_some() && self.checkpoint_ms.is_some() {
            return Err(MigrationError::Unsupported(
                "split and cancellable=on cannot be combined yet: a cancelled split would leave the VM's pages at the memservers. Use one or the other".into(),
            ));
        }
        if self.release && self.checkpoint_ms.is_some() {
            return Err(MigrationError::Unsupported(
                "release=on frees the source's copy of each page as soon as the destination has it, and cancellable=on needs that copy to resume the VM here: choose one".into(),
            ));
        }
        if let Some(ms) = self.checkpoint_ms {
            if ms == 0 || ms > tsubame_pageserver::message::MAX_CHECKPOINT_MS {
                return Err(MigrationError::Unsupported(format!(
                    "checkpoint_ms={ms}: give an interval between 1 and {} ms",
                    tsubame_pageserver::message::MAX_CHECKPOINT_MS
                )));
            }
        }
        Ok(())
    }
}

/// `query-migrate` on the source.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationStatus {
    pub role: &'static str,
    pub phase: Phase,
    pub error: Option<String>,
    pub destination: String,
    /// Precopy rounds asked for, and the one running or last run (0: none yet).
    pub precopy_rounds: u32,
    pub precopy_round: u32,
    /// Pages sent by the precopy rounds (a page written again is sent again).
    pub pages_precopy: u64,
    /// Pages the guest wrote after the last precopy round: dropped at the destination (just
    /// before the switchover, and at it) and served postcopy.
    pub pages_stale: u64,
    /// Migration start -> vCPUs paused (precopy, profiling, split).
    pub precopy_ms: Option<f64>,
    /// Pause of the vCPUs -> state, last discards and `PrecopyDone` sent (the source's share of
    /// the downtime).
    pub downtime_us: u64,
    /// When the vCPUs paused, µs since the Unix epoch (0: not yet). With the destination's
    /// `resumed_unix_us` on the same host, the whole downtime, network included.
    pub paused_unix_us: u64,
    pub state_bytes: u64,
    pub pages_demand: u64,
    pub pages_pushed: u64,
    /// Demand replies for pages the push had already queued (sent twice).
    pub pages_duplicate: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    /// Page data sent by the background push (zero pages go as markers: not counted).
    pub bytes_pushed: u64,
    /// `release=on`: pages freed here, the destination holding them (every page, once
    /// completed).
    pub pages_released: u64,
    /// `release=on`: demand requests for pages already released (a request that crossed the
    /// acknowledgement of the pages asked for), answered `Released`.
    pub pages_asked_after_release: u64,
    pub total_pages: u64,
    pub prepage: Prepage,
    /// `hot`: pages the profile found written (pushed first).
    pub hot_pages: u64,

    /// Split: the memservers, the pages stored at each, and how the stores went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitStatus>,
    /// A VM that ran split: its pages left at memservers (empty: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldStatus>,
    /// Switchover -> the background push sent its last page.
    pub push_ms: Option<f64>,
    /// Switchover -> `Complete` from the destination.
    pub total_ms: Option<f64>,
    /// A cancellable migration's reverse checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<checkpoint::CheckpointStatus>,
    /// A migration switched to another destination (`migrate-switch`): both senders.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch: Option<switch::SwitchStatus>,
    /// Outages of the session after the switchover, and its resumes (see [`recover`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<recover::RecoveryStatus>,
}

/// A split VM migrating on: what stays at one of its memservers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeldStatus {
    pub memserver: String,
    /// Pages the new destination fetches from it.
    pub pages_kept: u64,
    /// Pages it held that the guest faulted in here before the pause: sent from here.
    pub pages_taken_back: u64,
    /// Its copies of pages fetched here (maybe written since), forgotten once the VM left.
    pub stale_copies_dropped: u64,
}

/// The split part of `query-migrate`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitStatus {
    /// The memservers, and the pages stored at each so far.
    pub memservers: Vec<String>,
    pub pages_stored_each: Vec<u64>,
    pub pages_stored: u64,
    /// Pages dealt to the memservers.
    pub pages_planned: u64,
    /// Switchover -> every store ended (and the pages were handed over).
    pub store_ms: Option<f64>,
    /// Memservers that did not store their pages, and why (their pages went to the
    /// destination instead).
    pub failed: Vec<String>,
}

/// Stops a migration that has not switched over: the worker checks it between steps, and the
/// session's connections are shut down so that a blocked read or write returns at once.
#[derive(Debug, Default)]
pub struct CancelToken {
    cancelled: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

impl CancelToken {
    /// Cancels: sets the flag and shuts the registered connections down.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        for s in self.sockets.lock().expect("cancel lock").iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Fails with [`MigrationError::Cancelled`] once cancelled.
    pub fn check(&self) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Shuts `s` (a clone of it) down on cancel, and at once if already cancelled.
    pub fn watch(&self, s: &TcpStream) -> Result<(), MigrationError> {
        let clone = s.try_clone()?;
        if self.is_cancelled() {
            let _ = clone.shutdown(std::net::Shutdown::Both);
        }
        self.sockets.lock().expect("cancel lock").push(clone);
        self.check()
    }

    /// Forgets the watched connections (after the switchover they belong to the page server).
    pub fn release(&self) {
        self.sockets.lock().expect("cancel lock").clear();
    }
}

impl MigrationError {
    /// A session that could not be opened to the `what` (a destination, a memserver), which
    /// `command` runs: a refused connection says so.
    pub(crate) fn opening(what: &'static str, command: &'static str, e: SessionError) -> Self {
        match e {
            SessionError::Connect { addr, source } => Self::Connect {
                what,
                addr,
                command,
                source,
            },
            e => Self::Session(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_parse_with_their_share() {
        let s: Split = "tcp:127.0.0.1:5555:0.5".parse().unwrap();
        assert_eq!(
            s,
            Split {
                uris: vec!["tcp:127.0.0.1:5555".into()],
                amount: SplitAmount::Share(0.5)
            }
        );
        let s: Split = "tcp:127.0.0.1:5555,tcp:127.0.0.1:5556:16M".parse().unwrap();
        assert_eq!(s.uris.len(), 2);
        assert_eq!(s.amount, SplitAmount::Bytes(16 << 20));
        assert!((s.share(64 << 20) - 0.25).abs() < 1e-9);
        for bad in [
            "tcp:127.0.0.1:5555",
            "tcp:127.0.0.1:5555:1.5",
            "127.0.0.1:5555:0.5",
            "tcp:127.0.0.1:5555:half",
            "tcp:127.0.0.1:5555,nothing:0.5",
        ] {
            let e = bad.parse::<Split>().unwrap_err().to_string();
            assert!(e.contains("split=tcp:HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_cancel_shuts_watched_connections_down() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let token = CancelToken::default();
        token.watch(&c).unwrap();
        assert!(token.check().is_ok());
        token.cancel();
        assert!(matches!(token.check(), Err(MigrationError::Cancelled)));
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut s, &mut b).unwrap(), 0, "closed");
        assert!(
            token.watch(&s).is_err(),
            "watching after a cancel fails at once"
        );
    }
}
