//! A software model of what the host really holds behind guest RAM on a shmem THP backing
//! (a tmpfs mounted `huge=always`), as a `Stage2Backend` for the block tests: the map's
//! account of which frames are released is checked against it.
//!
//! Per 2 MiB block the host holds either one huge page (all 512 frames backed) or a set of
//! 4 KiB pages (possibly none: a hole). What moves it:
//! - a release (`fallocate(PUNCH_HOLE)`) of a whole block frees it all; a release of part of
//!   a huge page splits it into 4 KiB pages and frees those punched;
//! - a guest access to a frame that is not backed (`touch`) backs it: with the whole block a
//!   hole, shmem allocates a huge page for the whole block again; otherwise one 4 KiB page;
//! - a zap (`MADV_DONTNEED` on the shared mapping) keeps every page.
//!
//! The model starts with every block backed by a huge page (a guest that touched all its
//! memory).

use crate::backend::{BackendError, Capabilities, Granule, Stage2Backend, BLOCK_FRAMES};
use crate::gfn::{Gfn, GfnRange};
use crate::reclaim::ZapSpan;
use std::sync::Mutex;

const WORDS: usize = (BLOCK_FRAMES / 64) as usize;

#[derive(Clone, Copy)]
enum HostBlock {
    Huge,
    /// 4 KiB pages, one bit each; all clear is a hole.
    Small([u64; WORDS]),
}

pub struct ShmemHost {
    blocks: Mutex<Vec<HostBlock>>,
    /// Every release, in order.
    pub releases: Mutex<Vec<GfnRange>>,
}

fn split(g: Gfn) -> (usize, usize, u64) {
    let b = (g / BLOCK_FRAMES) as usize;
    let i = (g % BLOCK_FRAMES) as usize;
    (b, i / 64, 1 << (i % 64))
}

impl ShmemHost {
    /// `blocks` blocks, each backed by a huge page.
    pub fn new(blocks: u64) -> Self {
        Self {
            blocks: Mutex::new(vec![HostBlock::Huge; blocks as usize]),
            releases: Mutex::new(Vec::new()),
        }
    }

    /// Whether the host holds a page behind frame `g`.
    pub fn backed(&self, g: Gfn) -> bool {
        let (b, w, bit) = split(g);
        match self.blocks.lock().unwrap()[b] {
            HostBlock::Huge => true,
            HostBlock::Small(pages) => pages[w] & bit != 0,
        }
    }

    /// The guest reads or writes frame `g`.
    pub fn touch(&self, g: Gfn) {
        let (b, w, bit) = split(g);
        let mut blocks = self.blocks.lock().unwrap();
        blocks[b] = match blocks[b] {
            HostBlock::Small(mut pages) if pages.iter().any(|&p| p != 0) => {
                pages[w] |= bit;
                HostBlock::Small(pages)
            }
            // A hole over the whole block: shmem backs it with a huge page again.
            _ => HostBlock::Huge,
        };
    }

    /// Frames of block `b` the host holds pages for.
    pub fn backed_in(&self, b: u64) -> u64 {
        match self.blocks.lock().unwrap()[b as usize] {
            HostBlock::Huge => BLOCK_FRAMES,
            HostBlock::Small(pages) => pages.iter().map(|p| u64::from(p.count_ones())).sum(),
        }
    }
}

impl Stage2Backend for ShmemHost {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "shmem-thp-model",
            granule: Granule::Block { can_split: true },
            zap_keeps_contents: true,
        }
    }

    fn zap(&self, _: &ZapSpan) -> Result<(), BackendError> {
        Ok(())
    }

    fn release(&self, r: GfnRange) -> Result<(), BackendError> {
        self.releases.lock().unwrap().push(r);
        let mut blocks = self.blocks.lock().unwrap();
        for g in r.iter() {
            let (b, w, bit) = split(g);
            if let HostBlock::Huge = blocks[b] {
                // Punching part of a huge page splits it; punching all of it frees it.
                blocks[b] = HostBlock::Small([u64::MAX; WORDS]);
            }
            if let HostBlock::Small(pages) = &mut blocks[b] {
                pages[w] &= !bit;
            }
        }
        Ok(())
    }
}
