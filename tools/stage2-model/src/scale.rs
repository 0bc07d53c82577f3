//! Reclaim at scale: a deterministic, single-process simulation of a balloon taking a quarter
//! of a large guest's memory, through the unchanged Stage2Gather, on a backend that counts
//! instead of calling the host.
//!
//! Each zap call is one stage-2 invalidation: KVM sends one flush request to every vCPU and
//! an IPI to each vCPU in guest mode, then waits for each of those to acknowledge. With zap
//! spans a call also covers in-use frames between reclaimed ranges, and each of those the
//! guest touches again refaults. The cost of a reclaim is modelled from constants measured on
//! KVM (docs/BENCHMARKS.md, "vCPU slope" and "Zap spans"):
//!
//! ```text
//! time = host_calls × call_us + pages × page_us + Σ_zaps flush_us(running vCPUs)
//!        + bridged × touched × refault_us
//! flush_us(0) = 0,  flush_us(v) = flush_first_us + v × flush_per_vcpu_us
//! ```
//!
//! `touched` is the fraction of bridged frames the guest touches again (1 = every one, the
//! worst case: the guest's working set interleaved with what it balloons).
//!
//! The gather's behaviour (ranges, calls) does not depend on the vCPU count, so each memory
//! size and strategy is gathered once and the flush costs are applied per vCPU count.

use crate::explore::XorShift;
use guest_mm::{
    BackendError, Capabilities, GfnRange, Layout, Readers, ReclaimConfig, Stage2Backend,
    Stage2Gather, Stage2Map, Strategy, ZapSpan, PAGE_SIZE,
};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Cost constants, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CostModel {
    /// One host call (madvise or fallocate) with no remote vCPU to flush.
    pub call_us: f64,
    /// Zapping and freeing one 4 KiB page, amortized in large ranges.
    pub page_us: f64,
    /// The first remote vCPU of a flush (kick it out of guest mode, wait for it).
    pub flush_first_us: f64,
    /// Each further vCPU in guest mode.
    pub flush_per_vcpu_us: f64,
    /// One refault of a frame a span bridged: host minor fault plus stage-2 fault.
    pub refault_us: f64,
}

impl CostModel {
    /// Fitted to reclaim-bench on the 16-core PVM device machine, 2026-11-26: per-page
    /// reclaim of 64 MiB with 1, 2, 4, 8, 16 vCPUs (64.0, 367.4, 393.3, 462.9, 559.3 ms for
    /// 16,384 zaps + 16,384 releases) and the gather's 10.8 ms for the same pages.
    pub const MEASURED_PVM: CostModel = CostModel {
        call_us: 1.62,
        page_us: 0.66,
        flush_first_us: 17.7,
        flush_per_vcpu_us: 0.84,
        // The deflate refill rate here (balloon-stress --fragment, 2 vCPUs: 462 MiB/s, the
        // guest writing and checking each refaulted page): 8.5 µs per page, an upper bound.
        refault_us: 8.5,
    };

    pub fn flush_us(&self, running_vcpus: u64) -> f64 {
        if running_vcpus == 0 {
            0.0
        } else {
            self.flush_first_us + running_vcpus as f64 * self.flush_per_vcpu_us
        }
    }
}

/// Which frames the balloon gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// One run: the guest's free memory is one block.
    Contiguous,
    /// Runs of 1–16 frames separated by gaps of 1–48 (about a quarter of the memory):
    /// the free memory of a long-running guest.
    Scattered,
}

/// Counts calls and pages; touches nothing.
#[derive(Default)]
struct Counting {
    zaps: AtomicU64,
    releases: AtomicU64,
    pages: AtomicU64,
    bridged: AtomicU64,
}

impl Stage2Backend for Counting {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "counting",
            granule: guest_mm::Granule::Page,
            // It stands for KVM on a shared memfd.
            zap_keeps_contents: true,
        }
    }
    fn zap(&self, s: &ZapSpan) -> Result<(), BackendError> {
        self.zaps.fetch_add(1, Ordering::Relaxed);
        self.bridged.fetch_add(s.bridged, Ordering::Relaxed);
        self.pages
            .fetch_add(s.ranges.iter().map(|r| r.count).sum(), Ordering::Relaxed);
        Ok(())
    }
    fn release(&self, _r: GfnRange) -> Result<(), BackendError> {
        self.releases.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What the gather did for one memory size, strategy, span bound and pattern.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Gathered {
    pub memory_bytes: u64,
    pub strategy: Strategy,
    /// The gather's zap span bound (0: one zap per range).
    pub zap_span_gap: u64,
    pub pattern: Pattern,
    pub pages: u64,
    pub zaps: u64,
    pub releases: u64,
    /// In-use frames the zap spans bridged.
    pub bridged: u64,
    pub batches: u64,
}

/// Linux's balloon buffer: 256 PFNs.
const BUFFER: usize = 256;

/// Feeds a quarter of `memory` (per `pattern`) to a gather with default batching and the
/// span bound `zap_span_gap`, in 256-frame buffers; returns its calls.
pub fn gather(memory: u64, strategy: Strategy, zap_span_gap: u64, pattern: Pattern) -> Gathered {
    let layout = Layout::new(memory).expect("memory size");
    let backend = Arc::new(Counting::default());
    let g = Stage2Gather::new(
        ReclaimConfig {
            zap_span_gap,
            ..ReclaimConfig::with_strategy(strategy)
        },
        Arc::new(Stage2Map::new(layout.clone())),
        backend.clone(),
        Readers::new(),
    )
    .expect("a valid configuration");
    let want = memory / PAGE_SIZE / 4;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut next = move |n: u64| 1 + rng.below(n);
    let mut buf = Vec::with_capacity(BUFFER);
    let mut given = 0;
    'ranges: for r in layout.ranges() {
        let (mut gfn, end) = (r.gpa / PAGE_SIZE, (r.gpa + r.size) / PAGE_SIZE);
        while gfn < end {
            let run = match pattern {
                Pattern::Contiguous => end - gfn,
                Pattern::Scattered => next(16).min(end - gfn),
            };
            for f in gfn..gfn + run {
                buf.push(f);
                given += 1;
                if buf.len() == BUFFER || given == want {
                    g.add_buffer(&buf);
                    buf.clear();
                }
                if given == want {
                    break 'ranges;
                }
            }
            gfn += run
                + match pattern {
                    Pattern::Contiguous => 0,
                    Pattern::Scattered => next(48),
                };
        }
    }
    if !buf.is_empty() {
        g.add_buffer(&buf);
    }
    g.flush();
    let batches = g.stats().batches;
    Gathered {
        memory_bytes: memory,
        strategy,
        zap_span_gap,
        pattern,
        pages: backend.pages.load(Ordering::Relaxed),
        zaps: backend.zaps.load(Ordering::Relaxed),
        releases: backend.releases.load(Ordering::Relaxed),
        bridged: backend.bridged.load(Ordering::Relaxed),
        batches,
    }
}

/// One row of the scale table.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Row {
    pub vcpus: u64,
    pub running_vcpus: u64,
    #[serde(flatten)]
    pub gathered: Gathered,
    pub reclaimed_gib: f64,
    pub invalidations: u64,
    pub ipis: u64,
    pub acks_waited: u64,
    pub invalidations_per_gib: f64,
    pub ipis_per_gib: f64,
    pub modeled_seconds: f64,
    pub modeled_ms_per_gib: f64,
    /// Of which the refaults of bridged frames.
    pub refault_ms_per_gib: f64,
}

/// Applies the cost model to what the gather did, for `vcpus` of which the fraction `busy`
/// is in guest mode during the reclaim, and of whose bridged frames the fraction `touched`
/// refaults.
pub fn row(g: Gathered, vcpus: u64, busy: f64, touched: f64, cost: &CostModel) -> Row {
    let running = ((vcpus as f64) * busy).round() as u64;
    let gib = (g.pages * PAGE_SIZE) as f64 / (1u64 << 30) as f64;
    let invalidations = g.zaps;
    let ipis = invalidations * running;
    let base = (g.zaps + g.releases) as f64 * cost.call_us + g.pages as f64 * cost.page_us;
    let refault_us = g.bridged as f64 * touched * cost.refault_us;
    let us = base + invalidations as f64 * cost.flush_us(running) + refault_us;
    Row {
        vcpus,
        running_vcpus: running,
        gathered: g,
        reclaimed_gib: gib,
        invalidations,
        ipis,
        acks_waited: ipis,
        invalidations_per_gib: invalidations as f64 / gib,
        ipis_per_gib: ipis as f64 / gib,
        modeled_seconds: us / 1e6,
        modeled_ms_per_gib: us / 1e3 / gib,
        refault_ms_per_gib: refault_us / 1e3 / gib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_page_invalidates_every_page_and_the_gather_one_per_batch() {
        let mem = 4u64 << 30;
        let pp = gather(mem, Strategy::PerPage, 0, Pattern::Contiguous);
        let ga = gather(mem, Strategy::Gather, 0, Pattern::Contiguous);
        assert_eq!(pp.pages, mem / PAGE_SIZE / 4);
        assert_eq!(pp.zaps, pp.pages, "one invalidation per page");
        assert_eq!(ga.pages, pp.pages);
        // 1 GiB in 64 MiB batches.
        assert_eq!(ga.zaps, 16);
        let c = CostModel::MEASURED_PVM;
        let (rp, rg) = (row(pp, 4096, 1.0, 1.0, &c), row(ga, 4096, 1.0, 1.0, &c));
        assert_eq!(rp.ipis_per_gib, 262_144.0 * 4096.0);
        assert_eq!(rg.ipis_per_gib, 16.0 * 4096.0);
        assert!(rg.modeled_seconds < rp.modeled_seconds / 100.0);
        // Idle vCPUs get no IPI: the flush costs nothing but the call.
        assert_eq!(row(pp, 4096, 0.0, 1.0, &c).ipis, 0);
    }

    #[test]
    fn scattered_memory_is_a_quarter_of_the_guest_and_deterministic() {
        let mem = 1u64 << 30;
        let a = gather(mem, Strategy::Gather, 0, Pattern::Scattered);
        let b = gather(mem, Strategy::Gather, 0, Pattern::Scattered);
        assert_eq!((a.pages, a.zaps), (b.pages, b.zaps));
        assert_eq!(a.pages, mem / PAGE_SIZE / 4);
        let pb = gather(mem, Strategy::PerBuffer, 0, Pattern::Scattered);
        assert!(
            a.zaps <= pb.zaps,
            "gather {} > per-buffer {}",
            a.zaps,
            pb.zaps
        );
    }

    #[test]
    fn zap_spans_make_one_invalidation_per_batch_on_scattered_memory() {
        let mem = 1u64 << 30;
        let ranges = gather(mem, Strategy::Gather, 0, Pattern::Scattered);
        let spans = gather(mem, Strategy::Gather, 64, Pattern::Scattered);
        assert_eq!(spans.pages, ranges.pages);
        // Gaps are at most 48 in-use frames: one span per batch.
        assert_eq!(spans.zaps, spans.batches, "{spans:?}");
        assert!(ranges.zaps > 100 * spans.zaps, "{ranges:?} vs {spans:?}");
        assert_eq!(
            spans.releases, ranges.releases,
            "releases stay one per range"
        );
        assert!(spans.bridged > 0);
        let c = CostModel::MEASURED_PVM;
        // Many busy vCPUs: flushes dominate, spans win even if every bridged frame refaults.
        assert!(
            row(spans, 4096, 1.0, 1.0, &c).modeled_seconds
                < row(ranges, 4096, 1.0, 1.0, &c).modeled_seconds / 10.0
        );
        // One idle vCPU: flushes cost nothing, so refaulting every bridged frame loses.
        assert!(
            row(spans, 1, 0.0, 1.0, &c).modeled_seconds
                > row(ranges, 1, 0.0, 1.0, &c).modeled_seconds
        );
    }
}
