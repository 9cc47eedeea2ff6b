//! Guest addresses: [`Gfn`] (a guest frame number, the unit pages are tracked and moved in) and
//! [`Gpa`] (a guest-physical byte address). Both are plain `u64`s on the wire and in JSON.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

/// A guest frame number: guest-physical address / [`PAGE_SIZE`].
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Gfn(pub u64);

/// A guest-physical address in bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Gpa(pub u64);

impl Gfn {
    /// The address of the frame's first byte.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 * PAGE_SIZE)
    }

    /// `self + pages`, or `None` on overflow.
    pub fn checked_add(self, pages: u64) -> Option<Gfn> {
        self.0.checked_add(pages).map(Gfn)
    }

    /// `self - pages`, or frame 0.
    pub fn saturating_sub(self, pages: u64) -> Gfn {
        Gfn(self.0.saturating_sub(pages))
    }
}

impl Gpa {
    /// The frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 / PAGE_SIZE)
    }

    /// Whether the address starts a page.
    pub const fn is_page_aligned(self) -> bool {
        self.0 % PAGE_SIZE == 0
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }
}

impl Add<u64> for Gfn {
    type Output = Gfn;
    /// The frame `pages` frames further on.
    fn add(self, pages: u64) -> Gfn {
        Gfn(self.0 + pages)
    }
}

impl AddAssign<u64> for Gfn {
    fn add_assign(&mut self, pages: u64) {
        self.0 += pages;
    }
}

impl Sub for Gfn {
    type Output = u64;
    /// Frames from `other` to `self` (`self` must not be below `other`).
    fn sub(self, other: Gfn) -> u64 {
        self.0 - other.0
    }
}

impl Add<u64> for Gpa {
    type Output = Gpa;
    /// The address `bytes` bytes further on.
    fn add(self, bytes: u64) -> Gpa {
        Gpa(self.0 + bytes)
    }
}

impl Sub for Gpa {
    type Output = u64;
    /// Bytes from `other` to `self` (`self` must not be below `other`).
    fn sub(self, other: Gpa) -> u64 {
        self.0 - other.0
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gfn {:#x}", self.0)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_addresses_convert_and_count() {
        let g = Gfn(0x12);
        assert_eq!(g.gpa(), Gpa(0x12000));
        assert_eq!(Gpa(0x12fff).gfn(), g);
        assert!(Gpa(0x3000).is_page_aligned() && !Gpa(0x3001).is_page_aligned());
        assert_eq!(g + 3, Gfn(0x15));
        assert_eq!(Gfn(0x15) - g, 3);
        assert_eq!(Gfn(2).saturating_sub(5), Gfn(0));
        assert_eq!(Gfn(u64::MAX).checked_add(1), None);
        assert_eq!(format!("{g} {g:?} {}", g.gpa()), "0x12 gfn 0x12 0x12000");
        assert_eq!(serde_json::to_string(&g.gpa()).unwrap(), "73728");
    }
}
