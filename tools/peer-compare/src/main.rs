//! peer-compare: the same balloon guest on this VMM (zap spans, gather by range, per-page)
//! and on QEMU, side by side in one run.
//!
//! Each repetition boots the `balloon` test guest once per peer (interleaved, so machine
//! noise spreads over all of them), waits `--settle-ms`, inflates the balloon by the same
//! amount, waits `--settle-ms` again, deflates, and records: launch time (process start to the
//! driver being ready), time for `actual` to reach the target, host memory returned (the
//! allocated bytes of the VMM's guest-RAM memfd, found through /proc/PID/fd: guest RAM is a
//! shared memfd in both; RSS would count pages a zap span only unmapped), KVM
//! `remote_tlb_flush_requests` during the inflate (our control API; QEMU's QMP
//! `query-stats`), and the guest's own memory throughput during the inflate against before it
//! (its verifier vCPUs; `balloon: throughput` lines), with the verifier work that cost: the
//! rate lost times the inflate's duration, in seconds of full-speed verifying. Prints medians
//! and ratios as a Markdown table.
//!
//! vCPUs: `--vcpus N` boots N on both. QEMU's PVH entry starts only the boot vCPU; the guest
//! brings up the others itself with INIT/SIPI (`cpus=N`, `vmm::qemu::guest_cmdline`), as
//! Linux does, so both VMMs run the same N vCPUs.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::config::parse_size;
use vmm::guest_output::{throughputs, Throughput};
use vmm::qemu::{self, QemuProcess};
use vmm::qmp::Qmp;
use vmm::report::median;

/// Compare balloon inflation on this VMM and on QEMU with the same guest.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Balloon size to inflate to.
    #[arg(long, default_value = "768M", value_parser = parse_size)]
    balloon: u64,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// vCPUs on both VMMs (vCPU 0 drives the balloon, the others verify memory).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Fragment the guest's allocator first (as balloon-stress --fragment): inflates get
    /// scattered frames. With more than one vCPU the verifiers then work on the frames the
    /// fragmenting kept (`hot=1`), the working set interleaved with the balloon.
    #[arg(long)]
    fragment: bool,
    /// Zap span bound for the "zap spans" row (vmm --zap-span-gap).
    #[arg(long, default_value_t = guest_mm::gather::DEFAULT_ZAP_SPAN_GAP)]
    zap_span_gap: u64,
    /// Wait this long before the inflate and after it, so the guest measures its memory
    /// throughput before and after over a real period.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Leave out QEMU (for hosts without it).
    #[arg(long)]
    no_qemu: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Spans,
    ByRange,
    PerPage,
    Qemu,
}

impl Peer {
    fn name(self, a: &Args) -> String {
        match self {
            Peer::Spans => format!("this VMM, zap spans (gap {})", a.zap_span_gap),
            Peer::ByRange => "this VMM, gather by range".into(),
            Peer::PerPage => "this VMM, per-page".into(),
            Peer::Qemu => "QEMU (microvm, virtio-balloon-device)".into(),
        }
    }
}

struct Run {
    launch_s: f64,
    inflate_s: f64,
    returned_bytes: u64,
    flushes: u64,
    throughput: Option<Throughput>,
}

/// Allocated bytes of the largest memfd process `pid` holds open: its guest RAM (ours is
/// "memfd:guest-ram", QEMU's memory-backend-memfd "memfd:ram").
fn guest_memfd_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .max_by_key(|m| m.size())
        .map_or(0, |m| m.blocks() * 512)
}

/// Our VMM's process: its console collected, and a channel that fires when the driver is
/// ready.
struct Ours {
    child: Child,
    console: Arc<Mutex<String>>,
}

fn spawn(mut cmd: Command) -> Result<(Ours, mpsc::Receiver<()>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let console = Arc::new(Mutex::new(String::new()));
    let sink = console.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("balloon: driver ready") {
                let _ = tx.send(());
            }
            let mut c = sink.lock().unwrap();
            c.push_str(&line);
            c.push('\n');
        }
    });
    Ok((Ours { child, console }, rx))
}

fn wait_exit(child: &mut Child) -> Result<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.code().unwrap_or(-1));
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("guest did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn poll_until(mut f: impl FnMut() -> Result<bool>) -> Result<f64> {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > Duration::from_secs(300) {
            bail!("target not reached in 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The guest's command line for a peer with `vcpus` vCPUs.
fn guest_cmdline(a: &Args) -> String {
    let mut c = "changes=2".to_string();
    if a.fragment {
        c.push_str(" fragment=1");
        if a.vcpus > 1 {
            c.push_str(" hot=1");
        }
    }
    c
}

fn settle(a: &Args) {
    std::thread::sleep(Duration::from_millis(a.settle_ms));
}

fn run_ours(a: &Args, peer: Peer, dir: &Path) -> Result<Run> {
    let (strategy, gap) = match peer {
        Peer::Spans => ("gather", a.zap_span_gap),
        Peer::ByRange => ("gather", 0),
        _ => ("per-page", 0),
    };
    let sock = dir.join(format!("vmm-{strategy}-{gap}.sock"));
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
        "--reclaim-strategy",
        strategy,
        "--zap-span-gap",
        &gap.to_string(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        &guest_cmdline(a),
    ]);
    let t0 = Instant::now();
    let (mut vm, ready) = spawn(cmd)?;
    ready
        .recv_timeout(Duration::from_secs(120))
        .context("driver never ready")?;
    let launch_s = t0.elapsed().as_secs_f64();
    let api = vmm::api::ApiClient::new(&sock)?;
    settle(a);
    let before = api.reclaim()?;
    let held_before = guest_memfd_bytes(vm.child.id());
    api.set_balloon_mib(a.balloon >> 20)?;
    let inflate_s = poll_until(|| Ok(api.reclaim()?["actual_bytes"] == a.balloon))?;
    // Let a pending gather window close before measuring what the host got back.
    std::thread::sleep(Duration::from_millis(50));
    let after = api.reclaim()?;
    let held_after = guest_memfd_bytes(vm.child.id());
    settle(a);
    api.set_balloon_mib(0)?;
    let code = wait_exit(&mut vm.child)?;
    if code != 0 {
        bail!("guest failed on this VMM ({strategy}): exit {code}");
    }
    let f = |v: &serde_json::Value| v["kvm_remote_tlb_flush_requests"].as_u64().unwrap_or(0);
    let console = vm.console.lock().unwrap().clone();
    Ok(Run {
        launch_s,
        inflate_s,
        returned_bytes: held_before.saturating_sub(held_after),
        flushes: f(&after) - f(&before),
        throughput: throughputs(&console).first().copied(),
    })
}

fn run_qemu(a: &Args, dir: &Path) -> Result<Run> {
    let qmp_path = dir.join("qemu.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mem = format!("{}M", a.memory >> 20);
    let guest = vmm::guests::resolve("balloon")?;
    let mut cmd = Command::new(&a.qemu);
    cmd.args(qemu::microvm_args(&mem, a.vcpus))
        .args(["-machine", "memory-backend=ram"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=ram,size={mem},share=on"),
        ])
        .args([
            "-device",
            "virtio-balloon-device",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_path.display()),
        ])
        .args(["-kernel", guest.to_str().unwrap()])
        .args(["-append", &qemu::guest_cmdline(&guest_cmdline(a), a.vcpus)]);
    let t0 = Instant::now();
    let mut vm = QemuProcess::spawn(cmd)?;
    let mut qmp = vm.connect_qmp(&qmp_path, Duration::from_secs(30))?;
    vm.wait_for_stdout("balloon: driver ready", Duration::from_secs(120))?;
    let launch_s = t0.elapsed().as_secs_f64();
    let pid = vm.id();
    // Every QMP failure carries QEMU's exit status and stderr if QEMU is gone.
    let mut execute =
        |cmd: &str, args: serde_json::Value| qmp.execute(cmd, args).map_err(|e| vm.qmp_error(e));
    settle(a);
    let flushes_before = qemu_flushes(&mut execute)?;
    let held_before = guest_memfd_bytes(pid);
    let logical = a.memory - a.balloon;
    execute("balloon", json!({ "value": logical }))?;
    let inflate_s = poll_until(|| Ok(execute("query-balloon", json!({}))?["actual"] == logical))?;
    std::thread::sleep(Duration::from_millis(50));
    let held_after = guest_memfd_bytes(pid);
    let flushes_after = qemu_flushes(&mut execute)?;
    settle(a);
    execute("balloon", json!({ "value": a.memory }))?;
    vm.wait_pass(Duration::from_secs(300))
        .context("the balloon guest on QEMU")?;
    Ok(Run {
        launch_s,
        inflate_s,
        returned_bytes: held_before.saturating_sub(held_after),
        flushes: flushes_after - flushes_before,
        throughput: throughputs(&vm.stdout()).first().copied(),
    })
}

/// KVM's `remote_tlb_flush_requests` for QEMU's VM, through QMP `query-stats`.
fn qemu_flushes(
    execute: &mut impl FnMut(&str, serde_json::Value) -> Result<serde_json::Value, qemu::QemuError>,
) -> Result<u64> {
    let r = execute("query-stats", json!({ "target": "vm" }))?;
    Ok(Qmp::stat(&r, "remote_tlb_flush_requests").unwrap_or(0))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut peers = vec![Peer::Spans, Peer::ByRange, Peer::PerPage];
    if !a.no_qemu {
        // QEMU boots a tiny guest first, so a QEMU that cannot start here fails now with its
        // own message rather than in the middle of the first repetition.
        qemu::check_starts(&a.qemu, &vmm::guests::resolve("memtouch")?)?;
        peers.push(Peer::Qemu);
    }
    let dir = std::env::temp_dir().join(format!("peer-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut runs: Vec<Vec<Run>> = peers.iter().map(|_| Vec::new()).collect();
    for rep in 0..a.reps {
        for (i, &p) in peers.iter().enumerate() {
            eprintln!("rep {}/{}: {}", rep + 1, a.reps, p.name(&a));
            let r = match p {
                Peer::Qemu => run_qemu(&a, &dir)?,
                _ => run_ours(&a, p, &dir)?,
            };
            runs[i].push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gib = a.balloon as f64 / (1u64 << 30) as f64;
    let med = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    let qemu = peers.iter().position(|&p| p == Peer::Qemu);
    println!(
        "command: peer-compare --memory {}M --balloon {}M --reps {} --vcpus {}{} --zap-span-gap {} --settle-ms {} (medians)\n",
        a.memory >> 20,
        a.balloon >> 20,
        a.reps,
        a.vcpus,
        if a.fragment { " --fragment" } else { "" },
        a.zap_span_gap,
        a.settle_ms
    );
    println!("| VMM | vCPUs | launch s | inflate s | MiB/s | host MiB returned | KVM flush requests | per GiB | guest throughput kept during inflate | verifier work lost, s | speed vs QEMU | QEMU flushes / these |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in peers.iter().enumerate() {
        let inflate = med(i, |r| r.inflate_s);
        let flushes = med(i, |r| r.flushes as f64);
        let kept: Vec<f64> = runs[i]
            .iter()
            .filter_map(|r| r.throughput?.retained_during())
            .collect();
        // Full-speed verifier seconds the inflate cost: the rate lost times its duration.
        let lost: Vec<f64> = runs[i]
            .iter()
            .filter_map(|r| Some((1.0 - r.throughput?.retained_during()?) * r.inflate_s))
            .collect();
        let (kept, lost) = if kept.is_empty() {
            ("n/a (no verifier vCPU)".to_string(), "n/a".to_string())
        } else {
            (
                format!("{:.0}%", median(kept) * 100.0),
                format!("{:.2}", median(lost)),
            )
        };
        let vs = |f: &dyn Fn(usize) -> String| qemu.map_or("n/a".into(), f);
        println!(
            "| {} | {} | {:.2} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            p.name(&a),
            a.vcpus,
            med(i, |r| r.launch_s),
            inflate,
            a.balloon as f64 / (1u64 << 20) as f64 / inflate,
            med(i, |r| r.returned_bytes as f64) / (1u64 << 20) as f64,
            flushes,
            flushes / gib,
            kept,
            lost,
            vs(&|q| format!("{:.1}x", med(q, |r| r.inflate_s) / inflate)),
            vs(&|q| format!("{:.0}x", med(q, |r| r.flushes as f64) / flushes.max(1.0))),
        );
    }
    Ok(())
}
