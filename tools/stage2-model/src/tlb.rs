//! A per-vCPU set-associative TLB for stage-2 translations.
//!
//! Like hardware, an entry caches the dirty bit: once a write through an entry has set the
//! leaf's dirty bit, later writes through that entry do not walk the table again. That is why
//! cleaning a frame (clearing the dirty bit in the table) is only complete after every TLB
//! that may hold the entry has been flushed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    pub gfn: u64,
    pub hfn: u64,
    pub writable: bool,
    /// The leaf's dirty bit was set through this entry.
    pub dirty: bool,
}

#[derive(Clone, Debug)]
pub struct Tlb {
    sets: usize,
    ways: usize,
    entries: Vec<Option<TlbEntry>>,
    /// Round-robin victim per set.
    victim: Vec<usize>,
}

impl Tlb {
    pub fn new(sets: usize, ways: usize) -> Self {
        assert!(sets > 0 && ways > 0);
        Self {
            sets,
            ways,
            entries: vec![None; sets * ways],
            victim: vec![0; sets],
        }
    }

    fn set(&self, gfn: u64) -> std::ops::Range<usize> {
        let s = (gfn % self.sets as u64) as usize;
        s * self.ways..(s + 1) * self.ways
    }

    pub fn lookup(&mut self, gfn: u64) -> Option<&mut TlbEntry> {
        let r = self.set(gfn);
        self.entries[r].iter_mut().flatten().find(|e| e.gfn == gfn)
    }

    /// Fills an entry, evicting the set's round-robin victim if the set is full.
    pub fn insert(&mut self, entry: TlbEntry) {
        let r = self.set(entry.gfn);
        let s = r.start / self.ways;
        let slots = &mut self.entries[r];
        let i = slots
            .iter()
            .position(|e| e.is_none_or(|e| e.gfn == entry.gfn))
            .unwrap_or_else(|| {
                let v = self.victim[s];
                self.victim[s] = (v + 1) % self.ways;
                v
            });
        slots[i] = Some(entry);
    }

    /// Drops every entry for frames in `[start, start + count)`; returns how many.
    pub fn invalidate(&mut self, start: u64, count: u64) -> usize {
        let mut n = 0;
        for e in &mut self.entries {
            if e.is_some_and(|e| e.gfn >= start && e.gfn - start < count) {
                *e = None;
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(gfn: u64) -> TlbEntry {
        TlbEntry {
            gfn,
            hfn: gfn + 100,
            writable: true,
            dirty: false,
        }
    }

    #[test]
    fn set_associative_fill_evicts_round_robin_within_a_set() {
        let mut t = Tlb::new(4, 2);
        t.insert(e(0));
        t.insert(e(4));
        t.insert(e(1));
        assert_eq!(t.len(), 3);
        t.insert(e(8)); // set 0 is full: evicts way 0 (gfn 0)
        assert!(t.lookup(0).is_none());
        assert!(t.lookup(4).is_some() && t.lookup(8).is_some() && t.lookup(1).is_some());
        t.insert(e(12)); // then way 1 (gfn 4)
        assert!(t.lookup(4).is_none());
    }

    #[test]
    fn the_cached_dirty_bit_survives_until_invalidation() {
        let mut t = Tlb::new(8, 2);
        t.insert(e(5));
        t.lookup(5).unwrap().dirty = true;
        assert!(t.lookup(5).unwrap().dirty);
        assert_eq!(t.invalidate(4, 2), 1);
        assert!(t.lookup(5).is_none());
        assert_eq!(t.invalidate(0, u64::MAX), 0);
        assert!(t.is_empty());
    }
}
