//! A real `tsubame memserver` process against unlucky and hostile peers: a wrong secret,
//! malformed frames before and after the handshake, a restart on the same port, a limit
//! reached. After each, the memserver still answers its control socket, still serves what it
//! held, and stores and serves a good client's pages, byte for byte. (The unit tests of
//! `pageserver` cover the decoders in-process; `split.rs` covers a migration refused by a full
//! memserver; here it is the process that must survive.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tsubame_pages::{Gfn, MemStore, MemoryLayout, PageSink, PageStore, PAGE_BYTES};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::session::{self, Session};
use tsubame_pageserver::{
    BulkSender, Channel, ClientError, ClientEvents, Hello, Message, PageClient, PageServer,
    Purpose, SendKind,
};
use tsubame_tests::{Scratch, VmProcess};

const SECRET: &str = "memserver secret";
/// Long enough for anything the memserver does here; only a broken memserver waits it out.
const PATIENCE: Duration = Duration::from_secs(20);
/// Message kinds and the frame magic, as a hostile peer writes them by hand.
const MAGIC: u16 = 0x5354;
const HELLO: u16 = 2;
const PAGES: u16 = 6;
const PUSH_DONE: u16 = 8;

/// The stored VMs' memory: 16 MiB.
fn layout() -> MemoryLayout {
    MemoryLayout::for_size(16 << 20).unwrap()
}

/// The VMs' first page.
fn base() -> Gfn {
    layout().runs(u64::MAX).next().unwrap().gfn
}

fn hello(purpose: Purpose, vm: u64) -> Hello {
    Hello {
        purpose,
        channel: Channel::Urgent,
        session: 0,
        vm,
        layout: layout(),
        vcpus: 1,
        checkpoint_ms: 0,
    }
}

/// Page `gfn`'s content in a store tagged `tag` (0: a zero page).
fn page(gfn: Gfn, tag: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    if tag != 0 {
        p[..8].copy_from_slice(&gfn.0.to_le_bytes());
        p[8..].fill(tag);
    }
    p
}

/// Stores pages `[base, base + pages)` of VM `vm`, content tagged `tag`, at the memserver at
/// `uri` (as a migration source does); fails with the memserver's reason if it gave one.
fn store(uri: &str, vm: u64, pages: u64, tag: u8) -> Result<(), String> {
    let s = session::open(uri, SECRET.as_bytes(), &hello(Purpose::Store, vm))
        .map_err(|e| e.to_string())?;
    let held = MemStore::new(&layout());
    for k in 0..pages {
        held.install(base() + k, &page(base() + k, tag)).unwrap();
    }
    let server = PageServer::new(held);
    let sent = (|| -> anyhow::Result<()> {
        let mut w = BulkWriter::new(s.bulk, s.rtt)?;
        BulkSender::new(&server, None).send(&mut w, base(), pages, SendKind::Precopy)?;
        Message::PushDone.write_to(&mut w)?;
        w.wait_all_acknowledged()?;
        w.finish()?;
        Ok(())
    })();
    sent.map_err(|e| {
        // A memserver that refuses says why on the urgent channel.
        s.urgent.set_read_timeout(Some(PATIENCE)).unwrap();
        match Message::read_from(&mut &s.urgent) {
            Ok(Message::Error { message }) => message,
            other => format!("{e:#} (and on the urgent channel: {other:?})"),
        }
    })
}

/// A client's failures.
#[derive(Default)]
struct Failures(Mutex<Vec<String>>);

impl ClientEvents for Failures {
    fn failed(&self, _: &PageClient, error: ClientError) {
        self.0.lock().unwrap().push(error.to_string());
    }
}

/// Fetches everything the memserver at `uri` holds of VM `vm` (as a destination does, the
/// push only); fails with the memserver's reason if it refused.
fn fetch(uri: &str, vm: u64) -> Result<MemStore, String> {
    let s = session::open(uri, SECRET.as_bytes(), &hello(Purpose::Fetch, vm))
        .map_err(|e| e.to_string())?;
    let sink = Arc::new(MemStore::new(&layout()));
    let failures = Arc::new(Failures::default());
    let client = PageClient::new("the memserver", &s.urgent, sink.clone(), failures.clone())
        .map_err(|e| e.to_string())?;
    // Told the VM runs, the memserver pushes every page it holds, then closes the bulk
    // channel.
    client.send(&Message::Resumed).map_err(|e| e.to_string())?;
    client.receive_bulk(s.bulk);
    assert!(client.is_push_done(), "{:?}", failures.0.lock().unwrap());
    client.complete();
    let failures = failures.0.lock().unwrap().clone();
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    drop(client);
    Ok(Arc::into_inner(sink).expect("the client is gone"))
}

/// Checks that `fetched` holds exactly pages `[base, base + pages)` tagged `tag`.
fn assert_holds(fetched: &MemStore, pages: u64, tag: u8) {
    assert_eq!(fetched.held_pages(), pages);
    let mut scratch = Vec::new();
    for k in 0..pages {
        let g = base() + k;
        assert!(
            fetched.read(g, 1, &mut scratch).unwrap() == page(g, tag).as_slice(),
            "page {g} differs from what was stored"
        );
    }
}

/// Stores pages as [`store`] does and fetches them back whole.
fn round_trip(uri: &str, vm: u64, pages: u64, tag: u8) {
    store(uri, vm, pages, tag).unwrap();
    assert_holds(&fetch(uri, vm).unwrap(), pages, tag);
}

/// A memserver on loopback with a control socket in `dir`; returns it and its URI.
fn memserver(dir: &Scratch, extra: &[&str]) -> (VmProcess, String) {
    let sock = dir.path("ms.sock");
    VmProcess::memserver(
        SECRET,
        &[&["--control", sock.to_str().unwrap()], extra].concat(),
    )
    .unwrap()
}

/// What the memserver holds of VM `vm`, from its control socket.
fn usage_of(ms: &VmProcess, vm: u64) -> Value {
    let u = ms.ctl("query-usage", json!({})).unwrap();
    u["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .cloned()
        .unwrap_or_else(|| panic!("no VM {vm} in {u}"))
}

/// A frame header (and payload) written by hand: `len` need not be the payload's length.
fn frame(kind: u16, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Bytes that are not a frame.
fn garbage(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 37 + 11) % 251).unwrap())
        .collect()
}

/// Connects to the memserver at `uri` as a plain TCP peer, reads its challenge, sends `bytes`
/// instead of a Hello, and reads until the memserver closes the connection; returns the local
/// port (what its log names) and the messages it sent after the challenge.
fn hostile(uri: &str, bytes: &[u8]) -> (u16, Vec<Message>) {
    let mut s = TcpStream::connect(uri.strip_prefix("tcp:").unwrap()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let port = s.local_addr().unwrap().port();
    // Read before it can be lost: a close with our bytes unread resets the connection.
    let challenge = Message::read_from(&mut s).unwrap();
    assert!(
        matches!(challenge, Message::Challenge { .. }),
        "{challenge:?}"
    );
    // It may close before taking all of it.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the memserver kept a hostile connection open: {e}"),
    }
    let mut r = reply.as_slice();
    let mut messages = Vec::new();
    while !r.is_empty() {
        messages.push(Message::read_from(&mut r).unwrap());
    }
    (port, messages)
}

#[test]
fn a_wrong_secret_is_refused_and_the_others_are_served() {
    let dir = Scratch::new("ms-secret");
    let (ms, uri) = memserver(&dir, &[]);
    for purpose in [Purpose::Store, Purpose::Fetch] {
        let e = session::open(&uri, b"not the secret", &hello(purpose, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shared secret"), "{e}");
    }
    ms.wait_for_stderr("authentication failed", PATIENCE)
        .unwrap();
    round_trip(&uri, 1, 64, 0x11);
    let u = ms.ctl("query-usage", json!({})).unwrap();
    assert_eq!(u["vms"].as_array().unwrap().len(), 1, "{u}");
    assert_eq!(u["vms"][0]["pages_held"], 64, "{u}");
    assert_eq!(u["data_bytes"], 64 * 4096, "{u}");
}

#[test]
fn malformed_frames_neither_crash_it_nor_stop_it_serving() {
    let dir = Scratch::new("ms-malformed");
    let (mut ms, uri) = memserver(&dir, &[]);
    store(&uri, 1, 64, 0x21).unwrap();

    // Before the handshake: each refused and logged with its reason, none answered.
    let truncated = &frame(HELLO, 100, &[1; 10])[..];
    let cases: [(&[u8], &str); 4] = [
        (&garbage(4096), "not a Tsubame frame"),
        (truncated, "the peer closed the connection"),
        (&frame(HELLO, 0xffff_fff0, &[]), "exceeds its bound"),
        (&frame(0x7777, 8, &[0; 8]), "unknown message kind 30583"),
    ];
    for (bytes, reason) in cases {
        let (port, said) = hostile(&uri, bytes);
        assert!(said.is_empty(), "{said:?}");
        let refused = format!("refused a memserver connection from 127.0.0.1:{port}:");
        ms.wait_for_stderr(&refused, PATIENCE).unwrap();
        let line = ms
            .stderr()
            .lines()
            .find(|l| l.contains(&refused))
            .unwrap()
            .to_string();
        assert!(line.contains(reason), "expected '{reason}': {line}");
    }
    // A well-formed frame that is not a Hello: refused, and told why.
    let (_, said) = hostile(&uri, &frame(PUSH_DONE, 0, &[]));
    match said.as_slice() {
        [Message::Error { message }] => {
            assert!(
                message.contains("expected Hello, got PushDone"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    // After the handshake: a store session whose bulk channel carries garbage, or a page
    // batch beyond the bound, fails with the reason told on its urgent channel.
    for (vm, bytes, reason) in [
        (2, garbage(4096), "not a Tsubame frame"),
        (3, frame(PAGES, u32::MAX, &[]), "exceeds its bound"),
    ] {
        let mut s: Session =
            session::open(&uri, SECRET.as_bytes(), &hello(Purpose::Store, vm)).unwrap();
        s.bulk.write_all(&bytes).unwrap();
        s.urgent.set_read_timeout(Some(PATIENCE)).unwrap();
        match Message::read_from(&mut s.urgent) {
            Ok(Message::Error { message }) => assert!(message.contains(reason), "{message}"),
            other => panic!("VM {vm}: expected an Error saying '{reason}', got {other:?}"),
        }
    }
    // A fetch session whose urgent channel carries garbage: that session ends, with the
    // reason in the memserver's log.
    let mut s = session::open(&uri, SECRET.as_bytes(), &hello(Purpose::Fetch, 1)).unwrap();
    s.urgent.write_all(&garbage(512)).unwrap();
    ms.wait_for_stderr("VM 0x1: serving ended: Failed", PATIENCE)
        .unwrap();
    let line = ms
        .stderr()
        .lines()
        .find(|l| l.contains("VM 0x1: serving ended"))
        .unwrap()
        .to_string();
    assert!(line.contains("not a Tsubame frame"), "{line}");
    drop(s);

    // Still here: it answers its control socket, still holds VM 1's pages intact, and stores
    // and serves a good client's.
    let vm1 = usage_of(&ms, 1);
    assert_eq!(vm1["pages_held"], 64, "{vm1}");
    assert_holds(&fetch(&uri, 1).unwrap(), 64, 0x21);
    round_trip(&uri, 4, 32, 0x24);
    assert!(ms.child.try_wait().unwrap().is_none(), "{}", ms.stderr());
}

#[test]
fn a_restarted_memserver_is_reachable_on_its_port_and_stores_again() {
    let dir = Scratch::new("ms-restart");
    let (mut ms, uri) = memserver(&dir, &[]);
    round_trip(&uri, 1, 64, 0x31);
    ms.child.kill().unwrap();
    ms.child.wait().unwrap();
    drop(ms);
    assert!(
        session::open(&uri, SECRET.as_bytes(), &hello(Purpose::Store, 1)).is_err(),
        "nobody listens on {uri} any more"
    );

    let sock = dir.path("ms2.sock");
    let (ms, _) = VmProcess::command_until(
        &[
            "memserver",
            "--listen",
            &uri,
            "--secret",
            SECRET,
            "--control",
            sock.to_str().unwrap(),
        ],
        "memserver listening on",
    )
    .unwrap();
    // What the killed one held is gone with it, and a fetch says so.
    let e = fetch(&uri, 1).unwrap_err();
    assert!(e.contains("holds no pages of VM 0x1"), "{e}");
    round_trip(&uri, 1, 48, 0x32);
    assert_eq!(usage_of(&ms, 1)["pages_held"], 48);
}

#[test]
fn a_full_memserver_keeps_serving_what_it_held() {
    let dir = Scratch::new("ms-full");
    // 64 pages of data.
    let (ms, uri) = memserver(&dir, &["--max-mem", "256K"]);
    store(&uri, 1, 48, 0x41).unwrap();
    let e = store(&uri, 2, 32, 0x42).unwrap_err();
    assert!(e.contains("memserver is full"), "{e}");
    let u = ms.ctl("query-usage", json!({})).unwrap();
    assert_eq!(u["refused_full"], 1, "{u}");
    assert!(u["data_bytes"].as_u64().unwrap() <= 256 << 10, "{u}");
    // VM 1's pages are untouched by VM 2's refusal, and served whole.
    assert_eq!(usage_of(&ms, 1)["data_pages"], 48);
    assert_holds(&fetch(&uri, 1).unwrap(), 48, 0x41);
    // Zero pages take no memory: a store of them still fits.
    store(&uri, 3, 256, 0).unwrap();
    let vm3 = usage_of(&ms, 3);
    assert_eq!(
        (vm3["pages_held"].as_u64(), vm3["data_bytes"].as_u64()),
        (Some(256), Some(0)),
        "{vm3}"
    );
    assert_holds(&fetch(&uri, 3).unwrap(), 256, 0);
}

/// A peer that opens a connection, sends half a frame and goes silent must not keep other
/// hosts from opening sessions: the acceptor handshakes each connection on a thread of its own
/// (`pageserver/src/session.rs`, `Acceptor::next`); one at a time, such a peer held up every
/// new session for the handshake timeout (10 s), and a few of them for as long as they liked.
#[test]
fn a_silent_peer_does_not_hold_up_the_others() {
    let dir = Scratch::new("ms-silent");
    let (ms, uri) = memserver(&dir, &[]);
    let mut silent = TcpStream::connect(uri.strip_prefix("tcp:").unwrap()).unwrap();
    silent.write_all(&frame(HELLO, 100, &[])[..6]).unwrap();
    let port = silent.local_addr().unwrap().port();
    round_trip(&uri, 1, 16, 0x51);
    // Served while the silent peer was still connected, not after it was given up on.
    assert!(
        !ms.stderr().contains(&format!("127.0.0.1:{port}:")),
        "{}",
        ms.stderr()
    );
    drop(silent);
}
