//! Scenarios and their exploration under shuttle.
//!
//! Why shuttle: the gather must run unchanged, as blocking code that calls `zap` and waits,
//! so the model needs real (green) threads whose interleaving a tool controls. Shuttle gives
//! both searches the issue asks for over the same code: an exhaustive depth-first search of
//! every schedule for a small configuration, and randomized/PCT schedules for larger ones,
//! each failure replayable from the printed schedule. loom would add a weak-memory model we do
//! not need (the protocol's steps are serialized by the model's lock; the question is their
//! order, not memory ordering) and its exhaustive search grows too fast for hundreds of frames.

use crate::backend::{self, ModelBackend, Shared};
use crate::bounded::PreemptionBounded;
use crate::machine::{Counters, Machine, MachineConfig, Op, Order};
use guest_mm::reclaim::config::DEFAULT_ZAP_SPAN_GAP;
use guest_mm::{Layout, Readers, ReclaimConfig, Stage2Gather, Stage2Map, Strategy, PAGE_SIZE};
use rand::RngCore;
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use std::sync::{Arc, Mutex as StdMutex};

/// What the guest and the VMM do in one execution.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// A fixed script small enough for an exhaustive search: vcpu0 writes gfn 1 twice,
    /// vcpu1 reads it, the gather reclaims gfns 1–2 and gives gfn 1 back, one writeback pass.
    Small,
    /// The same size for zap spans: vcpu0 writes in-use gfn 2 twice, vcpu1 reads it, the
    /// gather reclaims gfns 1 and 3 with one span over 1–3 (bridging gfn 2) and gives gfn 1
    /// back, one writeback pass.
    SmallSpan,
    /// Per execution, from shuttle's (replayable) random source: each vCPU runs `ops` reads
    /// and writes, mostly on the frames the balloon takes; the VMM inflates and deflates
    /// `rounds` times in buffers of up to `buffer` frames.
    Random {
        ops: usize,
        rounds: usize,
        buffer: usize,
    },
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scenario {
    pub vcpus: usize,
    pub frames: u64,
    pub large_pages: bool,
    pub tlb_sets: usize,
    pub tlb_ways: usize,
    pub strategy: Strategy,
    pub max_batch_pages: u64,
    /// In-use frames a span may bridge per gap (the gather's `zap_span_gap`).
    pub zap_span_gap: u64,
    /// Give memory back in whole 2 MiB blocks that cannot be split (hugetlb), instead of
    /// 4 KiB pages: the gather holds frames in their blocks until each is complete.
    pub blocks: bool,
    pub order: Order,
    pub writeback_rounds: usize,
    pub workload: Workload,
}

impl Scenario {
    /// 2 vCPUs, 3 frames: the exhaustive configuration.
    pub fn small(order: Order) -> Self {
        Self {
            vcpus: 2,
            frames: 3,
            large_pages: false,
            tlb_sets: 2,
            tlb_ways: 2,
            strategy: Strategy::Gather,
            max_batch_pages: 16,
            zap_span_gap: DEFAULT_ZAP_SPAN_GAP,
            blocks: false,
            order,
            writeback_rounds: 1,
            workload: Workload::Small,
        }
    }

    /// The random configuration on 2 MiB blocks: each round the balloon takes one of the two
    /// blocks whole (in 256-frame buffers) besides its random frames, and gives some back.
    pub fn random_blocks(order: Order) -> Self {
        Self {
            blocks: true,
            workload: Workload::Random {
                ops: 24,
                rounds: 3,
                buffer: 16,
            },
            ..Self::random(order)
        }
    }

    /// 2 vCPUs, 4 frames, one span bridging an in-use frame: the exhaustive configuration
    /// for zap spans.
    pub fn small_span(order: Order) -> Self {
        Self {
            frames: 4,
            workload: Workload::SmallSpan,
            ..Self::small(order)
        }
    }

    /// 4 vCPUs, 1024 frames mapped by two 2 MiB leaves (split as the gather zaps parts of
    /// them), concurrent inflate, deflate, guest writes and writeback.
    pub fn random(order: Order) -> Self {
        Self {
            vcpus: 4,
            frames: 1024,
            large_pages: true,
            tlb_sets: 8,
            tlb_ways: 4,
            strategy: Strategy::Gather,
            max_batch_pages: 24,
            zap_span_gap: DEFAULT_ZAP_SPAN_GAP,
            blocks: false,
            order,
            writeback_rounds: 2,
            workload: Workload::Random {
                ops: 24,
                rounds: 3,
                buffer: 16,
            },
        }
    }
}

/// A tiny deterministic generator (xorshift64). The random workload seeds it from shuttle's
/// random source, so a schedule's workload replays with it; the scale simulation from a
/// constant.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The frames the balloon works on in a random workload: where the races are.
const HOT_FRAMES: u64 = 48;

struct Script {
    vcpu_ops: Vec<Vec<Op>>,
    /// Each round: the buffers to inflate, then the frames to deflate.
    rounds: Vec<(Vec<Vec<u64>>, Vec<u64>)>,
}

fn script(s: &Scenario) -> Script {
    match s.workload {
        Workload::Small => Script {
            vcpu_ops: vec![
                vec![Op::Write(1, 0x1_0001), Op::Write(1, 0x1_0002)],
                vec![Op::Read(1)],
            ],
            rounds: vec![(vec![vec![2, 1]], vec![1])],
        },
        Workload::SmallSpan => Script {
            vcpu_ops: vec![
                vec![Op::Write(2, 0x2_0001), Op::Write(2, 0x2_0002)],
                vec![Op::Read(2)],
            ],
            rounds: vec![(vec![vec![3, 1]], vec![1])],
        },
        Workload::Random {
            ops,
            rounds,
            buffer,
        } => {
            let mut r = XorShift(shuttle::rand::thread_rng().next_u64() | 1);
            let hot = HOT_FRAMES.min(s.frames);
            let pick = |r: &mut XorShift| {
                if r.below(4) == 0 {
                    r.below(s.frames)
                } else {
                    r.below(hot)
                }
            };
            let vcpu_ops = (0..s.vcpus)
                .map(|c| {
                    (0..ops)
                        .map(|i| {
                            let g = pick(&mut r);
                            if r.below(3) == 0 {
                                Op::Read(g)
                            } else {
                                Op::Write(g, ((c as u64 + 1) << 32) | (i as u64 + 1))
                            }
                        })
                        .collect()
                })
                .collect();
            let rounds = (0..rounds)
                .map(|round| {
                    let mut buffers: Vec<Vec<u64>> = (0..1 + r.below(3))
                        .map(|_| {
                            (0..1 + r.below(buffer as u64))
                                .map(|_| pick(&mut r))
                                .collect()
                        })
                        .collect();
                    if s.blocks {
                        // One whole 2 MiB block, descending, in Linux-sized buffers.
                        let first = (round as u64 % (s.frames / 512)) * 512;
                        let block: Vec<u64> = (first..first + 512).rev().collect();
                        buffers.extend(block.chunks(256).map(<[u64]>::to_vec));
                    }
                    let all: Vec<u64> = buffers.iter().flatten().copied().collect();
                    let back = all.iter().copied().filter(|_| r.below(2) == 0).collect();
                    (buffers, back)
                })
                .collect();
            Script { vcpu_ops, rounds }
        }
    }
}

/// One execution: build the machine, start vCPUs and writeback, drive the unchanged gather
/// from this thread, stop, check the end state. Violations panic (see `machine`).
pub fn execution(s: &Scenario) -> Counters {
    let machine = Machine::new(&MachineConfig {
        vcpus: s.vcpus,
        frames: s.frames,
        large_pages: s.large_pages,
        tlb_sets: s.tlb_sets,
        tlb_ways: s.tlb_ways,
        order: s.order,
    });
    let shared = Shared::new(machine);
    let script = script(s);
    let layout = Layout::new(s.frames * PAGE_SIZE).expect("scenario frames");
    let gather = Stage2Gather::new(
        ReclaimConfig {
            batch_pages: s.max_batch_pages,
            zap_span_gap: s.zap_span_gap,
            ..ReclaimConfig::with_strategy(s.strategy)
        },
        Arc::new(Stage2Map::new(layout)),
        Arc::new(ModelBackend::with_granule(
            shared.clone(),
            if s.blocks {
                guest_mm::Granule::Block { can_split: false }
            } else {
                guest_mm::Granule::Page
            },
        )),
        // The VMM's own references are not modelled (guest-mm's grace tests cover them):
        // no readers, so the grace period returns at once.
        Readers::new(),
    )
    .expect("a valid configuration");
    let vcpus: Vec<_> = script
        .vcpu_ops
        .into_iter()
        .enumerate()
        .map(|(cpu, ops)| {
            let sh = shared.clone();
            shuttle::thread::spawn(move || backend::vcpu(&sh, cpu, &ops))
        })
        .collect();
    let wb = {
        let sh = shared.clone();
        let rounds = s.writeback_rounds;
        shuttle::thread::spawn(move || backend::writeback(&sh, rounds))
    };
    for (buffers, back) in &script.rounds {
        for b in buffers {
            gather.add_buffer(b);
        }
        gather.flush();
        gather.return_frames(back);
    }
    drop(gather);
    wb.join().unwrap();
    for v in vcpus {
        v.join().unwrap();
    }
    let m = shared.lock();
    m.check_final();
    m.counters
}

/// How to search the schedules.
#[derive(Clone, Copy, Debug)]
pub enum Search {
    /// Every schedule (depth-first) with at most `preemptions` preemptions.
    Exhaustive { preemptions: usize },
    /// Uniformly random choices at every scheduling point.
    Random { schedules: usize, seed: u64 },
    /// Probabilistic concurrency testing: random priorities with `depth` change points.
    Pct {
        schedules: usize,
        depth: usize,
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub executions: usize,
    pub counters: Counters,
}

/// Runs `s` under `search`. A violation panics out of here with its report (shuttle prints
/// the schedule that reproduces it first).
pub fn explore(s: Scenario, search: Search) -> Summary {
    let total = Arc::new(StdMutex::new(Counters::default()));
    let t = total.clone();
    let f = move || {
        let c = execution(&s);
        t.lock().unwrap().add(&c);
    };
    let config = shuttle::Config::new();
    let executions = match search {
        Search::Exhaustive { preemptions } => {
            shuttle::Runner::new(PreemptionBounded::new(preemptions), config).run(f)
        }
        Search::Random { schedules, seed } => {
            shuttle::Runner::new(RandomScheduler::new_from_seed(seed, schedules), config).run(f)
        }
        Search::Pct {
            schedules,
            depth,
            seed,
        } => {
            shuttle::Runner::new(PctScheduler::new_from_seed(seed, depth, schedules), config).run(f)
        }
    };
    let counters = *total.lock().unwrap();
    Summary {
        executions,
        counters,
    }
}
