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

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use guest_mm::ReclaimConfig;
use indicatif::{ProgressBar, ProgressStyle};
use report::{Config, Report, Sample, Soak, Step};
use scenario::Pattern;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vmm::api::ApiClient;
use vmm::config::parse_size;
use vmm::report::BalloonReport;
use vmm_harness::console::{throughputs, verifier_totals};
use vmm_harness::{RunningVm, VmmRun};

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
    /// What backs guest RAM (passed to vmm run as it is).
    #[command(flatten)]
    backing: guest_mm::backing::BackingArgs,
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
    /// Linux as the guest instead of the balloon test guest: this kernel (e.g.
    /// target/linux-test-kernel/vmlinux) with --initrd; its own virtio_balloon driver follows
    /// the targets. There are no verifier vCPUs (no throughput or verifier counts), and the
    /// VM is stopped after the last target.
    #[arg(long, requires = "initrd", conflicts_with_all = ["fragment", "hot", "soak", "free_page_reporting"])]
    kernel: Option<PathBuf>,
    /// The initramfs for --kernel (e.g. target/linux-test-kernel/initramfs.cpio).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// With --fragment: the verifiers rewrite and check the frames the fragmenting kept (the
    /// guest's working set interleaved with what it balloons, which zap spans bridge) instead
    /// of memory of their own.
    #[arg(long, requires = "fragment")]
    hot: bool,
    /// Leave the host's fault-around on for guest RAM (vmm --keep-host-fault-around), to
    /// compare.
    #[arg(long)]
    keep_host_fault_around: bool,
    /// Wait this long after each target is reached before setting the next, so that the
    /// guest measures its memory throughput before and after each inflate over a real period.
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
    /// The reclaim settings (passed to vmm run as they are).
    #[command(flatten)]
    reclaim: ReclaimConfig,
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

/// The last lines of a text, for error messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Everything the VMM reports about reclaim (GET /vm/reclaim).
fn stats(api: &ApiClient) -> Result<BalloonReport> {
    api.reclaim().context("reclaim statistics")
}

fn sample(t: f64, s: &BalloonReport) -> Sample {
    Sample {
        t,
        target_bytes: s.target_bytes,
        actual_bytes: s.actual_bytes,
        host_bytes_held: s.host_bytes_held,
        ram_bytes: s.guest_ram_bytes,
    }
}

/// Calls `probe` every `every` until it gives a value; an error saying what was awaited if
/// the VM ends or `timeout` passes first, or the error `probe` returns.
fn poll<T>(
    vm: &mut RunningVm,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let mut out = None;
    let mut next = Instant::now() + every;
    vm.wait_until(timeout, what, |_| {
        if Instant::now() < next {
            return false;
        }
        next = Instant::now() + every;
        match probe() {
            Ok(None) => false,
            Ok(Some(v)) => {
                out = Some(Ok(v));
                true
            }
            Err(e) => {
                out = Some(Err(e));
                true
            }
        }
    })
    // Only the first line, which says why (the VM ended, or timed out): the output follows
    // it, and run() prints the output's tails.
    .map_err(|e| anyhow!("{}", e.lines().next().unwrap_or_default()))?;
    out.expect("set when done")
}

/// Host bytes held once the guest's free page reports have stopped coming (no new report
/// buffer for a second): the soak's baseline and end points.
fn settled_host_bytes(api: &ApiClient, vm: &mut RunningVm) -> Result<u64> {
    let mut last = stats(api)?.device.report_buffers;
    poll(
        vm,
        "the guest's free page reports to settle",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || {
            let now = stats(api)?;
            let reports = now.device.report_buffers;
            let settled = reports == last && reports > 0;
            last = reports;
            Ok(settled.then_some(now.host_bytes_held))
        },
    )
}

/// What the scenario measured while the VM ran.
struct Driven {
    steps: Vec<Step>,
    samples: Vec<Sample>,
    final_stats: BalloonReport,
    baseline: Option<u64>,
    end: Option<u64>,
}

fn run(a: &Args) -> Result<(Report, bool)> {
    let backing = a.backing.backing().map_err(anyhow::Error::msg)?;
    let max = a.max_balloon.unwrap_or(if a.fragment {
        a.memory / 2
    } else {
        a.memory / 4 * 3
    });
    let targets = scenario::targets(a.pattern, a.cycles, max, a.seed);
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
    let reclaim = a.reclaim;
    let (dir, sock) = vmm_harness::run::temp_api_sock("balloon-stress")?;
    let (guest, cmdline) = match &a.kernel {
        Some(k) => (
            VmmRun::kernel(&a.vmm, k, a.initrd.as_deref()),
            "console=ttyS0 panic=1".to_string(),
        ),
        None => (VmmRun::guest(&a.vmm, "balloon"), cmdline),
    };
    let mut vmm_run = guest
        .vcpus(a.vcpus)
        .memory(a.memory.to_string())
        .cmdline(cmdline)
        .api_sock(&sock)
        .reclaim(reclaim)
        .backing(backing);
    if a.keep_host_fault_around {
        vmm_run = vmm_run.keep_host_fault_around();
    }
    let command = format!("{:?}", vmm_run.command());
    if !a.vmm.is_file() {
        let _ = std::fs::remove_dir_all(&dir);
        bail!("cannot start {}: no such file", a.vmm.display());
    }

    let t0 = Instant::now();
    let mut vm = vmm_run.spawn();
    let driven = drive(a, &mut vm, &sock, &targets);
    let result = match driven {
        Err(e) => {
            eprintln!("--- guest output (tail) ---\n{}", tail(&vm_console(&vm)));
            eprintln!("--- vmm log (tail) ---\n{}", tail(&vm.stderr()));
            Err(e)
        }
        // The test guest finishes by itself once it has reached every target; Linux is
        // stopped.
        Ok(d) => {
            let fin = if a.kernel.is_some() {
                vm.stop(Duration::from_secs(30))
            } else {
                vm.finish(Duration::from_secs(a.step_timeout))
            };
            if fin.timed_out {
                eprintln!("--- guest output (tail) ---\n{}", tail(&fin.stdout()));
                eprintln!("--- vmm log (tail) ---\n{}", tail(&fin.stderr));
                Err(anyhow!("the guest did not finish after its last target"))
            } else {
                Ok((d, fin))
            }
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let (d, fin) = result?;

    let log = fin.stdout();
    // A stopped Linux ends by the signal it was sent (SIGTERM: 128 + 15).
    let guest_pass = fin.status == Some(0) || (a.kernel.is_some() && fin.status == Some(143));
    let (verifier_checks, verifier_errors) = verifier_totals(&log);
    let mut steps = d.steps;
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
    let soak = d.baseline.zip(d.end).map(|(baseline, end)| Soak {
        cycles: a.cycles,
        baseline_host_bytes: baseline,
        end_host_bytes: end,
        slack_bytes: a.soak_slack,
        pages_verified: verifier_checks + d.final_stats.device.pages_deflated,
        back_to_baseline: end <= baseline + a.soak_slack,
    });
    let pass = guest_pass
        && verifier_errors == 0
        && reuse_errors == 0
        && steps.iter().all(|s| s.reached)
        && soak.as_ref().is_none_or(|s| s.back_to_baseline);
    let report = Report {
        command,
        config: Config {
            vcpus: a.vcpus,
            memory: a.memory,
            memory_backend: a.backing.memory_backend.clone(),
            memory_path: a.backing.memory_path.clone(),
            kernel: a.kernel.clone(),
            touch: a.touch,
            pattern: a.pattern,
            cycles: a.cycles,
            max_balloon: max,
            reclaim,
            free_page_reporting: a.free_page_reporting,
            fragment: a.fragment,
            hot: a.hot,
            settle_ms: a.settle_ms,
            keep_host_fault_around: a.keep_host_fault_around,
            seed: a.seed,
            soak: a.soak,
        },
        wall_seconds: t0.elapsed().as_secs_f64(),
        steps,
        samples: d.samples,
        final_stats: d.final_stats,
        guest_verifier_errors: verifier_errors,
        guest_reuse_errors: reuse_errors,
        guest_verdict_pass: guest_pass,
        soak,
        summary: None,
    };
    Ok((report, pass))
}

/// The console so far, as one text.
fn vm_console(vm: &RunningVm) -> String {
    vm.console()
        .into_iter()
        .map(|(_, l)| l + "\n")
        .collect::<String>()
}

/// Walks the balloon through `targets` on the running VM; the last step sets the balloon
/// that tells the guest to finish.
fn drive(a: &Args, vm: &mut RunningVm, sock: &Path, targets: &[u64]) -> Result<Driven> {
    poll(
        vm,
        "the control socket",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || Ok(sock.exists().then_some(())),
    )?;
    let api = ApiClient::new(sock)?;
    // The driver fills the stats queue once it is ready, after touching its memory: start
    // the scenario from there, so the host's numbers begin from a populated guest.
    poll(
        vm,
        "the balloon driver's first statistics",
        // A Linux boot takes about 30 s here (guest ring 0 is emulated).
        Duration::from_secs(300),
        Duration::from_millis(50),
        || Ok((stats(&api)?.guest.updates > 0).then_some(())),
    )?;

    let baseline = if a.soak {
        Some(settled_host_bytes(&api, vm)?)
    } else {
        None
    };

    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(targets.len() as u64)
    };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").unwrap());
    let now = |vm: &RunningVm| vm.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let mut steps = Vec::new();
    let mut from = 0u64;
    for &target in targets {
        std::thread::sleep(Duration::from_millis(a.settle_ms));
        let before = stats(&api)?;
        api.set_balloon_mib(target >> 20)
            .with_context(|| format!("set the balloon to {} MiB", target >> 20))?;
        let start = Instant::now();
        let mut last = sample(now(vm), &before);
        let reached = loop {
            std::thread::sleep(Duration::from_millis(a.sample_ms));
            let s = sample(now(vm), &stats(&api)?);
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
        steps.push(Step::between(
            &before,
            &after,
            from,
            target,
            start.elapsed().as_secs_f64(),
            reached,
        ));
        from = target;
        bar.inc(1);
        if !reached {
            break;
        }
    }
    let end = if a.soak {
        Some(settled_host_bytes(&api, vm)?)
    } else {
        None
    };
    let final_stats = stats(&api)?;
    bar.finish_and_clear();
    api.set_balloon_mib(FINISH_BALLOON_MIB)?;
    Ok(Driven {
        steps,
        samples,
        final_stats,
        baseline,
        end,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mm::{Backing, Strategy};

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("balloon-stress").chain(extra.iter().copied()))
            .unwrap()
    }

    #[test]
    fn memory_backend_and_path_are_checked_as_vmm_run_checks_them() {
        let backing = |extra: &[&str]| args(extra).backing.backing();
        assert_eq!(backing(&[]).unwrap(), Backing::Memfd);
        assert_eq!(
            backing(&["--memory-backend", "hugetlb"]).unwrap(),
            Backing::Hugetlb
        );
        assert_eq!(
            backing(&["--memory-backend", "shmem-thp", "--memory-path", "/mnt/g"]).unwrap(),
            Backing::ShmemThp {
                dir: "/mnt/g".into()
            }
        );
        assert!(backing(&["--memory-backend", "shmem-thp"])
            .unwrap_err()
            .starts_with("--memory-backend shmem-thp needs --memory-path DIR"));
        assert_eq!(
            backing(&["--memory-path", "/mnt/g"]).unwrap_err(),
            "--memory-path is only for --memory-backend shmem-thp"
        );
        assert!(Args::try_parse_from(["balloon-stress", "--memory-backend", "tmpfs"]).is_err());
    }

    #[test]
    fn reclaim_options_are_vmm_runs_with_its_defaults() {
        assert_eq!(args(&[]).reclaim, ReclaimConfig::default());
        let c = args(&[
            "--reclaim-strategy",
            "per-buffer",
            "--zap-span-gap",
            "0",
            "--batch-pages",
            "512",
        ])
        .reclaim;
        assert_eq!(
            c,
            ReclaimConfig {
                zap_span_gap: 0,
                batch_pages: 512,
                ..ReclaimConfig::with_strategy(Strategy::PerBuffer)
            }
        );
    }
}
