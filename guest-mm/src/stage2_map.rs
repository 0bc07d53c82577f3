//! The stage-2 map: one byte per 4 KiB guest frame holding its reclaim state and the VMM's
//! reverse-map bits about it.
//!
//! ```text
//! Mapped ──gather──▶ Gathered ──zap──▶ Zapped ──release──▶ Released
//!   ▲                   │                                      │
//!   └──── return ───────┴──────────────── return ──────────────┘
//! ```
//!
//! The host offset that backs a frame is not stored: it follows from the layout (RAM ranges
//! are linear in the memfd), so the map costs one byte per frame and nothing per page on the
//! heap. A 1 TiB guest needs 256 MiB of map, allocated zeroed (so untouched parts cost no host
//! memory) and zero means Mapped with no bits set.
//!
//! The map must never let a frame reach Released without passing Zapped: the transitions
//! below only move one step at a time, and `release` is reachable only through the gather's
//! typed batches (see `gather`).

use crate::coalesce::check_ram;
use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::layout::{Layout, PAGE_SIZE};
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameState {
    Mapped = 0,
    Gathered = 1,
    Zapped = 2,
    Released = 3,
}

const STATE_MASK: u8 = 0b11;
/// The VMM wrote this frame since it was last released (dirty tracking).
pub const DIRTY: u8 = 1 << 2;
/// A device keeps a long-lived mapping of this frame (e.g. a virtqueue ring).
pub const DEVICE_MAPPED: u8 = 1 << 3;

impl FrameState {
    fn from_bits(b: u8) -> Self {
        match b & STATE_MASK {
            0 => FrameState::Mapped,
            1 => FrameState::Gathered,
            2 => FrameState::Zapped,
            _ => FrameState::Released,
        }
    }
}

pub struct Stage2Map {
    layout: Layout,
    frames: Vec<AtomicU8>,
}

impl std::fmt::Debug for Stage2Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage2Map")
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl Stage2Map {
    pub fn new(layout: Layout) -> Self {
        let n = (layout.end() / PAGE_SIZE) as usize;
        // A zeroed u8 allocation (calloc): large maps are backed lazily by the host.
        let mut zeroed = std::mem::ManuallyDrop::new(vec![0u8; n]);
        // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8, so the
        // allocation can be reinterpreted and later freed with the same layout.
        let frames = unsafe {
            Vec::from_raw_parts(
                zeroed.as_mut_ptr() as *mut AtomicU8,
                zeroed.len(),
                zeroed.capacity(),
            )
        };
        Self { layout, frames }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn slot(&self, gfn: Gfn) -> Result<&AtomicU8, FrameError> {
        check_ram(&self.layout, gfn)?;
        Ok(&self.frames[gfn as usize])
    }

    pub fn state(&self, gfn: Gfn) -> Result<FrameState, FrameError> {
        Ok(FrameState::from_bits(
            self.slot(gfn)?.load(Ordering::Acquire),
        ))
    }

    pub fn bits(&self, gfn: Gfn) -> Result<u8, FrameError> {
        Ok(self.slot(gfn)?.load(Ordering::Acquire) & !STATE_MASK)
    }

    /// Moves the frame from `from` to `to`, or reports why it cannot.
    fn transition(&self, gfn: Gfn, from: FrameState, to: FrameState) -> Result<(), FrameError> {
        let slot = self.slot(gfn)?;
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let state = FrameState::from_bits(cur);
            if state != from {
                return Err(match state {
                    FrameState::Gathered | FrameState::Zapped => FrameError::AlreadyGathered(gfn),
                    FrameState::Released => FrameError::AlreadyReleased(gfn),
                    FrameState::Mapped => FrameError::NotReleased(gfn),
                });
            }
            if to == FrameState::Gathered && cur & DEVICE_MAPPED != 0 {
                return Err(FrameError::DeviceMapped(gfn));
            }
            let mut new = (cur & !STATE_MASK) | to as u8;
            if to == FrameState::Released {
                // Release drops the VMM's reverse-map state for the frame.
                new &= !(DIRTY | DEVICE_MAPPED);
            }
            match slot.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Mapped → Gathered: the frame joins a reclaim batch.
    pub fn gather(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, FrameState::Mapped, FrameState::Gathered)
    }

    /// Gathered → Mapped: a frame handed back before its batch was zapped.
    pub fn ungather(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, FrameState::Gathered, FrameState::Mapped)
    }

    pub(crate) fn mark_zapped(&self, range: GfnRange) {
        for g in range.iter() {
            self.transition(g, FrameState::Gathered, FrameState::Zapped)
                .expect("only gathered frames are zapped");
        }
    }

    pub(crate) fn mark_released(&self, range: GfnRange) {
        for g in range.iter() {
            self.transition(g, FrameState::Zapped, FrameState::Released)
                .expect("only zapped frames are released");
        }
    }

    /// Released → Mapped: the guest may use the frame again; it reads as zeros.
    pub fn repopulate(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, FrameState::Released, FrameState::Mapped)
    }

    pub fn set_bits(&self, gfn: Gfn, bits: u8) -> Result<(), FrameError> {
        self.slot(gfn)?
            .fetch_or(bits & !STATE_MASK, Ordering::AcqRel);
        Ok(())
    }

    pub fn clear_bits(&self, gfn: Gfn, bits: u8) -> Result<(), FrameError> {
        self.slot(gfn)?
            .fetch_and(!(bits & !STATE_MASK), Ordering::AcqRel);
        Ok(())
    }

    /// Number of frames in `state` (a full scan; for tests and reports).
    pub fn count(&self, state: FrameState) -> u64 {
        self.layout
            .ranges()
            .iter()
            .flat_map(|r| (r.gpa / PAGE_SIZE)..(r.end() / PAGE_SIZE))
            .filter(|&g| {
                FrameState::from_bits(self.frames[g as usize].load(Ordering::Relaxed)) == state
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Stage2Map {
        Stage2Map::new(Layout::new(16 << 20).unwrap())
    }

    #[test]
    fn full_cycle_and_back() {
        let m = map();
        m.set_bits(7, DIRTY).unwrap();
        m.gather(7).unwrap();
        m.mark_zapped(GfnRange::new(7, 1));
        m.mark_released(GfnRange::new(7, 1));
        assert_eq!(m.state(7), Ok(FrameState::Released));
        assert_eq!(m.bits(7), Ok(0), "release drops dirty and device bits");
        m.repopulate(7).unwrap();
        assert_eq!(m.state(7), Ok(FrameState::Mapped));
    }

    #[test]
    fn refuses_double_gather_released_and_device_frames() {
        let m = map();
        m.gather(1).unwrap();
        assert_eq!(m.gather(1), Err(FrameError::AlreadyGathered(1)));
        m.set_bits(2, DEVICE_MAPPED).unwrap();
        assert_eq!(m.gather(2), Err(FrameError::DeviceMapped(2)));
        assert_eq!(m.repopulate(3), Err(FrameError::NotReleased(3)));
        assert_eq!(m.gather(1 << 30), Err(FrameError::OutsideRam(1 << 30)));
    }

    #[test]
    #[should_panic(expected = "only zapped frames are released")]
    fn release_without_zap_is_impossible() {
        let m = map();
        m.gather(4).unwrap();
        m.mark_released(GfnRange::new(4, 1));
    }

    #[test]
    fn one_tib_map_is_lazily_allocated() {
        // 1 TiB of RAM: 2^28 frames, one byte each, from a zeroed allocation.
        let m = Stage2Map::new(Layout::new(1 << 40).unwrap());
        let last = (m.layout().end() / PAGE_SIZE) - 1;
        m.gather(last).unwrap();
        assert_eq!(m.state(last), Ok(FrameState::Gathered));
    }
}
