//! The Tsubame wire protocol: binary frames over TCP.
//!
//! Every frame is a 12-byte little-endian header and a payload:
//!
//! ```text
//! u16 magic "TS" (0x5354)   u16 kind   u16 flags (0)   u16 reserved (0)   u32 payload length
//! ```
//!
//! Kind 0 is invalid; unknown kinds, wrong magic, non-zero flags, and lengths beyond the bound of
//! their kind are rejected before the payload is read. Every decoder checks its lengths.
//!
//! A migration opens two connections from the source (which holds the memory) to the destination
//! (which listens): an *urgent* channel for vCPU state, demand requests and their pages, and a
//! *bulk* channel for the background push, so a fault never waits behind the bulk stream. Each
//! connection authenticates both ways before anything else moves:
//!
//! ```text
//!  source                                          destination (listening)
//!    |  <------ Challenge{version, nonce_d} --------------|
//!    |  ------- Hello{version, channel, session, nonce_s, |
//!    |               mac_s, layout} ------------------->  |  checks version, mac_s, layout
//!    |  <------ Accept{mac_d} ----------------------------|  (or Error, then close)
//!    |  checks mac_d: only now does any memory move        |
//!  urgent:  <------ Ready ------------------------------- |  its VM is created, receivers run
//!  bulk:    ------- Pages / ZeroPages ... RoundDone{1} -> |  optional precopy rounds while the
//!           <------ RoundDone{1} (on urgent) ------------ |  VM still runs at the source; later
//!           ------- Discard{gfn, count} ... Pages ... --> |  rounds first drop the stale copies
//!  urgent:  ------- VmState{json} ----------------------> |  switchover: restore once pages
//!  bulk:    ------- Discard ... PrecopyDone ------------> |  dirtied since the last round are
//!                                                         |  dropped, then resume (without
//!                                                         |  rounds, PrecopyDone comes first,
//!                                                         |  before the source pauses)
//!           <------ Resumed ----------------------------- |  the source starts its push
//!           <------ PageRequest{gfn, count: 1} ---------- |  a vCPU faulted
//!           ------- Pages{gfn, data} / ZeroPages -------> |  exactly one reply per request
//!  bulk:    ------- Pages / ZeroPages ... PushDone -----> |
//!           <------ Installed{bytes} (bulk) ------------- |  flow control: see below
//!  urgent:  <------ Complete ---------------------------- |  every page is local: source exits
//! ```
//!
//! Flow control: the destination tells the source, on the bulk connection's return direction,
//! how many bytes of the bulk stream (frames after the handshake) it has read and installed
//! (`Installed`, every so often and whenever it has nothing buffered). The source keeps at most
//! a window of unacknowledged bulk bytes in flight, so pushed pages never queue for long in
//! socket buffers: a guest that faults on a page queued there would otherwise wait behind the
//! whole queue, or fetch it a second time on demand.
//!
//! `mac_s = HMAC-SHA256(secret, "tsubame-source" | nonce_d | nonce_s | channel | session)` and
//! `mac_d = HMAC-SHA256(secret, "tsubame-destination" | nonce_s | nonce_d)`.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Version of this protocol; both ends must speak the same.
pub const PROTOCOL_VERSION: u32 = 4;
const MAGIC: u16 = 0x5354; // "TS"
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// Guest page size on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` frame (4 MiB).
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// Longest vCPU/device state accepted.
pub const MAX_STATE: u32 = 16 << 20;
/// Longest error message accepted.
const MAX_TEXT: u32 = 4096;
/// Most memory regions in a layout.
const MAX_REGIONS: u32 = 64;
/// Largest vCPU count a Hello may announce.
pub const MAX_VCPUS: u32 = 256;
/// The frame kind of `Pages`, the one decoded separately.
const PAGES: u16 = 6;

/// Which connection of a migration this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Urgent = 1,
    Bulk = 2,
}

/// A guest memory region, as the layout travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
}

/// Protocol messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Challenge {
        version: u32,
        nonce: [u8; 32],
    },
    Hello {
        version: u32,
        channel: Channel,
        session: u64,
        nonce: [u8; 32],
        mac: [u8; 32],
        layout: Vec<Region>,
        /// vCPUs of the VM: the destination creates them before the state arrives.
        vcpus: u32,
    },
    Accept {
        mac: [u8; 32],
    },
    /// vCPU and device state (the VMM's JSON VM state).
    VmState(Vec<u8>),
    PageRequest {
        gfn: u64,
        count: u32,
    },
    /// `data.len() / 4096` pages from `gfn`.
    Pages {
        gfn: u64,
        data: Vec<u8>,
    },
    ZeroPages {
        gfn: u64,
        count: u64,
    },
    PushDone,
    Complete,
    Error {
        message: String,
    },
    /// The destination's copies of these pages are stale (the guest wrote them after they were
    /// sent in a precopy round): drop them; newer copies follow or are fetched on demand.
    Discard {
        gfn: u64,
        count: u64,
    },
    /// Source: precopy round `round` is all sent. Destination (on the urgent channel): all of
    /// it is installed.
    RoundDone {
        round: u32,
    },
    /// Everything before this on the bulk channel belongs to the precopy phase (including the
    /// switchover's discards); the destination resumes the VM only after applying it.
    PrecopyDone,
    /// Destination (on the urgent channel): the VM is assembled and resumes; the source starts
    /// its background push now, so the push does not compete with the switchover for CPUs.
    Resumed,
    /// Destination (on the bulk channel's return direction): it has read and installed this
    /// many bytes of the bulk stream since the handshake (flow control).
    Installed {
        bytes: u64,
    },
    /// Destination (on the urgent channel, once after the handshake): its VM (memory, vCPUs)
    /// is created and its receivers run. The source pauses its VM only after this, so the
    /// downtime never includes the destination's setup.
    Ready,
}

/// Why a frame was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a Tsubame frame (magic {0:#06x}); is the peer a Tsubame migration endpoint?")]
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
    #[error("authentication failed: the peer does not know the shared secret (check --secret on both hosts)")]
    Auth,
    #[error("memory layout mismatch: source {source_layout:?}, destination {destination:?}; start the destination with the source's --mem")]
    Layout {
        source_layout: Vec<Region>,
        destination: Vec<Region>,
    },
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
}

const KINDS: [&str; 17] = [
    "invalid",
    "Challenge",
    "Hello",
    "Accept",
    "VmState",
    "PageRequest",
    "Pages",
    "ZeroPages",
    "PushDone",
    "Complete",
    "Error",
    "Discard",
    "RoundDone",
    "PrecopyDone",
    "Resumed",
    "Installed",
    "Ready",
];

impl Message {
    fn kind(&self) -> u16 {
        match self {
            Self::Challenge { .. } => 1,
            Self::Hello { .. } => 2,
            Self::Accept { .. } => 3,
            Self::VmState(_) => 4,
            Self::PageRequest { .. } => 5,
            Self::Pages { .. } => PAGES,
            Self::ZeroPages { .. } => 7,
            Self::PushDone => 8,
            Self::Complete => 9,
            Self::Error { .. } => 10,
            Self::Discard { .. } => 11,
            Self::RoundDone { .. } => 12,
            Self::PrecopyDone => 13,
            Self::Resumed => 14,
            Self::Installed { .. } => 15,
            Self::Ready => 16,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        KINDS[usize::from(self.kind())]
    }

    /// Largest payload a frame of `kind` may carry (None: unknown kind).
    fn max_payload(kind: u16) -> Option<u32> {
        Some(match kind {
            1 => 36,
            2 => 4 + 1 + 8 + 32 + 32 + 4 + 16 * MAX_REGIONS + 4,
            3 => 32,
            4 => MAX_STATE,
            5 => 12,
            PAGES => 8 + MAX_PAGES_PER_FRAME * 4096,
            7 => 16,
            8 | 9 | 13 | 14 | 16 => 0,
            10 => MAX_TEXT,
            11 => 16,
            12 => 4,
            15 => 8,
            _ => return None,
        })
    }

    /// Encodes the message as one frame.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        let mut p = Vec::new();
        match self {
            Self::Challenge { version, nonce } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(nonce);
            }
            Self::Hello {
                version,
                channel,
                session,
                nonce,
                mac,
                layout,
                vcpus,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.push(*channel as u8);
                p.extend_from_slice(&session.to_le_bytes());
                p.extend_from_slice(nonce);
                p.extend_from_slice(mac);
                p.extend_from_slice(
                    &u32::try_from(layout.len())
                        .unwrap_or(u32::MAX)
                        .to_le_bytes(),
                );
                for r in layout {
                    p.extend_from_slice(&r.gpa.to_le_bytes());
                    p.extend_from_slice(&r.size.to_le_bytes());
                }
                p.extend_from_slice(&vcpus.to_le_bytes());
            }
            Self::Accept { mac } => p.extend_from_slice(mac),
            Self::VmState(s) => p.extend_from_slice(s),
            Self::PageRequest { gfn, count } => {
                p.extend_from_slice(&gfn.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
            }
            Self::Pages { gfn, data } => return write_pages(w, *gfn, data),
            Self::ZeroPages { gfn, count } | Self::Discard { gfn, count } => {
                p.extend_from_slice(&gfn.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
            }
            Self::RoundDone { round } => p.extend_from_slice(&round.to_le_bytes()),
            Self::Installed { bytes } => p.extend_from_slice(&bytes.to_le_bytes()),
            Self::PushDone | Self::Complete | Self::PrecopyDone | Self::Resumed | Self::Ready => {}
            Self::Error { message } => {
                let m = message.as_bytes();
                p.extend_from_slice(&m[..m.len().min(MAX_TEXT as usize)]);
            }
        }
        write_frame(w, self.kind(), &p, &[])
    }

    /// Reads and decodes one frame.
    pub fn read_from(r: &mut impl Read) -> Result<Self, ProtocolError> {
        Self::read_reusing(r, &mut Vec::new())
    }

    /// Reads one message like [`Message::read_from`]. A `Pages` payload is read straight into
    /// `spare` (the `data` of a previous `Pages`, say), which the message then owns: no copy
    /// after the socket's and no allocation per frame. Other messages leave `spare` alone.
    pub fn read_reusing(r: &mut impl Read, spare: &mut Vec<u8>) -> Result<Self, ProtocolError> {
        let mut data = std::mem::take(spare);
        let got = Self::read_into(r, |len| {
            resize_for_overwrite(&mut data, len);
            &mut data[..]
        });
        match got {
            Ok(Received::Pages { gfn, .. }) => Ok(Message::Pages { gfn, data }),
            other => {
                *spare = data;
                other.map(|r| match r {
                    Received::Message(m) => m,
                    Received::Pages { .. } => unreachable!("handled above"),
                })
            }
        }
    }

    /// Reads one frame; a `Pages` payload goes straight into the buffer `pages` returns for
    /// its length in bytes (a whole number of pages, checked before), e.g. memory the pages
    /// are then installed from without another copy.
    pub fn read_into<'b>(
        r: &mut impl Read,
        pages: impl FnOnce(usize) -> &'b mut [u8],
    ) -> Result<Received, ProtocolError> {
        let mut h = [0u8; HEADER_LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let (magic, kind, flags) = (u16_at(0), u16_at(2), u16_at(4) | u16_at(6));
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let max = Self::max_payload(kind).ok_or(ProtocolError::UnknownKind(kind))?;
        if flags != 0 {
            return Err(ProtocolError::BadFlags(flags));
        }
        let name = KINDS[usize::from(kind)];
        if len > max {
            return Err(ProtocolError::TooLong {
                kind: name,
                len,
                max,
            });
        }
        let closed = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
            _ => e.into(),
        };
        if kind == PAGES {
            // gfn, then the pages themselves into `buf`.
            let data_len = (len as usize)
                .checked_sub(8)
                .ok_or(ProtocolError::Malformed {
                    kind: name,
                    why: "8 more bytes expected".into(),
                })?;
            if data_len == 0 || data_len % PAGE_SIZE != 0 {
                return Err(ProtocolError::Malformed {
                    kind: name,
                    why: "page data is not a whole number of pages".into(),
                });
            }
            let mut gfn = [0u8; 8];
            r.read_exact(&mut gfn).map_err(closed)?;
            let buf = pages(data_len);
            assert_eq!(buf.len(), data_len, "the page buffer must fit the payload");
            r.read_exact(buf).map_err(closed)?;
            return Ok(Received::Pages {
                gfn: u64::from_le_bytes(gfn),
                len: data_len,
            });
        }
        let mut p = vec![0u8; len as usize];
        r.read_exact(&mut p).map_err(closed)?;
        decode(kind, name, p).map(Received::Message)
    }
}

/// A frame read by [`Message::read_into`].
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A `Pages` frame: `len` bytes of pages from `gfn`, now in the caller's buffer.
    Pages { gfn: u64, len: usize },
    /// Any other message.
    Message(Message),
}

/// Writes a `Pages` frame for `data` (whole pages from `gfn`) without copying it into a
/// message first: the page server sends straight from its read buffer.
pub fn write_pages(w: &mut impl Write, gfn: u64, data: &[u8]) -> Result<(), ProtocolError> {
    let pages = data.len() / PAGE_SIZE;
    if data.is_empty() || data.len() % PAGE_SIZE != 0 || pages > MAX_PAGES_PER_FRAME as usize {
        return Err(ProtocolError::Malformed {
            kind: "Pages",
            why: format!(
                "{} bytes is not 1 to {MAX_PAGES_PER_FRAME} whole pages",
                data.len()
            ),
        });
    }
    write_frame(w, PAGES, &gfn.to_le_bytes(), data)
}

fn write_frame(
    w: &mut impl Write,
    kind: u16,
    head: &[u8],
    tail: &[u8],
) -> Result<(), ProtocolError> {
    let len = u32::try_from(head.len() + tail.len()).map_err(|_| ProtocolError::TooLong {
        kind: KINDS[usize::from(kind)],
        len: u32::MAX,
        max: Message::max_payload(kind).unwrap_or(0),
    })?;
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

/// Payload tails up to this size are copied into the frame buffer (one page and a bit).
const SMALL_TAIL: usize = 16 << 10;

/// A cursor over a payload that turns running out of bytes into a `Malformed` error.
struct Cursor<'a> {
    p: &'a [u8],
    kind: &'static str,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtocolError> {
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
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn arr32(&mut self) -> Result<[u8; 32], ProtocolError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn end(self) -> Result<(), ProtocolError> {
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

/// Sets `buf` to `len` bytes that are about to be overwritten, zeroing only what it grows by.
fn resize_for_overwrite(buf: &mut Vec<u8>, len: usize) {
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
}

/// Decodes every payload but `Pages` (read separately, straight into its buffer).
fn decode(kind: u16, name: &'static str, p: Vec<u8>) -> Result<Message, ProtocolError> {
    let bad = |why: &str| ProtocolError::Malformed {
        kind: name,
        why: why.into(),
    };
    let mut c = Cursor { p: &p, kind: name };
    let m = match kind {
        1 => Message::Challenge {
            version: c.u32()?,
            nonce: c.arr32()?,
        },
        2 => {
            let version = c.u32()?;
            let channel = match c.take(1)?[0] {
                1 => Channel::Urgent,
                2 => Channel::Bulk,
                _ => return Err(bad("unknown channel")),
            };
            let session = c.u64()?;
            let nonce = c.arr32()?;
            let mac = c.arr32()?;
            let n = c.u32()?;
            if n > MAX_REGIONS {
                return Err(bad("too many memory regions"));
            }
            let mut layout = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (gpa, size) = (c.u64()?, c.u64()?);
                if gpa % PAGE_SIZE as u64 != 0
                    || size % PAGE_SIZE as u64 != 0
                    || gpa.checked_add(size).is_none()
                {
                    return Err(bad("memory region not page-aligned"));
                }
                layout.push(Region { gpa, size });
            }
            let vcpus = c.u32()?;
            if vcpus == 0 || vcpus > MAX_VCPUS {
                return Err(bad("vCPU count out of range"));
            }
            Message::Hello {
                version,
                channel,
                session,
                nonce,
                mac,
                layout,
                vcpus,
            }
        }
        3 => Message::Accept { mac: c.arr32()? },
        4 => return Ok(Message::VmState(p)),
        5 => {
            let (gfn, count) = (c.u64()?, c.u32()?);
            if count == 0 || count > MAX_PAGES_PER_FRAME {
                return Err(bad("page count out of range"));
            }
            Message::PageRequest { gfn, count }
        }
        7 => {
            let (gfn, count) = (c.u64()?, c.u64()?);
            if count == 0 {
                return Err(bad("zero page count"));
            }
            Message::ZeroPages { gfn, count }
        }
        11 => {
            let (gfn, count) = (c.u64()?, c.u64()?);
            if count == 0 {
                return Err(bad("zero page count"));
            }
            Message::Discard { gfn, count }
        }
        12 => Message::RoundDone { round: c.u32()? },
        13 => Message::PrecopyDone,
        14 => Message::Resumed,
        15 => Message::Installed { bytes: c.u64()? },
        16 => Message::Ready,
        8 => Message::PushDone,
        9 => Message::Complete,
        10 => {
            return Ok(Message::Error {
                message: String::from_utf8_lossy(&p).into_owned(),
            });
        }
        _ => return Err(ProtocolError::UnknownKind(kind)),
    };
    c.end()?;
    Ok(m)
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The source's proof that it knows the secret.
pub fn source_mac(
    secret: &[u8],
    nonce_d: &[u8; 32],
    nonce_s: &[u8; 32],
    channel: Channel,
    session: u64,
) -> [u8; 32] {
    mac(
        secret,
        &[
            b"tsubame-source",
            nonce_d,
            nonce_s,
            &[channel as u8],
            &session.to_le_bytes(),
        ],
    )
}

/// The destination's proof that it knows the secret.
pub fn destination_mac(secret: &[u8], nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> [u8; 32] {
    mac(secret, &[b"tsubame-destination", nonce_s, nonce_d])
}

/// Compares two MACs in constant time.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel, for nonces.
pub fn nonce() -> Result<[u8; 32], std::io::Error> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(m: &Message) {
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        let back = Message::read_from(&mut buf.as_slice()).unwrap();
        assert_eq!(&back, m);
    }

    #[test]
    fn page_payloads_land_in_the_spare_buffer_and_others_leave_it() {
        let mut wire = Vec::new();
        write_pages(&mut wire, 5, &[7u8; 2 * PAGE_SIZE]).unwrap();
        Message::ZeroPages { gfn: 9, count: 3 }
            .write_to(&mut wire)
            .unwrap();
        write_pages(&mut wire, 6, &[8u8; PAGE_SIZE]).unwrap();
        let mut r = wire.as_slice();
        let mut spare = Vec::with_capacity(4 * PAGE_SIZE);
        let ptr = spare.as_ptr();
        let Message::Pages { gfn: 5, data } = Message::read_reusing(&mut r, &mut spare).unwrap()
        else {
            panic!("expected Pages")
        };
        assert_eq!(
            (data.len(), data.as_ptr()),
            (2 * PAGE_SIZE, ptr),
            "read in place"
        );
        spare = data;
        assert!(matches!(
            Message::read_reusing(&mut r, &mut spare).unwrap(),
            Message::ZeroPages { gfn: 9, count: 3 }
        ));
        assert_eq!(
            spare.as_ptr(),
            ptr,
            "a ZeroPages frame keeps the spare buffer"
        );
        let Message::Pages { data, .. } = Message::read_reusing(&mut r, &mut spare).unwrap() else {
            panic!("expected Pages")
        };
        assert_eq!((data.len(), data.as_ptr(), data[0]), (PAGE_SIZE, ptr, 8));
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Message::Challenge {
                version: 1,
                nonce: [7; 32],
            },
            Message::Hello {
                version: 1,
                channel: Channel::Bulk,
                session: 42,
                nonce: [1; 32],
                mac: [2; 32],
                layout: vec![
                    Region {
                        gpa: 0,
                        size: 1 << 30,
                    },
                    Region {
                        gpa: 4 << 30,
                        size: 1 << 30,
                    },
                ],
                vcpus: 2,
            },
            Message::Accept { mac: [3; 32] },
            Message::VmState(b"{\"a\":1}".to_vec()),
            Message::PageRequest {
                gfn: 0x1234,
                count: 1,
            },
            Message::Pages {
                gfn: 9,
                data: vec![0xab; 2 * PAGE_SIZE],
            },
            Message::ZeroPages {
                gfn: 10,
                count: 100,
            },
            Message::PushDone,
            Message::Discard { gfn: 9, count: 3 },
            Message::RoundDone { round: 2 },
            Message::PrecopyDone,
            Message::Resumed,
            Message::Installed { bytes: 7 << 20 },
            Message::Ready,
            Message::Complete,
            Message::Error {
                message: "layout mismatch".into(),
            },
        ] {
            round_trip(&m);
        }
    }

    fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn decode_err(f: &[u8]) -> String {
        Message::read_from(&mut &f[..]).unwrap_err().to_string()
    }

    #[test]
    fn malformed_frames_are_rejected_with_a_reason() {
        assert!(decode_err(b"GET / HTTP/1.1\r\n").contains("not a Tsubame frame"));
        assert!(decode_err(&frame(0, 0, &[])).contains("unknown message kind 0"));
        assert!(decode_err(&frame(99, 0, &[])).contains("unknown message kind 99"));
        assert!(decode_err(&frame(8, 1, &[])).contains("flags"));
        assert!(decode_err(&frame(5, 0, &[0; 5])).contains("more bytes expected"));
        assert!(decode_err(&frame(5, 0, &[0; 13])).contains("exceeds its bound"));
        assert!(decode_err(&frame(6, 0, &[0; 8 + 100])).contains("whole number of pages"));
        let mut req = 5u64.to_le_bytes().to_vec();
        req.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_err(&frame(5, 0, &req)).contains("page count"));
        // A huge length is refused before anything is allocated or read.
        let mut f = frame(4, 0, &[]);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_err(&f).contains("exceeds its bound"));
        assert!(matches!(
            Message::read_from(&mut &frame(9, 0, &[])[..6]),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn oversized_page_batches_are_not_sent() {
        let mut out = Vec::new();
        assert!(write_pages(&mut out, 0, &[0; PAGE_SIZE + 1]).is_err());
        assert!(write_pages(
            &mut out,
            0,
            &vec![0; (MAX_PAGES_PER_FRAME as usize + 1) * PAGE_SIZE]
        )
        .is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn macs_bind_both_nonces_and_the_secret() {
        let (d, s) = ([1u8; 32], [2u8; 32]);
        let a = source_mac(b"secret", &d, &s, Channel::Urgent, 7);
        assert!(mac_eq(
            &a,
            &source_mac(b"secret", &d, &s, Channel::Urgent, 7)
        ));
        assert!(!mac_eq(
            &a,
            &source_mac(b"Secret", &d, &s, Channel::Urgent, 7)
        ));
        assert!(!mac_eq(
            &a,
            &source_mac(b"secret", &s, &d, Channel::Urgent, 7)
        ));
        assert!(!mac_eq(
            &a,
            &source_mac(b"secret", &d, &s, Channel::Bulk, 7)
        ));
        assert!(!mac_eq(
            &destination_mac(b"secret", &s, &d),
            &destination_mac(b"secret", &d, &s)
        ));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    proptest! {
        /// Hostile input: any bytes decode to a message or an error, never a panic or a huge
        /// allocation.
        #[test]
        fn decoder_survives_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::read_from(&mut bytes.as_slice());
        }

        /// A valid header with any kind, flags and payload: same.
        #[test]
        fn decoder_survives_any_payload(kind in 0u16..18, flags in 0u16..2,
                                        payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::read_from(&mut frame(kind, flags, &payload).as_slice());
        }

        /// Page batches of any size round-trip.
        #[test]
        fn pages_round_trip(gfn in any::<u64>(), pages in 1usize..4, fill in any::<u8>()) {
            round_trip(&Message::Pages { gfn, data: vec![fill; pages * PAGE_SIZE] });
        }
    }
}
