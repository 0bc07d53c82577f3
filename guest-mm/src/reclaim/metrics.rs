//! What reclaim reports: one `BatchReport` per batch, totals and latency histograms
//! (`ReclaimStats`), and KVM's counters around each batch.
//!
//! KVM's per-vCPU counters say whether a batch's invalidation reached each vCPU (`tlb_flush`)
//! and what it cost afterwards (`pf_fixed`: refaults). A vCPU handles KVM's flush request at
//! its next guest entry, which may be after the zap returned, so a batch's window runs from
//! its zap until the next batch's zap, or, for the newest batch, until the moment a report is
//! made. The recorder keeps raw counter snapshots; every report is computed from them and a
//! snapshot of now, and reading never changes what is recorded.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A histogram with power-of-two buckets: bucket i counts values in [2^i, 2^(i+1)) (bucket 0
/// also holds 0). Values are in whatever unit the caller records (microseconds, pages).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: u64,
    pub max: u64,
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        let b = (64 - v.leading_zeros()).saturating_sub(1) as usize;
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum += v;
        self.max = self.max.max(v);
    }

    /// Upper bound of the bucket holding the p-th percentile (0 < p <= 100).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return ((1u64 << (i + 1)) - 1).min(self.max);
            }
        }
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

/// One vCPU's KVM statistics that show an invalidation reaching it and its cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// TLB flushes the vCPU performed (KVM_REQ_TLB_FLUSH handled).
    pub tlb_flush: u64,
    /// Stage-2 page faults fixed (a refault of a zapped frame is one).
    pub pf_fixed: u64,
    /// Stage-2 page faults taken.
    pub pf_taken: u64,
    pub exits: u64,
}

/// KVM's counters at one moment: the VM's stage-2 flush requests
/// (`remote_tlb_flush_requests`) and each vCPU's counters, in vCPU order (empty where
/// per-vCPU statistics are unavailable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub flush_requests: Option<u64>,
    pub vcpus: Vec<VcpuCounters>,
}

impl CounterSnapshot {
    fn pf_fixed(&self) -> u64 {
        self.vcpus.iter().map(|c| c.pf_fixed).sum()
    }
}

/// Where KVM's counters come from (the VM's and vCPUs' statistics file descriptors).
pub trait KvmCounters: Send + Sync {
    fn snapshot(&self) -> CounterSnapshot;
}

/// The outcome of one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchReport {
    pub id: u64,
    pub pages: u64,
    pub ranges: u64,
    /// Zap calls: one per span.
    pub spans: u64,
    /// In-use frames the spans bridged (zapped, kept, never freed).
    pub bridged: u64,
    pub host_calls: u64,
    /// KVM flush requests during the zaps, where KVM's counters are attached.
    pub kvm_flush_requests: Option<u64>,
    /// Each vCPU's `tlb_flush` growth from this batch's zap until the next batch's zap, or
    /// until the report was made: the invalidation reached it.
    pub vcpu_tlb_flushes: Vec<u64>,
    /// Stage-2 faults fixed on all vCPUs from the end of this batch's zap until the next
    /// batch's zap, or until the report was made: refaults the batch caused, plus whatever
    /// else the guest faulted in meanwhile.
    pub refaults_after: Option<u64>,
    /// Microseconds from the batch's first frame until the protocol started on it.
    pub wait_us: u64,
    pub zap_us: u64,
    pub invalidate_us: u64,
    pub release_us: u64,
    /// Readers the grace period waited for, and of those, how many were kicked.
    pub grace_waited_for: u32,
    pub grace_kicked: u32,
    /// Host calls that failed, with context. Their frames stay in the balloon, Retained.
    pub errors: Vec<String>,
}

/// Totals over the gather's life, the newest batches, and latency histograms. Fields missing
/// from a report (another version's) read as their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReclaimStats {
    pub batches: u64,
    /// Frames accepted into the balloon (inflates, free page reports, the probe).
    pub pages_gathered: u64,
    /// Frames whose host pages were freed.
    pub pages_reclaimed: u64,
    pub ranges: u64,
    /// Zap calls made: one per span.
    pub spans: u64,
    /// Block backings: 2 MiB blocks released whole.
    pub blocks_released: u64,
    /// Block backings: blocks holding frames that wait for the rest of their block (the host
    /// still holds these blocks whole).
    pub partial_blocks: u64,
    /// Block backings: partial blocks whose waiting frames were released at 4 KiB (split).
    pub blocks_split: u64,
    /// In-use frames bridged by spans (zapped and kept).
    pub bridged: u64,
    /// Host calls made: one zap per span and one release per range.
    pub host_calls: u64,
    /// KVM `remote_tlb_flush_requests` that grew during zaps, when counters are attached.
    pub kvm_flush_requests: u64,
    /// Frames given back to the guest (deflates, completed reports, resets).
    pub pages_returned: u64,
    /// Frames refused, each counted once, with its reason logged by the caller.
    pub invalid_frames: u64,
    pub host_call_errors: u64,
    /// Grace periods that had to wait for a reader, and readers kicked.
    pub grace_waits: u64,
    pub grace_kicks: u64,
    /// Each vCPU's `tlb_flush` growth after zaps (`BatchReport::vcpu_tlb_flushes`), summed.
    pub vcpu_tlb_flushes: Vec<u64>,
    /// Stage-2 faults fixed after batches (`BatchReport::refaults_after`), summed.
    pub refaults_after: u64,
    /// The last `RECENT_BATCHES` batches, oldest first.
    pub recent_batches: VecDeque<BatchReport>,
    pub pages_per_batch: Histogram,
    pub ranges_per_batch: Histogram,
    /// Microseconds from a batch's first frame until the protocol started on it.
    pub wait_us: Histogram,
    pub zap_us: Histogram,
    pub invalidate_us: Histogram,
    pub release_us: Histogram,
}

/// How many batch reports `ReclaimStats::recent_batches` keeps.
pub const RECENT_BATCHES: usize = 64;

/// The counts the batcher keeps as frames come and go (read with the rest of the stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub pages_gathered: u64,
    pub pages_returned: u64,
    pub invalid_frames: u64,
    pub partial_blocks: u64,
    pub blocks_released: u64,
    pub blocks_split: u64,
}

/// A batch as the protocol ran it: its report and KVM's counters at its zap's start and end.
#[derive(Clone, Debug, Default)]
pub struct RanBatch {
    pub report: BatchReport,
    pub at_zap_start: CounterSnapshot,
    pub at_zap_end: CounterSnapshot,
}

/// The recorder: every finished batch goes in once; reports are computed from it.
#[derive(Default)]
pub struct Metrics {
    /// Totals of everything but the after-zap windows of the newest batch.
    closed: ReclaimStats,
    /// The newest batch, whose after-zap window is still open.
    open: Option<RanBatch>,
}

/// The after-zap counts of a batch whose window ran from its zap until `end`.
fn after(b: &RanBatch, end: &CounterSnapshot) -> (Vec<u64>, Option<u64>) {
    if b.at_zap_start.vcpus.is_empty() || end.vcpus.len() != b.at_zap_start.vcpus.len() {
        return (Vec::new(), None);
    }
    let tlb = end
        .vcpus
        .iter()
        .zip(&b.at_zap_start.vcpus)
        .map(|(e, s)| e.tlb_flush.saturating_sub(s.tlb_flush))
        .collect();
    (
        tlb,
        Some(end.pf_fixed().saturating_sub(b.at_zap_end.pf_fixed())),
    )
}

/// Adds per-vCPU counts to per-vCPU totals (growing them to as many vCPUs as counted).
pub fn add_per_vcpu(totals: &mut Vec<u64>, counts: &[u64]) {
    if totals.len() < counts.len() {
        totals.resize(counts.len(), 0);
    }
    for (t, n) in totals.iter_mut().zip(counts) {
        *t += n;
    }
}

/// Adds a batch whose after-zap window is `window` to the totals and recent list.
fn add(s: &mut ReclaimStats, mut r: BatchReport, window: (Vec<u64>, Option<u64>)) {
    (r.vcpu_tlb_flushes, r.refaults_after) = window;
    s.batches += 1;
    s.pages_reclaimed += r.pages;
    s.ranges += r.ranges;
    s.spans += r.spans;
    s.bridged += r.bridged;
    s.host_calls += r.host_calls;
    s.kvm_flush_requests += r.kvm_flush_requests.unwrap_or(0);
    s.host_call_errors += r.errors.len() as u64;
    s.grace_waits += u64::from(r.grace_waited_for > 0);
    s.grace_kicks += u64::from(r.grace_kicked);
    add_per_vcpu(&mut s.vcpu_tlb_flushes, &r.vcpu_tlb_flushes);
    s.refaults_after += r.refaults_after.unwrap_or(0);
    s.pages_per_batch.record(r.pages);
    s.ranges_per_batch.record(r.ranges);
    s.wait_us.record(r.wait_us);
    s.zap_us.record(r.zap_us);
    s.invalidate_us.record(r.invalidate_us);
    s.release_us.record(r.release_us);
    if s.recent_batches.len() == RECENT_BATCHES {
        s.recent_batches.pop_front();
    }
    s.recent_batches.push_back(r);
}

impl Metrics {
    /// Records a finished batch. The previous batch's after-zap window ends where this one's
    /// zap began.
    pub fn record(&mut self, ran: RanBatch) {
        if let Some(prev) = self.open.take() {
            let window = after(&prev, &ran.at_zap_start);
            add(&mut self.closed, prev.report, window);
        }
        self.open = Some(ran);
    }

    /// The report as of `now` (KVM's counters now, for the newest batch's open window) with
    /// the batcher's frame counts.
    pub fn report(&self, now: &CounterSnapshot, frames: FrameCounts) -> ReclaimStats {
        let mut s = self.closed.clone();
        if let Some(open) = &self.open {
            add(&mut s, open.report.clone(), after(open, now));
        }
        s.pages_gathered = frames.pages_gathered;
        s.pages_returned = frames.pages_returned;
        s.invalid_frames = frames.invalid_frames;
        s.partial_blocks = frames.partial_blocks;
        s.blocks_released = frames.blocks_released;
        s.blocks_split = frames.blocks_split;
        s
    }

    /// The newest batches' reports with ids from `first` on (their after-zap windows as of
    /// `now`).
    pub fn batches_since(&self, first: u64, now: &CounterSnapshot) -> Vec<BatchReport> {
        self.report(now, FrameCounts::default())
            .recent_batches
            .into_iter()
            .filter(|b| b.id >= first)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_percentiles() {
        let mut h = Histogram::default();
        for v in [0, 1, 2, 3, 4, 100, 1000] {
            h.record(v);
        }
        assert_eq!(h.count, 7);
        assert_eq!(h.max, 1000);
        assert_eq!(h.buckets[0], 2); // 0 and 1
        assert_eq!(h.buckets[1], 2); // 2, 3
        assert_eq!(h.percentile(50.0), 3);
        assert_eq!(h.percentile(100.0), 1000);
    }

    fn snap(tlb: u64, pf: u64) -> CounterSnapshot {
        CounterSnapshot {
            flush_requests: Some(0),
            vcpus: vec![VcpuCounters {
                tlb_flush: tlb,
                pf_fixed: pf,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_batch_window_runs_to_the_next_zap_and_reading_changes_nothing() {
        let mut m = Metrics::default();
        let batch = |id| RanBatch {
            report: BatchReport {
                id,
                pages: 10,
                ..Default::default()
            },
            at_zap_start: snap(id * 10, id * 100),
            at_zap_end: snap(id * 10 + 1, id * 100 + 5),
        };
        m.record(batch(1));
        let first = m.report(&snap(13, 120), FrameCounts::default());
        assert_eq!(first.recent_batches[0].vcpu_tlb_flushes, vec![3]);
        assert_eq!(first.recent_batches[0].refaults_after, Some(15));
        // Reading again with a later "now" grows the open window; the first read is unchanged.
        let later = m.report(&snap(15, 130), FrameCounts::default());
        assert_eq!(later.recent_batches[0].vcpu_tlb_flushes, vec![5]);
        assert_eq!(first.recent_batches[0].vcpu_tlb_flushes, vec![3]);
        // The next batch closes it at its own zap's start.
        m.record(batch(2));
        let s = m.report(&snap(25, 300), FrameCounts::default());
        assert_eq!(s.recent_batches[0].vcpu_tlb_flushes, vec![10]);
        assert_eq!(s.recent_batches[0].refaults_after, Some(95));
        assert_eq!(s.vcpu_tlb_flushes, vec![10 + 5]);
        assert_eq!((s.batches, s.pages_reclaimed), (2, 20));
        let back: ReclaimStats = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
