//! Zap planning: the batch's coalesced ranges become zap spans, one stage-2 zap call (and so
//! one KVM invalidation) each. A span covers one or more reclaimed ranges of one RAM range
//! and the frames between them.
//!
//! Why: KVM flushes every vCPU's TLB once per zap call, so on a fragmented guest one call per
//! range costs one invalidation per run of frames. Where the backend's zap keeps contents
//! (madvise(MADV_DONTNEED) on a MAP_SHARED memfd only drops page-table entries; the pages
//! stay in the memfd and fault back in unchanged), one call may also cover the in-use frames
//! between ranges: many zaps under one invalidation, paid for by a refault of each bridged
//! frame the guest touches again. Release still covers exactly the reclaimed ranges.
//!
//! What a plan must never do:
//! - cross a RAM range (memslot) boundary, or so the MMIO hole;
//! - bridge more in-use frames (the guest's or a device's) per gap than the policy allows;
//! - bridge anything at all when the backend's zap destroys contents (guest_memfd
//!   punch-hole, a MAP_PRIVATE mapping): the caller passes a bound of 0 then.
//!
//! Bridged frames are not touched in the stage-2 map: they stay Mapped (or whatever they
//! were) with their reverse-map state, since they were never given away.

use super::coalesce::same_ram_range;
pub use crate::backend::ZapSpan;
use crate::gfn::{Gfn, GfnRange};
use crate::layout::Layout;
use crate::stage2_map::{Owner, Stage2Map};

/// Longest span, in frames (1 GiB). Gaps of frames already in the balloon cost no refaults
/// and do not count against the bound, so without a cap a span could cover most of a guest;
/// KVM walks the whole range under mmu_lock and may break the walk with an extra flush.
pub const MAX_SPAN_FRAMES: u64 = 1 << 18;

/// In-use frames in `[start, end)`, counting no further than `limit + 1`.
fn in_use_between(map: &Stage2Map, start: Gfn, end: Gfn, limit: u64) -> u64 {
    let mut n = 0;
    for g in start..end {
        if map.owner(g) != Ok(Owner::Balloon) {
            n += 1;
            if n > limit {
                break;
            }
        }
    }
    n
}

/// Plans the zap spans for `ranges` (ascending, disjoint, each inside one RAM range, as
/// `coalesce` makes them). `max_bridged` in-use frames may be bridged per gap; 0 gives one
/// span per range.
pub fn plan(
    ranges: &[GfnRange],
    layout: &Layout,
    map: &Stage2Map,
    max_bridged: u64,
) -> Vec<ZapSpan> {
    let mut spans: Vec<ZapSpan> = Vec::new();
    for &r in ranges {
        if max_bridged > 0 {
            if let Some(s) = spans.last_mut() {
                let fits = same_ram_range(layout, s.span.start, r.start)
                    && r.end() - s.span.start <= MAX_SPAN_FRAMES;
                if fits {
                    let in_use = in_use_between(map, s.span.end(), r.start, max_bridged);
                    if in_use <= max_bridged {
                        s.span.count = r.end() - s.span.start;
                        s.ranges.push(r);
                        s.bridged += in_use;
                        continue;
                    }
                }
            }
        }
        spans.push(ZapSpan::single(r));
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END_GFN, MMIO_HOLE_START, MMIO_HOLE_START_GFN, PAGE_SIZE};
    use crate::reclaim::coalesce::coalesce;
    use proptest::prelude::*;

    #[test]
    fn bridges_small_gaps_and_splits_at_large_ones() {
        let layout = Layout::new(64 << 20).unwrap();
        let map = Stage2Map::new(layout.clone());
        let ranges = [
            GfnRange::new(10, 2),
            GfnRange::new(14, 1), // gap of 2
            GfnRange::new(30, 3), // gap of 15
        ];
        let spans = plan(&ranges, &layout, &map, 4);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].span, GfnRange::new(10, 5));
        assert_eq!(spans[0].bridged, 2);
        assert_eq!(spans[1].span, GfnRange::new(30, 3));
        assert_eq!(
            plan(&ranges, &layout, &map, 0).len(),
            3,
            "0: one span per range"
        );
    }

    #[test]
    fn frames_already_in_the_balloon_do_not_count_against_the_bound() {
        let layout = Layout::new(64 << 20).unwrap();
        let map = Stage2Map::new(layout.clone());
        for g in 12..20 {
            map.gather(g).unwrap(); // as if ballooned by an earlier batch
        }
        let ranges = [GfnRange::new(10, 2), GfnRange::new(21, 1)];
        let spans = plan(&ranges, &layout, &map, 1);
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!((spans[0].bridged, spans[0].gap_frames()), (1, 9));
    }

    #[test]
    fn never_spans_the_mmio_hole() {
        let layout = Layout::new(MMIO_HOLE_START + (64 << 20)).unwrap();
        let map = Stage2Map::new(layout.clone());
        let ranges = [
            GfnRange::new(MMIO_HOLE_START_GFN - 1, 1),
            GfnRange::new(MMIO_HOLE_END_GFN, 1),
        ];
        assert_eq!(plan(&ranges, &layout, &map, u64::MAX).len(), 2);
    }

    fn layout_strategy() -> impl Strategy<Value = Layout> {
        // Either a small guest, or one with RAM on both sides of the hole.
        prop_oneof![
            Just(Layout::new(8 << 20).unwrap()),
            Just(Layout::new(MMIO_HOLE_START + (8 << 20)).unwrap()),
        ]
    }

    /// Frames near the start of RAM, near the hole on both sides, and near the end.
    fn frames(layout: &Layout) -> impl Strategy<Value = Vec<Gfn>> {
        let end = layout.end() / PAGE_SIZE;
        let near = |base: Gfn| (0..600u64).prop_map(move |d| base.saturating_add(d));
        let below_hole = |d: u64| MMIO_HOLE_START_GFN.saturating_sub(600) + d;
        prop::collection::vec(
            prop_oneof![
                near(0),
                (0..600u64).prop_map(below_hole),
                near(MMIO_HOLE_END_GFN),
                (0..600u64).prop_map(move |d| end.saturating_sub(600) + d),
            ],
            0..400,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn spans_cover_every_range_stay_in_one_ram_range_and_respect_the_bound(
            (layout, mut gfns, ballooned) in layout_strategy().prop_flat_map(|l| {
                let f = frames(&l);
                let b = frames(&l);
                (Just(l), f, b)
            }),
            bound in prop_oneof![Just(0u64), 1..8u64, Just(64u64), Just(u64::MAX)],
        ) {
            let map = Stage2Map::new(layout.clone());
            for g in ballooned {
                let _ = map.gather(g); // frames an earlier batch took
            }
            gfns.retain(|&g| map.state(g) == Ok(crate::FrameState::Mapped));
            let ranges = coalesce(&mut gfns, &layout).ranges;
            let spans = plan(&ranges, &layout, &map, bound);
            // The ranges, in order, are exactly the reclaimed ranges: release covers them.
            let planned: Vec<GfnRange> = spans.iter().flat_map(|s| s.ranges.clone()).collect();
            prop_assert_eq!(&planned, &ranges);
            for s in &spans {
                prop_assert!(layout.range_of_frames(s.span.start, s.span.count).is_some(),
                    "span {:?} crosses a RAM range or the hole", s.span);
                prop_assert!(s.span.count <= MAX_SPAN_FRAMES.max(s.ranges[0].count));
                prop_assert_eq!(s.span.start, s.ranges[0].start);
                prop_assert_eq!(s.span.end(), s.ranges.last().unwrap().end());
                // Each gap bridges at most `bound` in-use frames, and `bridged` counts them.
                let mut bridged = 0;
                for w in s.ranges.windows(2) {
                    let in_use = (w[0].end()..w[1].start)
                        .filter(|&g| map.owner(g) != Ok(Owner::Balloon))
                        .count() as u64;
                    prop_assert!(in_use <= bound, "gap {:?}..{:?} bridges {}", w[0], w[1], in_use);
                    bridged += in_use;
                }
                prop_assert_eq!(s.bridged, bridged);
                if bound == 0 {
                    prop_assert_eq!(s.ranges.len(), 1);
                }
            }
        }
    }
}
