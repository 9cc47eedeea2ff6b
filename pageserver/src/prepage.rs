//! Prepaging policies: the order in which a page server pushes the pages nobody asked for yet.

use serde::Serialize;
use tsubame_pages::{gfn_runs, AtomicBitmap, Gfn, MemoryLayout, PageRun};

/// The order of the background push.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prepage {
    /// Guest-physical address order.
    Address,
    /// Around each demand fault first (Yabusame's bubbling): the pages just before it, then
    /// the scan continues from the faulting page onward, wrapping around. The default: a guest
    /// walking through memory gets its pages pushed ahead of it rather than behind.
    #[default]
    Bubble,
    /// The pages the guest wrote during a short profile before switchover first (KVM dirty
    /// log; with precopy rounds, the pages written since the last round), then address order.
    Hot,
    /// No background push: pages move only when the guest faults on them, and the server
    /// serves until the guest has touched every page. For measuring the demand path.
    None,
}

impl std::str::FromStr for Prepage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "address" => Ok(Self::Address),
            "bubble" => Ok(Self::Bubble),
            "hot" => Ok(Self::Hot),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown prepaging policy '{s}': use address, bubble, hot or none"
            )),
        }
    }
}

/// Pages before a demand fault that [`Prepage::Bubble`] pushes at once (the scan then
/// continues after the fault).
pub const BUBBLE: u64 = 16;

/// The pages hot-first prepaging pushes first: a set of pages, kept as a bitmap (by page
/// index) so that adding what a drop pass or the switchover found costs only that many pages.
/// (A sorted list would have to be merged or sorted again each time: 6 ms for 480,000 pages,
/// spent either while the guest still writes, letting it dirty more pages that the downtime
/// then drops, or inside the downtime itself.) The push reads them back in address order.
#[derive(Debug)]
pub struct HotPages {
    layout: MemoryLayout,
    pages: AtomicBitmap,
}

impl HotPages {
    /// An empty set for a guest with this memory layout.
    pub fn new(layout: &MemoryLayout) -> Self {
        Self {
            layout: layout.clone(),
            pages: AtomicBitmap::new(layout.total_pages()),
        }
    }

    /// Adds `gfns` (frames of this layout, sorted; repeats count once; others are ignored).
    pub fn add(&mut self, gfns: &[Gfn]) {
        for (gfn, n) in gfn_runs(gfns, u64::MAX) {
            for run in self.layout.split(gfn, n, u64::MAX) {
                self.pages.set_range(run.index, run.pages);
            }
        }
    }

    /// How many distinct pages there are.
    pub fn len(&self) -> u64 {
        self.pages.count_ones()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pages in address order, as runs of at most `max` pages (none crosses a region).
    pub fn runs(&self, max: u64) -> Vec<PageRun> {
        let end = self.pages.len();
        let mut out = Vec::new();
        let mut i = self.pages.next_set(0, end);
        while i < end {
            let stop = self
                .pages
                .next_clear(i, end)
                .min(i.saturating_add(max.max(1)));
            let run = self
                .layout
                .run_at(i, stop - i)
                .expect("a set bit is a page of the layout");
            out.push(run);
            i = self.pages.next_set(i + run.pages, end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_pages::Gpa;

    #[test]
    fn hot_pages_count_once_and_come_back_in_runs() {
        let layout = MemoryLayout::for_size(8 << 30).unwrap();
        let high = Gpa(4 << 30).gfn();
        let low_end = Gpa(3 << 30).gfn();
        let mut h = HotPages::new(&layout);
        assert!(h.is_empty());
        h.add(&[Gfn(3), Gfn(63), Gfn(64), Gfn(900)]);
        h.add(&[Gfn(0), Gfn(3), Gfn(64), Gfn(65), low_end, high]);
        h.add(&[low_end.saturating_sub(1)]);
        assert_eq!(h.len(), 8, "the hole's frame is not a page");
        let runs: Vec<_> = h.runs(2).iter().map(|r| (r.gfn, r.pages)).collect();
        assert_eq!(
            runs,
            [
                (Gfn(0), 1),
                (Gfn(3), 1),
                (Gfn(63), 2),
                (Gfn(65), 1),
                (Gfn(900), 1),
                (low_end.saturating_sub(1), 1),
                (high, 1)
            ],
            "split at max, and at the region's end even where the indices go on"
        );
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!("hot".parse::<Prepage>(), Ok(Prepage::Hot));
        assert!("fast"
            .parse::<Prepage>()
            .unwrap_err()
            .contains("address, bubble"));
    }
}
