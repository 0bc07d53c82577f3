//! balloon-stress: runs a balloon scenario against the VMM and reports what happened.
//!
//! It boots the `balloon` test guest (a Linux-like virtio-balloon driver on vCPU 0, memory
//! verifiers on the others) with a control socket, walks the balloon through a sequence of
//! targets, samples target/actual/host memory while it waits for each, and ends with a
//! summary, a JSON report and, with --plot, SVG charts. Exit status 1 if the guest saw any
//! corruption or failed; 2 if the tool itself failed.

mod plot;
mod report;
mod scenario;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use report::{Report, Sample, Soak, Step};
use scenario::Pattern;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use vmm::api::ApiClient;
use vmm::config::parse_size;
use vmm::guest_output::{throughputs, verifier_totals};

/// Stress the virtio balloon of the VMM and report reclaim and refill behaviour.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// vCPUs: vCPU 0 drives the balloon, the others verify memory the whole time.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Memory each verifier vCPU keeps rewriting and checking (workload intensity).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    touch: u64,
    /// Balloon pattern.
    #[arg(long, value_enum, default_value = "mixed")]
    pattern: Pattern,
    /// Cycles of the pattern (a step is one inflate+deflate, a sawtooth 4 inflates + 1 deflate).
    #[arg(long, default_value_t = 5)]
    cycles: u32,
    /// Largest balloon, as a size (default: 75% of --memory, 50% with --fragment).
    #[arg(long, value_parser = parse_size)]
    max_balloon: Option<u64>,
    /// Have the guest report its free memory in 2 MiB blocks at start (free page reporting).
    #[arg(long)]
    free_page_reporting: bool,
    /// Soak mode: the guest also reports its free memory after every target it reaches
    /// (`report=each`); the run takes the host bytes held once the driver is ready (baseline)
    /// and again once the balloon is back at zero and the last report is done (end), and
    /// fails if the end exceeds the baseline by more than --soak-slack.
    #[arg(long)]
    soak: bool,
    /// How far above the baseline the soak's end may be (2 MiB reporting blocks that happen
    /// to be partly in use at the end).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    soak_slack: u64,
    /// Fragment the guest allocator first: the driver then inflates scattered frames.
    #[arg(long)]
    fragment: bool,
    /// With --fragment: the verifiers rewrite and check the frames the fragmenting kept (the
    /// guest's working set interleaved with what it balloons, which zap spans bridge) instead
    /// of memory of their own.
    #[arg(long, requires = "fragment")]
    hot: bool,
    /// Zap span bound (passed to vmm --zap-span-gap; 0 = one zap per range).
    #[arg(long)]
    zap_span_gap: Option<u64>,
    /// Leave the host's fault-around on for guest RAM (vmm --keep-host-fault-around), to
    /// compare.
    #[arg(long)]
    keep_host_fault_around: bool,
    /// Wait this long after each target is reached before setting the next, so that the
    /// guest measures its memory throughput before and after each inflate over a real period.
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
    /// Gather strategy: per-page, per-buffer or gather.
    #[arg(long, default_value = "gather")]
    strategy: String,
    /// Gather batch bound in 4 KiB frames (passed to vmm --batch-pages).
    #[arg(long)]
    batch_pages: Option<u64>,
    /// Gather latency window in ms (passed to vmm --batch-window-ms).
    #[arg(long)]
    batch_window_ms: Option<u64>,
    /// Seconds to wait for one target before giving up on it.
    #[arg(long, default_value_t = 120)]
    step_timeout: u64,
    /// Sampling interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    sample_ms: u64,
    /// Random seed for the random-walk and mixed patterns.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "balloon-stress.json")]
    json: PathBuf,
    /// Render SVG charts into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar (for logs and CI).
    #[arg(long)]
    quiet: bool,
}

/// The balloon set after the scenario (MiB), which the guest counts as its last change.
const FINISH_BALLOON_MIB: u64 = 1;

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Everything the VMM reports about reclaim (GET /vm/reclaim).
fn stats(api: &ApiClient) -> Result<Value> {
    api.reclaim().context("reclaim statistics")
}

fn sample(t0: Instant, s: &Value) -> Sample {
    Sample {
        t: t0.elapsed().as_secs_f64(),
        target_bytes: s["target_bytes"].as_u64().unwrap_or(0),
        actual_bytes: s["actual_bytes"].as_u64().unwrap_or(0),
        host_bytes_held: s["host_bytes_held"].as_u64().unwrap_or(0),
        ram_bytes: s["guest_ram_bytes"].as_u64().unwrap_or(0),
    }
}

/// Host bytes held once the guest's free page reports have stopped coming (no new report
/// buffer for a second): the soak's baseline and end points.
fn settled_host_bytes(api: &ApiClient, vm: &mut std::process::Child) -> Result<u64> {
    let reports = |s: &Value| s["device"]["report_buffers"].as_u64().unwrap_or(0);
    let mut last = stats(api)?;
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = stats(api)?;
        if reports(&now) == reports(&last) && reports(&now) > 0 {
            return Ok(now["host_bytes_held"].as_u64().unwrap_or(0));
        }
        if vm.try_wait()?.is_some() || t0.elapsed() > Duration::from_secs(120) {
            bail!("the guest's free page reports never settled");
        }
        last = now;
    }
}

fn run(a: &Args) -> Result<(Report, bool)> {
    let dir = std::env::temp_dir().join(format!("balloon-stress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = scenario_run(a, &dir);
    if result.is_err() {
        eprintln!(
            "--- guest output (tail) ---\n{}",
            tail(&dir.join("guest.log"))
        );
        eprintln!("--- vmm log (tail) ---\n{}", tail(&dir.join("vmm.log")));
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn scenario_run(a: &Args, dir: &Path) -> Result<(Report, bool)> {
    let max = a.max_balloon.unwrap_or(if a.fragment {
        a.memory / 2
    } else {
        a.memory / 4 * 3
    });
    let targets = scenario::targets(a.pattern, a.cycles, max, a.seed);
    let sock = dir.join("api.sock");
    let guest_log = dir.join("guest.log");
    let vmm_log = dir.join("vmm.log");
    // One more change than the scenario has: after the last target and the final statistics,
    // a one-page balloon tells the guest to finish.
    let mut cmdline = format!("changes={} touch={}", targets.len() + 1, a.touch);
    if a.soak {
        cmdline.push_str(" report=each");
    } else if a.free_page_reporting {
        cmdline.push_str(" report=1");
    }
    if a.fragment {
        cmdline.push_str(" fragment=1");
    }
    if a.hot {
        cmdline.push_str(" hot=1");
    }
    let mut cmd = Command::new(&a.vmm);
    cmd.args([
        "run",
        "--guest",
        "balloon",
        "--vcpus",
        &a.vcpus.to_string(),
        "--memory",
        &a.memory.to_string(),
    ])
    .args([
        "--api-sock",
        sock.to_str().unwrap(),
        "--reclaim-strategy",
        &a.strategy,
        "--cmdline",
        &cmdline,
    ]);
    if let Some(b) = a.batch_pages {
        cmd.args(["--batch-pages", &b.to_string()]);
    }
    if let Some(w) = a.batch_window_ms {
        cmd.args(["--batch-window-ms", &w.to_string()]);
    }
    if let Some(g) = a.zap_span_gap {
        cmd.args(["--zap-span-gap", &g.to_string()]);
    }
    if a.keep_host_fault_around {
        cmd.arg("--keep-host-fault-around");
    }
    let command = format!("{cmd:?}");
    let mut vm = cmd
        .stdout(std::fs::File::create(&guest_log)?)
        .stderr(std::fs::File::create(&vmm_log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", a.vmm.display()))?;
    let t0 = Instant::now();
    while !sock.exists() {
        if let Some(st) = vm.try_wait()? {
            bail!(
                "the VMM exited ({st}) before serving its socket:\n{}",
                tail(&vmm_log)
            );
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the VMM did not create {} within 30s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let api = ApiClient::new(&sock)?;
    // The driver fills the stats queue once it is ready, after touching its memory: start
    // the scenario from there, so the host's numbers begin from a populated guest.
    while stats(&api)?["guest"]["updates"].as_u64().unwrap_or(0) == 0 {
        if vm.try_wait()?.is_some() || t0.elapsed() > Duration::from_secs(120) {
            bail!("the balloon driver never became ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let baseline = if a.soak {
        Some(settled_host_bytes(&api, &mut vm)?)
    } else {
        None
    };

    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(targets.len() as u64)
    };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").unwrap());
    let mut samples = Vec::new();
    let mut steps = Vec::new();
    let mut from = 0u64;
    for &target in &targets {
        std::thread::sleep(Duration::from_millis(a.settle_ms));
        let before = stats(&api)?;
        api.set_balloon_mib(target >> 20)
            .with_context(|| format!("set the balloon to {} MiB", target >> 20))?;
        let start = Instant::now();
        let mut last = sample(t0, &before);
        let reached = loop {
            std::thread::sleep(Duration::from_millis(a.sample_ms));
            let s = sample(t0, &stats(&api)?);
            let rate = (last.host_bytes_held as f64 - s.host_bytes_held as f64)
                / (1u64 << 20) as f64
                / (s.t - last.t).max(1e-6);
            bar.set_message(format!(
                "target {} MiB, actual {} MiB, host {} MiB, reclaim {:+.0} MiB/s",
                target >> 20,
                s.actual_bytes >> 20,
                s.host_bytes_held >> 20,
                rate
            ));
            let done = s.actual_bytes == target;
            last = s.clone();
            samples.push(s);
            if done {
                break true;
            }
            if start.elapsed() > Duration::from_secs(a.step_timeout) {
                break false;
            }
        };
        let after = stats(&api)?;
        let at = |s: &Value, path: &str| s.pointer(path).and_then(Value::as_u64).unwrap_or(0);
        let grew = |path: &str| at(&after, path).saturating_sub(at(&before, path));
        let flushes = grew("/kvm_remote_tlb_flush_requests");
        let vcpu_tlb_flushes = {
            let per = |s: &Value| -> Vec<u64> {
                s["gather"]["vcpu_tlb_flushes"]
                    .as_array()
                    .map_or(vec![], |v| v.iter().filter_map(Value::as_u64).collect())
            };
            let (b, a) = (per(&before), per(&after));
            a.iter()
                .enumerate()
                .map(|(i, x)| x.saturating_sub(b.get(i).copied().unwrap_or(0)))
                .collect()
        };
        steps.push(Step {
            zap_calls: grew("/gather/spans"),
            bridged: grew("/gather/bridged"),
            refaults_after: grew("/gather/refaults_after"),
            vcpu_tlb_flushes,
            throughput: None,
            target_bytes: target,
            from_bytes: from,
            seconds: start.elapsed().as_secs_f64(),
            reached,
            host_bytes_before: before["host_bytes_held"].as_u64().unwrap_or(0),
            host_bytes_after: after["host_bytes_held"].as_u64().unwrap_or(0),
            kvm_flush_requests: flushes,
        });
        from = target;
        bar.inc(1);
        if !reached {
            break;
        }
    }
    let end = if a.soak {
        Some(settled_host_bytes(&api, &mut vm)?)
    } else {
        None
    };
    let final_stats = stats(&api)?;
    bar.finish_and_clear();
    api.set_balloon_mib(FINISH_BALLOON_MIB)?;

    // The guest finishes by itself once it has reached every target.
    let deadline = Instant::now() + Duration::from_secs(a.step_timeout);
    let status = loop {
        if let Some(st) = vm.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = vm.kill();
            bail!("the guest did not finish after its last target");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&guest_log).unwrap_or_default();
    let (verifier_checks, verifier_errors) = verifier_totals(&log);
    // The guest's throughput lines belong to its inflates, in order.
    let mut lines = throughputs(&log).into_iter();
    for s in steps.iter_mut().filter(|s| s.target_bytes > s.from_bytes) {
        s.throughput = lines
            .next()
            .filter(|t| t.target_pages == s.target_bytes / 4096);
    }
    let reuse_errors: u64 = log
        .lines()
        .filter_map(|l| {
            l.split("reuse errors ")
                .nth(1)?
                .split(';')
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum();
    let soak = baseline.zip(end).map(|(baseline, end)| {
        let deflated = final_stats["device"]["pages_deflated"]
            .as_u64()
            .unwrap_or(0);
        Soak {
            cycles: a.cycles,
            baseline_host_bytes: baseline,
            end_host_bytes: end,
            slack_bytes: a.soak_slack,
            pages_verified: verifier_checks + deflated,
            back_to_baseline: end <= baseline + a.soak_slack,
        }
    });
    let pass = status.success()
        && verifier_errors == 0
        && reuse_errors == 0
        && steps.iter().all(|s| s.reached)
        && soak.as_ref().is_none_or(|s| s.back_to_baseline);
    let report = Report {
        command,
        config: json!({
            "vcpus": a.vcpus, "memory": a.memory, "touch": a.touch, "pattern": a.pattern, "cycles": a.cycles,
            "max_balloon": max, "strategy": a.strategy, "free_page_reporting": a.free_page_reporting,
            "fragment": a.fragment, "hot": a.hot, "zap_span_gap": a.zap_span_gap, "settle_ms": a.settle_ms,
            "keep_host_fault_around": a.keep_host_fault_around,
            "seed": a.seed, "soak": a.soak,
        }),
        wall_seconds: t0.elapsed().as_secs_f64(),
        steps,
        samples,
        final_stats,
        guest_verifier_errors: verifier_errors,
        guest_reuse_errors: reuse_errors,
        guest_verdict_pass: status.success(),
        soak,
        summary: Value::Null,
    };
    Ok((report, pass))
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok((mut report, pass)) => {
            for line in report.summarize() {
                println!("{line}");
            }
            if let Err(e) = std::fs::write(&a.json, serde_json::to_string_pretty(&report).unwrap())
            {
                eprintln!("error: cannot write {}: {e}", a.json.display());
                return ExitCode::from(2);
            }
            println!("report: {}", a.json.display());
            if let Some(dir) = &a.plot {
                match plot::write_all(dir, &report) {
                    Ok(files) => println!("plots: {}", files.join(", ")),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return ExitCode::from(2);
                    }
                }
            }
            if pass {
                ExitCode::SUCCESS
            } else {
                eprintln!("FAIL: the guest saw corruption, failed, a target was not reached, or (--soak) host memory did not return to its baseline");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
