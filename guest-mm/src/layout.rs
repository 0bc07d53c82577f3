//! Guest-physical address layout: RAM below the MMIO hole, the hole itself (device MMIO, the
//! IOAPIC and local APIC), and RAM above 4 GiB for whatever did not fit below.

pub use crate::gfn::PAGE_SIZE;
use crate::gfn::{FrameError, Gfn};
use thiserror::Error;
/// Start of the MMIO hole below 4 GiB. RAM never lives in [MMIO_HOLE_START, 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The MMIO hole in frames: its first frame, and the first frame above it.
pub const MMIO_HOLE_START_GFN: Gfn = MMIO_HOLE_START / PAGE_SIZE;
pub const MMIO_HOLE_END_GFN: Gfn = MMIO_HOLE_END / PAGE_SIZE;

/// A contiguous range of guest RAM and where it lives in the backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("guest memory size must be greater than zero")]
    Empty,
    #[error("guest memory size {0:#x} is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    #[error("guest memory size {0:#x} is too large for a 64-bit guest-physical address space")]
    TooLarge(u64),
}

/// The RAM ranges of a guest, in ascending guest-physical order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    ranges: Vec<RamRange>,
}

impl Layout {
    /// Lays out `size` bytes of RAM: up to the MMIO hole first, the rest above 4 GiB.
    pub fn new(size: u64) -> Result<Self, LayoutError> {
        if size == 0 {
            return Err(LayoutError::Empty);
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(LayoutError::Unaligned(size));
        }
        if size > (1 << 46) {
            return Err(LayoutError::TooLarge(size));
        }
        let low = size.min(MMIO_HOLE_START);
        let mut ranges = vec![RamRange {
            gpa: 0,
            size: low,
            file_offset: 0,
        }];
        if size > low {
            ranges.push(RamRange {
                gpa: MMIO_HOLE_END,
                size: size - low,
                file_offset: low,
            });
        }
        Ok(Self { ranges })
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// One past the highest guest-physical RAM address.
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, RamRange::end)
    }

    /// The range holding `gpa`, if it is RAM.
    pub fn range_of(&self, gpa: u64) -> Option<&RamRange> {
        self.ranges.iter().find(|r| r.contains(gpa))
    }

    /// The one RAM range holding all of frames `[gfn, gfn + count)`, if `count > 0` and they
    /// lie inside a single range (never across the MMIO hole or past the end). Overflow-safe
    /// for any guest-supplied values.
    pub fn range_of_frames(&self, gfn: u64, count: u64) -> Option<&RamRange> {
        let gpa = gfn.checked_mul(PAGE_SIZE)?;
        let end = count
            .checked_mul(PAGE_SIZE)
            .and_then(|len| gpa.checked_add(len))?;
        self.range_of(gpa).filter(|r| count > 0 && end <= r.end())
    }
}

/// Why `gfn` is not RAM in `layout`, if it is not.
pub fn check_ram(layout: &Layout, gfn: Gfn) -> Result<(), FrameError> {
    let Some(gpa) = gfn.checked_mul(PAGE_SIZE) else {
        return Err(FrameError::OutsideRam(gfn));
    };
    if layout.range_of(gpa).is_some() {
        Ok(())
    } else if gpa >= layout.end() {
        Err(FrameError::OutsideRam(gfn))
    } else {
        Err(FrameError::InMmioHole(gfn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_from_zero() {
        let l = Layout::new(256 << 20).unwrap();
        assert_eq!(
            l.ranges(),
            &[RamRange {
                gpa: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
        assert_eq!(l.end(), 256 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let l = Layout::new(4 << 30).unwrap();
        assert_eq!(l.ranges().len(), 2);
        assert_eq!(l.ranges()[0].end(), MMIO_HOLE_START);
        assert_eq!(l.ranges()[1].gpa, MMIO_HOLE_END);
        assert_eq!(l.ranges()[1].file_offset, MMIO_HOLE_START);
        assert_eq!(l.total_bytes(), 4 << 30);
        assert!(l.range_of(MMIO_HOLE_START).is_none());
        assert!(l.range_of(MMIO_HOLE_END - 1).is_none());
    }

    #[test]
    fn frame_ranges_must_lie_inside_one_ram_range() {
        let l = Layout::new(4 << 30).unwrap();
        let hole = MMIO_HOLE_START_GFN;
        assert_eq!(l.range_of_frames(0, 16).map(|r| r.gpa), Some(0));
        assert_eq!(l.range_of_frames(hole - 1, 1).map(|r| r.gpa), Some(0));
        assert!(l.range_of_frames(hole - 1, 2).is_none(), "across the hole");
        assert!(l.range_of_frames(5, 0).is_none(), "empty");
        assert!(
            l.range_of_frames(l.end() / PAGE_SIZE - 1, 2).is_none(),
            "past the end"
        );
        assert!(l.range_of_frames(u64::MAX, 1).is_none());
        assert!(l.range_of_frames(1, u64::MAX).is_none());
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(Layout::new(0), Err(LayoutError::Empty));
        assert_eq!(Layout::new(4097), Err(LayoutError::Unaligned(4097)));
    }
}
