//! Sessions: the two authenticated connections (urgent and bulk) that every exchange of pages
//! uses, whoever listens. [`open`] dials both; an [`Acceptor`] takes connections on a listener,
//! authenticates each and pairs them by session id.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::auth::random_u64;
use crate::frame::ProtocolError;
use crate::handshake::{initiate, respond};
use crate::message::{Channel, Hello};

/// Longest a connect or a handshake may take before either side gives up on the connection (a
/// peer that connects and says nothing must not hold up the others; a dial into a silent
/// network must fail, not hang).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most sessions an acceptor keeps waiting for their second connection.
const HALF_SESSIONS_MAX: usize = 64;

/// How long a serving end waits for a peer that went silent before it gives the connection
/// up (see [`notice_silence`]).
pub const SILENT_PEER: Duration = Duration::from_secs(4);

/// Makes the kernel notice a peer that went silent on `s` within about [`SILENT_PEER`]: a
/// network that drops everything tells TCP nothing, and a server would otherwise wait on its
/// retransmissions (about 15 minutes) or, idle, for ever. Keepalive probes go out after 1 s
/// of quiet, one a second, and 3 unanswered end the connection; sent data unacknowledged for
/// `SILENT_PEER` ends it too (`TCP_USER_TIMEOUT`; a peer that merely stops reading still
/// answers the window probes, and is not silent). The reader or writer then fails with
/// `ETIMEDOUT`, as with a reset. These are the server end's heartbeats: the receiver probes its
/// link itself (the VMM's router). A peer behind a user-space relay (`linkem`) is answered by
/// the relay's kernel: only a silence of the network itself shows here.
pub fn notice_silence(s: &TcpStream) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let millis = u32::try_from(SILENT_PEER.as_millis()).unwrap_or(u32::MAX);
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &1)?;
    setsockopt(s, sockopt::TcpKeepInterval, &1)?;
    setsockopt(s, sockopt::TcpKeepCount, &3)?;
    setsockopt(s, sockopt::TcpUserTimeout, &millis)?;
    Ok(())
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad endpoint address '{0}': write tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444")]
    Uri(String),
    #[error("cannot connect to {addr}: {source}; is a Tsubame endpoint listening there?")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} refused the session: {source}")]
    Handshake { addr: String, source: ProtocolError },
}

/// Parses `tcp:HOST:PORT` into a socket address.
pub fn parse_uri(uri: &str) -> Result<SocketAddr, SessionError> {
    let bad = || SessionError::Uri(uri.into());
    let rest = uri.strip_prefix("tcp:").ok_or_else(bad)?;
    rest.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// Both connections of a session, authenticated.
#[derive(Debug)]
pub struct Session {
    /// What the initiator said (the urgent connection's Hello).
    pub hello: Hello,
    pub urgent: TcpStream,
    pub bulk: TcpStream,
    /// The checkpoint channel, when the Hello announced one.
    pub checkpoint: Option<TcpStream>,
    /// The shorter of the two handshakes' round trips (on the responder, an upper bound).
    pub rtt: Duration,
}

/// Opens a session with the endpoint at `uri`: connects and authenticates the urgent, then the
/// bulk connection, both saying `hello` (its channel and session are filled in here).
pub fn open(uri: &str, secret: &[u8], hello: &Hello) -> Result<Session, SessionError> {
    open_dialling(uri, secret, hello, HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT)
}

/// [`open`], each connection's connect bounded by `connect` and its handshake by
/// `handshake`, so that a peer behind a silent network fails the dial rather than hang in the
/// kernel's SYN retries (1, 3, 7 s apart). A redial loop waiting for a network to come back
/// wants the first short (a fresh SYN soon after the last one was lost) and the second long
/// enough for a busy peer.
pub fn open_dialling(
    uri: &str,
    secret: &[u8],
    hello: &Hello,
    connect: Duration,
    handshake: Duration,
) -> Result<Session, SessionError> {
    let addr = parse_uri(uri)?;
    let session = random_u64().map_err(|source| SessionError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    let connect = |channel| -> Result<(TcpStream, Duration), SessionError> {
        // Bounded, so that a peer behind a silent network fails the dial (and a redial loop
        // tries again) rather than hang in the kernel's connect retries or in the handshake.
        let mut s =
            TcpStream::connect_timeout(&addr, connect).map_err(|source| SessionError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let hello = Hello {
            channel,
            session,
            ..hello.clone()
        };
        let rtt = s
            .set_nodelay(true)
            .and_then(|()| s.set_read_timeout(Some(handshake)))
            .map_err(ProtocolError::from)
            .and_then(|()| initiate(&mut s, secret, &hello))
            .and_then(|rtt| Ok(s.set_read_timeout(None).map(|()| rtt)?))
            .map_err(|source| SessionError::Handshake {
                addr: addr.to_string(),
                source,
            })?;
        Ok((s, rtt))
    };
    let (urgent, rtt_urgent) = connect(Channel::Urgent)?;
    let (bulk, rtt_bulk) = connect(Channel::Bulk)?;
    let checkpoint = if hello.checkpoint_ms > 0 {
        Some(connect(Channel::Checkpoint)?.0)
    } else {
        None
    };
    Ok(Session {
        hello: Hello {
            channel: Channel::Urgent,
            session,
            ..hello.clone()
        },
        urgent,
        bulk,
        checkpoint,
        rtt: rtt_urgent.min(rtt_bulk),
    })
}

/// The connections of a session that are in so far.
#[derive(Debug)]
struct Partial {
    hello: Hello,
    urgent: Option<TcpStream>,
    bulk: Option<TcpStream>,
    checkpoint: Option<TcpStream>,
    rtt: Duration,
}

impl Partial {
    /// Adds a connection; fails if its channel is in already.
    fn add(&mut self, hello: &Hello, s: TcpStream, rtt: Duration) -> Result<(), ()> {
        let slot = match hello.channel {
            Channel::Urgent => &mut self.urgent,
            Channel::Bulk => &mut self.bulk,
            Channel::Checkpoint => &mut self.checkpoint,
        };
        if slot.is_some() {
            return Err(());
        }
        *slot = Some(s);
        self.rtt = self.rtt.min(rtt);
        Ok(())
    }

    /// The session, if every connection it announced is in.
    fn complete(&mut self) -> Option<Session> {
        let need_checkpoint = self.hello.checkpoint_ms > 0;
        if self.urgent.is_none()
            || self.bulk.is_none()
            || (need_checkpoint && self.checkpoint.is_none())
        {
            return None;
        }
        Some(Session {
            hello: Hello {
                channel: Channel::Urgent,
                ..self.hello.clone()
            },
            urgent: self.urgent.take()?,
            bulk: self.bulk.take()?,
            checkpoint: self.checkpoint.take(),
            rtt: self.rtt,
        })
    }
}

/// Takes sessions on a listener: each connection is authenticated as it comes (a refused one
/// is logged and dropped, and the acceptor goes on), and a session is complete once all its
/// connections are in (urgent and bulk, and checkpoint if its Hello says so).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    secret: Arc<Vec<u8>>,
    /// What the sessions are for, in log lines ("migration", "memserver").
    what: Arc<str>,
    /// Sessions with some of their connections in, by session id.
    half: HashMap<u64, Partial>,
    /// Handshakes run on threads of their own and end up here, with a wake-up on `done_fd`.
    done_tx: crossbeam::channel::Sender<Handshaken>,
    done: crossbeam::channel::Receiver<Handshaken>,
    done_fd: Arc<EventFd>,
}

/// What decides whether a Hello is accepted (run on the handshake threads).
type Check = Arc<dyn Fn(&Hello) -> Result<(), ProtocolError> + Send + Sync>;

/// A connection whose handshake ended: authenticated (its Hello and round trip), or not.
type Handshaken = (
    TcpStream,
    SocketAddr,
    Result<(Hello, Duration), ProtocolError>,
);

impl Acceptor {
    /// Accepts `what` sessions ("migration", say: it names them in log lines) on `listener`,
    /// authenticating with `secret`.
    pub fn new(listener: TcpListener, secret: &[u8], what: &str) -> Self {
        let (done_tx, done) = crossbeam::channel::unbounded();
        Self {
            listener,
            secret: Arc::new(secret.to_vec()),
            what: what.into(),
            half: HashMap::new(),
            done_tx,
            done,
            done_fd: Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .expect("an eventfd"),
            ),
        }
    }

    /// The address listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next complete session whose Hello `check` accepts (it runs for each connection,
    /// before the connection is accepted). Each connection's handshake runs on a thread of its
    /// own, so that a peer that connects and then says nothing (or too little) holds up no
    /// other; it is dropped after [`HANDSHAKE_TIMEOUT`]. Fails only if the listener does.
    pub fn next(
        &mut self,
        check: impl Fn(&Hello) -> Result<(), ProtocolError> + Send + Sync + 'static,
    ) -> std::io::Result<Session> {
        self.next_until(None, check)?
            .ok_or_else(|| std::io::ErrorKind::TimedOut.into())
    }

    /// [`Self::next`], giving up at `deadline` (`Ok(None)`).
    pub fn next_until(
        &mut self,
        deadline: Option<std::time::Instant>,
        check: impl Fn(&Hello) -> Result<(), ProtocolError> + Send + Sync + 'static,
    ) -> std::io::Result<Option<Session>> {
        let check: Check = Arc::new(check);
        self.listener.set_nonblocking(true)?;
        loop {
            while let Ok(done) = self.done.try_recv() {
                if let Some(session) = self.assemble(done) {
                    return Ok(Some(session));
                }
            }
            match self.listener.accept() {
                Ok((s, peer)) => self.handshake(s, peer, check.clone())?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                        PollFd::new(self.done_fd.as_fd(), PollFlags::POLLIN),
                    ];
                    let timeout = match deadline {
                        None => PollTimeout::NONE,
                        Some(d) => {
                            let left = d.saturating_duration_since(std::time::Instant::now());
                            if left.is_zero() {
                                return Ok(None);
                            }
                            PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32)
                                .unwrap_or(PollTimeout::MAX)
                        }
                    };
                    match poll(&mut fds, timeout) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let _ = self.done_fd.read();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs the handshake of a new connection on a thread of its own.
    fn handshake(&self, mut s: TcpStream, peer: SocketAddr, check: Check) -> std::io::Result<()> {
        let (secret, tx, fd) = (
            self.secret.clone(),
            self.done_tx.clone(),
            self.done_fd.clone(),
        );
        std::thread::Builder::new()
            .name("handshake".into())
            .spawn(move || {
                let result = (|| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                    let h = respond(&mut s, &secret, |h| check(h))?;
                    s.set_read_timeout(None)?;
                    Ok::<_, ProtocolError>(h)
                })();
                if tx.send((s, peer, result)).is_ok() {
                    let _ = fd.write(1);
                }
            })?;
        Ok(())
    }

    /// Takes a connection whose handshake ended into its session; returns the session once
    /// all its connections are in.
    fn assemble(&mut self, (s, peer, result): Handshaken) -> Option<Session> {
        let (hello, rtt) = match result {
            Ok(h) => h,
            Err(e) => {
                let e = match e {
                    ProtocolError::Io(io)
                        if matches!(
                            io.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        format!(
                            "it sent no complete handshake within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        )
                    }
                    e => e.to_string(),
                };
                log::warn!("refused a {} connection from {peer}: {e}", self.what);
                eprintln!(
                    "tsubame: refused a {} connection from {peer}: {e}",
                    self.what
                );
                return None;
            }
        };
        if !self.half.contains_key(&hello.session) && self.half.len() >= HALF_SESSIONS_MAX {
            // Peers that opened some connections and never the others: forget them.
            self.half.clear();
        }
        let partial = self.half.entry(hello.session).or_insert_with(|| Partial {
            hello: hello.clone(),
            urgent: None,
            bulk: None,
            checkpoint: None,
            rtt,
        });
        if partial.hello.checkpoint_ms != hello.checkpoint_ms
            || partial.add(&hello, s, rtt).is_err()
        {
            log::warn!(
                "session {:#x} from {peer} opened one channel twice, or announced different channels",
                hello.session
            );
            return None;
        }
        let session = partial.complete()?;
        self.half.remove(&hello.session);
        Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Purpose;
    use tsubame_pages::MemoryLayout;

    fn hello(vm: u64) -> Hello {
        Hello {
            purpose: Purpose::Fetch,
            channel: Channel::Urgent,
            session: 0,
            vm,
            layout: MemoryLayout::for_size(64 << 20).unwrap(),
            vcpus: 1,
            checkpoint_ms: 0,
        }
    }

    #[test]
    fn sessions_pair_up_and_refused_ones_do_not_stop_the_acceptor() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", l.local_addr().unwrap());
        let mut acceptor = Acceptor::new(l, b"secret", "test");
        let server = std::thread::spawn(move || {
            acceptor
                .next(|h| {
                    if h.vm == 13 {
                        Err(ProtocolError::Refused("unlucky VM".into()))
                    } else {
                        Ok(())
                    }
                })
                .unwrap()
        });
        let e = open(&uri, b"wrong", &hello(1)).unwrap_err().to_string();
        assert!(e.contains("shared secret"), "{e}");
        let e = open(&uri, b"secret", &hello(13)).unwrap_err().to_string();
        assert!(e.contains("unlucky VM"), "{e}");
        let client = open(&uri, b"secret", &hello(2)).unwrap();
        let accepted = server.join().unwrap();
        assert_eq!(accepted.hello.vm, 2);
        assert_eq!(accepted.hello.session, client.hello.session);
        assert_eq!(accepted.hello.channel, Channel::Urgent);
        assert_eq!(
            accepted.urgent.peer_addr().unwrap(),
            client.urgent.local_addr().unwrap()
        );
        assert_eq!(
            accepted.bulk.peer_addr().unwrap(),
            client.bulk.local_addr().unwrap()
        );
    }

    #[test]
    fn a_session_with_checkpoints_waits_for_its_third_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", l.local_addr().unwrap());
        let mut acceptor = Acceptor::new(l, b"secret", "test");
        let server = std::thread::spawn(move || acceptor.next(|_| Ok(())).unwrap());
        let hello = Hello {
            checkpoint_ms: 100,
            ..hello(5)
        };
        let client = open(&uri, b"secret", &hello).unwrap();
        let accepted = server.join().unwrap();
        assert_eq!(accepted.hello.checkpoint_ms, 100);
        let (c, a) = (client.checkpoint.unwrap(), accepted.checkpoint.unwrap());
        assert_eq!(a.peer_addr().unwrap(), c.local_addr().unwrap());
    }

    #[test]
    fn addresses_must_be_tcp_uris() {
        assert!(parse_uri("tcp:127.0.0.1:4444").is_ok());
        for bad in ["127.0.0.1:4444", "tcp:", "udp:1.2.3.4:5", "tcp:nohost"] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
