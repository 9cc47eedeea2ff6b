//! Guest memory: one anonymous private mapping per region of a [`MemoryLayout`].
//!
//! Guest RAM is written concurrently by vCPUs, by KVM and (for migration) by `UFFDIO_COPY`, so it
//! is never handed out as a Rust slice: all access goes through the copy helpers here, which use
//! raw-pointer copies. The layout (regions and their guest-physical addresses, from
//! `tsubame_pages`) is plain data that can be sent to another process and checked before any
//! memory moves.

use std::ptr::NonNull;

pub use tsubame_pages::{Gfn, Gpa, LayoutError, MemoryLayout, RegionLayout, PAGE_BYTES, PAGE_SIZE};

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("guest memory size {size} is out of range for this host")]
    OutOfRange { size: u64 },
    #[error("cannot map {size} bytes of guest memory: {source}; lower --mem or free host memory")]
    Map { size: u64, source: std::io::Error },
    #[error("guest-physical range {gpa}+{len:#x} is outside guest memory")]
    OutOfBounds { gpa: Gpa, len: u64 },
    #[error("cannot read /proc/self/pagemap: {source}")]
    Pagemap { source: std::io::Error },
    #[error("cannot release guest memory {gpa}+{len:#x} to the host (madvise): {source}")]
    Release {
        gpa: Gpa,
        len: u64,
        source: nix::Error,
    },
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

    /// The host address of each region's first byte, in layout order.
    pub fn hvas(&self) -> Vec<u64> {
        self.regions
            .iter()
            .map(|r| r.map.as_mut_ptr() as u64)
            .collect()
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
    fn host_ptr(&self, gpa: Gpa, len: u64) -> Result<*mut u8, MemoryError> {
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
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemoryError> {
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
    pub unsafe fn frozen_slice(&self, gpa: Gpa, len: usize) -> Result<&[u8], MemoryError> {
        let src = self.host_ptr(gpa, len as u64)?;
        // SAFETY: host_ptr checked the bounds; the mapping lives as long as `self`; the caller
        // guarantees that nothing writes it meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(src, len) })
    }

    /// Releases the pages of `[gpa, gpa + len)` (page-aligned, inside one region) to the host
    /// (`MADV_DONTNEED`): their memory is freed, and they read as zero afterwards (the mapping
    /// is private and anonymous), taking no memory until written. A migration source in
    /// release mode drops each page once the destination holds it.
    ///
    /// # Safety
    /// No slice from [`Self::frozen_slice`] over the range may be alive, and none may be taken
    /// until this returns: its bytes would change under it.
    pub unsafe fn release(&self, gpa: Gpa, len: u64) -> Result<(), MemoryError> {
        if gpa.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(MemoryError::OutOfBounds { gpa, len });
        }
        let ptr = self.host_ptr(gpa, len)?;
        let (Some(addr), Ok(n)) = (
            NonNull::new(ptr.cast::<std::ffi::c_void>()),
            usize::try_from(len),
        ) else {
            return Err(MemoryError::OutOfBounds { gpa, len });
        };
        // SAFETY: [ptr, ptr + n) lies inside one region's mapping (host_ptr checked it), which
        // `self` owns and keeps mapped; dropping its pages leaves it mapped, reading as zero.
        // Guest memory is only ever accessed through raw-pointer copies, except for the slices
        // of `frozen_slice`, of which the caller promises none over the range is alive.
        unsafe { nix::sys::mman::madvise(addr, n, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
            .map_err(|source| MemoryError::Release { gpa, len, source })
    }

    /// Which of the `pages` pages from `gpa` (inside one region) the kernel has ever populated
    /// (present, or swapped out), from `/proc/self/pagemap`, into `out`. A page it has not
    /// reads as zero: it can go as a zero marker without being read, which would map it.
    pub fn populated(
        &self,
        pagemap: &std::fs::File,
        gpa: Gpa,
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
    pub fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemoryError> {
        let dst = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: `dst` is valid for buf.len() bytes (checked by host_ptr) and does not overlap
        // `buf`, which lives outside guest memory.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        Ok(())
    }

    /// Reads a `u64` with one volatile load (for mailbox fields the guest updates live).
    pub fn read_u64_volatile(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        if gpa.0 % 8 != 0 {
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
        const CHUNK_PAGES: u64 = 64; // 256 KiB
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; usize::try_from(CHUNK_PAGES * PAGE_SIZE).expect("chunk")];
        for r in &self.layout.regions {
            hasher.update(&r.gpa.0.to_le_bytes());
            hasher.update(&r.size.to_le_bytes());
            for run in self.layout.split(r.first_gfn(), r.pages(), CHUNK_PAGES) {
                let n = usize::try_from(run.pages * PAGE_SIZE).expect("chunk");
                self.read(run.gfn.gpa(), &mut buf[..n])
                    .expect("in-region read");
                hasher.update(&buf[..n]);
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
    fn read_write_and_digest() {
        let l = MemoryLayout::for_size(16 << 20).unwrap();
        let m = GuestMemory::new(&l).unwrap();
        let d0 = m.digest();
        m.write(Gpa(0x5000), b"tsubame").unwrap();
        let mut b = [0u8; 7];
        m.read(Gpa(0x5000), &mut b).unwrap();
        assert_eq!(&b, b"tsubame");
        assert_ne!(m.digest(), d0);
        assert!(m.write(Gpa((16 << 20) - 2), b"xyz").is_err());
        assert_eq!(
            m.digest().to_string().parse::<Digest>().unwrap(),
            m.digest()
        );
    }

    #[test]
    fn released_pages_read_as_zero_and_are_no_longer_populated() {
        let l = MemoryLayout::for_size(16 << 20).unwrap();
        let m = GuestMemory::new(&l).unwrap();
        m.write(Gpa(0x5000), &[7u8; 2 * PAGE_BYTES]).unwrap();
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut populated = Vec::new();
        m.populated(&pagemap, Gpa(0x5000), 2, &mut populated)
            .unwrap();
        assert_eq!(populated, [true, true]);
        // SAFETY: no slice of this memory was ever taken.
        unsafe { m.release(Gpa(0x5000), PAGE_SIZE) }.unwrap();
        m.populated(&pagemap, Gpa(0x5000), 2, &mut populated)
            .unwrap();
        assert_eq!(populated, [false, true], "only the released page is gone");
        let mut b = [1u8; PAGE_BYTES];
        m.read(Gpa(0x5000), &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        m.read(Gpa(0x6000), &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        // SAFETY: as above.
        let unaligned = unsafe { m.release(Gpa(0x5800), PAGE_SIZE) };
        assert!(matches!(unaligned, Err(MemoryError::OutOfBounds { .. })));
    }
}
