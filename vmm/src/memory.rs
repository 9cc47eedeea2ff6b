//! Guest memory: one anonymous private mapping per region of a [`MemoryLayout`].
//!
//! Guest RAM is written concurrently by vCPUs, by KVM and (for migration) by `UFFDIO_COPY`, so it
//! is never handed out as a Rust slice: all access goes through the copy helpers here, which use
//! raw-pointer copies. The layout (regions and their guest-physical addresses) is plain data that
//! can be sent to another process and checked before any memory moves.
//!
//! Layout rule (the same as QEMU's `pc` machine, so the built-in guest sees the same map under
//! both): below 3.5 GiB all RAM sits at guest-physical 0; from 3.5 GiB up, 3 GiB sit at 0 and the
//! rest starts at 4 GiB (the gap below 4 GiB is where a PC has its PCI hole).

use std::ptr::NonNull;

use serde::{Deserialize, Serialize};

/// Size of a guest page: Tsubame tracks, moves and digests memory in 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a buffer length.
#[allow(clippy::cast_possible_truncation)] // 4096 fits every usize
pub const PAGE_BYTES: usize = PAGE_SIZE as usize;
/// Guests smaller than this have all their RAM at guest-physical 0.
pub const SPLIT_THRESHOLD: u64 = 0xE000_0000;
/// Larger guests have this much RAM at 0, and the rest from [`HIGH_MEMORY_BASE`].
pub const LOW_MEMORY_TOP: u64 = 3 << 30;
/// Where RAM above [`LOW_MEMORY_TOP`] continues.
pub const HIGH_MEMORY_BASE: u64 = 4 << 30;
/// Smallest guest Tsubame will create: the built-in guest needs its first 4 MiB plus data.
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest guest: the built-in guest maps at most 254 GiB of guest-physical space.
pub const MAX_MEMORY: u64 = 250 << 30;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {size} is not a multiple of 4 KiB; use e.g. 256M or 1G")]
    Unaligned { size: u64 },
    #[error("guest memory size {size} is out of range: use between 8 MiB and 250 GiB")]
    OutOfRange { size: u64 },
    #[error("cannot map {size} bytes of guest memory: {source}; lower --mem or free host memory")]
    Map { size: u64, source: std::io::Error },
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfBounds { gpa: u64, len: u64 },
    #[error("cannot read /proc/self/pagemap: {source}")]
    Pagemap { source: std::io::Error },
}

/// One contiguous range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical address of the first byte (page-aligned).
    pub gpa: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RegionLayout {
    /// First guest frame number of the region.
    pub fn first_gfn(&self) -> u64 {
        self.gpa / PAGE_SIZE
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// The shape of a VM's memory: what migration sends first and checks on the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// The layout for `size` bytes of RAM.
    pub fn for_size(size: u64) -> Result<Self, MemoryError> {
        if size % PAGE_SIZE != 0 {
            return Err(MemoryError::Unaligned { size });
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(MemoryError::OutOfRange { size });
        }
        let low = if size < SPLIT_THRESHOLD {
            size
        } else {
            LOW_MEMORY_TOP
        };
        let mut regions = vec![RegionLayout { gpa: 0, size: low }];
        if size > low {
            regions.push(RegionLayout {
                gpa: HIGH_MEMORY_BASE,
                size: size - low,
            });
        }
        Ok(Self { regions })
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total RAM in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// One past the highest guest-physical address of RAM.
    pub fn top(&self) -> u64 {
        self.regions.iter().map(|r| r.end()).max().unwrap_or(0)
    }

    /// Position of page `gfn` when all regions' pages are numbered in layout order (the index
    /// of per-page bitmaps), or `None` if `gfn` is not RAM.
    pub fn page_index(&self, gfn: u64) -> Option<u64> {
        let mut before = 0;
        for r in &self.regions {
            if (r.first_gfn()..r.first_gfn() + r.pages()).contains(&gfn) {
                return Some(before + gfn - r.first_gfn());
            }
            before += r.pages();
        }
        None
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.region_of(gpa, len).is_some()
    }

    fn region_of(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && end <= r.end())
    }
}

/// A host mapping of one region; unmapped on drop.
#[derive(Debug)]
struct HostRegion {
    layout: RegionLayout,
    map: memmap2::MmapRaw,
}

/// A VM's RAM: host mappings for every region of its layout.
#[derive(Debug)]
pub struct GuestMemory {
    layout: MemoryLayout,
    regions: Vec<HostRegion>,
}

/// The host view of one region, for KVM memory slots and userfaultfd registration.
#[derive(Clone, Copy, Debug)]
pub struct HostRange {
    pub layout: RegionLayout,
    /// Host virtual address of the region's first byte.
    pub hva: NonNull<u8>,
}

impl GuestMemory {
    /// Maps zero-filled anonymous private memory for every region of `layout`.
    pub fn new(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let regions = layout
            .regions
            .iter()
            .map(|r| {
                let size = usize::try_from(r.size)
                    .map_err(|_| MemoryError::OutOfRange { size: r.size })?;
                let map = memmap2::MmapOptions::new()
                    .len(size)
                    .map_anon()
                    .map_err(|source| MemoryError::Map {
                        size: r.size,
                        source,
                    })?;
                Ok(HostRegion {
                    layout: *r,
                    map: memmap2::MmapRaw::from(map),
                })
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        Ok(Self {
            layout: layout.clone(),
            regions,
        })
    }

    /// The layout this memory was created from.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Host ranges of all regions, in layout order.
    pub fn host_ranges(&self) -> Vec<HostRange> {
        self.regions
            .iter()
            .map(|r| HostRange {
                layout: r.layout,
                hva: NonNull::new(r.map.as_mut_ptr()).expect("mmap never returns null"),
            })
            .collect()
    }

    /// Host pointer for `[gpa, gpa + len)`, which must lie inside one region.
    fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let i = self
            .layout
            .region_of(gpa, len)
            .ok_or(MemoryError::OutOfBounds { gpa, len })?;
        let r = &self.regions[i];
        let offset = usize::try_from(gpa - r.layout.gpa).expect("region offsets fit usize");
        // SAFETY: region_of checked that [gpa, gpa+len) is inside this region's mapping, so the
        // offset stays within the mapping that `map` owns.
        Ok(unsafe { r.map.as_mut_ptr().add(offset) })
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: `src` is valid for buf.len() bytes (host_ptr checked the bounds) and cannot
        // overlap `buf`, which is host memory outside any guest mapping. The guest may write the
        // range concurrently; callers that need a consistent view pause the vCPUs first.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Guest memory at `[gpa, gpa + len)` (inside one region) as bytes, without a copy.
    ///
    /// # Safety
    /// Nothing may write the range while the slice lives: the vCPUs are paused for good (the
    /// source of a migration after its switchover) and no other thread writes guest memory.
    pub unsafe fn frozen_slice(&self, gpa: u64, len: usize) -> Result<&[u8], MemoryError> {
        let src = self.host_ptr(gpa, len as u64)?;
        // SAFETY: host_ptr checked the bounds; the mapping lives as long as `self`; the caller
        // guarantees that nothing writes it meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(src, len) })
    }

    /// Which of the `pages` pages from `gpa` (inside one region) the kernel has ever populated
    /// (present, or swapped out), from `/proc/self/pagemap`, into `out`. A page it has not
    /// reads as zero: it can go as a zero marker without being read, which would map it.
    pub fn populated(
        &self,
        pagemap: &std::fs::File,
        gpa: u64,
        pages: usize,
        out: &mut Vec<bool>,
    ) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        let hva = self.host_ptr(gpa, (pages * PAGE_BYTES) as u64)? as u64;
        let mut entries = vec![0u8; pages * 8];
        pagemap
            .read_exact_at(&mut entries, hva / PAGE_SIZE * 8)
            .map_err(|source| MemoryError::Pagemap { source })?;
        out.clear();
        out.extend(entries.chunks_exact(8).map(|e| {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            e & (1 << 63 | 1 << 62) != 0 // present | swapped
        }));
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let dst = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: `dst` is valid for buf.len() bytes (checked by host_ptr) and does not overlap
        // `buf`, which lives outside guest memory.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        Ok(())
    }

    /// Reads a `u64` with one volatile load (for mailbox fields the guest updates live).
    pub fn read_u64_volatile(&self, gpa: u64) -> Result<u64, MemoryError> {
        if gpa % 8 != 0 {
            return Err(MemoryError::OutOfBounds { gpa, len: 8 });
        }
        let p = self.host_ptr(gpa, 8)?.cast::<u64>();
        // SAFETY: p is 8-byte aligned (gpa is, and mappings are page-aligned) and in bounds.
        Ok(unsafe { std::ptr::read_volatile(p) })
    }

    /// A digest of all guest memory (and its layout), the determinism oracle of every test.
    ///
    /// Pause the vCPUs first: a running guest changes memory under the digest.
    pub fn digest(&self) -> Digest {
        const CHUNK: usize = 256 << 10;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; CHUNK];
        for r in &self.regions {
            hasher.update(&r.layout.gpa.to_le_bytes());
            hasher.update(&r.layout.size.to_le_bytes());
            let mut off = 0u64;
            while off < r.layout.size {
                let n = CHUNK.min(usize::try_from(r.layout.size - off).unwrap_or(CHUNK));
                self.read(r.layout.gpa + off, &mut buf[..n])
                    .expect("in-region read");
                hasher.update(&buf[..n]);
                off += n as u64;
            }
        }
        Digest(hasher.digest128())
    }
}

// SAFETY: GuestMemory only hands out copies and raw pointers; the mappings live as long as the
// object, and concurrent access to guest RAM is the documented contract of this module.
unsafe impl Send for GuestMemory {}
// SAFETY: as above: no method gives out references into guest RAM.
unsafe impl Sync for GuestMemory {}

/// Whether `page` is all zero bytes. Blocks of 256 bytes are each reduced with a fold that
/// vectorises, and the first non-zero block ends the search: a data page is usually told
/// apart in its first block, while a full-page fold read all 4 KiB of every page (a tenth of
/// the push thread's time).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Splits `buf` (whole pages) into maximal runs of consecutive pages that `wanted` selects and
/// that are all zero or all data, and calls `each(first, end, zero)` (page indices into `buf`)
/// for each run in order: zero runs travel as markers, data runs as one copy.
pub fn for_each_page_run<E>(
    buf: &[u8],
    wanted: impl Fn(usize) -> bool,
    each: impl FnMut(usize, usize, bool) -> Result<(), E>,
) -> Result<(), E> {
    for_each_page_run_hinted(buf, wanted, |_| false, each)
}

/// [`for_each_page_run`], with pages that `known_zero` selects taken as zero without reading
/// them (pages the kernel never populated, for one).
pub fn for_each_page_run_hinted<E>(
    buf: &[u8],
    wanted: impl Fn(usize) -> bool,
    known_zero: impl Fn(usize) -> bool,
    mut each: impl FnMut(usize, usize, bool) -> Result<(), E>,
) -> Result<(), E> {
    let pages = buf.len() / PAGE_BYTES;
    let zero_at = |k: usize| known_zero(k) || is_zero(&buf[k * PAGE_BYTES..(k + 1) * PAGE_BYTES]);
    let mut k = 0;
    // Whether page `k` is zero, when the previous run already looked (each page once).
    let mut looked: Option<bool> = None;
    while k < pages {
        if !wanted(k) {
            k += 1;
            looked = None;
            continue;
        }
        let zero = looked.take().unwrap_or_else(|| zero_at(k));
        let mut j = k + 1;
        while j < pages && wanted(j) {
            let z = zero_at(j);
            if z != zero {
                looked = Some(z);
                break;
            }
            j += 1;
        }
        each(k, j, zero)?;
        k = j;
    }
    Ok(())
}

/// A 128-bit XXH3 digest of guest memory, printed as 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub u128);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(Digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_from_3_5g() {
        let l = MemoryLayout::for_size(1 << 30).unwrap();
        assert_eq!(
            l.regions,
            vec![RegionLayout {
                gpa: 0,
                size: 1 << 30
            }]
        );
        let l = MemoryLayout::for_size(3 << 30).unwrap();
        assert_eq!(
            l.regions.len(),
            1,
            "3 GiB stays low, as on QEMU's pc machine"
        );
        let l = MemoryLayout::for_size(0xE000_0000).unwrap();
        assert_eq!(l.regions[0].size, 3 << 30);
        let l = MemoryLayout::for_size(8 << 30).unwrap();
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[1].gpa, 4 << 30);
        assert_eq!(l.total_bytes(), 8 << 30);
        assert_eq!(l.top(), 9 << 30);
        assert_eq!(l.page_index(0), Some(0));
        assert_eq!(
            l.page_index((4 << 30) / PAGE_SIZE),
            Some((3 << 30) / PAGE_SIZE)
        );
        assert_eq!(
            l.page_index((3 << 30) / PAGE_SIZE),
            None,
            "the hole is not RAM"
        );
    }

    #[test]
    fn layout_rejects_bad_sizes() {
        assert!(matches!(
            MemoryLayout::for_size(4095 + (16 << 20)),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::for_size(1 << 20),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_write_and_digest() {
        let l = MemoryLayout::for_size(16 << 20).unwrap();
        let m = GuestMemory::new(&l).unwrap();
        let d0 = m.digest();
        m.write(0x5000, b"tsubame").unwrap();
        let mut b = [0u8; 7];
        m.read(0x5000, &mut b).unwrap();
        assert_eq!(&b, b"tsubame");
        assert_ne!(m.digest(), d0);
        assert!(m.write((16 << 20) - 2, b"xyz").is_err());
        assert_eq!(
            m.digest().to_string().parse::<Digest>().unwrap(),
            m.digest()
        );
    }

    #[test]
    fn page_runs_split_zero_and_data() {
        let mut buf = vec![0u8; 6 * PAGE_BYTES];
        buf[2 * PAGE_BYTES] = 1; // page 2 holds data
        buf[3 * PAGE_BYTES + 9] = 1; // page 3 holds data
        let mut runs = Vec::new();
        for_each_page_run(
            &buf,
            |k| k != 5,
            |a, b, zero| {
                runs.push((a, b, zero));
                Ok::<(), ()>(())
            },
        )
        .unwrap();
        assert_eq!(runs, vec![(0, 2, true), (2, 4, false), (4, 5, true)]);
    }

    #[test]
    fn is_zero_looks_at_every_byte() {
        let mut page = vec![0u8; PAGE_BYTES];
        assert!(is_zero(&page));
        for at in [0, 255, 256, 2000, PAGE_BYTES - 1] {
            page[at] = 0x80;
            assert!(!is_zero(&page), "non-zero byte at {at} missed");
            page[at] = 0;
        }
    }

    #[test]
    fn hinted_runs_take_known_zero_pages_unread() {
        let buf = vec![7u8; 5 * PAGE_BYTES]; // every page holds data
        let mut runs = Vec::new();
        for_each_page_run_hinted(
            &buf,
            |k| k != 4,
            |k| k == 1 || k == 2,
            |a, b, zero| {
                runs.push((a, b, zero));
                Ok::<(), ()>(())
            },
        )
        .unwrap();
        assert_eq!(runs, vec![(0, 1, false), (1, 3, true), (3, 4, false)]);
    }
}
