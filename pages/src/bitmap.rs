//! A fixed-size bitmap of atomics: one bit per guest page, set from any thread without locks.
//!
//! It also keeps the number of set bits, so that "is every page here?" costs one load: the
//! fault engine asks it after every install, and counting a 1 GiB guest's bitmap (4,096
//! words) each time took a tenth of the fault thread's time on the demand path.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
    /// Set bits; updated right after each change to `words`, by the thread that made it.
    ones: AtomicU64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` clear bits.
    pub fn new(bits: u64) -> Self {
        let n = usize::try_from(bits.div_ceil(64)).expect("bitmap fits memory");
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
            ones: AtomicU64::new(0),
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn word(&self, bit: u64) -> (&AtomicU64, u64) {
        assert!(bit < self.bits, "bit {bit} out of {}", self.bits);
        (
            &self.words[usize::try_from(bit / 64).expect("index")],
            1u64 << (bit % 64),
        )
    }

    /// Whether `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        let (w, m) = self.word(bit);
        w.load(Ordering::Acquire) & m != 0
    }

    /// Sets `bit`; returns whether it was already set.
    pub fn test_and_set(&self, bit: u64) -> bool {
        let (w, m) = self.word(bit);
        let was = w.fetch_or(m, Ordering::AcqRel) & m != 0;
        if !was {
            self.ones.fetch_add(1, Ordering::AcqRel);
        }
        was
    }

    /// Clears `bit`; returns whether it was set.
    pub fn test_and_clear(&self, bit: u64) -> bool {
        let (w, m) = self.word(bit);
        let was = w.fetch_and(!m, Ordering::AcqRel) & m != 0;
        if was {
            self.ones.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    /// Clears `bit`.
    pub fn clear(&self, bit: u64) {
        self.test_and_clear(bit);
    }

    /// Calls `f(word, mask)` for each word that `[first, first + count)` touches, with the
    /// mask of its bits in the range.
    fn for_each_word(&self, first: u64, count: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        if count == 0 {
            return;
        }
        let end = first + count;
        assert!(end <= self.bits, "bits {first}..{end} out of {}", self.bits);
        let mut b = first;
        while b < end {
            let lo = b % 64;
            let hi = (end - b / 64 * 64).min(64); // bits of this word in range: [lo, hi)
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[usize::try_from(b / 64).expect("index")], mask);
            b = b / 64 * 64 + hi;
        }
    }

    /// Sets `count` bits from `first`, a word at a time; returns how many were clear.
    pub fn set_range(&self, first: u64, count: u64) -> u64 {
        let mut newly = 0;
        self.for_each_word(first, count, |w, mask| {
            newly += u64::from(((w.fetch_or(mask, Ordering::AcqRel) & mask) ^ mask).count_ones());
        });
        self.ones.fetch_add(newly, Ordering::AcqRel);
        newly
    }

    /// Clears `count` bits from `first`, a word at a time; returns how many were set.
    pub fn clear_range(&self, first: u64, count: u64) -> u64 {
        let mut cleared = 0;
        self.for_each_word(first, count, |w, mask| {
            cleared += u64::from((w.fetch_and(!mask, Ordering::AcqRel) & mask).count_ones());
        });
        self.ones.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// The first clear bit in `[from, to)`, or `to` if they are all set: a word at a time.
    pub fn next_clear(&self, from: u64, to: u64) -> u64 {
        self.next_with(from, to, false)
    }

    /// The first set bit in `[from, to)`, or `to` if none is: a word at a time.
    pub fn next_set(&self, from: u64, to: u64) -> u64 {
        self.next_with(from, to, true)
    }

    /// The first bit in `[from, to)` whose value is `set`, or `to`.
    pub(crate) fn next_with(&self, from: u64, to: u64, set: bool) -> u64 {
        let to = to.min(self.bits);
        let mut b = from;
        while b < to {
            let word = self.words[usize::try_from(b / 64).expect("index")].load(Ordering::Acquire);
            let wanted = if set { word } else { !word } & (u64::MAX << (b % 64));
            if wanted != 0 {
                return (b / 64 * 64 + u64::from(wanted.trailing_zeros())).min(to);
            }
            b = (b / 64 + 1) * 64;
        }
        to
    }

    /// Number of set bits (one load). While other threads change the bitmap it may lag
    /// their changes briefly; the thread that makes the last change sees the final count.
    pub fn count_ones(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_count() {
        let b = AtomicBitmap::new(130);
        assert!(!b.test_and_set(129));
        assert!(b.test_and_set(129));
        b.clear(129);
        assert!(!b.get(129));
        b.test_and_set(129);
        b.set_range(0, 64);
        assert!(b.get(63) && !b.get(64));
        assert_eq!(b.count_ones(), 65);
    }

    #[test]
    fn range_operations_count_only_the_bits_they_change() {
        let b = AtomicBitmap::new(300);
        let count = || -> u64 { (0..300).map(|i| u64::from(b.get(i))).sum() };
        b.test_and_set(70);
        b.test_and_set(130);
        // Across three words, partly set already.
        assert_eq!(b.set_range(60, 80), 78);
        assert_eq!(b.count_ones(), 80);
        assert_eq!(count(), 80);
        assert!(!b.get(59) && b.get(60) && b.get(139) && !b.get(140));
        // Whole words, and the last partial word.
        assert_eq!(b.set_range(0, 300), 220);
        assert_eq!(b.count_ones(), 300);
        assert_eq!(b.clear_range(63, 2), 2);
        assert!(b.get(62) && !b.get(63) && !b.get(64) && b.get(65));
        assert_eq!(b.clear_range(0, 128), 126);
        assert_eq!(b.count_ones(), 172);
        assert_eq!(count(), 172);
        assert!(b.test_and_clear(299) && !b.test_and_clear(299));
        assert_eq!(b.set_range(5, 0), 0);
        assert_eq!(b.count_ones(), 171);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn a_range_past_the_end_panics() {
        AtomicBitmap::new(100).set_range(90, 11);
    }

    #[test]
    fn next_clear_skips_set_words_and_stops_at_the_end() {
        let b = AtomicBitmap::new(300);
        b.set_range(0, 200);
        assert_eq!(b.next_clear(0, 300), 200);
        assert_eq!(b.next_clear(5, 150), 150);
        assert_eq!(b.next_clear(250, 300), 250);
        b.set_range(200, 100);
        assert_eq!(b.next_clear(10, 300), 300);
        assert_eq!(b.next_clear(10, 1000), 300);
        b.clear(64);
        assert_eq!(b.next_clear(3, 300), 64);
        assert_eq!(b.next_clear(65, 300), 300);
    }

    #[test]
    fn next_set_skips_clear_words_and_stops_at_the_end() {
        let b = AtomicBitmap::new(300);
        assert_eq!(b.next_set(0, 300), 300);
        b.test_and_set(200);
        b.test_and_set(64);
        assert_eq!(b.next_set(0, 300), 64);
        assert_eq!(b.next_set(64, 300), 64);
        assert_eq!(b.next_set(65, 300), 200);
        assert_eq!(b.next_set(65, 150), 150);
        assert_eq!(b.next_set(201, 1000), 300);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_panics() {
        AtomicBitmap::new(10).get(10);
    }
}
