//! 2 MiB blocks: a block goes whole when its last frame arrives, waits as Partial until then,
//! and is backed again when one of its frames goes back to the guest.

use super::Strategy as Reclaim;
use super::*;
use proptest::prelude::*;
use proptest::strategy::Strategy;
use std::collections::BTreeSet;

const BLOCKS: u64 = 4;

#[derive(Clone, Debug)]
enum Op {
    /// A run of frames inside the first BLOCKS blocks, shuffled into buffers of 256.
    Inflate {
        start: u64,
        len: u64,
    },
    Deflate {
        start: u64,
        len: u64,
    },
    /// A free page report of one 2 MiB block (what Linux reports), or of a run.
    Report {
        start: u64,
        len: u64,
    },
    Flush,
}

fn run() -> impl Strategy<Value = (u64, u64)> {
    (0..BLOCKS * BLOCK_FRAMES, 1..=BLOCK_FRAMES)
        .prop_map(|(s, l)| (s, l.min(BLOCKS * BLOCK_FRAMES - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => run().prop_map(|(start, len)| Op::Inflate { start, len }),
        2 => run().prop_map(|(start, len)| Op::Deflate { start, len }),
        1 => (0..BLOCKS).prop_map(|b| Op::Report { start: b * BLOCK_FRAMES, len: BLOCK_FRAMES }),
        1 => run().prop_map(|(start, len)| Op::Report { start, len }),
        3 => Just(Op::Flush),
    ]
}

fn setup(can_split: bool) -> (Stage2Gather, Arc<Recording>, Arc<Stage2Map>) {
    checked_gather(
        ReclaimConfig::with_strategy(Reclaim::Gather),
        Recording {
            block: Some(can_split),
            ..Recording::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Across any interleaving of inflate, deflate and report buffers, a 2 MiB block
    /// is released exactly when all 512 of its frames are in the balloon (at the flush
    /// after its last one arrived), and only whole; a partial block is never released
    /// and its frames wait as Partial; the partial-block count is right.
    #[test]
    fn a_block_is_released_exactly_when_its_last_frame_arrives(
        ops in prop::collection::vec(op(), 1..40),
        can_split in any::<bool>(),
    ) {
        let (g, rec, map) = setup(can_split);
        let mut balloon: BTreeSet<u64> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Inflate { start, len } => {
                    let frames: Vec<u64> = (start..start + len).rev().collect();
                    for b in frames.chunks(256) {
                        g.add_buffer(b);
                    }
                    balloon.extend(start..start + len);
                }
                Op::Deflate { start, len } => {
                    let frames: Vec<u64> = (start..start + len).collect();
                    g.return_frames(&frames);
                    for f in start..start + len {
                        balloon.remove(&f);
                    }
                }
                Op::Report { start, len } => {
                    let frames: Vec<u64> = (start..start + len).filter(|f| !balloon.contains(f)).collect();
                    g.reclaim_and_give_back([frames.as_slice()]);
                }
                Op::Flush => {
                    g.flush();
                }
            }
            for r in rec.releases.lock().unwrap().iter() {
                prop_assert!(r.start % BLOCK_FRAMES == 0 && r.count % BLOCK_FRAMES == 0, "partial release {:?}", r);
            }
            let pending = g.pending_pages() > 0;
            let mut partial_blocks = 0;
            for b in 0..BLOCKS {
                let frames = b * BLOCK_FRAMES..(b + 1) * BLOCK_FRAMES;
                let states: Vec<FrameState> = frames.clone().map(|f| map.state(f).unwrap()).collect();
                let complete = frames.clone().all(|f| balloon.contains(&f));
                let released = states.iter().filter(|s| **s == FrameState::Released).count() as u64;
                if complete && !pending {
                    prop_assert_eq!(released, BLOCK_FRAMES, "complete block {} not released: {:?}", b, states);
                }
                if !complete {
                    prop_assert_eq!(released, 0, "incomplete block {} released in part", b);
                }
                for (f, s) in frames.zip(&states) {
                    let want_in = balloon.contains(&f);
                    prop_assert_eq!(s.owner() == crate::Owner::Balloon, want_in, "frame {} is {:?}", f, s);
                    if want_in && !complete {
                        prop_assert!(matches!(s, FrameState::Partial | FrameState::Gathered), "frame {} of incomplete block is {:?}", f, s);
                    }
                }
                partial_blocks += u64::from(states.contains(&FrameState::Partial));
            }
            prop_assert_eq!(g.stats().partial_blocks, partial_blocks);
        }
    }
}

#[test]
fn a_block_goes_when_its_last_frame_comes_and_is_backed_again_when_one_goes_back() {
    let (g, rec, map) = setup(false);
    let block: Vec<u64> = (512..1024).collect();
    g.add_buffer(&block[..300]);
    g.flush();
    assert!(rec.releases.lock().unwrap().is_empty());
    assert_eq!(
        (map.count(FrameState::Partial), g.stats().partial_blocks),
        (300, 1)
    );
    g.add_buffer(&block[300..]);
    g.flush();
    assert_eq!(*rec.releases.lock().unwrap(), vec![GfnRange::new(512, 512)]);
    assert_eq!(
        *rec.zaps.lock().unwrap(),
        vec![GfnRange::new(512, 512)],
        "one zap, one release"
    );
    assert_eq!(
        (g.stats().blocks_released, g.stats().partial_blocks),
        (1, 0)
    );
    // One frame back to the guest: the host backs the whole block again when it is
    // touched, so the other 511 wait again, and nothing more is released...
    g.return_frames(&[700]);
    assert_eq!(map.count(FrameState::Partial), 511);
    assert_eq!(map.count(FrameState::Released), 0);
    g.flush();
    assert_eq!(rec.releases.lock().unwrap().len(), 1);
    // ...until the frame is in the balloon again: then the block goes again, whole.
    g.add_buffer(&[700]);
    g.flush();
    assert_eq!(rec.releases.lock().unwrap().len(), 2);
    assert_eq!(map.count(FrameState::Released), 512);
}

#[test]
fn splitting_releases_the_waiting_frames_at_4k_only_where_the_backend_can() {
    for can_split in [true, false] {
        let (g, rec, map) = setup(can_split);
        g.add_buffer(&(10..20).collect::<Vec<_>>());
        g.flush();
        assert_eq!(map.count(FrameState::Partial), 10);
        assert!(
            rec.releases.lock().unwrap().is_empty(),
            "a partial block is never released"
        );
        let r = g.split_partial_blocks();
        if can_split {
            assert_eq!(r.map(|r| r.pages), Some(10));
            assert_eq!(*rec.releases.lock().unwrap(), vec![GfnRange::new(10, 10)]);
            assert_eq!((g.stats().blocks_split, g.stats().partial_blocks), (1, 0));
        } else {
            assert!(r.is_none(), "hugetlb pages cannot be freed in part");
            assert_eq!(map.count(FrameState::Partial), 10);
        }
    }
}
