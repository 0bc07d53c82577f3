//! reclaim-bench: the Stage2Gather's strategies side by side on real KVM.
//!
//! Boots the `reclaimcheck` guest repeatedly (strategies interleaved, so that machine noise
//! spreads over all of them), has the VMM reclaim a region through each strategy, and prints
//! a Markdown table of medians: reclaim time, ranges, host calls, KVM flush requests per GiB,
//! and speed-up against per-page. Every run must pass the guest's own check.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use vmm::report::median;

/// Measure per-page, per-buffer and gather reclaim on KVM with the reclaimcheck guest.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// Runs per strategy and pattern (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Guest RAM.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Region the guest fills and the VMM reclaims from.
    #[arg(long, default_value = "256M")]
    bytes: String,
    /// vCPUs (the others keep writing their own memory during the reclaim).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
}

const STRATEGIES: [&str; 3] = ["per-page", "per-buffer", "gather"];
const PATTERNS: [&str; 2] = ["contiguous", "scattered"];

fn run_once(a: &Args, strategy: &str, pattern: &str) -> Result<HashMap<String, f64>> {
    let out = Command::new(&a.vmm)
        .args([
            "run",
            "--guest",
            "reclaimcheck",
            "--vcpus",
            &a.vcpus.to_string(),
            "--memory",
            &a.memory,
        ])
        .args([
            "--reclaim-strategy",
            strategy,
            "--cmdline",
            &format!("bytes={} pattern={pattern}", a.bytes),
            "--reclaim-probe",
        ])
        .output()
        .with_context(|| format!("cannot run {}", a.vmm.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stdout.contains("reclaimcheck: PASS") {
        bail!("run failed ({strategy}, {pattern}):\n{stdout}\n{stderr}");
    }
    let line =
        vmm::devices::reclaim_probe::parse_report_line(&stderr).context("no reclaim-probe line")?;
    Ok(line
        .into_iter()
        .filter_map(|(k, v)| v.parse::<f64>().ok().map(|v| (k, v)))
        .collect())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut results: HashMap<(&str, &str), Vec<HashMap<String, f64>>> = HashMap::new();
    for rep in 0..a.reps {
        for pattern in PATTERNS {
            for strategy in STRATEGIES {
                eprintln!("run {}/{}: {pattern} {strategy}", rep + 1, a.reps);
                results
                    .entry((pattern, strategy))
                    .or_default()
                    .push(run_once(&a, strategy, pattern)?);
            }
        }
    }
    println!(
        "command: reclaim-bench --reps {} --memory {} --bytes {} --vcpus {}\n",
        a.reps, a.memory, a.bytes, a.vcpus
    );
    println!("| pattern | strategy | pages | ranges | host calls | KVM flush requests | flushes per GiB | reclaim ms (median) | MiB/s | speed-up vs per-page |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for pattern in PATTERNS {
        let med = |s: &str, k: &str| median(results[&(pattern, s)].iter().map(|m| m[k]).collect());
        let base = med("per-page", "elapsed_us");
        for s in STRATEGIES {
            let pages = med(s, "pages");
            let us = med(s, "elapsed_us");
            let gib = pages * 4096.0 / (1u64 << 30) as f64;
            println!(
                "| {pattern} | {s} | {pages:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1}x |",
                med(s, "ranges"),
                med(s, "host_calls"),
                med(s, "kvm_flush_requests"),
                med(s, "kvm_flush_requests") / gib,
                us / 1000.0,
                pages * 4096.0 / (1 << 20) as f64 / (us / 1e6),
                base / us
            );
        }
    }
    Ok(())
}
