//! Guest frame numbers and ranges of them, and why a frame cannot be reclaimed.

use thiserror::Error;

/// The size of a guest frame (and of a host page on the 4 KiB backings).
pub const PAGE_SIZE: u64 = 4096;

/// A guest frame number: guest-physical address / 4 KiB.
pub type Gfn = u64;

/// `count` consecutive guest frames starting at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GfnRange {
    pub start: Gfn,
    pub count: u64,
}

impl GfnRange {
    pub fn new(start: Gfn, count: u64) -> Self {
        Self { start, count }
    }

    pub fn end(&self) -> Gfn {
        self.start + self.count
    }

    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn >= self.start && gfn < self.end()
    }

    pub fn iter(&self) -> impl Iterator<Item = Gfn> {
        self.start..self.end()
    }

    pub fn bytes(&self) -> u64 {
        self.count * PAGE_SIZE
    }
}

/// Why a frame a guest offered was not reclaimed. Every refused frame gets one of these; none
/// is dropped silently.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
pub enum FrameError {
    #[error("frame {0:#x} is beyond the end of guest RAM")]
    OutsideRam(Gfn),
    #[error("frame {0:#x} is in the MMIO hole, not RAM")]
    InMmioHole(Gfn),
    #[error("frame {0:#x} is already in the balloon (gathered for reclaim)")]
    AlreadyGathered(Gfn),
    #[error("frame {0:#x} is already in the balloon (released to the host)")]
    AlreadyReleased(Gfn),
    #[error("frame {0:#x} holds device state (e.g. a virtqueue) and cannot be reclaimed")]
    DeviceMapped(Gfn),
    #[error("frame {0:#x} is not in the balloon, so it cannot be given back")]
    NotInBalloon(Gfn),
    #[error("frame {0:#x} is in the balloon, so a device cannot map it")]
    InBalloon(Gfn),
    #[error(
        "frame {0:#x} is in a batch being reclaimed; it can be given back once the batch ends"
    )]
    InFlight(Gfn),
}

impl FrameError {
    pub fn gfn(&self) -> Gfn {
        match *self {
            FrameError::OutsideRam(g)
            | FrameError::InMmioHole(g)
            | FrameError::AlreadyGathered(g)
            | FrameError::AlreadyReleased(g)
            | FrameError::DeviceMapped(g)
            | FrameError::NotInBalloon(g)
            | FrameError::InBalloon(g)
            | FrameError::InFlight(g) => g,
        }
    }
}
