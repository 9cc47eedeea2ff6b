//! The physical limits the benchmarks compare against, measured in the same run: TCP over
//! loopback (4 KiB request/response round trip, bulk throughput), and the local demand-paging
//! floors (a host thread, and a guest, whose pages an in-process userfaultfd handler serves).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tsubame_uffd::{FaultEngine, FetchError, Fetcher};
use tsubame_vmm::memory::Gfn;
use tsubame_vmm::memory::{GuestMemory, MemoryLayout};
use tsubame_vmm::paging::owners::Owner;
use tsubame_vmm::paging::DemandPaging;
use tsubame_vmm::{SerialOutput, Vm, VmConfig, WaitOutcome};

/// TCP over loopback.
#[derive(Clone, Debug, Serialize)]
pub struct Loopback {
    /// A 16-byte request answered by 4 KiB, one at a time (what a demand fault costs on the wire).
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// The same with both ends spinning on non-blocking sockets (no wakeups): the lower bound
    /// of a demand round trip when two CPUs are free for the two ends.
    pub spinning_rtt_p50_us: f64,
    pub spinning_rtt_p99_us: f64,
    /// One connection, 1 MiB writes.
    pub throughput_gb_per_s: f64,
}

fn pair() -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// Percentile `p` (0..1) of sorted durations, in microseconds.
#[allow(clippy::cast_precision_loss)]
pub fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_nanos() as f64 / 1e3
}

/// Reads exactly `buf.len()` bytes; with `spin`, from a non-blocking socket, retrying at once
/// instead of sleeping. `Ok(false)`: the peer closed the connection first.
fn read_all(s: &mut TcpStream, buf: &mut [u8], spin: bool) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if spin && e.kind() == std::io::ErrorKind::WouldBlock => {
                std::hint::spin_loop();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes all of `buf`; with `spin`, to a non-blocking socket, retrying at once.
fn write_all(s: &mut TcpStream, buf: &[u8], spin: bool) -> std::io::Result<()> {
    let mut put = 0;
    while put < buf.len() {
        match s.write(&buf[put..]) {
            Ok(n) => put += n,
            Err(e) if spin && e.kind() == std::io::ErrorKind::WouldBlock => {
                std::hint::spin_loop();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `n` request/response round trips (16 bytes out, 4 KiB back) between two threads, sorted.
/// With `spin`, both ends poll non-blocking sockets instead of sleeping in the kernel, as
/// Tsubame's demand path does while a reply is due.
fn round_trips(n: usize, spin: bool) -> Result<Vec<Duration>> {
    let (mut c, mut s) = pair()?;
    c.set_nonblocking(spin)?;
    s.set_nonblocking(spin)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let mut req = [0u8; 16];
        let page = [7u8; 4096];
        while read_all(&mut s, &mut req, spin)? {
            write_all(&mut s, &page, spin)?;
        }
        Ok(()) // client done
    });
    let mut page = [0u8; 4096];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        write_all(&mut c, &[1u8; 16], spin)?;
        if !read_all(&mut c, &mut page, spin)? {
            bail!("the loopback server closed the connection");
        }
        rtts.push(t.elapsed());
    }
    drop(c);
    server.join().expect("loopback server")?;
    rtts.sort_unstable();
    Ok(rtts)
}

/// Measures loopback TCP: `round_trips` 4 KiB round trips (sleeping, then spinning) and
/// `bytes` of bulk transfer.
#[allow(clippy::cast_precision_loss)]
pub fn loopback(round_trips_n: usize, bytes: u64) -> Result<Loopback> {
    let rtts = round_trips(round_trips_n, false)?;
    let spun = round_trips(round_trips_n, true)?;

    let (mut c, mut s) = pair()?;
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                k => got += k as u64,
            }
        }
    });
    let chunk = vec![9u8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let got = sink.join().expect("loopback sink")?;
    let secs = t.elapsed().as_secs_f64();
    if got != sent {
        bail!("loopback lost data: sent {sent}, received {got}");
    }
    Ok(Loopback {
        rtt_p50_us: percentile_us(&rtts, 0.5),
        rtt_p99_us: percentile_us(&rtts, 0.99),
        spinning_rtt_p50_us: percentile_us(&spun, 0.5),
        spinning_rtt_p99_us: percentile_us(&spun, 0.99),
        throughput_gb_per_s: sent as f64 / secs / 1e9,
    })
}

/// Local demand paging with no network: what a fault costs when the page is in this process.
#[derive(Clone, Debug, Serialize)]
pub struct LocalFloor {
    /// A host thread reading one word of each missing page in turn (fault -> handler thread ->
    /// `UFFDIO_COPY` -> wake).
    pub host_thread_us_per_page: f64,
    /// The fault engine's own view of those faults (fault read -> installed).
    pub host_engine_p50_us: f64,
    pub host_engine_p99_us: f64,
}

/// Installs a page of its gfn's byte value at once, from the fault thread.
struct Filled;

impl Fetcher for Filled {
    fn request(&self, gfn: Gfn, engine: &FaultEngine) -> Result<(), FetchError> {
        #[allow(clippy::cast_possible_truncation)]
        let page = [gfn.0 as u8; 4096];
        engine
            .install(gfn, &page)
            .map(drop)
            .map_err(|e| FetchError(e.to_string()))
    }
}

/// The host-thread floor over `pages` pages.
#[allow(clippy::cast_precision_loss)]
pub fn host_floor(pages: u64) -> Result<LocalFloor> {
    let layout = MemoryLayout::for_size(pages * 4096)?;
    let memory = GuestMemory::new(&layout)?;
    // The engine alone, with a fetcher that has every page at hand: no owner lookup either.
    let paging = DemandPaging::new(&memory, "benchmark", Owner::Zero)?;
    paging.engine().start(Arc::new(Filled))?;
    let mut word = [0u8; 8];
    let t = Instant::now();
    for p in 0..pages {
        memory.read(Gfn(p).gpa(), &mut word)?;
        #[allow(clippy::cast_possible_truncation)]
        if word[0] != p as u8 {
            bail!("page {p} came in wrong");
        }
    }
    let per_page = t.elapsed().as_secs_f64() * 1e6 / pages as f64;
    let stats = paging.stats();
    Ok(LocalFloor {
        host_thread_us_per_page: per_page,
        host_engine_p50_us: stats.demand_p50_us.unwrap_or(0.0),
        host_engine_p99_us: stats.demand_p99_us.unwrap_or(0.0),
    })
}

/// A guest whose demand faults an in-process handler serves (the local floor).
#[derive(Clone, Debug, Serialize)]
pub struct GuestFloor {
    /// Guest steps per second with every page local.
    pub local_steps_per_s: f64,
    /// Guest µs per step when each step faults on a page the handler reads from a local file.
    pub faulting_step_us: f64,
    /// The fault engine's view of those faults (fault read -> installed): what installing a
    /// page costs without a network, the engine-side floor.
    pub engine_p50_us: f64,
    pub engine_p99_us: f64,
}

/// A guest that first-touches pages served by an in-process userfaultfd handler: a VM with a
/// sequential workload runs one pass over its working set, is saved, and is restored with
/// demand paging only (no prefetch, the pages come from the snapshot file when touched).
#[allow(clippy::cast_precision_loss)]
pub fn guest_floor(
    mem_bytes: u64,
    workload: &str,
    dir: &Path,
    skip: u64,
    pages: u64,
) -> Result<GuestFloor> {
    let vm = Vm::new(&VmConfig {
        mem_bytes,
        vcpus: 1,
        workload: workload.parse()?,
        steps: 0,
        report_every: 0,
        verify_at_end: false,
        serial: SerialOutput::Discard,
    })?;
    vm.resume()?;
    let ws = vm_working_set(&vm)?;
    if vm.wait_steps(ws + 1000, Duration::from_secs(600)) != WaitOutcome::Reached {
        bail!("the guest did not finish its first pass: {:?}", vm.status());
    }
    let (t0, s0) = (Instant::now(), vm.progress().steps);
    std::thread::sleep(Duration::from_millis(300));
    let local_rate = (vm.progress().steps - s0) as f64 / t0.elapsed().as_secs_f64();
    vm.pause()?;
    let snap = dir.join("floor.snap");
    vm.save(&snap).context("saving the floor VM")?;
    drop(vm);
    let vm = Vm::restore_on_demand_only(&snap, &SerialOutput::Discard)?;
    vm.resume()?;
    let steps = || {
        let p = vm.progress();
        (!p.memory_pending).then_some(p.steps)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let start = loop {
        if let Some(s) = steps() {
            break s;
        }
        if Instant::now() > deadline {
            bail!("the restored guest made no progress");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (ta, sa) = loop {
        match steps() {
            Some(s) if s >= start + skip => break (Instant::now(), s),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let (tb, sb) = loop {
        match steps() {
            Some(s) if s >= sa + pages => break (Instant::now(), s),
            _ if Instant::now() > deadline => bail!("the restored guest stalled"),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let _ = std::fs::remove_file(&snap);
    let engine = vm
        .paging_stats()
        .context("the restored guest has no demand paging")?;
    Ok(GuestFloor {
        local_steps_per_s: local_rate,
        faulting_step_us: (tb - ta).as_secs_f64() * 1e6 / (sb - sa) as f64,
        engine_p50_us: engine.demand_p50_us.unwrap_or(0.0),
        engine_p99_us: engine.demand_p99_us.unwrap_or(0.0),
    })
}

fn vm_working_set(vm: &Vm) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = vm.progress();
        if p.working_set_pages > 0 {
            return Ok(p.working_set_pages);
        }
        if Instant::now() > deadline {
            bail!("the guest never reported its working set");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
