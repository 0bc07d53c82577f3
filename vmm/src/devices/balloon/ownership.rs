//! The ownership invariants of guest frames under the balloon, stated once for the device
//! tests, the property test of random operation sequences, and the fuzz targets.
//!
//! Between two guest operations (a queue processed, a probe, a reset):
//! - every RAM frame has exactly one owner, and the map's per-state counts agree with a scan;
//! - frames in the balloon = pages_inflated − pages_deflated − pages_returned_by_reset: a
//!   frame leaves the balloon only through a deflate (a reset deflates it all), and free page
//!   reports, hints and the probe give back exactly what they took;
//! - no frame is left between zap and release, and the Gathered frames are the pending batch;
//! - the device-mapped frames are the active rings' frames, none when inactive;
//! - the device's counts and the gather's agree (frames gathered, given back, refused).
//!
//! That no zap or release touches a guest-owned frame is checked at the host call itself,
//! by `guest_mm::backend::OwnershipChecked`.

use super::Balloon;
use crate::memory::MemoryManager;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::FrameState;

/// What reached the gather from outside the balloon device (the reclaim probe).
#[derive(Clone, Copy, Debug, Default)]
pub struct Outside {
    /// Frames the probe reclaimed (freed) and gave back.
    pub reclaimed: u64,
    /// Frames the probe took but could not free, given back with their contents.
    pub not_freed: u64,
    /// Frames the probe offered that the gather refused.
    pub invalid: u64,
}

/// Checks the invariants; the error names every one that does not hold.
pub fn check(
    balloon: &Balloon,
    active: bool,
    mm: &MemoryManager,
    outside: Outside,
) -> Result<(), String> {
    let mut broken = Vec::new();
    let map = &mm.map;
    let ram_frames = map.layout().total_bytes() / PAGE_SIZE;
    let total: u64 = FrameState::ALL.iter().map(|&s| map.count(s)).sum();
    if total != ram_frames {
        broken.push(format!(
            "{total} frames in the map's counts, {ram_frames} in RAM"
        ));
    }
    for s in FrameState::ALL {
        let (counted, scanned) = (map.count(s), map.scan_count(s));
        if counted != scanned {
            broken.push(format!("{s:?}: counted {counted}, a scan finds {scanned}"));
        }
    }
    let c = &balloon.counters;
    let expected = (c.pages_inflated)
        .checked_sub(c.pages_deflated + c.pages_returned_by_reset)
        .ok_or_else(|| format!("more pages deflated than inflated: {c:?}"))?;
    if map.in_balloon() != expected {
        broken.push(format!(
            "{} frames in the balloon, but inflated {} - deflated {} - reset {} = {expected}",
            map.in_balloon(),
            c.pages_inflated,
            c.pages_deflated,
            c.pages_returned_by_reset
        ));
    }
    if map.count(FrameState::Zapped) != 0 {
        broken.push(format!(
            "{} frames left between zap and release",
            map.count(FrameState::Zapped)
        ));
    }
    let gather = &mm.gather;
    if map.count(FrameState::Gathered) != gather.pending_pages() {
        broken.push(format!(
            "{} frames Gathered, {} pending in the batch",
            map.count(FrameState::Gathered),
            gather.pending_pages()
        ));
    }
    let ring_frames = if active {
        balloon.ring_frames.len() as u64
    } else {
        0
    };
    if map.count(FrameState::DeviceMapped) != ring_frames {
        broken.push(format!(
            "{} frames device-mapped, the active rings use {ring_frames}",
            map.count(FrameState::DeviceMapped)
        ));
    }
    let s = gather.stats();
    let reported = c.pages_reported + c.pages_reported_not_freed;
    let hinted = c.pages_hinted + c.pages_hinted_not_freed;
    let probed = outside.reclaimed + outside.not_freed;
    let gathered = c.pages_inflated + reported + hinted + probed;
    if s.pages_gathered != gathered {
        broken.push(format!(
            "the gather took {} frames, the device and probe gave it {gathered}",
            s.pages_gathered
        ));
    }
    let returned = c.pages_deflated + c.pages_returned_by_reset + reported + hinted + probed;
    if s.pages_returned != returned {
        broken.push(format!(
            "the gather gave back {} frames, the device and probe count {returned}",
            s.pages_returned
        ));
    }
    if s.invalid_frames != c.invalid_frames + outside.invalid {
        broken.push(format!(
            "the gather refused {} frames, the device and probe count {}",
            s.invalid_frames,
            c.invalid_frames + outside.invalid
        ));
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}
