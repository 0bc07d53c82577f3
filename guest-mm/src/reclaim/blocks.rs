//! 2 MiB block tracking for backends that give memory back in huge pages (shmem THP,
//! hugetlb): the balloon hands over 4 KiB frames, the host can free only whole 2 MiB blocks
//! (or, for shmem, split one at a cost), so the gather counts each block's frames across
//! batches and releases a block, with one zap and one release, once all 512 are in.
//!
//! Per block it keeps two u16 counters (frames in the balloon, frames waiting as Partial)
//! and one bit (all 512 frames released: a hole on the host): 4 bytes and a bit per 2 MiB,
//! 2 MiB of counters for a 1 TiB guest, allocated zeroed so untouched parts cost nothing.

use crate::backend::BLOCK_FRAMES;
use crate::gfn::Gfn;
use crate::layout::{Layout, PAGE_SIZE};

pub struct Blocks {
    in_balloon: Vec<u16>,
    waiting: Vec<u16>,
    released_whole: Vec<u64>,
    partial_blocks: u64,
}

/// The block a frame is in.
pub fn block_of(g: Gfn) -> usize {
    (g / BLOCK_FRAMES) as usize
}

/// The first frame of block `b`.
pub fn first_frame(b: usize) -> Gfn {
    b as Gfn * BLOCK_FRAMES
}

impl Blocks {
    pub fn new(layout: &Layout) -> Self {
        let n = (layout.end() / PAGE_SIZE).div_ceil(BLOCK_FRAMES) as usize;
        Self {
            in_balloon: vec![0; n],
            waiting: vec![0; n],
            released_whole: vec![0; n.div_ceil(64)],
            partial_blocks: 0,
        }
    }

    /// A frame entered the balloon.
    pub fn add(&mut self, g: Gfn) {
        self.in_balloon[block_of(g)] += 1;
    }

    /// A frame left the balloon.
    pub fn remove(&mut self, g: Gfn) {
        let b = block_of(g);
        debug_assert!(self.in_balloon[b] > 0);
        self.in_balloon[b] = self.in_balloon[b].saturating_sub(1);
    }

    /// All 512 frames of block `b` are in the balloon.
    pub fn complete(&self, b: usize) -> bool {
        u64::from(self.in_balloon[b]) == BLOCK_FRAMES
    }

    /// A frame of the balloon now waits as Partial.
    pub fn wait(&mut self, g: Gfn) {
        let b = block_of(g);
        if self.waiting[b] == 0 {
            self.partial_blocks += 1;
        }
        self.waiting[b] += 1;
    }

    /// A Partial frame went to a batch or back to the guest.
    pub fn unwait(&mut self, g: Gfn) {
        let b = block_of(g);
        debug_assert!(self.waiting[b] > 0);
        self.waiting[b] = self.waiting[b].saturating_sub(1);
        if self.waiting[b] == 0 {
            self.partial_blocks -= 1;
        }
    }

    pub fn set_released_whole(&mut self, b: usize) {
        self.released_whole[b / 64] |= 1 << (b % 64);
    }

    /// Whether all of block `b` was released (clearing the mark).
    pub fn take_released_whole(&mut self, b: usize) -> bool {
        let bit = 1 << (b % 64);
        let was = self.released_whole[b / 64] & bit != 0;
        self.released_whole[b / 64] &= !bit;
        was
    }

    /// Blocks holding frames that wait as Partial: the host still holds them whole.
    pub fn partial_blocks(&self) -> u64 {
        self.partial_blocks
    }

    /// Frames in the balloon in block `b`.
    pub fn in_balloon(&self, b: usize) -> u64 {
        u64::from(self.in_balloon[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terabyte_guest_needs_two_mebibytes_of_counters() {
        let b = Blocks::new(&Layout::new(1 << 40).unwrap());
        let bytes = b.in_balloon.len() * 2 + b.waiting.len() * 2 + b.released_whole.len() * 8;
        // 1 TiB of RAM and the 1 GiB hole below 4 GiB: 2^19 + 512 blocks, 4 bytes and a bit each.
        assert_eq!(b.in_balloon.len(), (1 << 19) + 512);
        assert!(
            bytes <= b.in_balloon.len() * 4 + b.in_balloon.len() / 8 + 8,
            "{bytes}"
        );
    }

    #[test]
    fn counts_and_partial_blocks_follow_the_frames() {
        let mut b = Blocks::new(&Layout::new(64 << 20).unwrap());
        for g in 512..1024 {
            b.add(g);
        }
        assert!(b.complete(1) && !b.complete(0));
        b.add(3);
        b.wait(3);
        b.wait(512);
        assert_eq!(b.partial_blocks(), 2);
        b.unwait(3);
        b.remove(3);
        assert_eq!((b.partial_blocks(), b.in_balloon(0)), (1, 0));
        b.set_released_whole(1);
        assert!(b.take_released_whole(1) && !b.take_released_whole(1));
    }
}
