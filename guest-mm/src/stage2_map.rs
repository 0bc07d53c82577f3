//! The stage-2 map: one byte per 4 KiB guest frame holding who owns the frame (its state in
//! one state machine) and the VMM's reverse-map bits about it.
//!
//! Every frame has exactly one owner:
//!
//! | owner   | states                                   |
//! |---------|------------------------------------------|
//! | guest   | `Mapped`                                 |
//! | balloon | `Gathered`, `Batched`, `Zapped`, `Released`, `Retained`, `Partial` |
//! | device  | `DeviceMapped` (a virtqueue's rings)     |
//!
//! and moves only along these transitions (every other one is refused with a typed error):
//!
//! ```text
//!             gather            take_batch          zap              release
//!   Mapped ───────────▶ Gathered ─────────▶ Batched ─────▶ Zapped ───────────▶ Released
//!     ▲ ▲                │                   │ zap failed  │ release failed     │
//!     │ │   give_back    │                   └─────▶ Retained ◀┘                  │
//!     │ ├────────────────┘                            │                          │
//!     │ ├─────────────────────────────────────────────┘ give_back                │
//!     │ └────────────────────────────────────────────────────────────────────────┘ give_back
//!     │  map_device / unmap_device
//!     └──────▶ DeviceMapped
//! ```
//!
//! `Batched` and `Zapped` are a batch in flight: the reclaim worker is between taking the
//! batch and releasing it. A frame in flight cannot be given back (`FrameError::InFlight`):
//! the caller waits for the batch to end, then gives it back Released. Otherwise the
//! worker's release could free a page the guest had already taken back and written.
//!
//! On a backend that gives memory back in 2 MiB blocks (`blocks`), a frame whose block is not
//! complete waits as `Partial` (Gathered → Partial → Gathered once the block is complete), and
//! when a frame of a block whose 512 frames are all Released is given back, the other 511
//! become Partial again (Released → Partial): the host backs the whole block again as soon as
//! the guest touches it.
//!
//! A frame leaves the balloon only through `give_back`, which the gather calls for a deflate,
//! for a completed free page report of the guest's own free frames, and for a device reset
//! (which empties the balloon). `Zapped` and `Released` are reachable only through the
//! gather's typed batches, and `Released` only after `Zapped`.
//!
//! The map keeps a count per state, updated by the one transition function, so "how many
//! frames are in the balloon" is read without a scan; `scan_count` recounts for checks.
//!
//! The host offset that backs a frame is not stored: it follows from the layout (RAM ranges
//! are linear in the memfd), so the map costs one byte per frame and nothing per page on the
//! heap. A 1 TiB guest needs 256 MiB of map, allocated zeroed (so untouched parts cost no host
//! memory), and zero means Mapped with no bits set.

use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::layout::check_ram;
use crate::layout::{Layout, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameState {
    /// The guest's.
    Mapped = 0,
    /// In the balloon, waiting in a reclaim batch; still mapped in stage 2.
    Gathered = 1,
    /// In the balloon; stage-2 mappings removed, host page not yet freed.
    Zapped = 2,
    /// In the balloon; host page freed. Reads as zeros once given back.
    Released = 3,
    /// In the balloon, but a host call failed, so the host still holds its page. Given back
    /// with its contents.
    Retained = 4,
    /// A device keeps a long-lived mapping of it (a virtqueue's rings); never reclaimed.
    DeviceMapped = 5,
    /// In the balloon, waiting for the rest of its 2 MiB block (block backends); still backed.
    Partial = 6,
    /// In the balloon, in a batch the reclaim protocol is running (not yet zapped); cannot be
    /// given back until the batch ends.
    Batched = 7,
}

/// Who a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Guest,
    Balloon,
    Device,
}

impl FrameState {
    pub const ALL: [FrameState; 8] = [
        FrameState::Mapped,
        FrameState::Gathered,
        FrameState::Zapped,
        FrameState::Released,
        FrameState::Retained,
        FrameState::DeviceMapped,
        FrameState::Partial,
        FrameState::Batched,
    ];
    /// The balloon's states.
    pub const BALLOON: [FrameState; 6] = [
        FrameState::Gathered,
        FrameState::Batched,
        FrameState::Zapped,
        FrameState::Released,
        FrameState::Retained,
        FrameState::Partial,
    ];

    fn from_bits(b: u8) -> Self {
        match b & STATE_MASK {
            0 => FrameState::Mapped,
            1 => FrameState::Gathered,
            2 => FrameState::Zapped,
            3 => FrameState::Released,
            4 => FrameState::Retained,
            5 => FrameState::DeviceMapped,
            6 => FrameState::Partial,
            _ => FrameState::Batched,
        }
    }

    pub fn owner(self) -> Owner {
        match self {
            FrameState::Mapped => Owner::Guest,
            FrameState::DeviceMapped => Owner::Device,
            _ => Owner::Balloon,
        }
    }

    /// The one table of allowed transitions.
    pub fn may_become(self, to: FrameState) -> bool {
        use FrameState::*;
        matches!(
            (self, to),
            (Mapped, Gathered)
                | (Gathered, Mapped)
                | (Gathered, Batched)
                | (Batched, Zapped)
                | (Batched, Retained)
                | (Zapped, Released)
                | (Zapped, Retained)
                | (Released, Mapped)
                | (Retained, Mapped)
                | (Mapped, DeviceMapped)
                | (DeviceMapped, Mapped)
                | (Gathered, Partial)
                | (Partial, Gathered)
                | (Partial, Mapped)
                | (Released, Partial)
        )
    }

    /// Why a frame in this state cannot become `to`.
    fn refusal(self, gfn: Gfn, to: FrameState) -> FrameError {
        match (self, to) {
            (FrameState::DeviceMapped, _) => FrameError::DeviceMapped(gfn),
            (FrameState::Mapped, _) => FrameError::NotInBalloon(gfn),
            (_, FrameState::DeviceMapped) => FrameError::InBalloon(gfn),
            (FrameState::Batched | FrameState::Zapped, FrameState::Mapped) => {
                FrameError::InFlight(gfn)
            }
            (FrameState::Released, _) => FrameError::AlreadyReleased(gfn),
            _ => FrameError::AlreadyGathered(gfn),
        }
    }
}

const STATE_MASK: u8 = 0b111;
/// The VMM wrote this frame since it was last released (dirty tracking, reverse-map state).
pub const DIRTY: u8 = 1 << 3;

/// What `give_back` did to a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GivenBack {
    /// It was still waiting in a batch: never zapped, contents intact.
    Ungathered,
    /// Its host page had been freed: it reads as zeros.
    Repopulated,
    /// A host call had failed: the host kept its page and contents.
    Retained,
}

pub struct Stage2Map {
    layout: Layout,
    frames: Vec<AtomicU8>,
    counts: [AtomicU64; FrameState::ALL.len()],
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
        let counts = std::array::from_fn(|_| AtomicU64::new(0));
        counts[FrameState::Mapped as usize]
            .store(layout.total_bytes() / PAGE_SIZE, Ordering::Relaxed);
        Self {
            layout,
            frames,
            counts,
        }
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

    pub fn owner(&self, gfn: Gfn) -> Result<Owner, FrameError> {
        self.state(gfn).map(FrameState::owner)
    }

    pub fn bits(&self, gfn: Gfn) -> Result<u8, FrameError> {
        Ok(self.slot(gfn)?.load(Ordering::Acquire) & !STATE_MASK)
    }

    /// Moves the frame from one of `from` to `to` along an allowed transition, or reports
    /// why it cannot. Returns the state it left.
    fn transition(
        &self,
        gfn: Gfn,
        from: &[FrameState],
        to: FrameState,
    ) -> Result<FrameState, FrameError> {
        let slot = self.slot(gfn)?;
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let state = FrameState::from_bits(cur);
            if !from.contains(&state) || !state.may_become(to) {
                return Err(state.refusal(gfn, to));
            }
            let mut new = (cur & !STATE_MASK) | to as u8;
            if to == FrameState::Released {
                // Release drops the VMM's reverse-map state for the frame.
                new &= !DIRTY;
            }
            match slot.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.counts[state as usize].fetch_sub(1, Ordering::Relaxed);
                    self.counts[to as usize].fetch_add(1, Ordering::Relaxed);
                    return Ok(state);
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Mapped → Gathered: the guest gives the frame to the balloon; it joins a batch.
    pub fn gather(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, &[FrameState::Mapped], FrameState::Gathered)
            .map(drop)
    }

    /// Balloon → Mapped: the frame is the guest's again (a deflate, the end of a free page
    /// report, a device reset). Only the batcher calls this, so that a frame still pending
    /// also leaves its batch. A frame in flight (`Batched`, `Zapped`) is refused with
    /// `FrameError::InFlight`: its batch must end first.
    pub(crate) fn give_back(&self, gfn: Gfn) -> Result<GivenBack, FrameError> {
        let from = [
            FrameState::Gathered,
            FrameState::Released,
            FrameState::Retained,
            FrameState::Partial,
            FrameState::Batched,
            FrameState::Zapped,
        ];
        Ok(match self.transition(gfn, &from, FrameState::Mapped)? {
            FrameState::Gathered | FrameState::Partial => GivenBack::Ungathered,
            FrameState::Released => GivenBack::Repopulated,
            _ => GivenBack::Retained,
        })
    }

    /// Gathered → Batched: the frame is in a batch the protocol is about to run.
    pub(crate) fn mark_batched(&self, g: Gfn) {
        self.transition(g, &[FrameState::Gathered], FrameState::Batched)
            .expect("only gathered frames join a batch");
    }

    pub(crate) fn mark_zapped(&self, range: GfnRange) {
        for g in range.iter() {
            self.transition(g, &[FrameState::Batched], FrameState::Zapped)
                .expect("only batched frames are zapped");
        }
    }

    pub(crate) fn mark_released(&self, range: GfnRange) {
        for g in range.iter() {
            self.transition(g, &[FrameState::Zapped], FrameState::Released)
                .expect("only zapped frames are released");
        }
    }

    /// Gathered → Partial: the frame waits for the rest of its 2 MiB block.
    pub(crate) fn mark_partial(&self, g: Gfn) {
        self.transition(g, &[FrameState::Gathered], FrameState::Partial)
            .expect("only gathered frames wait in a block");
    }

    /// Partial → Gathered: the frame's block is complete and goes to a batch.
    pub(crate) fn unpark(&self, g: Gfn) -> Result<(), FrameError> {
        self.transition(g, &[FrameState::Partial], FrameState::Gathered)
            .map(drop)
    }

    /// Released → Partial: the frame's block, released whole, is backed again (one of its
    /// frames went back to the guest). Frames not Released are left as they are.
    pub(crate) fn rebacked(&self, g: Gfn) {
        let _ = self.transition(g, &[FrameState::Released], FrameState::Partial);
    }

    /// A host call failed: the frames stay in the balloon, their host pages still held.
    pub(crate) fn mark_retained(&self, range: GfnRange) {
        for g in range.iter() {
            self.transition(
                g,
                &[FrameState::Batched, FrameState::Zapped],
                FrameState::Retained,
            )
            .expect("only frames in a batch are retained");
        }
    }

    /// Mapped → DeviceMapped: a device maps the frame for as long as it is active.
    pub fn map_device(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, &[FrameState::Mapped], FrameState::DeviceMapped)
            .map(drop)
    }

    /// DeviceMapped → Mapped: the device let go of it (reset).
    pub fn unmap_device(&self, gfn: Gfn) -> Result<(), FrameError> {
        self.transition(gfn, &[FrameState::DeviceMapped], FrameState::Mapped)
            .map(drop)
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

    /// Number of frames in `state`, from the counts the transitions keep.
    pub fn count(&self, state: FrameState) -> u64 {
        self.counts[state as usize].load(Ordering::Relaxed)
    }

    /// Number of frames the balloon owns.
    pub fn in_balloon(&self) -> u64 {
        FrameState::BALLOON.iter().map(|&s| self.count(s)).sum()
    }

    /// Every RAM frame in one of `states`, in ascending order (a full scan).
    pub fn frames_in(&self, states: &[FrameState]) -> Vec<Gfn> {
        self.ram_frames()
            .filter(|&g| states.contains(&self.state_unchecked(g)))
            .collect()
    }

    /// Number of frames in `state`, by a full scan (for checks against `count`).
    pub fn scan_count(&self, state: FrameState) -> u64 {
        self.ram_frames()
            .filter(|&g| self.state_unchecked(g) == state)
            .count() as u64
    }

    fn ram_frames(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.layout
            .ranges()
            .iter()
            .flat_map(|r| (r.gpa / PAGE_SIZE)..(r.end() / PAGE_SIZE))
    }

    fn state_unchecked(&self, g: Gfn) -> FrameState {
        FrameState::from_bits(self.frames[g as usize].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Stage2Map {
        Stage2Map::new(Layout::new(16 << 20).unwrap())
    }

    fn counts_agree_with_a_scan(m: &Stage2Map) {
        for s in FrameState::ALL {
            assert_eq!(m.count(s), m.scan_count(s), "{s:?}");
        }
    }

    #[test]
    fn full_cycle_and_back() {
        let m = map();
        m.set_bits(7, DIRTY).unwrap();
        m.gather(7).unwrap();
        m.mark_batched(7);
        assert_eq!(m.give_back(7), Err(FrameError::InFlight(7)));
        m.mark_zapped(GfnRange::new(7, 1));
        assert_eq!(m.give_back(7), Err(FrameError::InFlight(7)));
        m.mark_released(GfnRange::new(7, 1));
        assert_eq!(m.state(7), Ok(FrameState::Released));
        assert_eq!(m.bits(7), Ok(0), "release drops the dirty bit");
        assert_eq!(m.in_balloon(), 1);
        assert_eq!(m.give_back(7), Ok(GivenBack::Repopulated));
        assert_eq!(m.state(7), Ok(FrameState::Mapped));
        assert_eq!(m.in_balloon(), 0);
        counts_agree_with_a_scan(&m);
    }

    #[test]
    fn refuses_double_gather_released_and_device_frames() {
        let m = map();
        m.gather(1).unwrap();
        assert_eq!(m.gather(1), Err(FrameError::AlreadyGathered(1)));
        m.map_device(2).unwrap();
        assert_eq!(m.gather(2), Err(FrameError::DeviceMapped(2)));
        assert_eq!(m.give_back(2), Err(FrameError::DeviceMapped(2)));
        assert_eq!(m.give_back(3), Err(FrameError::NotInBalloon(3)));
        assert_eq!(m.gather(1 << 30), Err(FrameError::OutsideRam(1 << 30)));
        assert_eq!(m.map_device(1), Err(FrameError::InBalloon(1)));
        counts_agree_with_a_scan(&m);
    }

    #[test]
    fn a_failed_host_call_keeps_the_frame_in_the_balloon_until_given_back() {
        let m = map();
        m.gather(5).unwrap();
        m.mark_batched(5);
        m.mark_retained(GfnRange::new(5, 1));
        assert_eq!(m.owner(5), Ok(Owner::Balloon));
        assert_eq!(m.gather(5), Err(FrameError::AlreadyGathered(5)));
        assert_eq!(m.give_back(5), Ok(GivenBack::Retained));
        assert_eq!(m.owner(5), Ok(Owner::Guest));
    }

    #[test]
    #[should_panic(expected = "only zapped frames are released")]
    fn release_without_zap_is_impossible() {
        let m = map();
        m.gather(4).unwrap();
        m.mark_batched(4);
        m.mark_released(GfnRange::new(4, 1));
    }

    #[test]
    fn only_the_table_s_transitions_are_allowed() {
        use FrameState::*;
        let allowed: Vec<(FrameState, FrameState)> = FrameState::ALL
            .iter()
            .flat_map(|&a| FrameState::ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a.may_become(b))
            .collect();
        // Nothing reaches Released except from Zapped; nothing enters the device's state
        // except from the guest's; nothing leaves the balloon except to the guest; a frame
        // waiting in a block goes only back to a batch or to the guest.
        for &(a, b) in &allowed {
            if a == Partial {
                assert!(b == Gathered || b == Mapped, "{a:?} -> {b:?}");
            }
            if b == Released {
                assert_eq!(a, Zapped);
            }
            if b == Zapped {
                assert_eq!(a, Batched, "only a batch the protocol runs is zapped");
            }
            if b == DeviceMapped {
                assert_eq!(a, Mapped);
            }
            if a.owner() == Owner::Balloon && b.owner() != Owner::Balloon {
                assert_eq!(b, Mapped);
            }
        }
        assert_eq!(allowed.len(), 15);
    }

    #[test]
    fn one_tib_map_is_lazily_allocated() {
        // 1 TiB of RAM: 2^28 frames, one byte each, from a zeroed allocation.
        let m = Stage2Map::new(Layout::new(1 << 40).unwrap());
        let last = (m.layout().end() / PAGE_SIZE) - 1;
        m.gather(last).unwrap();
        assert_eq!(m.state(last), Ok(FrameState::Gathered));
        assert_eq!(m.count(FrameState::Mapped), (1 << 28) - 1);
    }
}
