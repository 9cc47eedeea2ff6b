//! The Rust side of `vmm/guest/abi.h`: addresses, ports, doorbell codes, and the config block and
//! mailbox layouts. Change both files together and bump [`ABI_VERSION`].

pub const CONFIG_GPA: u64 = 0x10_1000;
pub const MAILBOX_GPA: u64 = 0x10_2000;
pub const DATA_GPA: u64 = 0x40_0000;
pub const MAX_CPUS: usize = 32;
pub const MAX_RANGES: usize = 8;
pub const CONFIG_MAGIC: u64 = u64::from_le_bytes(*b"TSBMCFG1");
pub const MAILBOX_MAGIC: u64 = u64::from_le_bytes(*b"TSBMBOX1");
pub const ABI_VERSION: u32 = 1;
pub const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;
pub const AP_MAGIC: u32 = 0x5041_4d54;
pub const SERIAL_PORT: u16 = 0x3f8;
pub const DOORBELL_PORT: u16 = 0xf4;

pub const BELL_RUNNING: u32 = 1;
pub const BELL_DONE: u32 = 2;
pub const BELL_VERIFY: u32 = 3;
pub const BELL_EXCEPTION: u32 = 4;

pub const PATTERN_SEQUENTIAL: u32 = 1;
pub const PATTERN_UNIFORM: u32 = 2;
pub const PATTERN_HOTCOLD: u32 = 3;
pub const FLAG_VERIFY_AT_END: u32 = 1;
/// Exit bells, for QEMU's `isa-debug-exit` on the doorbell port: bells carry only their code
/// (no CPU, no vector), so that the first one ends QEMU with a status that tells done, verify
/// error and exception apart, and the running bell is not rung. The Tsubame VMM never sets it.
pub const FLAG_EXIT_BELLS: u32 = 2;

/// Size of `struct tsb_config`.
pub const CONFIG_SIZE: usize = 88 + 16 * MAX_RANGES;
/// Offset of the per-CPU slots in the mailbox, and the size of one slot.
pub const MAILBOX_SLOTS: u64 = 64;
pub const MAILBOX_SLOT_SIZE: u64 = 64;

/// A range of working-set pages (`struct tsb_range`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub base: u64,
    pub pages: u64,
}

/// `struct tsb_config`: what the guest reads at boot to know its workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigBlock {
    pub vcpus: u32,
    pub pattern: u32,
    pub seed: u64,
    pub steps: u64,
    pub write_ppm: u32,
    pub hot_pages_ppm: u32,
    pub hot_access_ppm: u32,
    pub flags: u32,
    pub report_every: u64,
    pub map_top: u64,
    pub vtable_gpa: u64,
    pub ranges: Vec<Range>,
}

impl ConfigBlock {
    /// The block as the guest lays it out in memory (little-endian).
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        assert!(
            self.ranges.len() <= MAX_RANGES,
            "at most {MAX_RANGES} ranges"
        );
        let mut b = [0u8; CONFIG_SIZE];
        let mut w = Writer {
            buf: &mut b,
            pos: 0,
        };
        w.u64(CONFIG_MAGIC);
        w.u32(ABI_VERSION);
        w.u32(CONFIG_SIZE.try_into().expect("small struct"));
        w.u32(self.vcpus);
        w.u32(self.pattern);
        w.u64(self.seed);
        w.u64(self.steps);
        w.u32(self.write_ppm);
        w.u32(self.hot_pages_ppm);
        w.u32(self.hot_access_ppm);
        w.u32(self.flags);
        w.u64(self.report_every);
        w.u64(self.map_top);
        w.u64(self.vtable_gpa);
        w.u32(self.ranges.len().try_into().expect("at most MAX_RANGES"));
        w.u32(0);
        for r in &self.ranges {
            w.u64(r.base);
            w.u64(r.pages);
        }
        b
    }

    /// Parses a block read from guest memory; `None` if the magic or version does not match.
    pub fn from_bytes(b: &[u8; CONFIG_SIZE]) -> Option<Self> {
        let mut r = Reader { buf: b, pos: 0 };
        if r.u64() != CONFIG_MAGIC || r.u32() != ABI_VERSION || r.u32() as usize != CONFIG_SIZE {
            return None;
        }
        let mut c = ConfigBlock {
            vcpus: r.u32(),
            pattern: r.u32(),
            seed: r.u64(),
            steps: r.u64(),
            write_ppm: r.u32(),
            hot_pages_ppm: r.u32(),
            hot_access_ppm: r.u32(),
            flags: r.u32(),
            report_every: r.u64(),
            map_top: r.u64(),
            vtable_gpa: r.u64(),
            ranges: Vec::new(),
        };
        let n = (r.u32() as usize).min(MAX_RANGES);
        r.u32();
        for _ in 0..n {
            c.ranges.push(Range {
                base: r.u64(),
                pages: r.u64(),
            });
        }
        Some(c)
    }

    /// Number of working-set pages.
    pub fn working_set_pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.pages).sum()
    }

    /// Guest-physical address of working-set page `index` (as the guest's `page_gpa`).
    pub fn page_gpa(&self, mut index: u64) -> Option<u64> {
        for r in &self.ranges {
            if index < r.pages {
                return Some(r.base + index * 4096);
            }
            index -= r.pages;
        }
        None
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let v = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("fixed size");
        self.pos += N;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// Guest-physical address of field `field` (0 = state, 1 = steps, ...) of CPU `cpu`'s slot.
pub fn mailbox_slot_field(cpu: usize, field: u64) -> u64 {
    MAILBOX_GPA + MAILBOX_SLOTS + cpu as u64 * MAILBOX_SLOT_SIZE + field * 8
}

/// Field indices of `struct tsb_cpu_slot`.
pub mod slot {
    pub const STATE: u64 = 0;
    pub const STEPS: u64 = 1;
    pub const WRITES: u64 = 2;
    pub const VERIFIED: u64 = 3;
    pub const ERR_KIND: u64 = 4;
    pub const ERR_GFN: u64 = 5;
    pub const ERR_EXPECTED: u64 = 6;
    pub const ERR_FOUND: u64 = 7;
}

/// `TSB_STATE_*` values of a mailbox slot.
pub mod state {
    pub const BOOTING: u64 = 0;
    pub const RUNNING: u64 = 1;
    pub const DONE: u64 = 2;
    pub const ERROR: u64 = 3;
}

/// `TSB_ERR_*`: what the in-guest verifier found.
pub fn verify_error_name(kind: u64) -> &'static str {
    match kind {
        1 => "corrupt page (checksum or header mismatch)",
        2 => "zeroed page (a page the guest wrote reads back as zeroes)",
        3 => "stale page (an older version of the page)",
        4 => "wrong page (the content of another page)",
        5 => "unexpected data (a page never written holds data)",
        _ => "unknown verify error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip() {
        let c = ConfigBlock {
            vcpus: 2,
            pattern: PATTERN_HOTCOLD,
            seed: 7,
            steps: 1000,
            write_ppm: 300_000,
            hot_pages_ppm: 100_000,
            hot_access_ppm: 900_000,
            flags: FLAG_VERIFY_AT_END,
            report_every: 0,
            map_top: 1 << 30,
            vtable_gpa: DATA_GPA,
            ranges: vec![Range {
                base: 0x50_0000,
                pages: 10,
            }],
        };
        assert_eq!(ConfigBlock::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(ConfigBlock::from_bytes(&[0u8; CONFIG_SIZE]), None);
    }
}
