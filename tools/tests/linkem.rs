//! `tsubame linkem`, the TCP link emulator, as a real process between a client and a small test
//! server: bytes arrive exact (with half-close), delay and rate are at least what was asked for,
//! bad arguments are explained, and a failing target does not take the proxy down. The faults
//! (cut, drop, reset, blackhole, set), driven through `--control` with `tsubame ctl`, do what
//! they say and lose no byte.
//!
//! Times are only checked from below: a lower bound is a correctness property, an upper bound
//! would fail on a busy shared machine.

use std::io::ErrorKind;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// A running `tsubame linkem`, killed on drop.
struct Linkem {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
    /// The control socket, removed on drop (a killed linkem leaves it behind).
    control: Option<PathBuf>,
}

impl Linkem {
    fn start(connect: SocketAddr, extra: &[&str]) -> Linkem {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsubame"))
            .args(["linkem", "--listen", "127.0.0.1:0", "--connect"])
            .arg(connect.to_string())
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tsubame linkem");
        let (tx, stderr) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("[linkem] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut l = Linkem {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            stderr,
            control: None,
        };
        let line = l.expect_line("forwarding");
        let addr = line
            .split("forwarding ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no address in '{line}'"));
        l.addr = addr.parse().unwrap();
        l
    }

    /// Waits for a stderr line containing `needle`.
    fn expect_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with '{needle}' from linkem: {e}"),
            }
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connecting to linkem");
        s.set_nodelay(true).unwrap();
        s
    }
}

impl Drop for Linkem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(sock) = &self.control {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// A test server. The first byte of a connection picks the mode: `e` echoes until EOF, then
/// half-closes; `r` reads until EOF, then sends everything back reversed (so data flows after
/// the client's half-close).
fn test_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                s.set_nodelay(true).unwrap();
                let mut mode = [0u8];
                if s.read_exact(&mut mode).is_err() {
                    return;
                }
                if mode[0] == b'e' {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                } else {
                    let mut all = Vec::new();
                    let _ = s.read_to_end(&mut all);
                    all.reverse();
                    let _ = s.write_all(&all);
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[3]
        })
        .collect()
}

/// Sends `data` (after the mode byte) in uneven writes from a thread, half-closes, and returns
/// everything received until EOF.
fn exchange(mut s: TcpStream, mode: u8, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        w.write_all(&[mode]).unwrap();
        let mut off = 0;
        let mut step = 1;
        while off < data.len() {
            let end = (off + step).min(data.len());
            w.write_all(&data[off..end]).unwrap();
            off = end;
            step = step * 7 % 200_003 + 1;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("reading through linkem");
    sender.join().unwrap();
    got
}

#[test]
fn bytes_arrive_exact_in_both_directions_with_half_close() {
    let server = test_server();
    // A small buffer makes the queues fill, so backpressure is exercised too.
    let link = Linkem::start(server, &["--delay", "1ms", "--buffer", "64K"]);
    let echo_data = pseudo_random(3 << 20, 0x1234_5678_9abc_def1);
    let rev_data = pseudo_random(3 << 20, 0x0fed_cba9_8765_4321);
    let (a, b) = (link.connect(), link.connect());
    let echo = {
        let d = echo_data.clone();
        std::thread::spawn(move || exchange(a, b'e', d))
    };
    let rev = exchange(b, b'r', rev_data.clone());
    let echoed = echo.join().unwrap();
    assert!(echoed == echo_data, "echoed bytes differ");
    let mut expected = rev_data;
    expected.reverse();
    assert!(
        rev == expected,
        "bytes sent back after the half-close differ"
    );
}

#[test]
fn every_round_trip_costs_at_least_twice_the_delay() {
    let server = test_server();
    let link = Linkem::start(server, &["--delay", "5ms"]);
    let mut s = link.connect();
    s.write_all(b"e").unwrap();
    let mut total = Duration::ZERO;
    for i in 0..20u8 {
        let t = Instant::now();
        s.write_all(&[i]).unwrap();
        let mut b = [0u8];
        s.read_exact(&mut b).unwrap();
        let rtt = t.elapsed();
        assert_eq!(b[0], i);
        assert!(
            rtt >= Duration::from_millis(10),
            "round trip {i} took {rtt:?}, less than 2 x 5 ms"
        );
        total += rtt;
    }
    eprintln!("mean round trip through --delay 5ms: {:?}", total / 20);
}

#[test]
fn rate_limits_throughput() {
    let server = test_server();
    let link = Linkem::start(server, &["--delay", "0", "--rate", "80Mbit"]);
    let data = pseudo_random(4_000_000, 7);
    let t = Instant::now();
    let echoed = exchange(link.connect(), b'e', data.clone());
    let took = t.elapsed();
    assert!(echoed == data, "echoed bytes differ");
    // 4 MB at 10 MB/s is 0.4 s in each direction (the two directions overlap).
    assert!(
        took >= Duration::from_millis(350),
        "4 MB through an 80 Mbit/s link took only {took:?}"
    );
    eprintln!("4 MB echoed through --rate 80Mbit in {took:?}");

    // The rate belongs to the link: two connections of 2 MB each share it.
    let t = Instant::now();
    let halves: Vec<_> = (0..2)
        .map(|i| {
            let s = link.connect();
            std::thread::spawn(move || exchange(s, b'e', pseudo_random(2_000_000, 11 + i)))
        })
        .collect();
    for h in halves {
        assert_eq!(h.join().unwrap().len(), 2_000_000);
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "2 x 2 MB through one 80 Mbit/s link took only {took:?}"
    );
    eprintln!("2 x 2 MB echoed through --rate 80Mbit in {took:?}");
}

fn fails_with(args: &[&str], needle: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_tsubame"))
        .arg("linkem")
        .args(args)
        .output()
        .expect("running tsubame linkem");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "linkem {args:?} should fail");
    assert!(
        e.contains(needle),
        "linkem {args:?}: expected '{needle}' in:\n{e}"
    );
}

#[test]
fn bad_arguments_are_explained() {
    let to = ["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9"];
    fails_with(&[&to[..], &["--delay", "5 parsecs"]].concat(), "500us, 4ms");
    fails_with(&[&to[..], &["--delay", "5"]].concat(), "number with a unit");
    fails_with(
        &[&to[..], &["--delay", "1ms", "--rate", "1G"]].concat(),
        "100Mbit, 1Gbit",
    );
    fails_with(
        &["--listen", "127.0.0.1:0", "--delay", "1ms"],
        "--connect <HOST:PORT>",
    );
    fails_with(
        &[
            "--listen",
            "nowhere",
            "--connect",
            "127.0.0.1:9",
            "--delay",
            "0",
        ],
        "HOST:PORT",
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    fails_with(
        &[
            "--listen",
            &taken,
            "--connect",
            "127.0.0.1:9",
            "--delay",
            "0",
        ],
        "cannot listen on",
    );
}

#[test]
fn an_unreachable_target_closes_only_that_connection() {
    // A port nobody listens on: bound, then released.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut link = Linkem::start(gone, &["--delay", "1ms"]);
    for _ in 0..2 {
        let mut s = link.connect();
        let mut buf = [0u8; 16];
        // The proxy closes the client's connection: EOF, or a reset.
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
        link.expect_line("cannot connect to");
        assert!(
            link.child.try_wait().unwrap().is_none(),
            "linkem exited after a failed connection"
        );
    }
    // SIGTERM ends it cleanly.
    let term = Command::new("kill")
        .args(["-TERM", &link.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = link.child.wait().unwrap();
    assert!(
        status.success(),
        "linkem exited with {status} after SIGTERM"
    );
    link.expect_line("stopped by SIGTERM");
}

/// A linkem with a control socket, and the socket's path.
fn controlled(connect: SocketAddr, name: &str, extra: &[&str]) -> (Linkem, PathBuf) {
    let sock = std::env::temp_dir().join(format!("linkem-{}-{name}.sock", std::process::id()));
    let mut link = Linkem::start(
        connect,
        &[&["--control", sock.to_str().unwrap()], extra].concat(),
    );
    link.control = Some(sock.clone());
    (link, sock)
}

/// `tsubame ctl --json SOCK ARGS...`: the reply, or the error object if the command failed.
fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_tsubame"))
        .args(["ctl", "--json"])
        .arg(sock)
        .args(args)
        .output()
        .expect("running tsubame ctl");
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|_| {
        panic!(
            "ctl {args:?}: no JSON in '{out}'; stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A connection in echo mode that has carried one round trip.
fn echoing(link: &Linkem) -> TcpStream {
    let mut s = link.connect();
    s.write_all(b"e!").unwrap();
    let mut b = [0u8];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"!");
    s
}

/// Whether the link closed or reset `s` (rather than leaving it open and silent).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("{n} bytes from a dropped link"),
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn a_cut_holds_bytes_for_its_duration_and_loses_none() {
    let (link, sock) = controlled(test_server(), "cut", &["--delay", "0"]);
    let s = echoing(&link);
    let start = Instant::now();
    let r = ctl(&sock, &["cut", "ms=800"]);
    assert_eq!(r["state"], "cut", "{r}");
    assert_eq!(r["faults"]["cuts"], 1);
    // Sent during the cut, echoed after it: nothing arrives before the cut is over.
    let data = pseudo_random(1 << 20, 99);
    let echoed = exchange(s, b'e', data.clone());
    let took = start.elapsed();
    assert!(echoed[1..] == data[..], "bytes echoed across a cut differ");
    assert!(
        took >= Duration::from_millis(750),
        "bytes crossed an 800 ms cut after only {took:?}"
    );
    let r = ctl(&sock, &["query-link"]);
    assert_eq!(r["state"], "up", "the cut did not end by itself: {r}");
    assert!(r["bytes"]["to_client"].as_u64().unwrap() > 1 << 20, "{r}");
}

#[test]
fn a_drop_closes_connections_and_refuses_new_ones_until_restore() {
    let (link, sock) = controlled(test_server(), "drop", &["--delay", "0"]);
    let mut s = echoing(&link);
    let r = ctl(&sock, &["drop"]);
    assert_eq!(r["state"], "dropped", "{r}");
    assert!(closed(&mut s), "a dropped link left the connection open");
    // A new connection is accepted and reset at once.
    let mut again = link.connect();
    let _ = again.write_all(b"e?");
    assert!(
        closed(&mut again),
        "a dropped link carried a new connection"
    );
    assert_eq!(ctl(&sock, &["restore"])["state"], "up");
    let _open = echoing(&link);
    let r = ctl(&sock, &["query-link"]);
    assert_eq!(r["faults"]["drops"], 1, "{r}");
    assert_eq!(r["connections"]["open"], 1, "{r}");
}

#[test]
fn a_reset_gives_the_peers_econnreset_and_new_connections_work() {
    let (link, sock) = controlled(test_server(), "reset", &["--delay", "1ms"]);
    let mut s = echoing(&link);
    let r = ctl(&sock, &["reset"]);
    assert_eq!(r["faults"]["resets"], 1, "{r}");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes (0 = EOF) instead of ECONNRESET"),
    }
    echoing(&link);
}

#[test]
fn a_blackhole_is_silent_until_restore_and_loses_nothing() {
    let (link, sock) = controlled(test_server(), "blackhole", &["--delay", "0"]);
    let mut s = echoing(&link);
    assert_eq!(ctl(&sock, &["blackhole"])["state"], "blackhole");
    s.write_all(b"x").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8];
    match s.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a blackholed link answered: {other:?}"),
    }
    assert_eq!(ctl(&sock, &["restore"])["state"], "up");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x", "the byte sent into the blackhole");
}

#[test]
fn set_changes_the_delay_and_rate_at_run_time() {
    let (link, sock) = controlled(test_server(), "set", &["--delay", "0"]);
    let mut s = echoing(&link);
    let r = ctl(&sock, &["set", "delay=60ms", "rate=1Gbit"]);
    assert_eq!(
        (r["delay"].as_str(), r["rate"].as_str()),
        (Some("60ms"), Some("1Gbit"))
    );
    let t = Instant::now();
    s.write_all(b"?").unwrap();
    let mut b = [0u8];
    s.read_exact(&mut b).unwrap();
    let rtt = t.elapsed();
    assert!(
        rtt >= Duration::from_millis(120),
        "a round trip after set delay=60ms took {rtt:?}"
    );
    let r = ctl(&sock, &["set", "delay=0", "rate=none"]);
    assert_eq!(
        (r["delay"].as_str(), r["rate"].as_str()),
        (Some("0ms"), None),
        "{r}"
    );
    assert_eq!(r["faults"]["sets"], 2);
    let e = ctl(&sock, &["set", "delay=5"]);
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("number with a unit"),
        "{e}"
    );
    let e = ctl(&sock, &["cut"]);
    assert!(e["error"]["desc"].as_str().unwrap().contains("ms="), "{e}");
}
