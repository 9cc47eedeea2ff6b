//! Frames: a 12-byte little-endian header and a payload.
//!
//! ```text
//! u16 magic "TS" (0x5354)   u16 kind   u16 flags (0)   u16 reserved (0)   u32 payload length
//! ```
//!
//! Kind 0 is invalid; unknown kinds, wrong magic, non-zero flags, and lengths beyond the bound of
//! their kind are rejected before the payload is read. A `Pages` frame's payload (a gfn, then
//! whole pages) can be read straight into a buffer of the reader's choice: [`read_head`] stops
//! after the gfn and says how many pages follow.

use std::io::{Read, Write};

use tsubame_pages::{Gfn, MemoryLayout, PAGE_BYTES};

use crate::message::{self, Message};

const MAGIC: u16 = 0x5354; // "TS"
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// Payload tails up to this size are copied into the frame buffer (four pages).
const SMALL_TAIL: usize = 16 << 10;

/// Why a frame was rejected, or a conversation could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a Tsubame frame (magic {0:#06x}); is the peer a Tsubame endpoint?")]
    BadMagic(u16),
    #[error("unknown message kind {0}; the peer speaks another protocol version")]
    UnknownKind(u16),
    #[error("frame flags {0:#x} are not supported")]
    BadFlags(u16),
    #[error("{kind} frame of {len} bytes exceeds its bound of {max}")]
    TooLong {
        kind: &'static str,
        len: u32,
        max: u32,
    },
    #[error("malformed {kind} frame: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}; run the same Tsubame version on both hosts")]
    Version { ours: u32, theirs: u32 },
    #[error("authentication failed: the peer does not know the shared secret (check --secret / TSUBAME_SECRET on both hosts)")]
    Auth,
    #[error("memory layout mismatch: the peer has {theirs}, this side {ours}; start both with the same --mem")]
    Layout {
        theirs: MemoryLayout,
        ours: MemoryLayout,
    },
    #[error("refused: {0}")]
    Refused(String),
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the peer reported an error: {0}")]
    Peer(String),
}

impl ProtocolError {
    /// What receiving `got` where `expected` was due means: the peer's own `Error` message, or
    /// a protocol violation.
    pub fn unexpected(expected: &'static str, got: Message) -> Self {
        match got {
            Message::Error { message } => Self::Peer(message),
            m => Self::Unexpected {
                expected,
                got: m.name(),
            },
        }
    }

    /// Whether the connection ended (closed, reset, or broken) rather than carried something
    /// wrong.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::NotConnected
            ),
            _ => false,
        }
    }
}

/// A frame whose header (and, for `Pages`, gfn) has been read.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A `Pages` frame: `pages` whole pages from `gfn` follow; read them with [`read_payload`].
    Pages { gfn: Gfn, pages: u64 },
    /// Any other message, read whole.
    Message(Message),
}

fn closed(e: std::io::Error) -> ProtocolError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => e.into(),
    }
}

/// Reads one frame: all of it, except a `Pages` payload's page data, which the caller reads
/// next with [`read_payload`] (into memory it may install from without another copy).
pub fn read_head(r: &mut impl Read) -> Result<Head, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(closed)?;
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let (magic, kind, flags) = (u16_at(0), u16_at(2), u16_at(4) | u16_at(6));
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let max = message::max_payload(kind).ok_or(ProtocolError::UnknownKind(kind))?;
    if flags != 0 {
        return Err(ProtocolError::BadFlags(flags));
    }
    let name = message::kind_name(kind);
    if len > max {
        return Err(ProtocolError::TooLong {
            kind: name,
            len,
            max,
        });
    }
    if kind == message::PAGES {
        let data = (len as usize)
            .checked_sub(8)
            .ok_or(ProtocolError::Malformed {
                kind: name,
                why: "8 more bytes expected".into(),
            })?;
        if data == 0 || data % PAGE_BYTES != 0 {
            return Err(ProtocolError::Malformed {
                kind: name,
                why: "page data is not a whole number of pages".into(),
            });
        }
        let mut gfn = [0u8; 8];
        r.read_exact(&mut gfn).map_err(closed)?;
        return Ok(Head::Pages {
            gfn: Gfn(u64::from_le_bytes(gfn)),
            pages: (data / PAGE_BYTES) as u64,
        });
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).map_err(closed)?;
    message::decode(kind, name, p).map(Head::Message)
}

/// Reads the page data announced by a [`Head::Pages`] into `buf` (exactly its length).
pub fn read_payload(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    r.read_exact(buf)
}

/// Writes a `Pages` frame for `data` (whole pages from `gfn`) without copying it into a
/// message first: a page server sends straight from its store.
pub fn write_pages(w: &mut impl Write, gfn: Gfn, data: &[u8]) -> Result<(), ProtocolError> {
    let pages = data.len() / PAGE_BYTES;
    if data.is_empty()
        || data.len() % PAGE_BYTES != 0
        || pages > message::MAX_PAGES_PER_FRAME as usize
    {
        return Err(ProtocolError::Malformed {
            kind: "Pages",
            why: format!(
                "{} bytes is not 1 to {} whole pages",
                data.len(),
                message::MAX_PAGES_PER_FRAME
            ),
        });
    }
    write_frame(w, message::PAGES, &gfn.0.to_le_bytes(), data)
}

/// Writes one frame of `kind` whose payload is `head` then `tail`.
pub(crate) fn write_frame(
    w: &mut impl Write,
    kind: u16,
    head: &[u8],
    tail: &[u8],
) -> Result<(), ProtocolError> {
    let name = message::kind_name(kind);
    let len = u32::try_from(head.len() + tail.len()).map_err(|_| ProtocolError::TooLong {
        kind: name,
        len: u32::MAX,
        max: message::max_payload(kind).unwrap_or(0),
    })?;
    if let Some(max) = message::max_payload(kind).filter(|max| len > *max) {
        return Err(ProtocolError::TooLong {
            kind: name,
            len,
            max,
        });
    }
    // One write for the header and small payloads: on a TCP_NODELAY connection every write
    // can leave as its own segment, and demand requests and replies are latency-critical.
    let mut frame = Vec::with_capacity(HEADER_LEN + head.len() + tail.len().min(SMALL_TAIL));
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&kind.to_le_bytes());
    frame.extend_from_slice(&[0u8; 4]); // flags, reserved
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(head);
    if tail.len() <= SMALL_TAIL {
        frame.extend_from_slice(tail);
        w.write_all(&frame)?;
    } else {
        // Header and pages in one vectored write: a buffered writer passes a large one
        // straight to the socket (one `writev`, no copy into its buffer, no tiny segment).
        let mut parts = [std::io::IoSlice::new(&frame), std::io::IoSlice::new(tail)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            match w.write_vectored(parts) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// A cursor over a payload that turns running out of bytes into a `Malformed` error.
pub(crate) struct Cursor<'a> {
    pub p: &'a [u8],
    pub kind: &'static str,
}

impl Cursor<'_> {
    pub fn take(&mut self, n: usize) -> Result<&[u8], ProtocolError> {
        if self.p.len() < n {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                why: format!("{n} more bytes expected"),
            });
        }
        let (a, b) = self.p.split_at(n);
        self.p = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn arr32(&mut self) -> Result<[u8; 32], ProtocolError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    /// An endpoint's address: a length (at most `max`), then UTF-8.
    pub fn text(&mut self, max: u32, what: &str) -> Result<String, ProtocolError> {
        let len = self.u32()?;
        let kind = self.kind;
        let bad = move |why: String| ProtocolError::Malformed { kind, why };
        if len > max {
            return Err(bad(format!("{what} too long")));
        }
        let bytes = self.take(len as usize)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| bad(format!("{what} is not UTF-8")))
    }
    pub fn end(self) -> Result<(), ProtocolError> {
        if self.p.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed {
                kind: self.kind,
                why: format!("{} trailing bytes", self.p.len()),
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A raw frame, for feeding decoders what a hostile peer would send.
    pub(crate) fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn page_data_is_left_for_the_caller_to_read_where_it_wants() {
        let mut wire = Vec::new();
        write_pages(&mut wire, Gfn(5), &[7u8; 2 * PAGE_BYTES]).unwrap();
        Message::ZeroPages {
            gfn: Gfn(9),
            count: 3,
        }
        .write_to(&mut wire)
        .unwrap();
        let mut r = wire.as_slice();
        assert_eq!(
            read_head(&mut r).unwrap(),
            Head::Pages {
                gfn: Gfn(5),
                pages: 2
            }
        );
        let mut buf = vec![0u8; 2 * PAGE_BYTES];
        read_payload(&mut r, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        assert_eq!(
            read_head(&mut r).unwrap(),
            Head::Message(Message::ZeroPages {
                gfn: Gfn(9),
                count: 3
            })
        );
        assert!(matches!(read_head(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn oversized_page_batches_are_not_sent() {
        let mut out = Vec::new();
        assert!(write_pages(&mut out, Gfn(0), &[0; PAGE_BYTES + 1]).is_err());
        assert!(write_pages(
            &mut out,
            Gfn(0),
            &vec![0; (message::MAX_PAGES_PER_FRAME as usize + 1) * PAGE_BYTES]
        )
        .is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn disconnects_are_told_apart_from_bad_frames() {
        assert!(ProtocolError::Closed.is_disconnect());
        assert!(ProtocolError::Io(std::io::ErrorKind::ConnectionReset.into()).is_disconnect());
        assert!(!ProtocolError::BadMagic(1).is_disconnect());
        assert!(!ProtocolError::Auth.is_disconnect());
    }
}
