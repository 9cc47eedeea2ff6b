//! Runs of pages inside a buffer (zero or data, for zero markers and single copies) and runs of
//! consecutive frames in a sorted list of frames (what a dirty log returns).

use crate::{Gfn, PAGE_BYTES};

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

/// Runs of consecutive frames in a sorted list, at most `max` pages each: (first, pages).
pub fn gfn_runs(mut gfns: &[Gfn], max: u64) -> impl Iterator<Item = (Gfn, u64)> + '_ {
    std::iter::from_fn(move || take_run(&mut gfns, max))
}

/// Takes the first run of consecutive frames, at most `max` pages, off a sorted list: its first
/// frame and its length (`None` once the list is empty).
pub fn take_run(gfns: &mut &[Gfn], max: u64) -> Option<(Gfn, u64)> {
    let (&first, _) = gfns.split_first()?;
    let mut n = 1;
    while n < gfns.len() && gfns[n] == first + n as u64 && (n as u64) < max {
        n += 1;
    }
    *gfns = &gfns[n..];
    Some((first, n as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn gfn_runs_split_at_gaps_and_at_max() {
        let gfns: Vec<Gfn> = [1, 2, 3, 7, 8, 20].into_iter().map(Gfn).collect();
        let runs: Vec<_> = gfn_runs(&gfns, 2).collect();
        assert_eq!(runs, [(Gfn(1), 2), (Gfn(3), 1), (Gfn(7), 2), (Gfn(20), 1)]);
        assert_eq!(gfn_runs(&[], 4).count(), 0);
        let mut rest = &gfns[..];
        assert_eq!(take_run(&mut rest, 8), Some((Gfn(1), 3)));
        assert_eq!(rest, &gfns[3..]);
    }
}
