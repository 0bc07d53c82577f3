//! What a run measured: samples over time, one record per balloon step, the VMM's final
//! statistics and the guest's verifier results; and the summary printed at the end.

use crate::scenario::Pattern;
use guest_mm::{Histogram, ReclaimConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use vmm::report::{median, BalloonReport};
use vmm_harness::console::Throughput;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub host_bytes_held: u64,
    pub ram_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub target_bytes: u64,
    pub from_bytes: u64,
    pub seconds: f64,
    pub reached: bool,
    pub host_bytes_before: u64,
    pub host_bytes_after: u64,
    pub kvm_flush_requests: u64,
    /// Zap calls (spans) the gather made during the step.
    pub zap_calls: u64,
    /// In-use frames those spans bridged.
    pub bridged: u64,
    /// Stage-2 faults fixed after the step's batches (refaults and other faults).
    pub refaults_after: u64,
    /// Each vCPU's TLB flushes during the step.
    pub vcpu_tlb_flushes: Vec<u64>,
    /// The guest's memory throughput around the step (inflates with verifiers).
    pub throughput: Option<Throughput>,
}

impl Step {
    /// The step from `from` to `target` bytes, from the VMM's reports before and after it.
    pub fn between(
        before: &BalloonReport,
        after: &BalloonReport,
        from: u64,
        target: u64,
        seconds: f64,
        reached: bool,
    ) -> Self {
        let (b, a) = (&before.gather, &after.gather);
        let flushes = |r: &BalloonReport| r.kvm_remote_tlb_flush_requests.unwrap_or(0);
        Step {
            target_bytes: target,
            from_bytes: from,
            seconds,
            reached,
            host_bytes_before: before.host_bytes_held,
            host_bytes_after: after.host_bytes_held,
            kvm_flush_requests: flushes(after).saturating_sub(flushes(before)),
            zap_calls: a.spans.saturating_sub(b.spans),
            bridged: a.bridged.saturating_sub(b.bridged),
            refaults_after: a.refaults_after.saturating_sub(b.refaults_after),
            vcpu_tlb_flushes: a
                .vcpu_tlb_flushes
                .iter()
                .enumerate()
                .map(|(i, x)| x.saturating_sub(b.vcpu_tlb_flushes.get(i).copied().unwrap_or(0)))
                .collect(),
            throughput: None,
        }
    }
}

/// The soak's end-to-end check (`--soak`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Soak {
    pub cycles: u32,
    pub baseline_host_bytes: u64,
    pub end_host_bytes: u64,
    pub slack_bytes: u64,
    /// Page checks by the guest: verifier rounds times their pages, plus every deflated page
    /// written and checked before reuse.
    pub pages_verified: u64,
    pub back_to_baseline: bool,
}

/// What the run was asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub struct Config {
    pub vcpus: u32,
    pub memory: u64,
    /// memfd, shmem-thp or hugetlb (vmm --memory-backend).
    pub memory_backend: String,
    pub memory_path: Option<PathBuf>,
    /// With --kernel: the Linux kernel the guest ran (else the balloon test guest).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    pub touch: u64,
    pub pattern: Pattern,
    pub cycles: u32,
    pub max_balloon: u64,
    /// The reclaim settings the VM ran with (the VMM's defaults where none was given).
    pub reclaim: ReclaimConfig,
    pub free_page_reporting: bool,
    pub fragment: bool,
    pub hot: bool,
    pub settle_ms: u64,
    pub keep_host_fault_around: bool,
    pub seed: u64,
    pub soak: bool,
}

/// A latency histogram's percentiles (upper bounds of their power-of-two buckets).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram) -> Self {
        Self {
            p50: h.percentile(50.0),
            p90: h.percentile(90.0),
            p99: h.percentile(99.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.p50, self.p90, self.p99)
    }
}

/// Per-batch latency of each phase of the gather, in microseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Latency {
    /// From a batch's first frame until the protocol started on it.
    pub wait_us: Percentiles,
    pub zap_us: Percentiles,
    pub invalidate_us: Percentiles,
    pub release_us: Percentiles,
}

/// The numbers the summary lines print.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub steps_not_reached: usize,
    pub mib_reclaimed: f64,
    pub mib_returned: f64,
    pub reclaim_rate_mib_s_median: f64,
    pub refill_rate_mib_s_median: f64,
    pub kvm_flush_requests: u64,
    pub kvm_flush_requests_per_gib: f64,
    pub zap_calls: u64,
    pub guest_throughput_retained_during_inflate_median: Option<f64>,
    pub guest_verifier_seconds_lost_per_inflate_median: Option<f64>,
    pub latency_us: Latency,
    pub guest_verifier_errors: u64,
    pub guest_reuse_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// The `vmm run` command line.
    pub command: String,
    pub config: Config,
    pub wall_seconds: f64,
    pub steps: Vec<Step>,
    pub samples: Vec<Sample>,
    /// The VMM's reclaim report at the end of the scenario (GET /vm/reclaim).
    pub final_stats: BalloonReport,
    pub guest_verifier_errors: u64,
    pub guest_reuse_errors: u64,
    pub guest_verdict_pass: bool,
    pub soak: Option<Soak>,
    /// Filled in by `summarize`.
    pub summary: Option<Summary>,
}

const MIB: f64 = (1u64 << 20) as f64;

impl Report {
    /// Computes the summary numbers and returns the lines to print.
    pub fn summarize(&mut self) -> Vec<String> {
        let inflates: Vec<&Step> = self
            .steps
            .iter()
            .filter(|s| s.target_bytes > s.from_bytes && s.reached)
            .collect();
        let deflates: Vec<&Step> = self
            .steps
            .iter()
            .filter(|s| s.target_bytes < s.from_bytes && s.reached)
            .collect();
        let reclaimed: u64 = self
            .steps
            .iter()
            .map(|s| s.host_bytes_before.saturating_sub(s.host_bytes_after))
            .sum();
        let returned: u64 = self
            .steps
            .iter()
            .map(|s| s.host_bytes_after.saturating_sub(s.host_bytes_before))
            .sum();
        let rate = |v: &[&Step]| {
            median(
                v.iter()
                    .map(|s| {
                        (s.target_bytes.abs_diff(s.from_bytes)) as f64 / MIB / s.seconds.max(1e-6)
                    })
                    .collect(),
            )
        };
        let g = &self.final_stats.gather;
        let pages = g.pages_reclaimed;
        let flushes = g.kvm_flush_requests;
        let gib = pages as f64 * 4096.0 / (1u64 << 30) as f64;
        let per_gib = if gib > 0.0 { flushes as f64 / gib } else { 0.0 };
        let lat = Latency {
            wait_us: Percentiles::of(&g.wait_us),
            zap_us: Percentiles::of(&g.zap_us),
            invalidate_us: Percentiles::of(&g.invalidate_us),
            release_us: Percentiles::of(&g.release_us),
        };
        let unreached = self.steps.iter().filter(|s| !s.reached).count();
        let retained: Vec<f64> = inflates
            .iter()
            .filter_map(|s| s.throughput?.retained_during())
            .collect();
        let retained_median = (!retained.is_empty()).then(|| median(retained));
        // Full-speed verifier seconds each inflate cost: the rate lost times its duration.
        let lost: Vec<f64> = inflates
            .iter()
            .filter_map(|s| Some((1.0 - s.throughput?.retained_during()?) * s.seconds))
            .collect();
        let lost_median = (!lost.is_empty()).then(|| median(lost));
        let zap_calls: u64 = self.steps.iter().map(|s| s.zap_calls).sum();
        let s = Summary {
            steps: self.steps.len(),
            steps_not_reached: unreached,
            mib_reclaimed: reclaimed as f64 / MIB,
            mib_returned: returned as f64 / MIB,
            reclaim_rate_mib_s_median: rate(&inflates),
            refill_rate_mib_s_median: rate(&deflates),
            kvm_flush_requests: flushes,
            kvm_flush_requests_per_gib: per_gib,
            zap_calls,
            guest_throughput_retained_during_inflate_median: retained_median,
            guest_verifier_seconds_lost_per_inflate_median: lost_median,
            latency_us: lat,
            guest_verifier_errors: self.guest_verifier_errors,
            guest_reuse_errors: self.guest_reuse_errors,
        };
        let mut lines = vec![
            format!(
                "steps: {} ({} not reached) in {:.1}s; reclaimed {:.1} MiB, returned {:.1} MiB",
                self.steps.len(),
                unreached,
                self.wall_seconds,
                reclaimed as f64 / MIB,
                returned as f64 / MIB
            ),
            format!(
                "rates (median per step): reclaim {:.1} MiB/s, refill {:.1} MiB/s",
                s.reclaim_rate_mib_s_median, s.refill_rate_mib_s_median
            ),
            format!("KVM flush requests: {flushes} ({per_gib:.0} per GiB reclaimed); zap calls {zap_calls}"),
            match retained_median {
                Some(r) => format!(
                    "guest memory throughput during inflates (median): {:.0}% of the rate before; verifier work lost per inflate {:.2} s",
                    r * 100.0,
                    lost_median.unwrap_or(0.0)
                ),
                None => "guest memory throughput: not measured (needs a verifier vCPU and --settle-ms)".into(),
            },
            format!(
                "latency p50/p90/p99 us: batch wait {}, zap {}, invalidate {}, release {}",
                lat.wait_us, lat.zap_us, lat.invalidate_us, lat.release_us
            ),
            format!(
                "guest: verifier errors {}, reuse errors {}, verdict {}",
                self.guest_verifier_errors,
                self.guest_reuse_errors,
                if self.guest_verdict_pass {
                    "PASS"
                } else {
                    "FAIL"
                }
            ),
        ];
        if let Some(k) = &self.soak {
            lines.push(format!(
                "soak: {} cycles, {} pages verified, host bytes held {} MiB at baseline, {} MiB at the end ({:+.1} MiB, slack {} MiB): {}",
                k.cycles,
                k.pages_verified,
                k.baseline_host_bytes >> 20,
                k.end_host_bytes >> 20,
                (k.end_host_bytes as f64 - k.baseline_host_bytes as f64) / MIB,
                k.slack_bytes >> 20,
                if k.back_to_baseline { "back to baseline" } else { "ABOVE BASELINE" }
            ));
        }
        self.summary = Some(s);
        lines
    }
}
