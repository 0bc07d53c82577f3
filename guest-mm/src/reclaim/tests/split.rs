//! 2 MiB blocks released at 4 KiB (`--partial-blocks split`, shmem THP), checked against a
//! model of what the host really holds (`shmem_host`): after any sequence of inflates,
//! splits, deflates the guest then writes, free page reports and re-inflates, a frame the map
//! calls Released is one the host holds no page for, and every other frame is backed; a
//! report's freed frames are those the host stopped backing.

use super::batcher::Batcher;
use super::protocol;
use super::shmem_host::ShmemHost;
use super::Strategy as Reclaim;
use super::*;
use crate::layout::PAGE_SIZE;
use proptest::prelude::*;
use proptest::strategy::Strategy;
use std::collections::BTreeSet;

const BLOCKS: u64 = 2;

/// A gather in split mode on the host model, every host call checked against the owners.
fn setup() -> (Stage2Gather, Arc<ShmemHost>, Arc<Stage2Map>) {
    let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
    let host = Arc::new(ShmemHost::new(
        map.layout().end() / PAGE_SIZE / BLOCK_FRAMES,
    ));
    let checked = Arc::new(OwnershipChecked::new(host.clone(), map.clone()));
    let config = ReclaimConfig {
        partial_blocks: PartialBlocks::Split,
        ..ReclaimConfig::with_strategy(Reclaim::Gather)
    };
    let g = Stage2Gather::new(config, map.clone(), checked, Readers::new()).unwrap();
    (g, host, map)
}

fn inflate(g: &Stage2Gather, frames: std::ops::Range<u64>) {
    let frames: Vec<u64> = frames.rev().collect();
    for b in frames.chunks(256) {
        g.add_buffer(b);
    }
}

/// A deflate of `frames`, which the guest then writes.
fn deflate_and_write(g: &Stage2Gather, host: &ShmemHost, frames: &[u64]) {
    g.return_frames(frames);
    for &f in frames {
        host.touch(f);
    }
}

/// The map's account agrees with the host: Released frames are not backed, all others are.
fn map_matches_host(map: &Stage2Map, host: &ShmemHost) -> Result<(), String> {
    for f in 0..BLOCKS * BLOCK_FRAMES {
        let s = map.state(f).unwrap();
        if (s == FrameState::Released) == host.backed(f) {
            return Err(format!(
                "frame {f:#x} is {s:?} in the map; the host {} it",
                if host.backed(f) { "backs" } else { "freed" }
            ));
        }
    }
    Ok(())
}

/// The sequence: a block released in two splits, one frame deflated and written
/// (the host backs the whole block again), then inflated again.
#[test]
fn a_block_released_in_two_splits_is_backed_again_when_a_frame_goes_back() {
    let (g, host, map) = setup();
    inflate(&g, 0..300);
    g.split_partial_blocks();
    inflate(&g, 300..512);
    g.split_partial_blocks();
    assert_eq!(
        (map.count(FrameState::Released), host.backed_in(0)),
        (512, 0)
    );
    deflate_and_write(&g, &host, &[0]);
    assert_eq!(
        host.backed_in(0),
        512,
        "the host backs the whole block again"
    );
    assert_eq!(
        (
            map.count(FrameState::Released),
            map.count(FrameState::Partial)
        ),
        (0, 511),
        "the other 511 are held again, waiting"
    );
    assert_eq!(g.stats().partial_blocks, 1);
    map_matches_host(&map, &host).unwrap();
    // In again: the block is complete and goes whole, with one release.
    inflate(&g, 0..1);
    g.split_partial_blocks();
    assert_eq!(host.backed_in(0), 0);
    assert_eq!(
        host.releases.lock().unwrap().last(),
        Some(&GfnRange::new(0, BLOCK_FRAMES))
    );
    assert_eq!(map.count(FrameState::Released), 512);
    map_matches_host(&map, &host).unwrap();
}

/// With the protocol on the worker, a batch's frames are Released before the front lock is
/// taken again to record the batch as ended; a deflate in between must wait, or the block
/// bookkeeping of the ended batch would miss that its block had been a hole.
#[test]
fn a_released_frame_waits_for_its_batch_to_be_recorded_as_ended() {
    let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
    let host = Arc::new(ShmemHost::new(32));
    let mut b = Batcher::new(map.clone(), host.capabilities());
    b.accept(&(0..BLOCK_FRAMES).collect::<Vec<_>>());
    let config = ReclaimConfig::with_strategy(Reclaim::Gather);
    let taken = b.take(&config).unwrap();
    let readers = Readers::new();
    protocol::run(
        taken.batch,
        &protocol::Pipeline {
            map: &map,
            backend: host.as_ref(),
            readers: &readers,
            counters: None,
            log: None,
        },
    );
    assert_eq!(map.count(FrameState::Released), BLOCK_FRAMES);
    let (out, in_flight) = b.give_back(&[7], None);
    assert_eq!((out.given_back(), in_flight), (0, vec![7]));
    b.finished(&taken.ranges);
    let (out, in_flight) = b.give_back(&[7], None);
    assert_eq!((out.repopulated, in_flight), (1, vec![]));
    host.touch(7);
    assert_eq!(map.count(FrameState::Partial), BLOCK_FRAMES - 1);
    map_matches_host(&map, &host).unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Inflate {
        start: u64,
        len: u64,
    },
    /// A deflate; the guest then writes the frames it got back.
    Deflate {
        start: u64,
        len: u64,
    },
    /// A free page report; the guest then reuses (writes) the reported frames.
    Report {
        start: u64,
        len: u64,
    },
    /// The target is reached: the frames waiting in partial blocks go at 4 KiB.
    Split,
    Flush,
}

/// Runs that often start or end on a half or whole block, so that blocks complete.
fn run() -> impl Strategy<Value = (u64, u64)> {
    let end = BLOCKS * BLOCK_FRAMES;
    prop_oneof![
        (0..end, 1..=BLOCK_FRAMES),
        (0..BLOCKS * 4, 1..=4u64).prop_map(|(q, n)| (q * BLOCK_FRAMES / 4, n * BLOCK_FRAMES / 4)),
        (0..end, 1..=4u64),
    ]
    .prop_map(move |(s, l)| (s, l.min(end - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => run().prop_map(|(start, len)| Op::Inflate { start, len }),
        3 => run().prop_map(|(start, len)| Op::Deflate { start, len }),
        1 => run().prop_map(|(start, len)| Op::Report { start, len }),
        3 => Just(Op::Split),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// In split mode, through any sequence: the map's Released frames are exactly those the
    /// host holds no page for (so `partial_block_bytes`, the Partial frames, is what the
    /// host holds for the balloon), the partial-block count is right, the balloon holds
    /// what the guest gave it, and after a split no frame in the balloon is held.
    #[test]
    fn split_mode_accounting_matches_what_the_host_holds(ops in prop::collection::vec(op(), 1..40)) {
        let (g, host, map) = setup();
        let mut balloon: BTreeSet<u64> = BTreeSet::new();
        for op in &ops {
            match *op {
                Op::Inflate { start, len } => {
                    inflate(&g, start..start + len);
                    balloon.extend(start..start + len);
                }
                Op::Deflate { start, len } => {
                    let frames: Vec<u64> = (start..start + len).filter(|f| balloon.remove(f)).collect();
                    deflate_and_write(&g, &host, &frames);
                }
                Op::Report { start, len } => {
                    let frames: Vec<u64> = (start..start + len).filter(|f| !balloon.contains(f)).collect();
                    let out = g.reclaim_and_give_back([frames.as_slice()]);
                    // The frames it says it freed are exactly those the host no longer backs.
                    for &f in &out.accepted {
                        prop_assert_eq!(out.freed.binary_search(&f).is_ok(), !host.backed(f), "reported frame {}", f);
                    }
                    for f in out.accepted {
                        host.touch(f);
                    }
                }
                Op::Split => {
                    g.split_partial_blocks();
                }
                Op::Flush => {
                    g.flush();
                }
            }
            if let Err(e) = map_matches_host(&map, &host) {
                prop_assert!(false, "after {:?}: {}", op, e);
            }
            let mut partial_blocks = 0;
            for b in 0..BLOCKS {
                let frames = b * BLOCK_FRAMES..(b + 1) * BLOCK_FRAMES;
                let mut partial = false;
                for f in frames {
                    let s = map.state(f).unwrap();
                    prop_assert_eq!(s.owner() == crate::Owner::Balloon, balloon.contains(&f), "frame {} is {:?}", f, s);
                    partial |= s == FrameState::Partial;
                }
                partial_blocks += u64::from(partial);
            }
            prop_assert_eq!(g.stats().partial_blocks, partial_blocks);
            if matches!(op, Op::Split) {
                prop_assert_eq!(map.count(FrameState::Released), balloon.len() as u64,
                    "after a split the host holds nothing the balloon has");
            }
        }
    }
}
