//! Which guest memory to compare, and its digests: [`workload_ranges`] and
//! [`ranges_without_firmware`], hashed by [`digest_ranges`] in the format of
//! [`GuestMemory::digest`]; [`MemoryDigests`] of a QEMU guest, [`workload_digest`] of a Tsubame
//! VM. See the [module docs](super) for which digest is an oracle between what.

use serde::Serialize;

use tsubame_vmm::guest::{abi, read_config};
use tsubame_vmm::memory::{
    Digest, Gpa, GuestMemory, MemoryError, MemoryLayout, RegionLayout, PAGE_SIZE,
};

/// Where the guest's boot code builds its page tables (`TSB_PT_GPA` in `vmm/guest/abi.h`).
pub const PAGE_TABLES_GPA: u64 = 0x20_0000;
/// Bytes reserved for them (`TSB_PT_PAGES` pages).
pub const PAGE_TABLES_BYTES: u64 = 256 * PAGE_SIZE;

/// Below this address the firmware (SeaBIOS: IVT, BDA, EBDA, ROM shadows) owns memory.
pub const FIRMWARE_LOW_END: u64 = 1 << 20;
/// SeaBIOS's temporary allocations (measured under QEMU 7.2 with 256 MiB to 1 GiB): the
/// [`SEABIOS_SCRATCH_BYTES`] that end this far below the top of low RAM.
pub const SEABIOS_SCRATCH_BELOW_TOP: u64 = 16 << 20;
pub const SEABIOS_SCRATCH_BYTES: u64 = 128 << 10;

/// Digests of a QEMU guest's memory after it finished (see the module docs for which to
/// compare with what).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryDigests {
    /// All RAM, exactly as [`GuestMemory::digest`] hashes it. Differs between two boots.
    #[serde(serialize_with = "serialize_digest")]
    pub ram: Digest,
    /// RAM except the firmware's ([`ranges_without_firmware`]): the same in every QEMU run of
    /// the same guest and steps, migrated or not.
    #[serde(serialize_with = "serialize_digest")]
    pub ram_without_firmware: Digest,
    /// Only [`workload_ranges`]: the same as a Tsubame VM's ([`workload_digest`]).
    #[serde(serialize_with = "serialize_digest")]
    pub workload: Digest,
}

fn serialize_digest<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

/// The parts of guest memory that only the workload determines: the mailbox, the guest's page
/// tables, its version table and its working set, in address order. Tsubame and QEMU leave
/// them the same after the same steps.
pub fn workload_ranges(block: &abi::ConfigBlock) -> Vec<RegionLayout> {
    let table_bytes = (block.working_set_pages() * 4).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut ranges = vec![
        RegionLayout {
            gpa: Gpa(abi::MAILBOX_GPA),
            size: PAGE_SIZE,
        },
        RegionLayout {
            gpa: Gpa(PAGE_TABLES_GPA),
            size: PAGE_TABLES_BYTES,
        },
        RegionLayout {
            gpa: Gpa(block.vtable_gpa),
            size: table_bytes,
        },
    ];
    ranges.extend(block.ranges.iter().map(|r| RegionLayout {
        gpa: Gpa(r.base),
        size: r.pages * PAGE_SIZE,
    }));
    ranges
}

/// All RAM of `layout` except what QEMU's firmware writes with boot-timing-dependent content:
/// the first MiB and SeaBIOS's scratch zone ([`SEABIOS_SCRATCH_BYTES`] ending
/// [`SEABIOS_SCRATCH_BELOW_TOP`] below the end of the first region; kept when the region is
/// too small to hold it there).
pub fn ranges_without_firmware(layout: &MemoryLayout) -> Vec<RegionLayout> {
    let mut ranges = Vec::new();
    for (i, r) in layout.regions.iter().enumerate() {
        let (gpa, end) = (r.gpa.0, r.end().0);
        let start = gpa.max(FIRMWARE_LOW_END);
        if start >= end {
            continue;
        }
        let scratch_end = end.saturating_sub(SEABIOS_SCRATCH_BELOW_TOP);
        let scratch_start = scratch_end.saturating_sub(SEABIOS_SCRATCH_BYTES);
        if i == 0 && scratch_start >= start {
            ranges.push(RegionLayout {
                gpa: Gpa(start),
                size: scratch_start - start,
            });
            ranges.push(RegionLayout {
                gpa: Gpa(scratch_end),
                size: end - scratch_end,
            });
        } else {
            ranges.push(RegionLayout {
                gpa: Gpa(start),
                size: end - start,
            });
        }
    }
    ranges.retain(|r| r.size > 0);
    ranges
}

/// XXH3-128 over `ranges` as [`GuestMemory::digest`] hashes its regions (each range's gpa and
/// size, little-endian, then its bytes); `read(gpa, buf)` fills `buf` from guest memory. Over
/// a layout's regions it equals [`GuestMemory::digest`].
pub fn digest_ranges<E>(
    ranges: &[RegionLayout],
    mut read: impl FnMut(Gpa, &mut [u8]) -> Result<(), E>,
) -> Result<Digest, E> {
    const CHUNK: usize = 256 << 10;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; CHUNK];
    for r in ranges {
        hasher.update(&r.gpa.0.to_le_bytes());
        hasher.update(&r.size.to_le_bytes());
        let mut off = 0u64;
        while off < r.size {
            let n = CHUNK.min(usize::try_from(r.size - off).unwrap_or(CHUNK));
            read(r.gpa + off, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(Digest(hasher.digest128()))
}

/// [`MemoryDigests::workload`] of a Tsubame VM's memory (pause its vCPUs first), reading the
/// config block from the memory itself.
pub fn workload_digest(memory: &GuestMemory) -> Result<Digest, MemoryError> {
    let block = read_config(memory).ok_or(MemoryError::OutOfBounds {
        gpa: Gpa(abi::CONFIG_GPA),
        len: abi::CONFIG_SIZE as u64,
    })?;
    digest_ranges(&workload_ranges(&block), |gpa, buf| memory.read(gpa, buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{qemu_config_block, qemu_layout};
    use tsubame_vmm::guest::WorkloadSpec;

    #[test]
    fn digest_ranges_over_the_layout_is_the_memory_digest() {
        let layout = MemoryLayout::for_size(16 << 20).unwrap();
        let memory = GuestMemory::new(&layout).unwrap();
        memory.write(Gpa(0x5000), b"tsubame").unwrap();
        memory.write(Gpa((16 << 20) - 8), b"qemu").unwrap();
        let d = digest_ranges(&layout.regions, |gpa, buf| memory.read(gpa, buf)).unwrap();
        assert_eq!(d, memory.digest());
    }
    #[test]
    fn workload_ranges_cover_tables_and_working_set() {
        let spec: WorkloadSpec = "uniform:ws=64M,seed=1".parse().unwrap();
        let block = qemu_config_block(&spec, 256 << 20, 10, 0, false).unwrap();
        let ranges = workload_ranges(&block);
        assert_eq!(ranges[0].gpa, Gpa(abi::MAILBOX_GPA));
        assert_eq!(ranges[1].gpa, Gpa(PAGE_TABLES_GPA));
        assert_eq!(ranges[2].gpa, Gpa(abi::DATA_GPA));
        assert_eq!(ranges[2].size, 16 * PAGE_SIZE, "16384 pages * 4 bytes");
        let ws: u64 = ranges[3..].iter().map(|r| r.size).sum();
        assert_eq!(ws, 64 << 20);
        let layout = qemu_layout(256 << 20).unwrap();
        for pair in ranges.windows(2) {
            assert!(pair[0].end() <= pair[1].gpa, "{ranges:?}");
        }
        assert!(ranges.iter().all(|r| layout.contains(r.gpa, r.size)));
    }
    #[test]
    fn ranges_without_firmware_skip_the_first_mib_and_seabios_scratch() {
        const MIB: u64 = 1 << 20;
        let small = ranges_without_firmware(&MemoryLayout::for_size(256 * MIB).unwrap());
        assert_eq!(
            small,
            vec![
                RegionLayout {
                    gpa: Gpa(MIB),
                    size: 0xefe_0000 - MIB
                },
                RegionLayout {
                    gpa: Gpa(0xf00_0000),
                    size: 16 * MIB
                },
            ]
        );
        let big = ranges_without_firmware(&MemoryLayout::for_size(8 << 30).unwrap());
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].end(), Gpa(3 << 30));
        assert_eq!(big[2].gpa, Gpa(4 << 30));
        assert_eq!(big[2].size, 5 << 30);
        // Too small to hold the scratch zone below 16 MiB from the top: all of it past 1 MiB.
        let tiny = ranges_without_firmware(&MemoryLayout::for_size(16 * MIB).unwrap());
        assert_eq!(
            tiny,
            vec![RegionLayout {
                gpa: Gpa(MIB),
                size: 15 * MIB
            }]
        );
    }
}
