//! The built-in guest: a small bare-metal multiboot image (C and assembly under `vmm/guest/`,
//! built by `build.rs`) that sets up long mode, drops to CPL3 and runs a deterministic workload
//! described by a config block ([`abi::ConfigBlock`]).
//!
//! This module holds the image, loads it into guest memory the way a multiboot loader would,
//! turns a [`WorkloadSpec`] (`hotcold:ws=512M,write=0.3,seed=7`) into a config block for a given
//! memory layout, and produces a patched image for QEMU (`-kernel`), so that the very same guest
//! runs under both.

pub mod abi;
mod workload;

pub use workload::{parse_size, Pattern, WorkloadError, WorkloadSpec};

use crate::memory::{Gpa, GuestMemory, MemoryError, MemoryLayout, PAGE_SIZE};

/// The guest image: a multiboot ELF32 file.
pub static GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// Where the VMM puts the multiboot information structure for the boot CPU.
pub const MULTIBOOT_INFO_GPA: u64 = 0x9000;

/// Errors of loading the guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the guest image is not an ELF file this loader understands: {0}")]
    BadElf(&'static str),
    #[error("a segment of the guest image does not fit in guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// A loadable segment of the image.
struct Segment<'a> {
    paddr: u64,
    data: &'a [u8],
    file_offset: usize,
    mem_size: u64,
}

/// Parsed view of a (32- or 64-bit, little-endian, x86) ELF executable.
struct Elf<'a> {
    entry: u64,
    segments: Vec<Segment<'a>>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}
fn le_u32(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        b.get(at..at + 4)?.try_into().ok()?,
    )))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl<'a> Elf<'a> {
    fn parse(b: &'a [u8]) -> Result<Self, ImageError> {
        if b.get(0..4) != Some(b"\x7fELF".as_slice()) {
            return Err(ImageError::BadElf("no ELF magic"));
        }
        let is64 = match b.get(4) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(ImageError::BadElf("unknown ELF class")),
        };
        if b.get(5) != Some(&1) {
            return Err(ImageError::BadElf("not little-endian"));
        }
        let bad = || ImageError::BadElf("truncated header");
        let (entry, phoff, phentsize, phnum) = if is64 {
            (le_u64(b, 24), le_u64(b, 32), le_u16(b, 54), le_u16(b, 56))
        } else {
            (le_u32(b, 24), le_u32(b, 28), le_u16(b, 42), le_u16(b, 44))
        };
        let (entry, phoff, phentsize, phnum) = (
            entry.ok_or_else(bad)?,
            phoff.ok_or_else(bad)?,
            phentsize.ok_or_else(bad)?,
            phnum.ok_or_else(bad)?,
        );
        let mut segments = Vec::new();
        for i in 0..phnum {
            let ph = to_usize(phoff + i * phentsize).ok_or_else(bad)?;
            let field = |off64: usize, off32: usize| {
                if is64 {
                    le_u64(b, ph + off64)
                } else {
                    le_u32(b, ph + off32)
                }
            };
            let p_type = le_u32(b, ph).ok_or_else(bad)?;
            if p_type != 1 {
                continue; // PT_LOAD only
            }
            let offset = field(8, 4).ok_or_else(bad)?;
            let paddr = field(24, 12).ok_or_else(bad)?;
            let filesz = field(32, 16).ok_or_else(bad)?;
            let memsz = field(40, 20).ok_or_else(bad)?;
            let start = to_usize(offset).ok_or_else(bad)?;
            let end = start
                .checked_add(to_usize(filesz).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            let data = b
                .get(start..end)
                .ok_or(ImageError::BadElf("segment beyond end of file"))?;
            if memsz < filesz {
                return Err(ImageError::BadElf("segment memory size below file size"));
            }
            segments.push(Segment {
                paddr,
                data,
                file_offset: start,
                mem_size: memsz,
            });
        }
        Ok(Self { entry, segments })
    }
}

/// Loads `image` into `memory` as a multiboot loader would: segments at their physical
/// addresses, zero-filled to their memory size. Returns the entry point.
pub fn load_image(memory: &GuestMemory, image: &[u8]) -> Result<u64, ImageError> {
    let elf = Elf::parse(image)?;
    for s in &elf.segments {
        memory.write(Gpa(s.paddr), s.data)?;
        let zeroes = s.mem_size - s.data.len() as u64;
        if zeroes > 0 {
            let z = vec![0u8; to_usize(zeroes).ok_or(ImageError::BadElf("huge segment"))?];
            memory.write(Gpa(s.paddr + s.data.len() as u64), &z)?;
        }
    }
    Ok(elf.entry)
}

/// Writes the multiboot information structure the boot CPU receives in EBX (memory sizes only).
pub fn write_multiboot_info(memory: &GuestMemory) -> Result<u64, MemoryError> {
    let low = memory.layout().regions[0].size;
    let mut info = [0u8; 16];
    info[0..4].copy_from_slice(&1u32.to_le_bytes()); // flags: mem_lower/mem_upper valid
    info[4..8].copy_from_slice(&639u32.to_le_bytes());
    let upper_kib = u32::try_from((low.saturating_sub(1 << 20)) / 1024).unwrap_or(u32::MAX);
    info[8..12].copy_from_slice(&upper_kib.to_le_bytes());
    memory.write(Gpa(MULTIBOOT_INFO_GPA), &info)?;
    Ok(MULTIBOOT_INFO_GPA)
}

/// Returns a copy of `image` whose built-in config block is `config`: the image to hand to
/// `qemu-system-x86_64 -kernel`, which has no other way to pass the block.
pub fn image_with_config(image: &[u8], config: &abi::ConfigBlock) -> Result<Vec<u8>, ImageError> {
    let elf = Elf::parse(image)?;
    let seg = elf
        .segments
        .iter()
        .find(|s| {
            s.paddr <= abi::CONFIG_GPA
                && abi::CONFIG_GPA + abi::CONFIG_SIZE as u64 <= s.paddr + s.data.len() as u64
        })
        .ok_or(ImageError::BadElf("no config block segment in the image"))?;
    let at = seg.file_offset + to_usize(abi::CONFIG_GPA - seg.paddr).expect("small offset");
    let mut out = image.to_vec();
    out[at..at + abi::CONFIG_SIZE].copy_from_slice(&config.to_bytes());
    Ok(out)
}

/// Reads the config block back from guest memory (e.g. after a restore).
pub fn read_config(memory: &GuestMemory) -> Option<abi::ConfigBlock> {
    let mut b = [0u8; abi::CONFIG_SIZE];
    memory.read(Gpa(abi::CONFIG_GPA), &mut b).ok()?;
    abi::ConfigBlock::from_bytes(&b)
}

/// Options of a workload run that are not part of the workload itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// vCPUs that run the workload.
    pub vcpus: u32,
    /// Steps per vCPU; 0 runs forever.
    pub steps: u64,
    /// Steps between serial progress lines; 0 = never.
    pub report_every: u64,
    /// Verify every page of the working set after the last step.
    pub verify_at_end: bool,
}

/// Where the guest's data may live in `layout`: RAM from [`abi::DATA_GPA`] on, except the top
/// [`FIRMWARE_RESERVE`] of the region below 4 GiB. Under QEMU, SeaBIOS keeps data there (its
/// tables in the last 128 KiB, scratch memory around 16 MiB below the top); a working set
/// reaching it would find foreign data. The same spans serve every VM, so that a guest's
/// memory is laid out alike under Tsubame and QEMU.
fn data_spans(layout: &MemoryLayout) -> Vec<(u64, u64)> {
    layout
        .regions
        .iter()
        .filter_map(|r| {
            let start = r.gpa.0.max(abi::DATA_GPA);
            let end = if r.end().0 <= 1 << 32 {
                r.end().0.saturating_sub(FIRMWARE_RESERVE)
            } else {
                r.end().0
            };
            (start < end).then_some((start, end))
        })
        .collect()
}

/// RAM at the top of the region below 4 GiB that the guest keeps no data in.
pub const FIRMWARE_RESERVE: u64 = 17 << 20;

/// Builds the config block for `spec` in a guest with `layout`.
///
/// The version table (4 bytes per working-set page) sits at [`abi::DATA_GPA`]; the working set
/// follows it, spilling into the high region when the low one is full.
pub fn config_block(
    spec: &WorkloadSpec,
    layout: &MemoryLayout,
    run: &RunOptions,
) -> Result<abi::ConfigBlock, WorkloadError> {
    if run.vcpus == 0 || run.vcpus as usize > abi::MAX_CPUS {
        return Err(WorkloadError::Vcpus {
            vcpus: run.vcpus,
            max: abi::MAX_CPUS,
        });
    }
    // Where data may go: RAM from DATA_GPA on, minus the firmware's zone below the top of the
    // low region.
    let spans = data_spans(layout);
    let avail: u64 = spans.iter().map(|(a, b)| (b - a) / PAGE_SIZE).sum();
    // ws pages + ceil(ws/1024) table pages must fit: largest ws is floor(avail*1024/1025).
    let max_ws = avail * 1024 / 1025;
    let ws_pages = match spec.ws_bytes {
        0 => max_ws,
        b => b.div_ceil(PAGE_SIZE),
    };
    if ws_pages == 0 || ws_pages > max_ws {
        return Err(WorkloadError::WorkingSetTooLarge {
            ws: ws_pages * PAGE_SIZE,
            max: max_ws * PAGE_SIZE,
        });
    }
    let table_pages = ws_pages.div_ceil(1024);
    let mut skip = table_pages; // pages taken by the version table at the start
    let mut need = ws_pages;
    let mut ranges = Vec::new();
    for &(start, end) in &spans {
        if need == 0 {
            break;
        }
        let mut pages = (end - start) / PAGE_SIZE;
        let s = skip.min(pages);
        skip -= s;
        pages -= s;
        let take = pages.min(need);
        if take > 0 {
            ranges.push(abi::Range {
                base: start + s * PAGE_SIZE,
                pages: take,
            });
            need -= take;
        }
    }
    debug_assert_eq!(need, 0);
    let (pattern, hot_pages_ppm, hot_access_ppm) = match spec.pattern {
        Pattern::Sequential => (abi::PATTERN_SEQUENTIAL, 0, 0),
        Pattern::Uniform => (abi::PATTERN_UNIFORM, 0, 0),
        Pattern::HotCold {
            hot_pages,
            hot_access,
        } => (abi::PATTERN_HOTCOLD, ppm(hot_pages), ppm(hot_access)),
    };
    Ok(abi::ConfigBlock {
        vcpus: run.vcpus,
        pattern,
        seed: spec.seed,
        steps: run.steps,
        write_ppm: ppm(spec.write_ratio),
        hot_pages_ppm,
        hot_access_ppm,
        flags: if run.verify_at_end {
            abi::FLAG_VERIFY_AT_END
        } else {
            0
        },
        report_every: run.report_every,
        map_top: layout.top().0,
        vtable_gpa: abi::DATA_GPA,
        ranges,
    })
}

/// A ratio in [0, 1] as parts per million.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to [0, 1e6]
fn ppm(ratio: f64) -> u32 {
    (ratio.clamp(0.0, 1.0) * 1e6).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_parses_and_has_config() {
        let elf = Elf::parse(GUEST_IMAGE).unwrap();
        assert!(elf.segments.iter().any(|s| s.paddr == abi::CONFIG_GPA));
        let layout = MemoryLayout::for_size(64 << 20).unwrap();
        let spec: WorkloadSpec = "uniform:ws=8M,seed=3".parse().unwrap();
        let run = RunOptions {
            vcpus: 1,
            steps: 10,
            report_every: 0,
            verify_at_end: true,
        };
        let cfg = config_block(&spec, &layout, &run).unwrap();
        let patched = image_with_config(GUEST_IMAGE, &cfg).unwrap();
        let mem = GuestMemory::new(&layout).unwrap();
        load_image(&mem, &patched).unwrap();
        assert_eq!(read_config(&mem), Some(cfg));
    }

    #[test]
    fn working_set_spills_into_high_memory() {
        let layout = MemoryLayout::for_size(4 << 30).unwrap();
        let spec: WorkloadSpec = "seq:ws=3G".parse().unwrap();
        let run = RunOptions {
            vcpus: 2,
            steps: 0,
            report_every: 0,
            verify_at_end: false,
        };
        let cfg = config_block(&spec, &layout, &run).unwrap();
        assert_eq!(cfg.working_set_pages(), (3u64 << 30) / PAGE_SIZE);
        // Low RAM up to the firmware's reserve, then high RAM.
        assert_eq!(cfg.ranges.len(), 2);
        assert_eq!(cfg.ranges[1].base, 4 << 30);
        for r in &cfg.ranges {
            assert!(layout.contains(Gpa(r.base), r.pages * PAGE_SIZE));
        }
        let low = &cfg.ranges[0];
        assert_eq!(
            low.base + low.pages * PAGE_SIZE,
            (3 << 30) - FIRMWARE_RESERVE,
            "data stops short of the firmware's reserve"
        );
        // the table does not overlap the data
        assert!(
            cfg.ranges[0].base
                >= abi::DATA_GPA + cfg.working_set_pages().div_ceil(1024) * PAGE_SIZE
        );
    }

    #[test]
    fn working_set_too_large_is_explained() {
        let layout = MemoryLayout::for_size(64 << 20).unwrap();
        let spec: WorkloadSpec = "uniform:ws=64M".parse().unwrap();
        let run = RunOptions {
            vcpus: 1,
            steps: 0,
            report_every: 0,
            verify_at_end: false,
        };
        let e = config_block(&spec, &layout, &run).unwrap_err();
        assert!(e.to_string().contains("raise --mem"), "{e}");
    }
}
