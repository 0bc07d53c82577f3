//! reclaim-bench: the Stage2Gather's strategies side by side on real KVM.
//!
//! Boots the `reclaimcheck` guest repeatedly (strategies interleaved, so that machine noise
//! spreads over all of them), has the VMM reclaim a region through each strategy, and prints
//! a Markdown table of medians: reclaim time, ranges, host calls, KVM flush requests per GiB,
//! and speed-up against per-page. Every run must pass the guest's own check.

use anyhow::{bail, Context, Result};
use clap::Parser;
use guest_mm::{ReclaimConfig, Strategy};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::devices::reclaim_probe::ProbeReport;
use vmm::report::median;
use vmm_harness::VmmRun;

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

const STRATEGIES: [Strategy; 3] = [Strategy::PerPage, Strategy::PerBuffer, Strategy::Gather];
const PATTERNS: [&str; 2] = ["contiguous", "scattered"];

/// How long one run may take before it is killed and the bench fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// One boot of the reclaimcheck guest; what its reclaim probe measured (the run's report).
fn run_once(a: &Args, report: &Path, strategy: Strategy, pattern: &str) -> Result<ProbeReport> {
    let f = VmmRun::guest(&a.vmm, "reclaimcheck")
        .vcpus(a.vcpus)
        .memory(a.memory.as_str())
        .reclaim(ReclaimConfig::with_strategy(strategy))
        .cmdline(format!("bytes={} pattern={pattern}", a.bytes))
        .reclaim_probe()
        .report_json(report)
        .run(RUN_TIMEOUT);
    if f.status != Some(0) || f.find("reclaimcheck: PASS").is_none() {
        bail!("run failed ({strategy}, {pattern}):\n{}", f.all());
    }
    f.report
        .and_then(|r| r.probes.into_iter().next())
        .with_context(|| format!("no reclaim probe in the run's report ({strategy}, {pattern})"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !a.vmm.is_file() {
        bail!("cannot run {}: no such file", a.vmm.display());
    }
    let dir = std::env::temp_dir().join(format!("reclaim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let report = dir.join("report.json");
    let mut results: Vec<(&str, Strategy, ProbeReport)> = Vec::new();
    let mut all_ran = Ok(());
    'runs: for rep in 0..a.reps {
        for pattern in PATTERNS {
            for strategy in STRATEGIES {
                eprintln!("run {}/{}: {pattern} {strategy}", rep + 1, a.reps);
                match run_once(&a, &report, strategy, pattern) {
                    Ok(p) => results.push((pattern, strategy, p)),
                    Err(e) => {
                        all_ran = Err(e);
                        break 'runs;
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    all_ran?;
    println!(
        "command: reclaim-bench --reps {} --memory {} --bytes {} --vcpus {}\n",
        a.reps, a.memory, a.bytes, a.vcpus
    );
    println!("| pattern | strategy | pages | ranges | host calls | KVM flush requests | flushes per GiB | reclaim ms (median) | MiB/s | speed-up vs per-page |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for pattern in PATTERNS {
        let med = |s: Strategy, k: fn(&ProbeReport) -> f64| {
            median(
                results
                    .iter()
                    .filter(|(p, st, _)| *p == pattern && *st == s)
                    .map(|(_, _, r)| k(r))
                    .collect(),
            )
        };
        let elapsed_us = |p: &ProbeReport| p.elapsed_us as f64;
        // NaN where KVM does not count its flushes.
        let flushes = |p: &ProbeReport| p.kvm_flush_requests.map_or(f64::NAN, |f| f as f64);
        let base = med(Strategy::PerPage, elapsed_us);
        for s in STRATEGIES {
            let pages = med(s, |p| p.pages as f64);
            let us = med(s, elapsed_us);
            let gib = pages * 4096.0 / (1u64 << 30) as f64;
            println!(
                "| {pattern} | {s} | {pages:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1}x |",
                med(s, |p| p.ranges as f64),
                med(s, |p| p.host_calls as f64),
                med(s, flushes),
                med(s, flushes) / gib,
                us / 1000.0,
                pages * 4096.0 / (1 << 20) as f64 / (us / 1e6),
                base / us
            );
        }
    }
    Ok(())
}
