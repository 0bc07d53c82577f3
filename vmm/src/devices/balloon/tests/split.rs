//! `--partial-blocks split` through the device, as a driver and the control API drive it: the
//! balloon splits the frames waiting in partial 2 MiB blocks when it reaches its target
//! (whoever's change makes target and `actual` equal), and keeps its account of what the host
//! holds through splits, deflates and re-inflates.

use super::*;
use guest_mm::reclaim::PartialBlocks;

/// A split-mode device on the memfd driven as a 2 MiB block backend that can split.
fn split_mode() -> Harness {
    let mut h = Harness::with_blocks(Strategy::Gather, Some(true));
    let g = &h.mm.gather;
    g.set_config(ReclaimConfig {
        partial_blocks: PartialBlocks::Split,
        ..g.config()
    })
    .unwrap();
    h.init(ALL, None);
    h
}

impl Harness {
    /// Inflates `frames` as Linux does: buffers of 256 descending PFNs.
    fn inflate(&mut self, frames: std::ops::Range<u32>) {
        let pfns: Vec<u32> = frames.rev().collect();
        for chunk in pfns.chunks(256) {
            let buf = self.pfn_buffer(chunk);
            self.submit(INFLATE_Q, &[buf]);
        }
    }

    fn deflate(&mut self, pfns: &[u32]) {
        let buf = self.pfn_buffer(pfns);
        self.submit(DEFLATE_Q, &[buf]);
    }

    /// The driver writes `actual`.
    fn set_actual(&mut self, pages: u32) {
        self.t
            .write(r::CONFIG + CONFIG_ACTUAL, &pages.to_le_bytes());
        self.check();
    }

    /// The control API sets the target.
    /// A new target as `BalloonDevice::set_target_pages` sets it.
    fn set_target(&mut self, pages: u32) {
        if self.t.device_mut().set_num_pages(pages) && self.t.device().target_met() {
            split_at_target(&self.mm);
        }
        self.check();
    }

    /// Frames of `frames` in `state`.
    fn count_in(&self, frames: std::ops::Range<u64>, state: FrameState) -> u64 {
        frames.filter(|&g| self.state(g) == state).count() as u64
    }

    /// What the report calls `partial_block_bytes`.
    fn partial_block_bytes(&self) -> u64 {
        self.mm.map.count(FrameState::Partial) * 4096
    }
}

const BLOCK: std::ops::Range<u64> = 0x1000..0x1200;

/// The reproduction: a block released in two 4 KiB splits, then one frame deflated and
/// written. The host backs the whole block again (a hole that is touched gets a huge page), so
/// the other 511 are held: the map must say Partial for them, not Released, and the frame
/// inflated again must make the block go whole.
#[test]
fn a_block_split_twice_is_held_again_after_a_deflate_and_goes_whole_when_refilled() {
    let mut h = split_mode();
    h.set_target(300);
    h.inflate(0x1000..0x1000 + 300);
    h.set_actual(300);
    assert_eq!(h.count_in(BLOCK, FrameState::Released), 300);
    h.set_target(512);
    h.inflate(0x112c..0x112c + 212);
    h.set_actual(512);
    assert_eq!(h.count_in(BLOCK, FrameState::Released), 512);
    assert_eq!(h.partial_block_bytes(), 0);

    h.deflate(&[0x1000]);
    h.fill(0x1000, 0xab);
    h.set_actual(511);
    assert_eq!(
        (
            h.count_in(BLOCK, FrameState::Released),
            h.count_in(BLOCK, FrameState::Partial)
        ),
        (0, 511),
        "the host backs the whole block again: none of it is released"
    );
    assert_eq!(h.partial_block_bytes(), 511 * 4096);
    assert_eq!(h.mm.gather.stats().partial_blocks, 1);

    let released_before = h.mm.gather.stats().blocks_released;
    h.inflate(0x1000..0x1001);
    h.set_actual(512);
    assert_eq!(h.count_in(BLOCK, FrameState::Released), 512);
    assert_eq!(h.partial_block_bytes(), 0);
    assert_eq!(
        h.mm.gather.stats().blocks_released,
        released_before + 1,
        "the refilled block goes whole"
    );
    assert!(h.canary_intact());
}

/// A Linux driver writes nothing when target and `actual` are already equal, so a target
/// lowered through the API to exactly the current `actual` must split by itself.
#[test]
fn a_target_lowered_to_the_current_actual_splits_the_waiting_frames() {
    let mut h = split_mode();
    h.set_target(600);
    h.inflate(0x1000..0x1000 + 300);
    h.set_actual(300);
    h.mm.gather.flush(); // the batch window passes
    assert_eq!(
        h.count_in(BLOCK, FrameState::Partial),
        300,
        "below the target nothing is split"
    );
    h.set_target(300);
    assert_eq!(
        (
            h.count_in(BLOCK, FrameState::Released),
            h.partial_block_bytes()
        ),
        (300, 0),
        "the target is reached: the waiting frames go at 4 KiB"
    );
    assert!(h.canary_intact());
}
