//! Snapshot files: a VM's complete state in one file, to restore it in another process.
//!
//! ```text
//! offset 0   "TSUBAME\0"            magic
//!        8   u32 LE                 format version (SNAPSHOT_VERSION)
//!       12   u32 LE                 length N of the JSON state
//!       16   N bytes                VmState as JSON: layout, vCPUs, devices (self-describing)
//!            zero padding           up to the next 4 KiB boundary
//!            RAM                    every region of the layout in order, page for page
//!                                   (page index i at RAM + i * 4 KiB); all-zero pages are
//!                                   holes (the file is sparse)
//! ```
//!
//! A snapshot's RAM is also a [`PageStore`] ([`SnapshotStore`]): a lazy restore fetches guest
//! pages from it on demand, like a migration fetches them from its source.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use tsubame_pages::{is_zero, run_buffer, Gfn, PageError, PageStore};

use crate::memory::{GuestMemory, MemoryLayout, PAGE_BYTES, PAGE_SIZE};
use crate::state::VmState;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"TSUBAME\0";
/// Version of the file format (the header and RAM's place in the file).
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

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` and all of `memory` to `path`. The vCPUs must be paused.
pub fn write(path: &Path, state: &VmState, memory: &GuestMemory) -> Result<u64, SnapshotError> {
    let err = io_err(path);
    let json = state.to_bytes();
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
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for run in state.layout.runs(buf.len() as u64 / PAGE_SIZE) {
        let n = usize::try_from(run.pages * PAGE_SIZE).expect("chunk");
        memory
            .read(run.gfn.gpa(), &mut buf[..n])
            .map_err(|e| SnapshotError::Malformed {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
        let off = ram_start + run.index * PAGE_SIZE;
        for (i, page) in buf[..n].chunks(PAGE_BYTES).enumerate() {
            if !is_zero(page) {
                f.write_all_at(page, off + i as u64 * PAGE_SIZE)
                    .map_err(&err)?;
                written += PAGE_SIZE;
            }
        }
    }
    let off = ram_start + state.layout.total_bytes();
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
    let state = VmState::from_bytes(&json).map_err(|e| SnapshotError::Malformed {
        path: p(),
        why: e.to_string(),
    })?;
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
    let f = File::open(path).map_err(&err)?;
    let mut buf = vec![0u8; 1 << 20];
    let layout = memory.layout();
    let mut index = 0;
    while let Some(run) = layout.run_at(index, buf.len() as u64 / PAGE_SIZE) {
        let off = ram_start + run.index * PAGE_SIZE;
        // Jump over holes: SEEK_DATA finds the next written byte at or after `off` (ENXIO:
        // there is none).
        let data = nix::unistd::lseek(
            &f,
            i64::try_from(off).expect("offset"),
            nix::unistd::Whence::SeekData,
        )
        .ok()
        .and_then(|d| u64::try_from(d).ok())
        .unwrap_or(u64::MAX);
        let hole = (data.saturating_sub(off) / PAGE_SIZE).min(run.pages);
        if hole > 0 {
            index += hole;
            continue;
        }
        let n = usize::try_from(run.pages * PAGE_SIZE).expect("chunk");
        f.read_exact_at(&mut buf[..n], off).map_err(&err)?;
        for (i, page) in buf[..n].chunks(PAGE_BYTES).enumerate() {
            if !is_zero(page) {
                memory
                    .write(run.gfn.gpa() + i as u64 * PAGE_SIZE, page)
                    .expect("in-layout write");
            }
        }
        index += run.pages;
    }
    Ok(())
}

/// A snapshot's RAM as a [`PageStore`]: pages are read from the file when asked for (a lazy
/// restore is postcopy with a file as the page server).
#[derive(Debug)]
pub struct SnapshotStore {
    file: File,
    path: String,
    ram_start: u64,
    layout: MemoryLayout,
}

impl SnapshotStore {
    /// The RAM of the snapshot at `path`, starting at `ram_start` (from [`read_state`]).
    pub fn open(path: &Path, ram_start: u64, layout: &MemoryLayout) -> Result<Self, SnapshotError> {
        Ok(Self {
            file: File::open(path).map_err(io_err(path))?,
            path: path.display().to_string(),
            ram_start,
            layout: layout.clone(),
        })
    }
}

impl PageStore for SnapshotStore {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read<'a>(
        &'a self,
        gfn: Gfn,
        pages: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PageError> {
        let at = self
            .layout
            .locate(gfn, pages)
            .ok_or(PageError::OutOfRange { gfn, pages })?;
        let buf = run_buffer(scratch, gfn, pages)?;
        self.file
            .read_exact_at(buf, self.ram_start + at.index * PAGE_SIZE)
            .map_err(|e| PageError::backend(format!("reading the snapshot {}", self.path), e))?;
        Ok(buf)
    }
}
