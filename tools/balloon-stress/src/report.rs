//! What a run measured: samples over time, one record per balloon step, the VMM's final
//! statistics and the guest's verifier results; and the summary printed at the end.

use serde::Serialize;
use serde_json::Value;
use vmm::report::median;

#[derive(Clone, Debug, Serialize)]
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
    pub throughput: Option<vmm::guest_output::Throughput>,
}

/// The soak's end-to-end check (`--soak`).
#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub config: Value,
    pub wall_seconds: f64,
    pub steps: Vec<Step>,
    pub samples: Vec<Sample>,
    pub final_stats: Value,
    pub guest_verifier_errors: u64,
    pub guest_reuse_errors: u64,
    pub guest_verdict_pass: bool,
    pub soak: Option<Soak>,
    pub summary: Value,
}

const MIB: f64 = (1u64 << 20) as f64;

fn pct(h: &Value, p: f64) -> u64 {
    // Same rule as guest_mm::Histogram::percentile: upper bound of the bucket.
    let buckets: Vec<u64> = h["buckets"]
        .as_array()
        .map_or(vec![], |a| a.iter().filter_map(Value::as_u64).collect());
    let count: u64 = buckets.iter().sum();
    if count == 0 {
        return 0;
    }
    let rank = ((p / 100.0) * count as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in buckets.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return ((1u64 << (i + 1)) - 1).min(h["max"].as_u64().unwrap_or(u64::MAX));
        }
    }
    h["max"].as_u64().unwrap_or(0)
}

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
        let g = &self.final_stats["gather"];
        let pages = g["pages_reclaimed"].as_u64().unwrap_or(0);
        let flushes = g["kvm_flush_requests"].as_u64().unwrap_or(0);
        let gib = pages as f64 * 4096.0 / (1u64 << 30) as f64;
        let per_gib = if gib > 0.0 { flushes as f64 / gib } else { 0.0 };
        let phases = ["gather_us", "zap_us", "invalidate_us", "release_us"];
        let lat: serde_json::Map<String, Value> = phases
            .iter()
            .map(|p| {
                (p.to_string(), serde_json::json!({"p50": pct(&g[p], 50.0), "p90": pct(&g[p], 90.0), "p99": pct(&g[p], 99.0)}))
            })
            .collect();
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
        self.summary = serde_json::json!({
            "steps": self.steps.len(),
            "steps_not_reached": unreached,
            "mib_reclaimed": reclaimed as f64 / MIB,
            "mib_returned": returned as f64 / MIB,
            "reclaim_rate_mib_s_median": rate(&inflates),
            "refill_rate_mib_s_median": rate(&deflates),
            "kvm_flush_requests": flushes,
            "kvm_flush_requests_per_gib": per_gib,
            "zap_calls": zap_calls,
            "guest_throughput_retained_during_inflate_median": retained_median,
            "guest_verifier_seconds_lost_per_inflate_median": lost_median,
            "latency_us": lat,
            "guest_verifier_errors": self.guest_verifier_errors,
            "guest_reuse_errors": self.guest_reuse_errors,
        });
        let s = &self.summary;
        let l = |p: &str| {
            format!(
                "{}/{}/{}",
                s["latency_us"][p]["p50"], s["latency_us"][p]["p90"], s["latency_us"][p]["p99"]
            )
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
                s["reclaim_rate_mib_s_median"].as_f64().unwrap_or(0.0),
                s["refill_rate_mib_s_median"].as_f64().unwrap_or(0.0)
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
                "latency p50/p90/p99 us: gather {}, zap {}, invalidate {}, release {}",
                l("gather_us"),
                l("zap_us"),
                l("invalidate_us"),
                l("release_us")
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
        lines
    }
}
