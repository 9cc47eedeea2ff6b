//! The messages of the protocol, their encodings and bounds.
//!
//! Every payload is little-endian; every decoder checks its lengths, counts and ranges, and
//! rejects trailing bytes. A page run on the wire is `u64 gfn, u64 count`.

use std::io::{Read, Write};

use tsubame_pages::{Gfn, Gpa, MemoryLayout, RegionLayout, PAGE_BYTES};

use crate::frame::{self, Cursor, Head, ProtocolError};

/// Version of this protocol; both ends must speak the same.
pub const PROTOCOL_VERSION: u32 = 9;
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
/// Most page runs in one `Owners` frame (the sender splits longer lists).
pub const MAX_OWNER_RUNS: u32 = 4096;
/// Longest checkpoint interval a Hello may ask for (one minute).
pub const MAX_CHECKPOINT_MS: u32 = 60_000;
/// Longest endpoint address in an `Owners` frame.
const MAX_ENDPOINT: u32 = 256;

/// The frame kind of `Pages`, the one whose data is read separately.
pub(crate) const PAGES: u16 = 6;

/// Which connection of a session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Control messages, demand requests and their replies: never waits behind bulk data.
    Urgent = 1,
    /// The background stream of pages, flow-controlled.
    Bulk = 2,
    /// Reverse checkpoints of a cancellable migration: the destination's dirty pages and state,
    /// back to the source.
    Checkpoint = 3,
}

/// What the side that opens a connection wants from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// It sends a VM: the other side runs it (a migration's source connecting to its
    /// destination).
    Migrate = 1,
    /// It wants pages of VM `vm` that the other side holds (a destination fetching from a
    /// memserver).
    Fetch = 2,
    /// It sends pages of VM `vm` for the other side to hold (a source handing part of a VM's
    /// memory to a memserver).
    Store = 3,
    /// It wants back, one demand request at a time, pages of VM `vm` that it stored itself (a
    /// host paging its VM's memory out to a memserver): like `Fetch`, but nothing is pushed.
    Recall = 4,
    /// It is the source of the migration that brought VM `vm` here, and asks this host to
    /// move the VM on (`SwitchTo`): a migration switched after its switchover.
    Switch = 5,
    /// It is the destination of a migration of VM `vm` whose session with the source broke
    /// after the switchover, and picks it up again: it says which pages it still lacks
    /// (`Owners{"", runs}` ... `Ready`), and the source serves them on this new session.
    Resume = 6,
}

/// What a connection is about: sent by the side that opens it, checked by the other before
/// anything else moves (see [`crate::handshake`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub purpose: Purpose,
    pub channel: Channel,
    /// Pairs a session's connections (urgent and bulk).
    pub session: u64,
    /// The VM's identity (it stays the same across migrations and restores).
    pub vm: u64,
    pub layout: MemoryLayout,
    /// vCPUs of the VM: a destination creates them before the state arrives.
    pub vcpus: u32,
    /// A cancellable migration: the session has a checkpoint channel too, and the destination
    /// sends a reverse checkpoint this often (milliseconds). 0: not cancellable.
    pub checkpoint_ms: u32,
}

/// Protocol messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Challenge {
        version: u32,
        nonce: [u8; 32],
    },
    /// The opening side's introduction and its proof that it knows the secret.
    Hello {
        version: u32,
        nonce: [u8; 32],
        mac: [u8; 32],
        hello: Hello,
    },
    Accept {
        mac: [u8; 32],
    },
    /// vCPU and device state (the VMM's VM state).
    VmState(Vec<u8>),
    PageRequest {
        gfn: Gfn,
        count: u32,
    },
    /// `data.len() / 4096` pages from `gfn`.
    Pages {
        gfn: Gfn,
        data: Vec<u8>,
    },
    ZeroPages {
        gfn: Gfn,
        count: u64,
    },
    /// The sender has pushed every page it is going to push.
    PushDone,
    /// The receiver has every page: the sender may stop serving. On the checkpoint channel,
    /// from the source: it will never resume the VM, the destination owns it for good.
    Complete,
    Error {
        message: String,
    },
    /// The receiver's copies of these pages are stale (the guest wrote them after they were
    /// sent in a precopy round): drop them; newer copies follow or are fetched on demand.
    Discard {
        gfn: Gfn,
        count: u64,
    },
    /// Sender: precopy round `round` is all sent. Receiver (on the urgent channel): all of it
    /// is installed.
    RoundDone {
        round: u32,
    },
    /// Everything before this on the bulk channel belongs to the precopy phase (including the
    /// switchover's discards); the destination resumes the VM only after applying it.
    PrecopyDone,
    /// Receiver (on the urgent channel): it runs the VM now and wants the background push.
    Resumed,
    /// Receiver (on the bulk channel's return direction): it has read and installed this many
    /// bytes of the bulk stream since the handshake (flow control).
    Installed {
        bytes: u64,
    },
    /// Destination (on the urgent channel): its VM (memory, vCPUs) is created and its receivers
    /// run (after the handshake), or it has connected to the owners just announced.
    Ready,
    /// Source (on the urgent channel, before the VM state): these pages' owner is `endpoint`,
    /// a page server holding the VM's pages (its address), or the source itself (empty).
    Owners {
        endpoint: String,
        runs: Vec<(Gfn, u64)>,
    },
    /// Destination (on the checkpoint channel): checkpoint `epoch` begins, with the VM state
    /// captured while the vCPUs were paused; the pages written since the last checkpoint
    /// follow (`Pages`, `ZeroPages`).
    CheckpointBegin {
        epoch: u64,
        /// The destination's lease to run, counted from when it sent this: once the source
        /// acknowledges the checkpoint, the destination runs at most this long without a newer
        /// acknowledgement (see `tsubame_vmm::fence`).
        lease_ms: u32,
        /// The destination's checkpoint interval now (it adapts), for the source's status.
        interval_ms: u32,
        state: Vec<u8>,
    },
    /// Destination: checkpoint `epoch` is all sent (`pages` pages). The source commits it only
    /// now: one that ends otherwise is discarded.
    CheckpointEnd {
        epoch: u64,
        pages: u64,
        /// How long the guest was paused to take it (µs), for the source's statistics.
        pause_us: u64,
    },
    /// Source (on the checkpoint channel): checkpoint `epoch` is committed. The destination
    /// releases the output its guest produced up to it, and its lease to run is renewed.
    CheckpointAck {
        epoch: u64,
    },
    /// Source (on the checkpoint channel): the migration is called off; stop running the VM
    /// and say `Fenced`.
    Cancel,
    /// Destination (on the checkpoint channel): its vCPUs are stopped for good (cancelled, or
    /// its lease ran out); the last checkpoint it sent is `epoch`. The source resumes from its
    /// last committed one.
    Fenced {
        epoch: u64,
    },
    /// Source (on the urgent channel, the reply to a request): these pages were released here
    /// after the receiver acknowledged installing them (`Installed`, release mode): it has
    /// them already, and they cannot be sent again.
    Released {
        gfn: Gfn,
        count: u64,
    },
    /// Source (on the urgent channel, to the old destination of a switched migration, before
    /// the VM state): stop being the destination; serve the pages you hold (each one the
    /// source still has clean) to the new destination `to`, which fetches them from you, and
    /// report (`Forwarded`) until it has them all.
    Forward {
        to: String,
    },
    /// Source (on the urgent channel, to the new destination of a switched migration, before
    /// the VM state): `endpoint`, the old destination, holds pages of the VM (`Owners` for it
    /// follow): fetch them from it, in parallel with the source's own. A page the source
    /// discards afterwards is the source's again, whoever's copy is here (see the
    /// destination's docs, "Two senders").
    Forwarder {
        endpoint: String,
    },
    /// Old destination (on the urgent channel, to the source): it has sent this many pages to
    /// the new destination (pushed or on demand); `pushed`: its push has sent every page it
    /// holds; `done`: the new destination has them all and the old one stops.
    Forwarded {
        pages: u64,
        pushed: bool,
        done: bool,
    },
    /// Source (in a `Switch` session, to the destination that runs the VM): migrate the VM on
    /// to `to`, postcopy; the pages you still lack stay the source's, which serves them at
    /// `source` (the new destination fetches them from there). Answered `Ready` once the VM
    /// runs at `to`, or `Error`.
    SwitchTo {
        to: String,
        source: String,
    },
    /// Source (on the urgent channel, before the VM state): if this session breaks after the
    /// switchover, dial `uri` with a `Resume` session to pick it up again, for up to
    /// `within_ms` after it broke (the source waits that long, then gives the migration up).
    ResumeAt {
        uri: String,
        within_ms: u32,
    },
}

const KINDS: [&str; 29] = [
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
    "Owners",
    "CheckpointBegin",
    "CheckpointEnd",
    "CheckpointAck",
    "Cancel",
    "Fenced",
    "Released",
    "Forward",
    "Forwarder",
    "Forwarded",
    "SwitchTo",
    "ResumeAt",
];

/// The name of frame kind `kind` (a known one).
pub(crate) fn kind_name(kind: u16) -> &'static str {
    KINDS.get(usize::from(kind)).copied().unwrap_or("unknown")
}

/// Bytes of a Hello's payload before its regions.
const HELLO_FIXED: u32 = 4 + 32 + 32 + 1 + 1 + 8 + 8 + 4 + 4 + 4;

/// Largest payload a frame of `kind` may carry (`None`: unknown kind).
pub(crate) fn max_payload(kind: u16) -> Option<u32> {
    Some(match kind {
        1 => 36,
        2 => HELLO_FIXED + 16 * MAX_REGIONS,
        3 => 32,
        4 => MAX_STATE,
        5 => 12,
        PAGES => 8 + MAX_PAGES_PER_FRAME * 4096,
        7 | 11 | 23 => 16,
        8 | 9 | 13 | 14 | 16 | 21 => 0,
        10 => MAX_TEXT,
        12 => 4,
        15 => 8,
        17 => 4 + MAX_ENDPOINT + 4 + 16 * MAX_OWNER_RUNS,
        18 => 16 + MAX_STATE,
        19 => 24,
        20 | 22 => 8,
        24 | 25 => 4 + MAX_ENDPOINT,
        26 => 16,
        27 => 8 + 2 * MAX_ENDPOINT,
        28 => 8 + MAX_ENDPOINT,
        _ => return None,
    })
}

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
            Self::Owners { .. } => 17,
            Self::CheckpointBegin { .. } => 18,
            Self::CheckpointEnd { .. } => 19,
            Self::CheckpointAck { .. } => 20,
            Self::Cancel => 21,
            Self::Fenced { .. } => 22,
            Self::Released { .. } => 23,
            Self::Forward { .. } => 24,
            Self::Forwarder { .. } => 25,
            Self::Forwarded { .. } => 26,
            Self::SwitchTo { .. } => 27,
            Self::ResumeAt { .. } => 28,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
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
                nonce,
                mac,
                hello,
            } => encode_hello(&mut p, *version, nonce, mac, hello),
            Self::Accept { mac } => p.extend_from_slice(mac),
            Self::VmState(s) => p.extend_from_slice(s),
            Self::PageRequest { gfn, count } => {
                p.extend_from_slice(&gfn.0.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
            }
            Self::Pages { gfn, data } => return frame::write_pages(w, *gfn, data),
            Self::ZeroPages { gfn, count }
            | Self::Discard { gfn, count }
            | Self::Released { gfn, count } => {
                p.extend_from_slice(&gfn.0.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
            }
            Self::RoundDone { round } => p.extend_from_slice(&round.to_le_bytes()),
            Self::Installed { bytes } => p.extend_from_slice(&bytes.to_le_bytes()),
            Self::PushDone
            | Self::Complete
            | Self::PrecopyDone
            | Self::Resumed
            | Self::Ready
            | Self::Cancel => {}
            Self::CheckpointBegin {
                epoch,
                lease_ms,
                interval_ms,
                state,
            } => {
                p.extend_from_slice(&epoch.to_le_bytes());
                p.extend_from_slice(&lease_ms.to_le_bytes());
                p.extend_from_slice(&interval_ms.to_le_bytes());
                p.extend_from_slice(state);
            }
            Self::CheckpointEnd {
                epoch,
                pages,
                pause_us,
            } => {
                p.extend_from_slice(&epoch.to_le_bytes());
                p.extend_from_slice(&pages.to_le_bytes());
                p.extend_from_slice(&pause_us.to_le_bytes());
            }
            Self::CheckpointAck { epoch } | Self::Fenced { epoch } => {
                p.extend_from_slice(&epoch.to_le_bytes());
            }
            Self::Error { message } => {
                let m = message.as_bytes();
                p.extend_from_slice(&m[..m.len().min(MAX_TEXT as usize)]);
            }
            Self::ResumeAt { uri, within_ms } => {
                let e = uri.as_bytes();
                p.extend_from_slice(&len_u32(e.len()).to_le_bytes());
                p.extend_from_slice(e);
                p.extend_from_slice(&within_ms.to_le_bytes());
            }
            Self::Forward { to: endpoint } | Self::Forwarder { endpoint } => {
                let e = endpoint.as_bytes();
                p.extend_from_slice(&len_u32(e.len()).to_le_bytes());
                p.extend_from_slice(e);
            }
            Self::SwitchTo { to, source } => {
                for e in [to, source] {
                    let e = e.as_bytes();
                    p.extend_from_slice(&len_u32(e.len()).to_le_bytes());
                    p.extend_from_slice(e);
                }
            }
            Self::Forwarded {
                pages,
                pushed,
                done,
            } => {
                p.extend_from_slice(&pages.to_le_bytes());
                p.extend_from_slice(&(u64::from(*done) | u64::from(*pushed) << 1).to_le_bytes());
            }
            Self::Owners { endpoint, runs } => {
                let e = endpoint.as_bytes();
                p.extend_from_slice(&len_u32(e.len()).to_le_bytes());
                p.extend_from_slice(e);
                p.extend_from_slice(&len_u32(runs.len()).to_le_bytes());
                for (gfn, count) in runs {
                    p.extend_from_slice(&gfn.0.to_le_bytes());
                    p.extend_from_slice(&count.to_le_bytes());
                }
            }
        }
        frame::write_frame(w, self.kind(), &p, &[])
    }

    /// Reads and decodes one frame (a `Pages` payload into a new buffer).
    pub fn read_from(r: &mut impl Read) -> Result<Self, ProtocolError> {
        match frame::read_head(r)? {
            Head::Message(m) => Ok(m),
            Head::Pages { gfn, pages } => {
                let mut data = vec![0u8; usize::try_from(pages).expect("bounded") * PAGE_BYTES];
                frame::read_payload(r, &mut data).map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
                    _ => e.into(),
                })?;
                Ok(Message::Pages { gfn, data })
            }
        }
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A Hello's payload. The MAC covers this encoding with `mac` zeroed.
pub(crate) fn encode_hello(
    p: &mut Vec<u8>,
    version: u32,
    nonce: &[u8; 32],
    mac: &[u8; 32],
    h: &Hello,
) {
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(nonce);
    p.extend_from_slice(mac);
    p.push(h.purpose as u8);
    p.push(h.channel as u8);
    p.extend_from_slice(&h.session.to_le_bytes());
    p.extend_from_slice(&h.vm.to_le_bytes());
    p.extend_from_slice(&h.vcpus.to_le_bytes());
    p.extend_from_slice(&h.checkpoint_ms.to_le_bytes());
    p.extend_from_slice(&len_u32(h.layout.regions.len()).to_le_bytes());
    for r in &h.layout.regions {
        p.extend_from_slice(&r.gpa.0.to_le_bytes());
        p.extend_from_slice(&r.size.to_le_bytes());
    }
}

/// Decodes every payload but `Pages` (read separately, straight into its buffer).
pub(crate) fn decode(kind: u16, name: &'static str, p: Vec<u8>) -> Result<Message, ProtocolError> {
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
            let nonce = c.arr32()?;
            let mac = c.arr32()?;
            let purpose = match c.u8()? {
                1 => Purpose::Migrate,
                2 => Purpose::Fetch,
                3 => Purpose::Store,
                4 => Purpose::Recall,
                5 => Purpose::Switch,
                6 => Purpose::Resume,
                _ => return Err(bad("unknown purpose")),
            };
            let channel = match c.u8()? {
                1 => Channel::Urgent,
                2 => Channel::Bulk,
                3 => Channel::Checkpoint,
                _ => return Err(bad("unknown channel")),
            };
            let session = c.u64()?;
            let vm = c.u64()?;
            let vcpus = c.u32()?;
            if vcpus == 0 || vcpus > MAX_VCPUS {
                return Err(bad("vCPU count out of range"));
            }
            let checkpoint_ms = c.u32()?;
            if checkpoint_ms > MAX_CHECKPOINT_MS {
                return Err(bad("checkpoint interval out of range"));
            }
            let n = c.u32()?;
            if n > MAX_REGIONS {
                return Err(bad("too many memory regions"));
            }
            let mut regions = Vec::with_capacity(n as usize);
            for _ in 0..n {
                regions.push(RegionLayout {
                    gpa: Gpa(c.u64()?),
                    size: c.u64()?,
                });
            }
            let layout = MemoryLayout::from_regions(regions).map_err(|e| bad(&e.to_string()))?;
            Message::Hello {
                version,
                nonce,
                mac,
                hello: Hello {
                    purpose,
                    channel,
                    session,
                    vm,
                    layout,
                    vcpus,
                    checkpoint_ms,
                },
            }
        }
        3 => Message::Accept { mac: c.arr32()? },
        4 => return Ok(Message::VmState(p)),
        5 => {
            let (gfn, count) = (Gfn(c.u64()?), c.u32()?);
            if count == 0 || count > MAX_PAGES_PER_FRAME {
                return Err(bad("page count out of range"));
            }
            Message::PageRequest { gfn, count }
        }
        7 | 11 | 23 => {
            let (gfn, count) = (Gfn(c.u64()?), c.u64()?);
            if count == 0 || gfn.checked_add(count).is_none() {
                return Err(bad("page count out of range"));
            }
            match kind {
                7 => Message::ZeroPages { gfn, count },
                11 => Message::Discard { gfn, count },
                _ => Message::Released { gfn, count },
            }
        }
        8 => Message::PushDone,
        9 => Message::Complete,
        10 => {
            return Ok(Message::Error {
                message: String::from_utf8_lossy(&p).into_owned(),
            });
        }
        12 => Message::RoundDone { round: c.u32()? },
        13 => Message::PrecopyDone,
        14 => Message::Resumed,
        15 => Message::Installed { bytes: c.u64()? },
        16 => Message::Ready,
        24 | 25 => {
            let endpoint = c.text(MAX_ENDPOINT, "endpoint address")?;
            if kind == 24 {
                Message::Forward { to: endpoint }
            } else {
                Message::Forwarder { endpoint }
            }
        }
        28 => Message::ResumeAt {
            uri: c.text(MAX_ENDPOINT, "resume address")?,
            within_ms: c.u32()?,
        },
        27 => Message::SwitchTo {
            to: c.text(MAX_ENDPOINT, "destination address")?,
            source: c.text(MAX_ENDPOINT, "source address")?,
        },
        26 => {
            let pages = c.u64()?;
            let flags = c.u64()?;
            if flags > 3 {
                return Err(bad("unknown flags"));
            }
            Message::Forwarded {
                pages,
                pushed: flags & 2 != 0,
                done: flags & 1 != 0,
            }
        }
        17 => {
            let endpoint = c.text(MAX_ENDPOINT, "endpoint address")?;
            let n = c.u32()?;
            if n > MAX_OWNER_RUNS {
                return Err(bad("too many page runs"));
            }
            let mut runs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (gfn, count) = (Gfn(c.u64()?), c.u64()?);
                if count == 0 || gfn.checked_add(count).is_none() {
                    return Err(bad("page count out of range"));
                }
                runs.push((gfn, count));
            }
            Message::Owners { endpoint, runs }
        }
        18 => {
            let epoch = c.u64()?;
            let lease_ms = c.u32()?;
            let interval_ms = c.u32()?;
            return Ok(Message::CheckpointBegin {
                epoch,
                lease_ms,
                interval_ms,
                state: c.p.to_vec(),
            });
        }
        19 => Message::CheckpointEnd {
            epoch: c.u64()?,
            pages: c.u64()?,
            pause_us: c.u64()?,
        },
        20 => Message::CheckpointAck { epoch: c.u64()? },
        21 => Message::Cancel,
        22 => Message::Fenced { epoch: c.u64()? },
        _ => return Err(ProtocolError::UnknownKind(kind)),
    };
    c.end()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::frame;
    use proptest::prelude::*;

    fn round_trip(m: &Message) {
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        let back = Message::read_from(&mut buf.as_slice()).unwrap();
        assert_eq!(&back, m);
    }

    fn hello() -> Hello {
        Hello {
            purpose: Purpose::Fetch,
            channel: Channel::Bulk,
            session: 42,
            vm: 7,
            layout: MemoryLayout::for_size(8 << 30).unwrap(),
            vcpus: 2,
            checkpoint_ms: 100,
        }
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
                nonce: [1; 32],
                mac: [2; 32],
                hello: hello(),
            },
            Message::Accept { mac: [3; 32] },
            Message::VmState(b"{\"a\":1}".to_vec()),
            Message::PageRequest {
                gfn: Gfn(0x1234),
                count: 1,
            },
            Message::Pages {
                gfn: Gfn(9),
                data: vec![0xab; 2 * PAGE_BYTES],
            },
            Message::ZeroPages {
                gfn: Gfn(10),
                count: 100,
            },
            Message::PushDone,
            Message::Discard {
                gfn: Gfn(9),
                count: 3,
            },
            Message::RoundDone { round: 2 },
            Message::PrecopyDone,
            Message::Resumed,
            Message::Installed { bytes: 7 << 20 },
            Message::Ready,
            Message::Complete,
            Message::Error {
                message: "layout mismatch".into(),
            },
            Message::Forward {
                to: "tcp:10.0.0.9:4444".into(),
            },
            Message::Forwarder {
                endpoint: "tcp:10.0.0.8:4444".into(),
            },
            Message::Forwarded {
                pages: 12345,
                pushed: true,
                done: false,
            },
            Message::SwitchTo {
                to: "tcp:10.0.0.9:4444".into(),
                source: "tcp:10.0.0.1:39999".into(),
            },
            Message::ResumeAt {
                uri: "tcp:10.0.0.1:40001".into(),
                within_ms: 60_000,
            },
            Message::Owners {
                endpoint: "tcp:10.0.0.2:5555".into(),
                runs: vec![(Gfn(0), 512), (Gfn(4096), 1)],
            },
            Message::Owners {
                endpoint: String::new(),
                runs: vec![],
            },
            Message::CheckpointBegin {
                epoch: 3,
                lease_ms: 300,
                interval_ms: 100,
                state: b"{}".to_vec(),
            },
            Message::CheckpointEnd {
                epoch: 3,
                pages: 1000,
                pause_us: 1200,
            },
            Message::CheckpointAck { epoch: 3 },
            Message::Cancel,
            Message::Fenced { epoch: 2 },
            Message::Released {
                gfn: Gfn(77),
                count: 1,
            },
        ] {
            round_trip(&m);
        }
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
        let mut zero = u64::MAX.to_le_bytes().to_vec();
        zero.extend_from_slice(&2u64.to_le_bytes());
        assert!(decode_err(&frame(7, 0, &zero)).contains("page count"));
        // A huge length is refused before anything is allocated or read.
        let mut f = frame(4, 0, &[]);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_err(&f).contains("exceeds its bound"));
        assert!(matches!(
            Message::read_from(&mut &frame(9, 0, &[])[..6]),
            Err(ProtocolError::Closed)
        ));
        // Owners: a run count beyond the payload, a bad address.
        let mut o = 0u32.to_le_bytes().to_vec();
        o.extend_from_slice(&3u32.to_le_bytes());
        assert!(decode_err(&frame(17, 0, &o)).contains("more bytes expected"));
        let mut o = 2u32.to_le_bytes().to_vec();
        o.extend_from_slice(&[0xff, 0xfe]);
        o.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_err(&frame(17, 0, &o)).contains("UTF-8"));
    }

    #[test]
    fn a_hello_with_a_bad_layout_or_purpose_is_refused() {
        let mut p = Vec::new();
        let mut h = hello();
        h.layout.regions[1].gpa = Gpa(1 << 30); // overlaps region 0
        encode_hello(&mut p, 5, &[0; 32], &[0; 32], &h);
        assert!(decode_err(&frame(2, 0, &p)).contains("overlaps"));
        let mut p = Vec::new();
        encode_hello(&mut p, 5, &[0; 32], &[0; 32], &hello());
        p[68] = 9; // purpose
        assert!(decode_err(&frame(2, 0, &p)).contains("unknown purpose"));
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
        fn decoder_survives_any_payload(kind in 0u16..30, flags in 0u16..2,
                                        payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::read_from(&mut frame(kind, flags, &payload).as_slice());
        }

        /// Page batches of any size round-trip.
        #[test]
        fn pages_round_trip(gfn in any::<u64>(), pages in 1usize..4, fill in any::<u8>()) {
            round_trip(&Message::Pages { gfn: Gfn(gfn), data: vec![fill; pages * PAGE_BYTES] });
        }
    }
}
