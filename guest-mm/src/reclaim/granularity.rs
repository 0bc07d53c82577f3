//! The unit guest memory goes back to the host in, chosen once from the backend's
//! capabilities: 4 KiB pages (every frame may go in the next batch) or 2 MiB blocks (a frame
//! waits as Partial until all 512 frames of its block are in the balloon; the block then goes
//! with one zap and one release). The batcher asks its granularity and never which backend
//! it has.
//!
//! When a frame of a block whose 512 frames are all released (whole, or at 4 KiB over several
//! splits: either way the block is a hole on the host) goes back to the guest, the host backs
//! the whole block again as soon as it is touched, so the other 511 wait as Partial again.
//! Where the backend can split a huge page (shmem THP), the frames still waiting in partial
//! blocks can be released at 4 KiB on request (`take_partial`).

use super::blocks::{self, Blocks};
use crate::backend::{Granule, BLOCK_FRAMES};
use crate::gfn::{Gfn, GfnRange};
use crate::layout::Layout;
use crate::stage2_map::{FrameState, GivenBack, Stage2Map};

/// Block counts a granularity keeps (zero for pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Blocks holding frames that wait as Partial.
    pub partial: u64,
    /// Blocks released whole.
    pub released: u64,
    /// Partial blocks whose waiting frames were released at 4 KiB.
    pub split: u64,
}

pub trait Granularity: Send {
    /// Frames per host page (one per-page host call covers this many): 1 or 512.
    fn unit(&self) -> u64;
    /// A frame entered the balloon (now Gathered).
    fn accepted(&mut self, g: Gfn);
    /// Of the pending frames (Gathered), those that may go into a batch now, with any frames
    /// that waited for them; the others wait (Partial).
    fn ready(&mut self, map: &Stage2Map, pending: Vec<Gfn>) -> Vec<Gfn>;
    /// A frame left the balloon: it was `was`, and the map says what giving it back did.
    fn returned(&mut self, map: &Stage2Map, g: Gfn, was: FrameState, how: GivenBack);
    /// A batch released `ranges` (those the plan made; some may have failed).
    fn released(&mut self, map: &Stage2Map, ranges: &[GfnRange]);
    /// The frames waiting in partial blocks, made Gathered for release at 4 KiB, where the
    /// backend can split huge pages; None where it cannot or nothing waits.
    fn take_partial(&mut self, map: &Stage2Map) -> Option<Vec<Gfn>>;
    fn counts(&self) -> BlockCounts;
}

/// The granularity for a backend that gives memory back in `granule`.
pub fn for_granule(granule: Granule, layout: &Layout) -> Box<dyn Granularity> {
    match granule {
        Granule::Page => Box::new(Pages),
        Granule::Block { can_split } => Box::new(BlockGrouping {
            blocks: Blocks::new(layout),
            can_split,
            counts: BlockCounts::default(),
        }),
    }
}

/// 4 KiB pages: nothing waits.
struct Pages;

impl Granularity for Pages {
    fn unit(&self) -> u64 {
        1
    }
    fn accepted(&mut self, _: Gfn) {}
    fn ready(&mut self, _: &Stage2Map, pending: Vec<Gfn>) -> Vec<Gfn> {
        pending
    }
    fn returned(&mut self, _: &Stage2Map, _: Gfn, _: FrameState, _: GivenBack) {}
    fn released(&mut self, _: &Stage2Map, _: &[GfnRange]) {}
    fn take_partial(&mut self, _: &Stage2Map) -> Option<Vec<Gfn>> {
        None
    }
    fn counts(&self) -> BlockCounts {
        BlockCounts::default()
    }
}

/// 2 MiB blocks, counted across batches (`blocks::Blocks`).
struct BlockGrouping {
    blocks: Blocks,
    can_split: bool,
    counts: BlockCounts,
}

impl Granularity for BlockGrouping {
    fn unit(&self) -> u64 {
        BLOCK_FRAMES
    }

    fn accepted(&mut self, g: Gfn) {
        self.blocks.add(g);
    }

    /// A block whose 512 frames are all in the balloon goes whole (the frames that waited as
    /// Partial go back to Gathered); a block with a frame that cannot join a batch (Retained
    /// after a failed host call) waits, as do incomplete blocks.
    fn ready(&mut self, map: &Stage2Map, mut pending: Vec<Gfn>) -> Vec<Gfn> {
        pending.sort_unstable();
        pending.dedup();
        let mut ready: Vec<usize> = pending
            .iter()
            .map(|&g| blocks::block_of(g))
            .filter(|&b| self.blocks.complete(b))
            .collect();
        ready.dedup();
        ready.retain(|&b| {
            (0..BLOCK_FRAMES).all(|i| {
                matches!(
                    map.state(blocks::first_frame(b) + i),
                    Ok(FrameState::Gathered | FrameState::Partial)
                )
            })
        });
        let mut out = Vec::with_capacity(ready.len() * BLOCK_FRAMES as usize);
        for &b in &ready {
            for g in blocks::first_frame(b)..blocks::first_frame(b) + BLOCK_FRAMES {
                if map.unpark(g).is_ok() {
                    self.blocks.unwait(g);
                }
                out.push(g);
            }
        }
        for g in pending {
            if ready.binary_search(&blocks::block_of(g)).is_err() {
                map.mark_partial(g);
                self.blocks.wait(g);
            }
        }
        self.counts.partial = self.blocks.partial_blocks();
        out
    }

    fn returned(&mut self, map: &Stage2Map, g: Gfn, was: FrameState, how: GivenBack) {
        self.blocks.remove(g);
        if was == FrameState::Partial {
            self.blocks.unwait(g);
        }
        let blk = blocks::block_of(g);
        if how == GivenBack::Repopulated && self.blocks.take_released_whole(blk) {
            for s in blocks::first_frame(blk)..blocks::first_frame(blk) + BLOCK_FRAMES {
                if map.state(s) == Ok(FrameState::Released) {
                    map.rebacked(s);
                    self.blocks.wait(s);
                }
            }
        }
        self.counts.partial = self.blocks.partial_blocks();
    }

    /// A block all of whose 512 frames are now Released, whether by one whole release or by
    /// 4 KiB releases over several batches (splits), is a hole on the host: marked, so that
    /// a frame of it going back to the guest makes the others wait again (`returned`).
    fn released(&mut self, map: &Stage2Map, ranges: &[GfnRange]) {
        let mut seen = None;
        for r in ranges.iter().filter(|r| r.count > 0) {
            let whole =
                r.start.is_multiple_of(BLOCK_FRAMES) && r.count.is_multiple_of(BLOCK_FRAMES);
            for blk in blocks::block_of(r.start)..=blocks::block_of(r.end() - 1) {
                if seen == Some(blk) || !self.blocks.complete(blk) {
                    continue;
                }
                seen = Some(blk);
                let first = blocks::first_frame(blk);
                if (first..first + BLOCK_FRAMES).all(|g| map.state(g) == Ok(FrameState::Released)) {
                    self.blocks.set_released_whole(blk);
                    if whole {
                        self.counts.released += 1;
                    }
                }
            }
        }
        self.counts.partial = self.blocks.partial_blocks();
    }

    fn take_partial(&mut self, map: &Stage2Map) -> Option<Vec<Gfn>> {
        if !self.can_split {
            return None;
        }
        let frames = map.frames_in(&[FrameState::Partial]);
        if frames.is_empty() {
            return None;
        }
        let before = self.blocks.partial_blocks();
        for &g in &frames {
            if map.unpark(g).is_ok() {
                self.blocks.unwait(g);
            }
        }
        self.counts.split += before - self.blocks.partial_blocks();
        self.counts.partial = self.blocks.partial_blocks();
        Some(frames)
    }

    fn counts(&self) -> BlockCounts {
        self.counts
    }
}
