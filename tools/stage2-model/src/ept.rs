//! An EPT-format stage-2 table: four levels of 512 eight-byte entries (PML4, PDPT, PD, PT),
//! indexed by guest frame number, with the Intel EPT bit layout:
//!
//! | bit | meaning |
//! |---|---|
//! | 0, 1, 2 | read, write, execute (present = any of them) |
//! | 7 | page size: this PD entry maps a 2 MiB page (leaf) |
//! | 8 | accessed (set by the walker on a TLB fill) |
//! | 9 | dirty (set by the walker on the first write through a translation) |
//! | 12–51 | host frame of the next table or of the page |
//!
//! Table "host frames" are indices into the model's table arena, not real memory. A 2 MiB leaf
//! is split into 512 4 KiB leaves, which inherit its accessed and dirty bits, before one of its
//! pages is zapped or cleaned (the way KVM splits huge mappings it must change in part).

pub const READ: u64 = 1 << 0;
pub const WRITE: u64 = 1 << 1;
pub const EXEC: u64 = 1 << 2;
pub const PAGE_SIZE_BIT: u64 = 1 << 7;
pub const ACCESSED: u64 = 1 << 8;
pub const DIRTY: u64 = 1 << 9;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const RWX: u64 = READ | WRITE | EXEC;
/// Frames under one 2 MiB leaf.
pub const LARGE_FRAMES: u64 = 512;

type Table = [u64; 512];

/// Where a leaf entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    table: usize,
    slot: usize,
    /// 1: a 4 KiB PT entry; 2: a 2 MiB PD entry.
    pub level: u8,
}

/// What a walk found for one guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub leaf: Leaf,
    pub hfn: u64,
    pub writable: bool,
}

#[derive(Clone, Debug)]
pub struct Ept {
    tables: Vec<Table>,
}

impl Default for Ept {
    fn default() -> Self {
        Self::new()
    }
}

fn index(gfn: u64, level: u8) -> usize {
    ((gfn >> (9 * (u32::from(level) - 1))) & 511) as usize
}

fn present(e: u64) -> bool {
    e & RWX != 0
}

fn frame_of(e: u64) -> u64 {
    (e & ADDR_MASK) >> 12
}

impl Ept {
    /// An empty table: just the PML4.
    pub fn new() -> Self {
        Self {
            tables: vec![[0; 512]],
        }
    }

    /// Tables allocated (PML4 included): the table's own memory cost.
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    fn new_table(&mut self) -> usize {
        self.tables.push([0; 512]);
        self.tables.len() - 1
    }

    /// The table at `level` covering `gfn`, creating the path to it; `None` if a large leaf
    /// sits on the path.
    fn table_for(&mut self, gfn: u64, level: u8) -> Option<usize> {
        let mut t = 0;
        for l in (level + 1..=4).rev() {
            let i = index(gfn, l);
            let e = self.tables[t][i];
            if !present(e) {
                let n = self.new_table();
                self.tables[t][i] = ((n as u64) << 12) | RWX;
                t = n;
            } else if e & PAGE_SIZE_BIT != 0 {
                return None;
            } else {
                t = frame_of(e) as usize;
            }
        }
        Some(t)
    }

    /// Maps one 4 KiB guest frame to `hfn`.
    pub fn map_4k(&mut self, gfn: u64, hfn: u64, writable: bool) {
        if self.walk(gfn).is_some_and(|t| t.leaf.level == 2) {
            self.split(gfn);
        }
        let t = self.table_for(gfn, 1).expect("split above");
        let w = if writable { WRITE } else { 0 };
        self.tables[t][index(gfn, 1)] = (hfn << 12) | READ | EXEC | w;
    }

    /// Maps the 2 MiB-aligned run of 512 frames at `gfn` to the run at `hfn`.
    pub fn map_2m(&mut self, gfn: u64, hfn: u64, writable: bool) {
        assert!(gfn.is_multiple_of(LARGE_FRAMES) && hfn.is_multiple_of(LARGE_FRAMES));
        let t = self
            .table_for(gfn, 2)
            .expect("no 1 GiB leaves in this model");
        let w = if writable { WRITE } else { 0 };
        self.tables[t][index(gfn, 2)] = (hfn << 12) | READ | EXEC | w | PAGE_SIZE_BIT;
    }

    /// Walks the table for `gfn` (the hardware page walk, without side effects).
    pub fn walk(&self, gfn: u64) -> Option<Translation> {
        let mut t = 0;
        for level in (1..=4u8).rev() {
            let slot = index(gfn, level);
            let e = self.tables[t][slot];
            if !present(e) {
                return None;
            }
            let leaf = level == 1 || (level == 2 && e & PAGE_SIZE_BIT != 0);
            if leaf {
                let base = frame_of(e);
                let hfn = if level == 2 {
                    base + (gfn & (LARGE_FRAMES - 1))
                } else {
                    base
                };
                return Some(Translation {
                    leaf: Leaf {
                        table: t,
                        slot,
                        level,
                    },
                    hfn,
                    writable: e & WRITE != 0,
                });
            }
            t = frame_of(e) as usize;
        }
        None
    }

    pub fn entry(&self, leaf: Leaf) -> u64 {
        self.tables[leaf.table][leaf.slot]
    }

    /// Sets accessed (and dirty) bits on a leaf, as the walker does.
    pub fn set_bits(&mut self, leaf: Leaf, bits: u64) {
        self.tables[leaf.table][leaf.slot] |= bits & (ACCESSED | DIRTY);
    }

    /// Replaces the 2 MiB leaf covering `gfn` by a table of 512 4 KiB leaves with the same
    /// permissions and accessed/dirty bits.
    fn split(&mut self, gfn: u64) {
        let Some(t) = self.walk(gfn).filter(|t| t.leaf.level == 2) else {
            return;
        };
        let e = self.entry(t.leaf);
        let base = frame_of(e);
        let pt = self.new_table();
        for (i, slot) in self.tables[pt].iter_mut().enumerate() {
            *slot = ((base + i as u64) << 12) | (e & !(ADDR_MASK | PAGE_SIZE_BIT));
        }
        self.tables[t.leaf.table][t.leaf.slot] = ((pt as u64) << 12) | RWX;
    }

    /// Removes the translation of `gfn`; returns the old leaf entry (for its dirty bit).
    pub fn zap(&mut self, gfn: u64) -> Option<u64> {
        self.split(gfn);
        let t = self.walk(gfn)?;
        let old = self.entry(t.leaf);
        self.tables[t.leaf.table][t.leaf.slot] = 0;
        Some(old)
    }

    /// Clears the dirty bit of `gfn`'s leaf (the folio_mkclean step); returns whether it was
    /// set. The caller must flush TLBs afterwards: they may cache the dirty bit.
    pub fn clean(&mut self, gfn: u64) -> bool {
        self.split(gfn);
        let Some(t) = self.walk(gfn) else {
            return false;
        };
        let e = self.entry(t.leaf);
        self.tables[t.leaf.table][t.leaf.slot] = e & !DIRTY;
        e & DIRTY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_walks_and_zaps_4k_frames_with_four_levels() {
        let mut ept = Ept::new();
        let gfn = (3 << 27) | (5 << 18) | (7 << 9) | 11;
        ept.map_4k(gfn, 0x1234, true);
        assert_eq!(ept.tables(), 4, "PML4 + PDPT + PD + PT");
        let t = ept.walk(gfn).unwrap();
        assert_eq!((t.hfn, t.writable, t.leaf.level), (0x1234, true, 1));
        assert!(ept.walk(gfn + 1).is_none());
        ept.set_bits(t.leaf, ACCESSED | DIRTY);
        assert_eq!(ept.entry(t.leaf) & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        assert!(ept.clean(gfn), "was dirty");
        assert!(!ept.clean(gfn), "clean now");
        let old = ept.zap(gfn).unwrap();
        assert_eq!(old & ACCESSED, ACCESSED);
        assert!(ept.walk(gfn).is_none());
        assert!(ept.zap(gfn).is_none());
    }

    #[test]
    fn a_2m_leaf_is_split_before_part_of_it_is_zapped_and_keeps_its_dirty_bit() {
        let mut ept = Ept::new();
        ept.map_2m(512, 1024, true);
        let t = ept.walk(512 + 77).unwrap();
        assert_eq!((t.hfn, t.leaf.level), (1024 + 77, 2));
        ept.set_bits(t.leaf, DIRTY);
        let old = ept.zap(512 + 77).unwrap();
        assert_ne!(
            old & DIRTY,
            0,
            "the 4 KiB leaf inherited the 2 MiB leaf's dirty bit"
        );
        assert!(ept.walk(512 + 77).is_none());
        let n = ept.walk(512 + 78).unwrap();
        assert_eq!((n.hfn, n.leaf.level), (1024 + 78, 1));
        assert_ne!(ept.entry(n.leaf) & DIRTY, 0);
        // Remapping a frame under a large leaf splits it too.
        ept.map_2m(2048, 4096, false);
        ept.map_4k(2048 + 3, 9, true);
        assert_eq!(ept.walk(2048 + 3).unwrap().hfn, 9);
        assert_eq!(ept.walk(2048 + 4).unwrap().hfn, 4096 + 4);
        assert!(!ept.walk(2048 + 4).unwrap().writable);
    }
}
