//! Random sequences of guest operations (inflate, deflate, free page report, reclaim probe,
//! device reset, batch window) on the real device through real rings, for every strategy
//! (and for the gather both by range and with zap spans), on 4 KiB pages and in 2 MiB
//! blocks,
//! checked after each step against the ownership invariants (`ownership::check`), against
//! the host calls (`OwnershipChecked` panics on a zap or release of a frame the balloon does
//! not own), and against a model of who owns each frame: the set of frames in the balloon
//! must be exactly what the model says, so a frame leaves the balloon only through a deflate
//! or a reset.

use super::*;
use crate::devices::reclaim_probe;
use abi::probe::{self, Mailbox};
use guest_mm::Strategy as Reclaim;
use proptest::prelude::*;
use proptest::strategy::Strategy;
use std::collections::BTreeSet;

/// Frames the operations draw from: a small window, so that operations collide, plus the
/// ring frames and frames outside RAM.
const LOW: u64 = 0x1000;
const WINDOW: u64 = 64;
const MAILBOX_GPA: u64 = 0x50000;
const PROBE_LIST: u64 = 0x60;

#[derive(Clone, Debug)]
enum Op {
    Inflate(Vec<u64>),
    Deflate(Vec<u64>),
    /// A free page report of `pages` frames from `first`.
    Report {
        first: u64,
        pages: u64,
    },
    /// The reclaim probe over `pages` frames from `first`.
    Probe {
        first: u64,
        pages: u64,
        contiguous: bool,
    },
    /// The batch window passes.
    Flush,
    Reset,
}

fn frame() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0..WINDOW).prop_map(|i| LOW + i),
        1 => (0..12u64).prop_map(|i| RING_BASE / 4096 + i),
        1 => prop_oneof![Just(MEM / 4096), Just(u32::MAX as u64), Just(0xC0000)],
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(frame(), 1..24).prop_map(Op::Inflate),
        3 => prop::collection::vec(frame(), 1..24).prop_map(Op::Deflate),
        // Half of one of two 2 MiB blocks at LOW, so that blocks complete and go whole.
        2 => (0..4u64).prop_map(|h| Op::Inflate((LOW + h * 256..LOW + (h + 1) * 256).rev().collect())),
        1 => (0..4u64).prop_map(|h| Op::Deflate((LOW + h * 256..LOW + (h + 1) * 256).collect())),
        2 => (0..WINDOW, 1..16u64).prop_map(|(i, pages)| Op::Report { first: LOW + i, pages }),
        1 => (0..WINDOW, 1..16u64, any::<bool>())
            .prop_map(|(i, pages, contiguous)| Op::Probe { first: LOW + i, pages, contiguous }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reset),
    ]
}

/// Who owns what, as the guest sees it: the frames it gave to the balloon.
#[derive(Default)]
struct Model {
    balloon: BTreeSet<u64>,
}

impl Model {
    fn ram(g: u64) -> bool {
        g < MEM / 4096
    }

    fn rings(g: u64) -> bool {
        (RING_BASE / 4096..RING_BASE / 4096 + 12).contains(&g)
    }

    /// Frames an inflate or report may take: RAM, not a ring, not already in the balloon.
    fn takeable(&self, g: u64) -> bool {
        Self::ram(g) && !Self::rings(g) && !self.balloon.contains(&g)
    }
}

fn run(strategy: Reclaim, zap_span_gap: u64, blocks: Option<bool>, ops: &[Op]) {
    let mut h = Harness::with_blocks(strategy, blocks);
    let g = &h.mm.gather;
    g.set_config(ReclaimConfig {
        zap_span_gap,
        ..g.config()
    })
    .unwrap();
    h.init(ALL, None);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Inflate(frames) => {
                let pfns: Vec<u32> = frames.iter().map(|&g| g as u32).collect();
                let buf = h.pfn_buffer(&pfns);
                h.submit(INFLATE_Q, &[buf]);
                for &g in frames {
                    if model.takeable(g) && g <= u32::MAX as u64 {
                        model.balloon.insert(g);
                    }
                }
            }
            Op::Deflate(frames) => {
                let pfns: Vec<u32> = frames.iter().map(|&g| g as u32).collect();
                let buf = h.pfn_buffer(&pfns);
                h.submit(DEFLATE_Q, &[buf]);
                for g in frames {
                    model.balloon.remove(g);
                }
            }
            Op::Report { first, pages } => {
                h.submit(REPORTING_Q, &[(first * 4096, (pages * 4096) as u32, 2)]);
                // Reported frames are reclaimed and given back: the balloon is unchanged.
            }
            Op::Probe {
                first,
                pages,
                contiguous,
            } => {
                let mb = Mailbox {
                    magic: probe::MAGIC,
                    region_gfn: *first,
                    region_pages: *pages,
                    list_gfn: PROBE_LIST,
                    list_capacity: *pages,
                    pattern: if *contiguous {
                        probe::PATTERN_CONTIGUOUS
                    } else {
                        probe::PATTERN_SCATTERED
                    },
                    ..Mailbox::default()
                };
                h.write_mailbox(&mb, MAILBOX_GPA);
                let out = reclaim_probe::handle(&h.mm, MAILBOX_GPA)
                    .expect("mailbox in RAM")
                    .expect("a valid mailbox");
                for g in &out.reclaimed {
                    assert!(
                        model.takeable(*g),
                        "the probe reclaimed {g:#x}, which it may not"
                    );
                }
                h.outside.reclaimed += out.reclaimed.len() as u64;
                h.outside.not_freed += out.not_freed;
                h.outside.invalid += out.invalid;
            }
            Op::Flush => {
                h.mm.gather.flush();
            }
            Op::Reset => {
                h.reset();
                h.init(ALL, None);
                model.balloon.clear();
            }
        }
        h.check();
        let in_map: BTreeSet<u64> =
            h.mm.map
                .frames_in(&FrameState::BALLOON)
                .into_iter()
                .collect();
        assert_eq!(
            in_map, model.balloon,
            "after {op:?}: the balloon holds other frames than the guest gave it"
        );
        assert!(h.canary_intact(), "after {op:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_keep_one_owner_per_frame(
        ops in prop::collection::vec(op(), 1..40),
        strategy in prop_oneof![Just(Reclaim::PerPage), Just(Reclaim::PerBuffer), Just(Reclaim::Gather)],
        // Gather by range, or with zap spans bridging the in-use frames between ranges.
        zap_span_gap in prop_oneof![Just(0u64), Just(64u64)],
        // 4 KiB pages, or 2 MiB blocks (that can split, or not), as on huge pages.
        blocks in prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
    ) {
        run(strategy, zap_span_gap, blocks, &ops);
    }
}
