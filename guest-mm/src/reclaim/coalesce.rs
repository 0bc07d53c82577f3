//! Sort, de-duplicate and merge guest frames into maximal ranges that never cross a RAM range
//! (memslot) boundary, reporting every frame that is not RAM.

use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::layout::{check_ram, Layout, PAGE_SIZE};

/// The result of coalescing: valid frames as ranges, and every invalid frame with its reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Coalesced {
    pub ranges: Vec<GfnRange>,
    /// Invalid frames, one entry per occurrence in the input.
    pub invalid: Vec<FrameError>,
    /// Valid frames that appeared more than once (counted, merged into one).
    pub duplicates: u64,
}

/// Coalesces `gfns` (any order, duplicates allowed). `gfns` is sorted in place.
pub fn coalesce(gfns: &mut [Gfn], layout: &Layout) -> Coalesced {
    gfns.sort_unstable();
    let mut out = Coalesced::default();
    let mut prev: Option<Gfn> = None;
    for &gfn in gfns.iter() {
        if let Err(e) = check_ram(layout, gfn) {
            out.invalid.push(e);
            continue;
        }
        if prev == Some(gfn) {
            out.duplicates += 1;
            continue;
        }
        prev = Some(gfn);
        match out.ranges.last_mut() {
            Some(r) if r.end() == gfn && same_ram_range(layout, r.start, gfn) => r.count += 1,
            _ => out.ranges.push(GfnRange::new(gfn, 1)),
        }
    }
    out
}

/// Whether frames `a` and `b` (both RAM) lie in the same RAM range (memslot).
pub(crate) fn same_ram_range(layout: &Layout, a: Gfn, b: Gfn) -> bool {
    layout.range_of(a * PAGE_SIZE).map(|r| r.gpa) == layout.range_of(b * PAGE_SIZE).map(|r| r.gpa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END_GFN, MMIO_HOLE_START_GFN};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_sorts_and_dedups() {
        let layout = Layout::new(64 << 20).unwrap();
        let mut g = vec![5, 3, 4, 4, 10, 12, 11, 100];
        let c = coalesce(&mut g, &layout);
        assert_eq!(
            c.ranges,
            vec![
                GfnRange::new(3, 3),
                GfnRange::new(10, 3),
                GfnRange::new(100, 1)
            ]
        );
        assert_eq!(c.duplicates, 1);
        assert!(c.invalid.is_empty());
    }

    #[test]
    fn never_merges_across_the_hole() {
        let layout = Layout::new(4 << 30).unwrap();
        let mut g = vec![
            MMIO_HOLE_START_GFN - 1,
            MMIO_HOLE_START_GFN,
            MMIO_HOLE_END_GFN - 1,
            MMIO_HOLE_END_GFN,
        ];
        let c = coalesce(&mut g, &layout);
        assert_eq!(
            c.ranges,
            vec![
                GfnRange::new(MMIO_HOLE_START_GFN - 1, 1),
                GfnRange::new(MMIO_HOLE_END_GFN, 1)
            ]
        );
        assert_eq!(
            c.invalid,
            vec![
                FrameError::InMmioHole(MMIO_HOLE_START_GFN),
                FrameError::InMmioHole(MMIO_HOLE_END_GFN - 1)
            ]
        );
    }

    #[test]
    fn reports_frames_beyond_ram_and_overflowing_ones() {
        let layout = Layout::new(64 << 20).unwrap();
        let mut g = vec![u64::MAX, 16384, 16383];
        let c = coalesce(&mut g, &layout);
        assert_eq!(c.ranges, vec![GfnRange::new(16383, 1)]);
        assert_eq!(
            c.invalid,
            vec![
                FrameError::OutsideRam(16384),
                FrameError::OutsideRam(u64::MAX)
            ]
        );
    }

    fn arb_layout() -> impl Strategy<Value = Layout> {
        prop_oneof![
            Just(Layout::new(64 << 20).unwrap()),
            Just(Layout::new((3 << 30) + (64 << 20)).unwrap()),
        ]
    }

    fn arb_gfns() -> impl Strategy<Value = Vec<Gfn>> {
        // Mix frames near the interesting boundaries: start of RAM, the hole, the end.
        let near = prop_oneof![
            0u64..64u64,
            (MMIO_HOLE_START_GFN - 32)..(MMIO_HOLE_START_GFN + 32),
            MMIO_HOLE_END_GFN - 32..MMIO_HOLE_END_GFN + 32,
            (16384u64 - 32)..(16384u64 + 32),
            (MMIO_HOLE_END_GFN + 16384) - 32..(MMIO_HOLE_END_GFN + 16384) + 32,
            any::<u64>(),
        ];
        proptest::collection::vec(near, 0..300)
    }

    proptest! {
        #[test]
        fn ranges_cover_exactly_the_valid_frames_once_and_are_maximal(layout in arb_layout(), input in arb_gfns()) {
            let mut g = input.clone();
            let c = coalesce(&mut g, &layout);
            let valid: BTreeSet<Gfn> = input.iter().copied().filter(|&f| check_ram(&layout, f).is_ok()).collect();
            // Exactly the valid frames, each once.
            let mut covered = Vec::new();
            for r in &c.ranges {
                prop_assert!(r.count > 0);
                covered.extend(r.iter());
            }
            let covered_set: BTreeSet<Gfn> = covered.iter().copied().collect();
            prop_assert_eq!(covered.len(), covered_set.len(), "a frame is covered twice");
            prop_assert_eq!(&covered_set, &valid);
            // Maximal: ranges are sorted, and neighbours could not have been merged.
            for w in c.ranges.windows(2) {
                prop_assert!(w[0].end() <= w[1].start);
                if w[0].end() == w[1].start {
                    prop_assert!(!same_ram_range(&layout, w[0].start, w[1].start));
                }
            }
            // Every invalid occurrence is reported, with its frame.
            let invalid_in: Vec<Gfn> = { let mut v: Vec<Gfn> = input.iter().copied().filter(|&f| check_ram(&layout, f).is_err()).collect(); v.sort_unstable(); v };
            let invalid_out: Vec<Gfn> = c.invalid.iter().map(FrameError::gfn).collect();
            prop_assert_eq!(invalid_in, invalid_out);
            // Nothing dropped: valid occurrences = distinct valid frames + duplicates.
            let valid_occurrences = input.iter().filter(|&&f| check_ram(&layout, f).is_ok()).count() as u64;
            prop_assert_eq!(valid_occurrences, valid.len() as u64 + c.duplicates);
        }
    }
}
