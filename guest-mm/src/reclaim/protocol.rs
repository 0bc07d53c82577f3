//! The reclaim protocol: zap → invalidate → release, for one batch. This is the only code
//! that zaps, waits for a grace period, or releases.
//!
//! Why this order. Three things hold references to a guest page: the stage-2 tables and every
//! vCPU's TLB; the VMM's own state about it (its reverse map and dirty bits, and pointers a
//! VMM thread may hold while it handles an exit: the "second TLB"); and the host page itself.
//! A stale translation that outlives the release writes into a page that has been freed or
//! handed to someone else, and dropping the reverse map before the flush loses the dirty
//! state of writes made through it (Linux, "mm: delay rmap removal until after TLB flush",
//! 6.2). So, as mmu_gather does:
//!
//! 1. `zap`: one backend call per span removes the stage-2 mappings. KVM flushes every
//!    vCPU's TLB inside that call, so a batch whose frames fit one span costs one invalidation
//!    however many ranges it has.
//! 2. `invalidate`: a grace period in which every VMM thread that may hold a guest address
//!    passes a quiescent point (`Readers::synchronize`).
//! 3. `release`: only now the reverse-map state is dropped and the host pages of exactly the
//!    reclaimed ranges are freed (never a frame a span bridged: the guest still owns it).
//!
//! Each phase is a type: `Batch::zap` gives a `ZappedBatch`, whose only way forward is
//! `invalidate`, which gives the `InvalidatedBatch` that alone can `release`. Release before
//! invalidate does not compile, and the stage-2 map refuses a release of a frame that was not
//! zapped. A failed host call leaves its frames in the balloon, Retained (still backed), and
//! says which call failed on which frames.

use super::events::{EventLog, Phase};
use super::metrics::{BatchReport, CounterSnapshot, KvmCounters, RanBatch};
use super::span::ZapSpan;
use crate::backend::Stage2Backend;
use crate::grace::Readers;
use crate::stage2_map::Stage2Map;
use std::time::{Duration, Instant};

/// Readers slower than this to quiesce are kicked (and still waited for).
pub const KICK_AFTER: Duration = Duration::from_millis(1);

/// What a batch runs against.
pub struct Pipeline<'a> {
    pub map: &'a Stage2Map,
    pub backend: &'a dyn Stage2Backend,
    pub readers: &'a Readers,
    pub counters: Option<&'a dyn KvmCounters>,
    pub log: Option<&'a EventLog>,
}

impl Pipeline<'_> {
    fn snapshot(&self) -> CounterSnapshot {
        self.counters.map(|c| c.snapshot()).unwrap_or_default()
    }
}

/// Frames taken from the batcher (Batched in the stage-2 map), planned into zap spans.
pub struct Batch {
    spans: Vec<ZapSpan>,
    report: BatchReport,
}

/// Stage-2 mappings removed; VMM threads may still hold references.
pub struct ZappedBatch {
    batch: Batch,
    at_zap_start: CounterSnapshot,
    at_zap_end: CounterSnapshot,
}

/// Every VMM thread has passed a quiescent point since the zap: safe to release.
pub struct InvalidatedBatch {
    zapped: ZappedBatch,
}

/// Runs one batch through the protocol.
pub fn run(batch: Batch, p: &Pipeline) -> RanBatch {
    batch.zap(p).invalidate(p).release(p)
}

impl Batch {
    pub(super) fn new(id: u64, spans: Vec<ZapSpan>, wait_us: u64) -> Self {
        let report = BatchReport {
            id,
            pages: spans.iter().flat_map(|s| &s.ranges).map(|r| r.count).sum(),
            ranges: spans.iter().map(|s| s.ranges.len() as u64).sum(),
            spans: spans.len() as u64,
            bridged: spans.iter().map(|s| s.bridged).sum(),
            wait_us,
            ..Default::default()
        };
        Self { spans, report }
    }

    pub fn id(&self) -> u64 {
        self.report.id
    }

    pub fn zap(mut self, p: &Pipeline) -> ZappedBatch {
        let t = Instant::now();
        let at_zap_start = p.snapshot();
        let mut zapped = Vec::with_capacity(self.spans.len());
        for span in std::mem::take(&mut self.spans) {
            let r = &mut self.report;
            r.host_calls += 1;
            match p.backend.zap(&span) {
                Ok(()) => {
                    for &range in &span.ranges {
                        p.map.mark_zapped(range);
                        if let Some(log) = p.log {
                            log.record(r.id, Phase::Zap(range));
                        }
                    }
                    zapped.push(span);
                }
                Err(e) => {
                    // Nothing was removed. The guest gave the frames away, so they stay in the
                    // balloon, still backed, until it takes them back.
                    tracing::error!("stage-2 zap failed, frames stay in the balloon: {e}");
                    r.errors.push(e.to_string());
                    for &range in &span.ranges {
                        p.map.mark_retained(range);
                        r.pages -= range.count;
                        r.ranges -= 1;
                    }
                    r.spans -= 1;
                    r.bridged -= span.bridged;
                }
            }
        }
        let at_zap_end = p.snapshot();
        self.report.kvm_flush_requests = at_zap_start
            .flush_requests
            .zip(at_zap_end.flush_requests)
            .map(|(b, a)| a.saturating_sub(b));
        self.spans = zapped;
        self.report.zap_us = t.elapsed().as_micros() as u64;
        ZappedBatch {
            batch: self,
            at_zap_start,
            at_zap_end,
        }
    }
}

impl ZappedBatch {
    pub fn invalidate(mut self, p: &Pipeline) -> InvalidatedBatch {
        let t = Instant::now();
        let grace = p.readers.synchronize(KICK_AFTER);
        let r = &mut self.batch.report;
        r.invalidate_us = t.elapsed().as_micros() as u64;
        (r.grace_waited_for, r.grace_kicked) = (grace.waited_for, grace.kicked);
        if let Some(log) = p.log {
            log.record(r.id, Phase::Invalidated);
        }
        InvalidatedBatch { zapped: self }
    }
}

impl InvalidatedBatch {
    /// Releases exactly the reclaimed ranges of every span (never a bridged frame).
    pub fn release(self, p: &Pipeline) -> RanBatch {
        let t = Instant::now();
        let ZappedBatch {
            batch: Batch { spans, mut report },
            at_zap_start,
            at_zap_end,
        } = self.zapped;
        for range in spans.into_iter().flat_map(|s| s.ranges) {
            report.host_calls += 1;
            if let Err(e) = p.backend.release(range) {
                // Gone from stage 2 and given up by the guest, but the host did not get the
                // memory back: say so; the frames stay in the balloon, Retained.
                tracing::error!("release failed, host memory not returned: {e}");
                report.errors.push(e.to_string());
                p.map.mark_retained(range);
                report.pages -= range.count;
                report.ranges -= 1;
                continue;
            }
            p.map.mark_released(range);
            if let Some(log) = p.log {
                log.record(report.id, Phase::Release(range));
            }
        }
        report.release_us = t.elapsed().as_micros() as u64;
        RanBatch {
            report,
            at_zap_start,
            at_zap_end,
        }
    }
}
