//! The handshake every connection starts with, whoever listens: the side that opens the
//! connection (the *initiator*) introduces itself with a [`Hello`] and proves it knows the
//! secret; the side that accepts it (the *responder*) checks the version, the proof and what
//! the Hello asks for, and proves itself back. Nothing else moves before both proofs are
//! checked.
//!
//! ```text
//!  initiator                                     responder
//!     |  <------ Challenge{version, nonce_r} ---------|
//!     |  ------- Hello{version, nonce_i, mac_i, ...} ->|  checks version, mac_i, then `check`
//!     |  <------ Accept{mac_r} -----------------------|  (or Error{why}, then close)
//!     |  checks mac_r                                  |
//! ```

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::auth::{initiator_mac, mac_eq, nonce, responder_mac};
use crate::frame::ProtocolError;
use crate::message::{Hello, Message, PROTOCOL_VERSION};

/// The initiator's side, on a fresh connection: returns the round trip it measured (`Hello`
/// sent -> `Accept` read), a first estimate of the link's delay.
pub fn initiate<S: Read + Write>(
    s: &mut S,
    secret: &[u8],
    hello: &Hello,
) -> Result<Duration, ProtocolError> {
    let (version, nonce_r) = match Message::read_from(s)? {
        Message::Challenge { version, nonce } => (version, nonce),
        m => return Err(ProtocolError::unexpected("Challenge", m)),
    };
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let nonce_i = nonce()?;
    Message::Hello {
        version: PROTOCOL_VERSION,
        nonce: nonce_i,
        mac: initiator_mac(secret, &nonce_r, PROTOCOL_VERSION, &nonce_i, hello),
        hello: hello.clone(),
    }
    .write_to(s)?;
    let sent = Instant::now();
    match Message::read_from(s)? {
        Message::Accept { mac } if mac_eq(&mac, &responder_mac(secret, &nonce_i, &nonce_r)) => {
            Ok(sent.elapsed())
        }
        Message::Accept { .. } => Err(ProtocolError::Auth),
        m => Err(ProtocolError::unexpected("Accept", m)),
    }
}

/// The responder's side: challenges, reads the Hello, checks the version and the proof, then
/// asks `check` whether it can serve what the Hello asks for (a layout it can hold, a VM it
/// knows). A refusal is sent to the initiator as an `Error` saying why, then returned. Returns
/// the Hello and the round trip it measured (`Challenge` sent -> `Hello` read, which includes
/// the initiator's work in between: an upper bound).
pub fn respond<S: Read + Write>(
    s: &mut S,
    secret: &[u8],
    check: impl FnOnce(&Hello) -> Result<(), ProtocolError>,
) -> Result<(Hello, Duration), ProtocolError> {
    let nonce_r = nonce()?;
    Message::Challenge {
        version: PROTOCOL_VERSION,
        nonce: nonce_r,
    }
    .write_to(s)?;
    let sent = Instant::now();
    let refuse = |s: &mut S, e: ProtocolError| {
        let _ = Message::Error {
            message: e.to_string(),
        }
        .write_to(s);
        Err(e)
    };
    let got = Message::read_from(s)?;
    let rtt = sent.elapsed();
    let (version, nonce_i, mac, hello) = match got {
        Message::Hello {
            version,
            nonce,
            mac,
            hello,
        } => (version, nonce, mac, hello),
        m => {
            let got = m.name();
            return refuse(
                s,
                ProtocolError::Unexpected {
                    expected: "Hello",
                    got,
                },
            );
        }
    };
    if version != PROTOCOL_VERSION {
        return refuse(
            s,
            ProtocolError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            },
        );
    }
    if !mac_eq(
        &mac,
        &initiator_mac(secret, &nonce_r, version, &nonce_i, &hello),
    ) {
        return refuse(s, ProtocolError::Auth);
    }
    if let Err(e) = check(&hello) {
        return refuse(s, e);
    }
    Message::Accept {
        mac: responder_mac(secret, &nonce_i, &nonce_r),
    }
    .write_to(s)?;
    Ok((hello, rtt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Channel, Purpose};
    use std::net::{TcpListener, TcpStream};
    use tsubame_pages::MemoryLayout;

    fn hello() -> Hello {
        Hello {
            purpose: Purpose::Store,
            channel: Channel::Bulk,
            session: 1,
            vm: 77,
            layout: MemoryLayout::for_size(64 << 20).unwrap(),
            vcpus: 1,
            checkpoint_ms: 0,
        }
    }

    /// Runs both sides over loopback; returns (initiator's result, responder's result).
    fn run(
        secret_i: &'static [u8],
        secret_r: &'static [u8],
        check: impl FnOnce(&Hello) -> Result<(), ProtocolError> + Send + 'static,
    ) -> (
        Result<Duration, ProtocolError>,
        Result<(Hello, Duration), ProtocolError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let r = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            respond(&mut s, secret_r, check)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let i = initiate(&mut s, secret_i, &hello());
        (i, r.join().unwrap())
    }

    #[test]
    fn both_sides_agree_on_the_hello() {
        let (i, r) = run(b"s", b"s", |_| Ok(()));
        assert!(i.is_ok());
        assert_eq!(r.unwrap().0, hello());
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (i, r) = run(b"s", b"other", |_| Ok(()));
        assert!(matches!(r, Err(ProtocolError::Auth)));
        let e = i.unwrap_err().to_string();
        assert!(e.contains("shared secret"), "{e}");
    }

    #[test]
    fn a_refusal_reaches_the_initiator_with_its_reason() {
        let (i, r) = run(b"s", b"s", |h| {
            Err(ProtocolError::Refused(format!("no VM {:#x} here", h.vm)))
        });
        assert!(r.is_err());
        let e = i.unwrap_err().to_string();
        assert!(e.contains("no VM 0x4d here"), "{e}");
    }
}
