//! Snapshot files: a VM's complete state in one file, to restore it in another process.
//!
//! ```text
//! offset 0   "TSUBAME\0"            magic
//!        8   u32 LE                 format version (SNAPSHOT_VERSION)
//!       12   u32 LE                 length N of the JSON state
//!       16   N bytes                VmState as JSON: layout, vCPUs, devices (self-describing)
//!            zero padding           up to the next 4 KiB boundary
//!            RAM                    every region of the layout in order, page for page;
//!                                   all-zero pages are holes (the file is sparse)
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::devices::DevicesState;
use crate::memory::{for_each_page_run, is_zero, GuestMemory, MemoryLayout, PAGE_BYTES, PAGE_SIZE};
use tsubame_uffd::{FaultEngine, PageSource, SourceError};

use crate::vstate::vcpu::VcpuState;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"TSUBAME\0";
pub const SNAPSHOT_VERSION: u32 = 1;
/// Upper bound on the JSON state, so that a corrupt length cannot make us allocate GiBs.
const MAX_STATE_JSON: u32 = 64 << 20;

/// Errors of snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a Tsubame snapshot (bad magic)")]
    NotASnapshot { path: String },
    #[error("{path} is snapshot format version {found}; this Tsubame reads version {SNAPSHOT_VERSION}: restore it with the Tsubame that wrote it")]
    Version { path: String, found: u32 },
    #[error("{path}: the VM state is malformed: {why}")]
    Malformed { path: String, why: String },
}

/// Everything about a VM except its RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Always "tsubame-vm-state".
    pub format: String,
    pub version: u32,
    pub layout: MemoryLayout,
    /// The workload the guest was started with (for people; the guest reads its config block).
    pub workload: String,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

pub const STATE_FORMAT: &str = "tsubame-vm-state";

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` and all of `memory` to `path`. The vCPUs must be paused.
pub fn write(path: &Path, state: &VmState, memory: &GuestMemory) -> Result<u64, SnapshotError> {
    let err = io_err(path);
    let json = serde_json::to_vec(state).expect("VM state serializes");
    let mut f = File::create(path).map_err(&err)?;
    f.write_all(SNAPSHOT_MAGIC).map_err(&err)?;
    f.write_all(&SNAPSHOT_VERSION.to_le_bytes()).map_err(&err)?;
    f.write_all(
        &u32::try_from(json.len())
            .expect("small state")
            .to_le_bytes(),
    )
    .map_err(&err)?;
    f.write_all(&json).map_err(&err)?;
    let ram_start = (16 + json.len() as u64).next_multiple_of(PAGE_SIZE);
    let mut off = ram_start;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for r in &state.layout.regions {
        let mut done = 0u64;
        while done < r.size {
            let n = usize::try_from((r.size - done).min(buf.len() as u64)).expect("chunk");
            memory
                .read(r.gpa + done, &mut buf[..n])
                .map_err(|e| SnapshotError::Malformed {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })?;
            for (i, page) in buf[..n].chunks(PAGE_BYTES).enumerate() {
                if !is_zero(page) {
                    f.write_all_at(page, off + i as u64 * PAGE_SIZE)
                        .map_err(&err)?;
                    written += PAGE_SIZE;
                }
            }
            off += n as u64;
            done += n as u64;
        }
    }
    f.set_len(off).map_err(&err)?; // trailing holes
    f.sync_all().map_err(&err)?;
    Ok(written)
}

/// Reads the state of the snapshot at `path`, and returns where its RAM starts.
pub fn read_state(path: &Path) -> Result<(VmState, u64), SnapshotError> {
    let err = io_err(path);
    let p = || path.display().to_string();
    let mut f = File::open(path).map_err(&err)?;
    let mut head = [0u8; 16];
    f.read_exact(&mut head)
        .map_err(|_| SnapshotError::NotASnapshot { path: p() })?;
    if &head[0..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot { path: p() });
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
        });
    }
    let len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    if len > MAX_STATE_JSON {
        return Err(SnapshotError::Malformed {
            path: p(),
            why: format!("state of {len} bytes"),
        });
    }
    let mut json = vec![0u8; len as usize];
    f.read_exact(&mut json).map_err(&err)?;
    let state: VmState = serde_json::from_slice(&json).map_err(|e| SnapshotError::Malformed {
        path: p(),
        why: e.to_string(),
    })?;
    if state.format != STATE_FORMAT || state.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Malformed {
            path: p(),
            why: format!("state format {} version {}", state.format, state.version),
        });
    }
    let ram_start = (16 + u64::from(len)).next_multiple_of(PAGE_SIZE);
    let size = f.metadata().map_err(&err)?.len();
    let need = ram_start + state.layout.total_bytes();
    if size < need {
        return Err(SnapshotError::Malformed {
            path: p(),
            why: format!("file has {size} bytes, the layout needs {need}: truncated copy?"),
        });
    }
    Ok((state, ram_start))
}

/// Copies the RAM of the snapshot at `path` into `memory` (whose layout must be the state's).
/// Holes and all-zero pages are skipped, so untouched guest memory stays unallocated.
pub fn read_memory(path: &Path, ram_start: u64, memory: &GuestMemory) -> Result<(), SnapshotError> {
    let err = io_err(path);
    let mut f = File::open(path).map_err(&err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = ram_start;
    for r in &memory.layout().regions.clone() {
        let mut done = 0u64;
        while done < r.size {
            // Jump over holes: SEEK_DATA finds the next written byte at or after `off`.
            let data = match f.seek(SeekFrom::Start(off)).and_then(|_| {
                nix::unistd::lseek(
                    &f,
                    i64::try_from(off).expect("offset"),
                    nix::unistd::Whence::SeekData,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(d) => u64::try_from(d).expect("non-negative offset"),
                Err(_) => off + (r.size - done), // ENXIO: no data left in the file
            };
            let skip = (data.saturating_sub(off) / PAGE_SIZE * PAGE_SIZE).min(r.size - done);
            off += skip;
            done += skip;
            if done >= r.size {
                break;
            }
            let n = usize::try_from((r.size - done).min(buf.len() as u64)).expect("chunk");
            f.read_exact_at(&mut buf[..n], off).map_err(&err)?;
            for (i, page) in buf[..n].chunks(PAGE_BYTES).enumerate() {
                if !is_zero(page) {
                    memory
                        .write(r.gpa + done + i as u64 * PAGE_SIZE, page)
                        .expect("in-layout write");
                }
            }
            off += n as u64;
            done += n as u64;
        }
    }
    Ok(())
}

/// A snapshot's RAM as a page source: guest pages are read from the file when a vCPU (or the
/// VMM) first touches them, and pushed in address order by [`SnapshotPages::prefetch_all`].
/// This is postcopy with a file as the page server ("lazy restore").
#[derive(Debug)]
pub struct SnapshotPages {
    file: File,
    path: String,
    ram_start: u64,
    layout: MemoryLayout,
}

impl SnapshotPages {
    pub fn open(path: &Path, ram_start: u64, layout: &MemoryLayout) -> Result<Self, SnapshotError> {
        Ok(Self {
            file: File::open(path).map_err(io_err(path))?,
            path: path.display().to_string(),
            ram_start,
            layout: layout.clone(),
        })
    }

    /// File offset of guest frame `gfn`.
    fn offset_of(&self, gfn: u64) -> Option<u64> {
        let gpa = gfn * PAGE_SIZE;
        let mut before = 0;
        for r in &self.layout.regions {
            if (r.gpa..r.end()).contains(&gpa) {
                return Some(self.ram_start + before + (gpa - r.gpa));
            }
            before += r.size;
        }
        None
    }

    /// Installs `pages` frames from `gfn` (inside one region): zero runs as zero pages, the rest
    /// with one copy per run.
    fn install_run(&self, engine: &FaultEngine, gfn: u64, pages: u64) -> Result<(), SourceError> {
        let err = |e: String| SourceError(format!("lazy restore from {}: {e}", self.path));
        let off = self
            .offset_of(gfn)
            .ok_or_else(|| err(format!("gfn {gfn:#x} is not guest RAM")))?;
        let mut buf =
            vec![0u8; usize::try_from(pages * PAGE_SIZE).map_err(|e| err(e.to_string()))?];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| err(e.to_string()))?;
        for_each_page_run(
            &buf,
            |_| true,
            |a, b, zero| {
                let at = gfn + a as u64;
                let r = if zero {
                    engine.install_zero(at, (b - a) as u64)
                } else {
                    engine.install(at, &buf[a * PAGE_BYTES..b * PAGE_BYTES])
                };
                r.map(drop).map_err(|e| err(e.to_string()))
            },
        )
    }

    /// Pushes every page not yet present, in address order, 2 MiB (512 pages) at a time:
    /// UFFDIO_COPY is fastest on large runs.
    pub fn prefetch_all(&self, engine: &FaultEngine) -> Result<(), SourceError> {
        const RUN: u64 = 512;
        for r in &self.layout.regions {
            let mut gfn = r.first_gfn();
            let end = r.first_gfn() + r.pages();
            while gfn < end {
                let n = RUN.min(end - gfn);
                if (gfn..gfn + n).any(|g| !engine.is_present(g)) {
                    self.install_run(engine, gfn, n)?;
                }
                gfn += n;
            }
        }
        Ok(())
    }
}

impl PageSource for SnapshotPages {
    fn request(&self, gfn: u64, engine: &FaultEngine) -> Result<(), SourceError> {
        self.install_run(engine, gfn, 1)
    }
}
