//! Reclaim statistics: counters and log2 latency histograms, serialisable for reports.

use serde::Serialize;
use std::time::Duration;

/// A histogram with power-of-two buckets: bucket i counts values in [2^i, 2^(i+1)) (bucket 0
/// also holds 0). Values are in whatever unit the caller records (microseconds, pages).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
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

    pub fn record_duration(&mut self, d: Duration) {
        self.record(d.as_micros() as u64);
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

/// How many batch reports `GatherStats::recent_batches` keeps.
pub const RECENT_BATCHES: usize = 64;

/// Totals over the gather's life.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatherStats {
    pub batches: u64,
    /// Frames accepted into the balloon (inflates, free page reports, the probe).
    pub pages_gathered: u64,
    /// Frames whose host pages were freed.
    pub pages_reclaimed: u64,
    pub ranges: u64,
    /// Zap calls made: one per span.
    pub spans: u64,
    /// Block backends: 2 MiB blocks released whole.
    pub blocks_released: u64,
    /// Block backends: blocks holding frames that wait for the rest of their block (the host
    /// still holds these blocks whole).
    pub partial_blocks: u64,
    /// Block backends: partial blocks whose waiting frames were released at 4 KiB (split).
    pub blocks_split: u64,
    /// In-use frames bridged by spans (zapped and kept).
    pub bridged: u64,
    /// Host calls made: one zap per span and one release per range.
    pub host_calls: u64,
    /// KVM `remote_tlb_flush_requests` that grew during zaps, when a counter is attached.
    pub kvm_flush_requests: u64,
    /// Frames given back to the guest (deflates, completed reports, resets).
    pub pages_returned: u64,
    /// Frames refused, each counted once, with its reason logged by the caller.
    pub invalid_frames: u64,
    pub host_call_errors: u64,
    /// Grace periods that had to wait for a reader, and readers kicked.
    pub grace_waits: u64,
    pub grace_kicks: u64,
    /// Each vCPU's `tlb_flush` growth during zaps, summed over batches.
    pub vcpu_tlb_flushes: Vec<u64>,
    /// Stage-2 faults fixed after batches (`BatchReport::refaults_after`), summed.
    pub refaults_after: u64,
    /// The last `RECENT_BATCHES` batches, oldest first.
    pub recent_batches: std::collections::VecDeque<crate::gather::BatchReport>,
    pub pages_per_batch: Histogram,
    pub ranges_per_batch: Histogram,
    /// Microseconds from a batch's first frame to its flush.
    pub gather_us: Histogram,
    pub zap_us: Histogram,
    pub invalidate_us: Histogram,
    pub release_us: Histogram,
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
}
