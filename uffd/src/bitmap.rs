//! A fixed-size bitmap of atomics: one bit per guest page, set from any thread without locks.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` clear bits.
    pub fn new(bits: u64) -> Self {
        let n = usize::try_from(bits.div_ceil(64)).expect("bitmap fits memory");
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
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
        w.fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clears `bit`.
    pub fn clear(&self, bit: u64) {
        let (w, m) = self.word(bit);
        w.fetch_and(!m, Ordering::AcqRel);
    }

    /// Sets `count` bits from `first`.
    pub fn set_range(&self, first: u64, count: u64) {
        for b in first..first + count {
            self.test_and_set(b);
        }
    }

    /// Clears `count` bits from `first`.
    pub fn clear_range(&self, first: u64, count: u64) {
        for b in first..first + count {
            self.clear(b);
        }
    }

    /// The first clear bit in `[from, to)`, or `to` if they are all set: a word at a time.
    pub fn next_clear(&self, from: u64, to: u64) -> u64 {
        let to = to.min(self.bits);
        let mut b = from;
        while b < to {
            let word = self.words[usize::try_from(b / 64).expect("index")].load(Ordering::Acquire);
            let clear = !word & (u64::MAX << (b % 64));
            if clear != 0 {
                return (b / 64 * 64 + u64::from(clear.trailing_zeros())).min(to);
            }
            b = (b / 64 + 1) * 64;
        }
        to
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
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
    #[should_panic(expected = "out of")]
    fn out_of_range_panics() {
        AtomicBitmap::new(10).get(10);
    }
}
