//! The shape of a VM's memory ([`MemoryLayout`]: regions of guest-physical RAM) and the one way
//! to walk it: [`PageRun`]s, runs of consecutive frames inside one region, each with its *page
//! index* (the frame's position when all regions' pages are numbered in layout order, the index
//! of every per-page bitmap).
//!
//! Layout rule (the same as QEMU's `pc` machine, so the built-in guest sees the same map under
//! both): below 3.5 GiB all RAM sits at guest-physical 0; from 3.5 GiB up, 3 GiB sit at 0 and the
//! rest starts at 4 GiB (the gap below 4 GiB is where a PC has its PCI hole).

use serde::{Deserialize, Serialize};

use crate::{AtomicBitmap, Gfn, Gpa, PAGE_SIZE};

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

/// Why a layout cannot be made or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("guest memory size {size} is not a multiple of 4 KiB; use e.g. 256M or 1G")]
    Unaligned { size: u64 },
    #[error("guest memory size {size} is out of range: use between 8 MiB and 250 GiB")]
    OutOfRange { size: u64 },
    #[error(
        "memory region {gpa}+{size:#x} is not page-aligned, empty, or overlaps the one before"
    )]
    BadRegion { gpa: Gpa, size: u64 },
}

/// One contiguous range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical address of the first byte (page-aligned).
    pub gpa: Gpa,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RegionLayout {
    /// First guest frame of the region.
    pub fn first_gfn(&self) -> Gfn {
        self.gpa.gfn()
    }
    /// One past the last frame.
    pub fn end_gfn(&self) -> Gfn {
        self.first_gfn() + self.pages()
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    /// One past the last guest-physical address.
    pub fn end(&self) -> Gpa {
        self.gpa + self.size
    }
    fn holds(&self, gfn: Gfn) -> bool {
        gfn >= self.first_gfn() && gfn < self.end_gfn()
    }
}

/// Consecutive frames `[gfn, gfn + pages)` inside one region; `index` is the page index of
/// `gfn` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub gfn: Gfn,
    pub pages: u64,
    pub index: u64,
}

impl PageRun {
    /// One past the run's last frame.
    pub fn end(&self) -> Gfn {
        self.gfn + self.pages
    }
}

/// Where a run of frames lies: its region, the page index of its first frame, and its byte
/// offset into the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub region: usize,
    pub index: u64,
    pub offset: u64,
}

/// The shape of a VM's memory: what migration sends first and checks on the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// The layout for `size` bytes of RAM.
    pub fn for_size(size: u64) -> Result<Self, LayoutError> {
        if size % PAGE_SIZE != 0 {
            return Err(LayoutError::Unaligned { size });
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(LayoutError::OutOfRange { size });
        }
        let low = if size < SPLIT_THRESHOLD {
            size
        } else {
            LOW_MEMORY_TOP
        };
        let mut regions = vec![RegionLayout {
            gpa: Gpa(0),
            size: low,
        }];
        if size > low {
            regions.push(RegionLayout {
                gpa: Gpa(HIGH_MEMORY_BASE),
                size: size - low,
            });
        }
        Ok(Self { regions })
    }

    /// A layout of these regions, which must be page-aligned, non-empty, in increasing order
    /// and apart (what a peer sends is checked with this before it is used).
    pub fn from_regions(regions: Vec<RegionLayout>) -> Result<Self, LayoutError> {
        let mut end = Gpa(0);
        for (i, r) in regions.iter().enumerate() {
            let bad = || LayoutError::BadRegion {
                gpa: r.gpa,
                size: r.size,
            };
            if !r.gpa.is_page_aligned() || r.size == 0 || r.size % PAGE_SIZE != 0 {
                return Err(bad());
            }
            if i > 0 && r.gpa < end {
                return Err(bad());
            }
            end = r.gpa.checked_add(r.size).ok_or_else(bad)?;
        }
        Ok(Self { regions })
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total RAM in pages (the length of every per-page bitmap).
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// One past the highest guest-physical address of RAM.
    pub fn top(&self) -> Gpa {
        self.regions.iter().map(|r| r.end()).max().unwrap_or(Gpa(0))
    }

    /// The page index of `gfn` (see the module docs), or `None` if `gfn` is not RAM.
    pub fn page_index(&self, gfn: Gfn) -> Option<u64> {
        self.locate(gfn, 1).map(|l| l.index)
    }

    /// The frame at page index `index`, or `None` past the last page.
    pub fn gfn_at(&self, index: u64) -> Option<Gfn> {
        let mut before = 0;
        for r in &self.regions {
            if index < before + r.pages() {
                return Some(r.first_gfn() + (index - before));
            }
            before += r.pages();
        }
        None
    }

    /// Where `[gfn, gfn + pages)` lies, if all of it is inside one region.
    pub fn locate(&self, gfn: Gfn, pages: u64) -> Option<Location> {
        let end = gfn.checked_add(pages)?;
        let mut before = 0;
        for (region, r) in self.regions.iter().enumerate() {
            if r.holds(gfn) {
                if end > r.end_gfn() {
                    return None;
                }
                let pages_in = gfn - r.first_gfn();
                return Some(Location {
                    region,
                    index: before + pages_in,
                    offset: pages_in * PAGE_SIZE,
                });
            }
            before += r.pages();
        }
        None
    }

    /// The region holding all of `[gpa, gpa + len)`, if one does.
    pub fn region_of(&self, gpa: Gpa, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && end <= r.end())
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains(&self, gpa: Gpa, len: u64) -> bool {
        self.region_of(gpa, len).is_some()
    }

    /// The run from page index `index`: up to `max` pages, ending at its region's end at the
    /// latest (`None` past the last page).
    pub fn run_at(&self, index: u64, max: u64) -> Option<PageRun> {
        let mut before = 0;
        for r in &self.regions {
            if index < before + r.pages() {
                let into = index - before;
                return Some(PageRun {
                    gfn: r.first_gfn() + into,
                    pages: max.min(r.pages() - into),
                    index,
                });
            }
            before += r.pages();
        }
        None
    }

    /// All of memory in layout order, in runs of at most `max` pages (none crosses a region).
    pub fn runs(&self, max: u64) -> impl Iterator<Item = PageRun> + '_ {
        let max = max.max(1);
        let mut index = 0;
        std::iter::from_fn(move || {
            let run = self.run_at(index, max)?;
            index += run.pages;
            Some(run)
        })
    }

    /// The pages whose bit in `bitmap` (by page index) is `set`, in layout order, in runs as
    /// long as the bitmap allows (none crosses a region). Bits changed meanwhile may or may
    /// not be seen.
    pub fn runs_where<'a>(
        &'a self,
        bitmap: &'a AtomicBitmap,
        set: bool,
    ) -> impl Iterator<Item = PageRun> + 'a {
        let end = bitmap.len();
        let (mut at, mut stop) = (0, 0);
        std::iter::from_fn(move || {
            if at >= stop {
                at = bitmap.next_with(stop, end, set);
                stop = bitmap.next_with(at, end, !set);
            }
            let run = self.run_at(at, stop - at).filter(|r| r.pages > 0)?;
            at += run.pages;
            Some(run)
        })
    }

    /// The parts of `[gfn, gfn + pages)` that are RAM, in runs of at most `max` pages (holes
    /// between regions are skipped; none crosses a region).
    pub fn split(&self, gfn: Gfn, pages: u64, max: u64) -> impl Iterator<Item = PageRun> + '_ {
        let max = max.max(1);
        let end = gfn.checked_add(pages).unwrap_or(Gfn(u64::MAX));
        let mut at = gfn;
        let mut before = 0;
        let mut region = 0;
        std::iter::from_fn(move || {
            while region < self.regions.len() {
                let r = &self.regions[region];
                let from = at.max(r.first_gfn());
                let to = end.min(r.end_gfn());
                if from < to {
                    let n = (to - from).min(max);
                    at = from + n;
                    return Some(PageRun {
                        gfn: from,
                        pages: n,
                        index: before + (from - r.first_gfn()),
                    });
                }
                before += r.pages();
                region += 1;
            }
            None
        })
    }
}

/// `size at gpa` per region, sizes in the largest binary unit that divides them.
impl std::fmt::Display for MemoryLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.regions.is_empty() {
            return f.write_str("no memory");
        }
        for (i, r) in self.regions.iter().enumerate() {
            if i > 0 {
                f.write_str(" + ")?;
            }
            let (n, unit) = [(30, "GiB"), (20, "MiB"), (10, "KiB")]
                .into_iter()
                .find(|(shift, _)| r.size % (1u64 << shift) == 0)
                .map_or((r.size, "bytes"), |(shift, unit)| (r.size >> shift, unit));
            write!(f, "{n} {unit} at {}", r.gpa)?;
        }
        Ok(())
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
                gpa: Gpa(0),
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
        assert_eq!(l.regions[1].gpa, Gpa(4 << 30));
        assert_eq!(l.total_bytes(), 8 << 30);
        assert_eq!(l.to_string(), "3 GiB at 0x0 + 5 GiB at 0x100000000");
        assert_eq!(l.top(), Gpa(9 << 30));
        assert_eq!(l.page_index(Gfn(0)), Some(0));
        let high = Gpa(4 << 30).gfn();
        let low_pages = (3 << 30) / PAGE_SIZE;
        assert_eq!(l.page_index(high), Some(low_pages));
        assert_eq!(l.gfn_at(low_pages), Some(high));
        assert_eq!(l.gfn_at(low_pages - 1), Some(Gfn(low_pages - 1)));
        assert_eq!(l.gfn_at(l.total_pages()), None);
        assert_eq!(
            l.page_index(Gpa(3 << 30).gfn()),
            None,
            "the hole is not RAM"
        );
    }

    #[test]
    fn layout_rejects_bad_sizes_and_regions() {
        assert!(matches!(
            MemoryLayout::for_size(4095 + (16 << 20)),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::for_size(1 << 20),
            Err(LayoutError::OutOfRange { .. })
        ));
        let r = |gpa, size| RegionLayout {
            gpa: Gpa(gpa),
            size,
        };
        assert!(MemoryLayout::from_regions(vec![r(0, 1 << 20), r(2 << 20, 1 << 20)]).is_ok());
        for bad in [
            vec![r(1, 1 << 20)],
            vec![r(0, 100)],
            vec![r(0, 0)],
            vec![r(0, 2 << 20), r(1 << 20, 1 << 20)],
            vec![r(u64::MAX - 4095, 8192)],
        ] {
            assert!(MemoryLayout::from_regions(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn locate_keeps_runs_inside_one_region() {
        let l = MemoryLayout::for_size(8 << 30).unwrap();
        let low_end = Gfn((3 << 30) / PAGE_SIZE);
        let loc = l.locate(low_end.saturating_sub(2), 2).unwrap();
        assert_eq!((loc.region, loc.offset), (0, (3 << 30) - 2 * PAGE_SIZE));
        assert!(
            l.locate(low_end.saturating_sub(2), 3).is_none(),
            "crosses the hole"
        );
        let high = Gpa(4 << 30).gfn();
        let loc = l.locate(high + 5, 10).unwrap();
        assert_eq!(loc.region, 1);
        assert_eq!(loc.index, (3 << 30) / PAGE_SIZE + 5);
        assert_eq!(loc.offset, 5 * PAGE_SIZE);
        assert!(l.locate(Gfn(u64::MAX), 2).is_none());
        assert_eq!(l.region_of(Gpa(4 << 30), 4096), Some(1));
        assert!(!l.contains(Gpa((3 << 30) - 4096), 8192));
    }

    #[test]
    fn runs_where_follow_the_bitmap_and_split_at_regions() {
        let l = MemoryLayout::from_regions(vec![
            RegionLayout {
                gpa: Gpa(0),
                size: 4 * PAGE_SIZE,
            },
            RegionLayout {
                gpa: Gpa(1 << 20),
                size: 4 * PAGE_SIZE,
            },
        ])
        .unwrap();
        let b = AtomicBitmap::new(l.total_pages());
        b.set_range(2, 4); // the last two pages of region 0, the first two of region 1
        let runs = |set| {
            l.runs_where(&b, set)
                .map(|r| (r.gfn.0, r.pages))
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(true), [(2, 2), (256, 2)]);
        assert_eq!(runs(false), [(0, 2), (258, 2)]);
        b.set_range(0, 8);
        assert_eq!(runs(false), []);
    }

    #[test]
    fn runs_cover_memory_once_in_order_and_split_at_regions() {
        let l = MemoryLayout::for_size(8 << 30).unwrap();
        // 3 GiB low (786,432 pages), 5 GiB high (1,310,720 pages), runs of at most 2^20.
        let runs: Vec<_> = l.runs(1 << 20).collect();
        let pages: Vec<u64> = runs.iter().map(|r| r.pages).collect();
        assert_eq!(pages, [786_432, 1 << 20, 262_144]);
        assert_eq!(runs[1].gfn, Gpa(4 << 30).gfn());
        assert_eq!(runs[1].index, 786_432);
        assert_eq!(runs[2].gfn, Gpa(4 << 30).gfn() + (1 << 20));
        assert_eq!(runs[2].index, 786_432 + (1 << 20));
        assert_eq!(pages.iter().sum::<u64>(), l.total_pages());
        let low_end = Gfn((3 << 30) / PAGE_SIZE);
        let high = Gpa(4 << 30).gfn();
        let parts: Vec<_> = l
            .split(low_end.saturating_sub(2), high - low_end + 5, 4)
            .collect();
        assert_eq!(
            parts,
            vec![
                PageRun {
                    gfn: low_end.saturating_sub(2),
                    pages: 2,
                    index: low_end.0 - 2
                },
                PageRun {
                    gfn: high,
                    pages: 3,
                    index: low_end.0
                },
            ]
        );
        assert_eq!(
            l.split(Gfn(10), 10, 4).map(|r| r.pages).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        assert_eq!(l.split(low_end, 5, 4).count(), 0, "all hole");
        assert_eq!(l.run_at(l.total_pages() - 1, 8).unwrap().pages, 1);
        assert!(l.run_at(l.total_pages(), 8).is_none());
    }
}
