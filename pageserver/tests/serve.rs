//! A page server and a page client over loopback TCP, each over an in-memory store: no KVM, no
//! userfaultfd. Demand requests, the push with its policies, withheld and stale pages, storing,
//! release mode, and hostile or vanishing peers.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tsubame_pages::{
    Gfn, Gpa, MemStore, MemoryLayout, PageSink, PageStore, RegionLayout, PAGE_BYTES, PAGE_SIZE,
};
use tsubame_pageserver::flow::BulkWriter;
use tsubame_pageserver::session::{self, Acceptor, Session};
use tsubame_pageserver::{
    ClientError, ClientEvents, Hello, HotPages, Message, PageClient, PageServer, Prepage, Purpose,
    PushOptions, SendKind, ServeState,
};

const SECRET: &[u8] = b"unit secret";
const WAIT: Duration = Duration::from_secs(20);

/// Two regions with a hole between them: 96 pages at 1 MiB, 64 pages at 4 MiB.
fn layout() -> MemoryLayout {
    MemoryLayout::from_regions(vec![
        RegionLayout {
            gpa: Gpa(1 << 20),
            size: 96 * PAGE_SIZE,
        },
        RegionLayout {
            gpa: Gpa(4 << 20),
            size: 64 * PAGE_SIZE,
        },
    ])
    .unwrap()
}

/// Page `gfn`'s test content.
fn page(gfn: Gfn) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    p[..8].copy_from_slice(&gfn.0.to_le_bytes());
    p[100] = 0x5a;
    p
}

/// A store holding every page of the layout: every third page zero, the rest `page(gfn)`.
fn full_store() -> MemStore {
    let l = layout();
    let s = MemStore::new(&l);
    for run in l.runs(u64::MAX) {
        for k in 0..run.pages {
            let g = run.gfn + k;
            if k % 3 == 0 {
                s.install_zero(g, 1).unwrap();
            } else {
                s.install(g, &page(g)).unwrap();
            }
        }
    }
    s
}

fn hello(purpose: Purpose) -> Hello {
    Hello {
        purpose,
        channel: tsubame_pageserver::Channel::Urgent,
        session: 0,
        vm: 0x77,
        layout: layout(),
        vcpus: 1,
        checkpoint_ms: 0,
    }
}

/// A connected session: (the dialling side's, the listening side's).
fn session_pair(purpose: Purpose) -> (Session, Session) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || Acceptor::new(l, SECRET, "test").next(|_| Ok(())).unwrap());
    let dialled = session::open(&uri, SECRET, &hello(purpose)).unwrap();
    (dialled, t.join().unwrap())
}

/// Completes the client once its store holds every page; records failures.
struct UntilFull {
    store: Arc<MemStore>,
    failures: Mutex<Vec<String>>,
    done: Mutex<Option<mpsc::Sender<()>>>,
    applied: AtomicUsize,
}

impl UntilFull {
    fn new(store: Arc<MemStore>) -> (Arc<Self>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (
            Arc::new(Self {
                store,
                failures: Mutex::new(Vec::new()),
                done: Mutex::new(Some(tx)),
                applied: AtomicUsize::new(0),
            }),
            rx,
        )
    }
}

impl ClientEvents for UntilFull {
    fn applied(&self, client: &PageClient) {
        self.applied.fetch_add(1, Ordering::Relaxed);
        if self.store.held_pages() == self.store.layout().total_pages() {
            client.complete();
            if let Some(tx) = self.done.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    }
    fn failed(&self, _: &PageClient, error: ClientError) {
        self.failures.lock().unwrap().push(error.to_string());
    }
}

fn options(prepage: Prepage) -> PushOptions {
    PushOptions {
        prepage,
        rate: None,
        hot: HotPages::new(&layout()),
        gate_timeout: None,
        start_on_demand: true,
        before_push: None,
        after_push: None,
        release: false,
    }
}

/// Serves `server` on `serving` (the side that has the pages), with a client into a fresh store
/// on `receiving`; returns the client, its store and events, and the "full" signal.
#[allow(clippy::type_complexity)]
fn serve(
    server: &Arc<PageServer<MemStore>>,
    serving: Session,
    receiving: Session,
    opts: PushOptions,
) -> (
    Arc<PageClient>,
    Arc<MemStore>,
    Arc<UntilFull>,
    mpsc::Receiver<()>,
) {
    let bulk = BulkWriter::new(serving.bulk, serving.rtt).unwrap();
    server
        .serve("the test client", serving.urgent, bulk, opts)
        .unwrap();
    let sink = Arc::new(MemStore::new(&layout()));
    let (events, full) = UntilFull::new(sink.clone());
    let client = PageClient::new(
        "the test server",
        &receiving.urgent,
        sink.clone(),
        events.clone(),
    )
    .unwrap();
    client.attach_replies(receiving.urgent);
    let c = client.clone();
    std::thread::spawn(move || c.receive_bulk(receiving.bulk));
    (client, sink, events, full)
}

fn assert_same_pages(a: &MemStore, b: &MemStore) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for run in layout().runs(8) {
        assert_eq!(
            a.read(run.gfn, run.pages, &mut x).unwrap(),
            b.read(run.gfn, run.pages, &mut y).unwrap(),
            "pages at {}",
            run.gfn
        );
    }
}

fn wait_state(server: &PageServer<MemStore>, want: &ServeState) {
    let deadline = std::time::Instant::now() + WAIT;
    while server.status().state != *want {
        assert!(
            std::time::Instant::now() < deadline,
            "server state {:?}, expected {want:?}",
            server.status().state
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn demand_replies_and_the_push_deliver_every_page_once() {
    for prepage in [Prepage::Address, Prepage::Bubble, Prepage::Hot] {
        // The client dials and is served (a destination fetching from a memserver).
        let (receiving, serving) = session_pair(Purpose::Fetch);
        let server = Arc::new(PageServer::new(full_store()));
        let mut opts = options(prepage);
        let high = Gpa(4 << 20).gfn();
        opts.hot.add(&[high + 3, high + 4, high + 60]);
        let (client, sink, events, full) = serve(&server, serving, receiving, opts);
        // Two faults before the push starts: asking opens the gate.
        for g in [Gfn(256 + 10), high + 20] {
            client.request(g).unwrap();
            client.read_replies().unwrap();
            assert!(sink.holds(g), "{prepage:?}: demand reply for {g} installed");
        }
        full.recv_timeout(WAIT).expect("every page arrives");
        wait_state(&server, &ServeState::Completed);
        assert_same_pages(&sink, server.store());
        let s = server.status();
        // The second request is not sent if the push brought every page first.
        assert!((1..=2).contains(&s.pages_demand), "{s:?}");
        assert_eq!(
            s.pages_pushed + s.pages_demand - s.pages_duplicate,
            layout().total_pages(),
            "{prepage:?}: {s:?}"
        );
        assert_eq!(s.zero_pages, (96 / 3) + (64 / 3 + 1));
        assert!(events.failures.lock().unwrap().is_empty());
        // The push ends after the last page it sent (the client may be full before).
        let deadline = std::time::Instant::now() + WAIT;
        while !client.is_push_done() {
            assert!(std::time::Instant::now() < deadline, "no PushDone");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn withheld_pages_are_never_pushed_and_stale_ones_are_sent_again() {
    let (receiving, serving) = session_pair(Purpose::Fetch);
    let server = Arc::new(PageServer::new(full_store()));
    // The receiver gets the second region from someone else.
    let high = Gpa(4 << 20).gfn();
    assert_eq!(server.withhold(high, 64), 64);
    // A precopy-style round sent pages 0..8 of the first region before; two of them went stale.
    let mut precopy = Vec::new();
    let mut scratch = tsubame_pageserver::server::Scratch::default();
    server
        .send(&mut precopy, &mut scratch, Gfn(256), 8, SendKind::Precopy)
        .unwrap();
    assert_eq!(server.unsend(Gfn(256 + 2), 2), 2);
    assert_eq!(server.pages_sent(), 64 + 6);
    let (client, sink, _, _) = serve(&server, serving, receiving, options(Prepage::Address));
    client.send(&Message::Resumed).unwrap(); // opens the push's gate
    let deadline = std::time::Instant::now() + WAIT;
    while !client.is_push_done() {
        assert!(std::time::Instant::now() < deadline, "push never ended");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        sink.held_pages(),
        96 - 6,
        "all of region 0 but what precopy had sent"
    );
    assert!(
        sink.holds(Gfn(256 + 2)) && sink.holds(Gfn(256 + 3)),
        "stale pages sent again"
    );
    assert!(!sink.holds(Gfn(256)) && !sink.holds(high));
    assert_eq!(server.status().pages_pushed, 96 - 6);
    // A withheld page still gets a demand reply: the receiver asked, so it needs it.
    client.request(high + 1).unwrap();
    client.read_replies().unwrap();
    assert!(sink.holds(high + 1));
}

#[test]
fn a_store_session_delivers_pages_that_are_acknowledged_once_stored() {
    // A source dials a memserver and sends it part of a VM's memory.
    let (dialled, accepted) = session_pair(Purpose::Store);
    assert_eq!(accepted.hello.purpose, Purpose::Store);
    let held = Arc::new(MemStore::new(&layout()));
    let (events, _) = UntilFull::new(held.clone());
    let receiver = PageClient::new("the source", &accepted.urgent, held.clone(), events).unwrap();
    let rx = std::thread::spawn(move || receiver.receive_bulk(accepted.bulk));
    let server = PageServer::new(full_store());
    let mut w = BulkWriter::new(dialled.bulk, dialled.rtt).unwrap();
    let mut sender = tsubame_pageserver::BulkSender::new(&server, None);
    sender
        .send(&mut w, Gfn(256), 96, SendKind::Precopy)
        .unwrap();
    w.wait_all_acknowledged().unwrap();
    assert_eq!(held.held_pages(), 96, "everything acknowledged is stored");
    let mut scratch = Vec::new();
    assert_eq!(
        held.read(Gfn(257), 1, &mut scratch).unwrap(),
        &page(Gfn(257))[..]
    );
    w.finish().unwrap();
    rx.join().unwrap();
}

#[test]
fn a_request_outside_the_vm_fails_the_session_with_a_reason() {
    let (receiving, serving) = session_pair(Purpose::Fetch);
    let server = Arc::new(PageServer::new(full_store()));
    let (client, _sink, _, _) = serve(&server, serving, receiving, options(Prepage::None));
    // The hole between the regions is not memory.
    client.request(Gfn(512)).unwrap();
    let e = client.read_replies().unwrap_err().to_string();
    assert!(e.contains("not this VM's memory"), "{e}");
    wait_state(
        &server,
        &ServeState::Failed(
            "lost the test client: the receiver asked for 0x200 (+1 pages), which is not this \
             VM's memory"
                .into(),
        ),
    );
}

#[test]
fn a_vanished_server_fails_the_client_and_installs_nothing_partial() {
    let (receiving, serving) = session_pair(Purpose::Fetch);
    let sink = Arc::new(MemStore::new(&layout()));
    let (events, _) = UntilFull::new(sink.clone());
    let client = PageClient::new(
        "the test server",
        &receiving.urgent,
        sink.clone(),
        events.clone(),
    )
    .unwrap();
    client.attach_replies(receiving.urgent);
    let c = client.clone();
    let bulk_rx = std::thread::spawn(move || c.receive_bulk(receiving.bulk));
    // The server sends half a page batch on the bulk channel, and one request goes
    // unanswered on the urgent one; then it dies.
    let mut frame = Vec::new();
    tsubame_pageserver::frame::write_pages(&mut frame, Gfn(256), &[7u8; 2 * PAGE_BYTES]).unwrap();
    use std::io::Write;
    let mut bulk = serving.bulk;
    bulk.write_all(&frame[..frame.len() - 100]).unwrap();
    client.request(Gfn(300)).unwrap();
    drop((bulk, serving.urgent));
    let e = client.read_replies().unwrap_err();
    assert!(e.to_string().starts_with("lost the test server"), "{e}");
    bulk_rx.join().unwrap();
    let failures = events.failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("closed"), "{failures:?}");
    assert_eq!(sink.held_pages(), 0, "no page of a cut batch is installed");
}

/// Reads frames off `r` until `until` (a message's name), returning each frame's end position
/// in the stream and the pages it covers (none for control messages); acknowledges each on
/// `acks` if given.
fn read_frames(
    r: &mut tsubame_pageserver::flow::Counted<std::io::BufReader<std::net::TcpStream>>,
    until: &str,
    mut acks: Option<&mut std::net::TcpStream>,
) -> Vec<(u64, Gfn, u64)> {
    let mut frames = Vec::new();
    loop {
        let m = Message::read_from(r).unwrap();
        let (gfn, pages) = match &m {
            Message::Pages { gfn, data } => (*gfn, (data.len() / PAGE_BYTES) as u64),
            Message::ZeroPages { gfn, count } => (*gfn, *count),
            _ => (Gfn(0), 0),
        };
        frames.push((r.bytes, gfn, pages));
        if let Some(a) = acks.as_deref_mut() {
            Message::Installed { bytes: r.bytes }.write_to(a).unwrap();
        }
        if m.name() == until {
            return frames;
        }
    }
}

/// Waits until `server` has released `pages` pages.
fn wait_released(server: &PageServer<MemStore>, pages: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while server.status().pages_released < pages {
        let s = server.status();
        assert!(std::time::Instant::now() < deadline, "not {pages}: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn release_mode_frees_what_the_receiver_acknowledged_and_never_sends_it_again() {
    // 4 MiB of data pages: more than the flow-control window, so the push stops until the
    // receiver acknowledges (a raw receiver here, which acknowledges what the test says).
    let big = MemoryLayout::from_regions(vec![RegionLayout {
        gpa: Gpa(1 << 20),
        size: 1024 * PAGE_SIZE,
    }])
    .unwrap();
    let store = MemStore::new(&big);
    for run in big.runs(u64::MAX) {
        for k in 0..run.pages {
            store.install(run.gfn + k, &page(run.gfn + k)).unwrap();
        }
    }
    let (receiving, serving) = session_pair(Purpose::Fetch);
    let server = Arc::new(PageServer::new(store));
    let mut opts = options(Prepage::Address);
    opts.hot = HotPages::new(&big);
    opts.release = true;
    server
        .serve(
            "the raw receiver",
            serving.urgent,
            BulkWriter::new(serving.bulk, serving.rtt).unwrap(),
            opts,
        )
        .unwrap();
    let first = Gfn(256);
    let last = first + 1023;
    let mut urgent = receiving.urgent;
    let mut acks = receiving.bulk.try_clone().unwrap();
    let mut bulk = tsubame_pageserver::flow::Counted {
        inner: std::io::BufReader::new(receiving.bulk),
        bytes: 0,
    };
    // A fault on the last page before the push gets there: a demand reply, which nobody
    // acknowledges.
    Message::PageRequest {
        gfn: last,
        count: 1,
    }
    .write_to(&mut urgent)
    .unwrap();
    assert!(matches!(
        Message::read_from(&mut urgent).unwrap(),
        Message::Pages { gfn, .. } if gfn == last
    ));
    // The push's first runs (64 pages each until the rate is measured) fill the window.
    let mut frames = Vec::new();
    while frames
        .last()
        .is_none_or(|f: &(u64, Gfn, u64)| f.1 + f.2 < first + 256)
    {
        frames.push(read_frames(&mut bulk, "Pages", None).pop().unwrap());
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.status().pages_released, 0, "nothing acknowledged");
    // Acknowledge the first run: the push sends another, then releases that run, and only it.
    let run_end = frames
        .iter()
        .filter(|f| f.1 + f.2 <= first + 64)
        .map(|f| f.0)
        .max()
        .unwrap();
    Message::Installed { bytes: run_end }
        .write_to(&mut acks)
        .unwrap();
    wait_released(&server, 64);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.status().pages_released, 64);
    assert!(!server.store().holds(first) && server.store().holds(first + 64));
    // A request for a released page is answered `Released`, never with its data.
    Message::PageRequest {
        gfn: first + 5,
        count: 1,
    }
    .write_to(&mut urgent)
    .unwrap();
    assert_eq!(
        Message::read_from(&mut urgent).unwrap(),
        Message::Released {
            gfn: first + 5,
            count: 1
        }
    );
    assert_eq!(server.status().pages_asked_after_release, 1);
    // Acknowledge everything up to `PushDone`: every pushed page goes, the demand reply stays
    // until `Complete`.
    read_frames(&mut bulk, "PushDone", Some(&mut acks));
    wait_released(&server, 1023);
    assert!(
        server.store().holds(last),
        "sent on demand: not acknowledged"
    );
    assert_eq!(server.store().held_pages(), 1);
    Message::Complete.write_to(&mut urgent).unwrap();
    wait_released(&server, 1024);
    let s = server.status();
    assert_eq!(s.state, ServeState::Completed);
    assert_eq!((s.pages_pushed, s.pages_demand), (1023, 1), "{s:?}");
    assert_eq!(server.store().held_pages(), 0);
}

#[test]
fn a_client_accepts_released_only_for_pages_it_holds() {
    let (receiving, serving) = session_pair(Purpose::Fetch);
    let sink = Arc::new(MemStore::new(&layout()));
    let (events, _) = UntilFull::new(sink.clone());
    let client =
        PageClient::new("the test server", &receiving.urgent, sink.clone(), events).unwrap();
    client.attach_replies(receiving.urgent);
    let mut server = serving.urgent;
    // Held here (the bulk run that brought it crossed the request): fine. Not held: the
    // page is lost for good, and the client says so instead of waiting forever.
    sink.install(Gfn(260), &page(Gfn(260))).unwrap();
    let [held, lost] = [260, 261].map(|g| {
        client.request(Gfn(g)).unwrap();
        Message::Released {
            gfn: Gfn(g),
            count: 1,
        }
        .write_to(&mut server)
        .unwrap();
        client.read_replies()
    });
    held.unwrap();
    let e = lost.unwrap_err().to_string();
    assert!(
        e.contains("released 0x105 (+1 pages)") && e.contains("not installed here"),
        "{e}"
    );
    assert!(!sink.holds(Gfn(261)));
}

#[test]
fn sent_runs_are_the_marked_pages_by_region() {
    let layout = MemoryLayout::for_size(8 << 30).unwrap(); // two regions, a hole between
    let server = PageServer::new(MemStore::new(&layout));
    assert!(server.sent_runs().is_empty());
    let low_end = Gfn(layout.regions[0].first_gfn().0 + layout.regions[0].pages());
    let high = layout.regions[1].first_gfn();
    server.withhold(Gfn(3), 2);
    server.withhold(Gfn(low_end.0 - 2), 2);
    server.withhold(high, 5);
    server.unsend(high + 1, 1);
    assert_eq!(
        server.sent_runs(),
        [
            (Gfn(3), 2),
            (Gfn(low_end.0 - 2), 2),
            (high, 1),
            (high + 2, 3)
        ]
    );
}
