//! Tsubame's page server: the wire protocol, and both ends of an exchange of guest pages.
//!
//! A [`PageServer`] serves the pages of any [`PageStore`](tsubame_pages::PageStore) to one
//! receiver; a [`PageClient`] asks for pages and feeds whatever it receives into any
//! [`PageSink`](tsubame_pages::PageSink). Who listens and who dials does not matter: a
//! migration's source dials its destination and serves it; a destination dials a memserver and
//! is served by it; a source dials a memserver and sends it pages to hold.
//!
//! Every exchange is a *session* ([`session`]): two TCP connections, each authenticated by the
//! [`handshake`] before anything else moves, the *urgent* channel for control messages,
//! demand requests and their replies, and the *bulk* channel for the background stream, so that
//! a fault never waits behind the bulk stream. The bulk channel is flow-controlled ([`flow`]).
//! A cancellable migration (`Hello::checkpoint_ms` > 0) has a third connection, the
//! *checkpoint* channel, on which the destination sends its reverse checkpoints back.
//! Frames ([`frame`]) carry the [`message`]s.
//!
//! A migration (`Purpose::Migrate`; the source holds the memory, the destination listens):
//!
//! ```text
//!  source                                          destination (listening)
//!    |  ======== handshake on both connections ========|  version, secret, layout checked
//!  urgent:  <------ Ready ------------------------------ |  its VM is created, receivers run
//!  bulk:    ------- Pages / ZeroPages ... RoundDone{1} -> |  optional precopy rounds while the
//!           <------ RoundDone{1} (on urgent) ----------- |  VM still runs at the source; later
//!           ------- Discard{gfn, count} ... Pages ... --> |  rounds first drop the stale copies
//!  urgent:  ------- Owners{endpoint, runs} ------------> |  optional: a memserver that holds (or
//!           <------ Ready ------------------------------ |  will hold) pages: the destination
//!                                                         |  dials it
//!  urgent:  ------- Owners{"", runs} -------------------> |  switchover: pages that are the
//!           ------- VmState{json} ----------------------> |  source's again; the state; the
//!  bulk:    ------- Discard ... PrecopyDone ------------> |  stale pages are dropped, then the
//!                                                         |  VM resumes (without rounds,
//!                                                         |  PrecopyDone comes first, before
//!                                                         |  the source pauses)
//!           <------ Resumed ---------------------------- |  the source starts its push
//!           <------ PageRequest{gfn, count: 1} --------- |  a vCPU faulted
//!           ------- Pages{gfn, data} / ZeroPages ------> |  exactly one reply per request
//!           ------- Released{gfn, count} ---------------> |  (release mode: a page it holds)
//!  bulk:    ------- Pages / ZeroPages ... --------------> |
//!           ------- Owners{memserver, runs} -----------> |  a split: stripes stored at the
//!           ------- PushDone ---------------------------> |  memserver meanwhile, handed over
//!           <------ Installed{bytes} (bulk) ------------ |  flow control
//!  urgent:  <------ Complete --------------------------- |  every page is local: source exits
//! ```
//!
//! A cancellable migration adds, once the VM runs at the destination:
//!
//! ```text
//!  checkpoint: <-- CheckpointBegin{epoch, lease, state} |  every interval: the VM state, then
//!              <-- Pages ... CheckpointEnd{epoch, n} -- |  the pages written since the last
//!              --- CheckpointAck{epoch} --------------> |  committed: output released, lease
//!              --- Cancel ----------------------------> |  renewed; a cancel at the source
//!              <-- Fenced{epoch} ---------------------- |  the destination stopped for good
//!              --- Complete --------------------------> |  or: every page there, handed over
//! ```
//!
//! In release mode (`migrate ... release=on`), the source frees each page once the destination
//! has acknowledged installing it, and answers a request that crossed such a page's
//! acknowledgement with `Released` instead of the page (see [`server`]).
//!
//! Fetching from a memserver (`Purpose::Fetch`) is the same, the destination dialling, except
//! that the memserver pushes only once told `Resumed` (consolidation): until then the host
//! fetches its pages on demand; storing into one (`Purpose::Store`) is a bulk stream of pages the memserver
//! acknowledges as it stores them.
//! Recalling from one (`Purpose::Recall`) is fetching without the push: a host that pages its
//! VM's memory out to the memserver asks for each page back when its guest touches it.
//!
//! A switched migration (`migrate-switch`, see `tsubame_vmm::migration::switch`). During the
//! precopy rounds, to the old destination and then the new one:
//!
//! ```text
//!  source ── old destination:  Discard ... RoundDone, Forward{to} ──►  <── Ready
//!                              <── Forwarded{pages, pushed, done} (every 20 ms, until done)
//!  source ── new destination:  Forwarder{old} ──► (it dials the old one: Fetch)  <── Ready
//!                              Owners{old, runs} ──►  <── Ready    then the rounds go on
//! ```
//!
//! After the switchover, the source opens a `Purpose::Switch` session on the old destination's
//! migration listener and says `SwitchTo{to, source}`; the old destination migrates the VM on
//! to `to`, naming `source` (a `Forwarder`, then `Owners`) as the owner of the pages it still
//! lacks, and answers `Ready` once the VM runs there (or `Error`).

pub mod auth;
pub mod client;
pub mod flow;
pub mod frame;
pub mod handshake;
pub mod memserver;
pub mod message;
pub mod prepage;
pub mod server;
pub mod session;
pub mod spin;

pub use client::{ClientError, ClientEvents, ClientStats, PageClient};
pub use frame::ProtocolError;
pub use memserver::Memserver;
pub use message::{Channel, Hello, Message, Purpose, PROTOCOL_VERSION};
pub use prepage::{HotPages, Prepage};
pub use server::{
    BulkSender, PageServer, PushOptions, SendKind, ServeState, ServerError, ServerStats,
};
pub use session::{Acceptor, Session, SessionError};
