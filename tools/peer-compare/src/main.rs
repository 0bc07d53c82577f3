//! peer-compare: the same balloon guest on this VMM (gather and per-page) and on QEMU, side by
//! side in one run.
//!
//! Each repetition boots the `balloon` test guest once per VMM (interleaved, so machine noise
//! spreads over all of them), inflates the balloon by the same amount, deflates it, and
//! records: launch time (process start to the driver being ready), time for `actual` to reach
//! the target, host memory returned (RssShmem of the VMM process: guest RAM is a shared memfd
//! in both), and KVM `remote_tlb_flush_requests` during the inflate (our control API; QEMU's
//! QMP `query-stats`). Prints medians and ratios as a Markdown table.
//!
//! One vCPU: the guests' PVH entry, which QEMU uses, starts only the boot vCPU.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmm::config::parse_size;
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
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Gather,
    PerPage,
    Qemu,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Gather => "this VMM, gather",
            Peer::PerPage => "this VMM, per-page",
            Peer::Qemu => "QEMU (microvm, virtio-balloon-device)",
        }
    }
}

struct Run {
    launch_s: f64,
    inflate_s: f64,
    returned_bytes: u64,
    flushes: u64,
}

fn rss_shmem(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssShmem:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Starts `cmd` and returns it with a channel that fires when the guest's driver is ready.
fn spawn(mut cmd: Command) -> Result<(Child, mpsc::Receiver<()>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("balloon: driver ready") {
                let _ = tx.send(());
            }
        }
    });
    Ok((child, rx))
}

fn wait_exit(child: &mut Child) -> Result<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.code().unwrap_or(-1));
        }
        if start.elapsed() > Duration::from_secs(180) {
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

fn run_ours(a: &Args, strategy: &str, dir: &Path) -> Result<Run> {
    let sock = dir.join(format!("vmm-{strategy}.sock"));
    let mut cmd = Command::new(&a.vmm);
    cmd.args([
        "run",
        "--guest",
        "balloon",
        "--vcpus",
        "1",
        "--memory",
        &a.memory.to_string(),
    ])
    .args([
        "--reclaim-strategy",
        strategy,
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        "changes=2",
    ]);
    let t0 = Instant::now();
    let (mut child, ready) = spawn(cmd)?;
    ready
        .recv_timeout(Duration::from_secs(120))
        .context("driver never ready")?;
    let launch_s = t0.elapsed().as_secs_f64();
    let api = |req| vmm::api::request(&sock, &req).context("control API");
    let before = api(json!({"cmd": "stats"}))?;
    let rss_before = rss_shmem(child.id());
    api(json!({"cmd": "set", "target_bytes": a.balloon}))?;
    let inflate_s =
        poll_until(|| Ok(api(json!({"cmd": "stats"}))?["stats"]["actual_bytes"] == a.balloon))?;
    // Let a pending gather window close before measuring what the host got back.
    std::thread::sleep(Duration::from_millis(50));
    let after = api(json!({"cmd": "stats"}))?;
    let rss_after = rss_shmem(child.id());
    api(json!({"cmd": "set", "target_bytes": 0}))?;
    let code = wait_exit(&mut child)?;
    if code != 0 {
        bail!("guest failed on this VMM ({strategy}): exit {code}");
    }
    let f = |v: &serde_json::Value| {
        v["stats"]["kvm_remote_tlb_flush_requests"]
            .as_u64()
            .unwrap_or(0)
    };
    Ok(Run {
        launch_s,
        inflate_s,
        returned_bytes: rss_before.saturating_sub(rss_after),
        flushes: f(&after) - f(&before),
    })
}

fn run_qemu(a: &Args, dir: &Path) -> Result<Run> {
    let qmp_path = dir.join("qemu.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mem = format!("{}M", a.memory >> 20);
    let guest = vmm::guests::resolve("balloon")?;
    let mut cmd = Command::new(&a.qemu);
    cmd.args(qemu::microvm_args(&mem))
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
        .args(["-kernel", guest.to_str().unwrap(), "-append", "changes=2"]);
    let t0 = Instant::now();
    let mut vm = QemuProcess::spawn(cmd)?;
    let mut qmp = vm.connect_qmp(&qmp_path, Duration::from_secs(30))?;
    vm.wait_for_stdout("balloon: driver ready", Duration::from_secs(120))?;
    let launch_s = t0.elapsed().as_secs_f64();
    let pid = vm.id();
    // Every QMP failure carries QEMU's exit status and stderr if QEMU is gone.
    let mut execute =
        |cmd: &str, args: serde_json::Value| qmp.execute(cmd, args).map_err(|e| vm.qmp_error(e));
    let flushes_before = qemu_flushes(&mut execute)?;
    let rss_before = rss_shmem(pid);
    let logical = a.memory - a.balloon;
    execute("balloon", json!({ "value": logical }))?;
    let inflate_s = poll_until(|| Ok(execute("query-balloon", json!({}))?["actual"] == logical))?;
    std::thread::sleep(Duration::from_millis(50));
    let rss_after = rss_shmem(pid);
    let flushes_after = qemu_flushes(&mut execute)?;
    execute("balloon", json!({ "value": a.memory }))?;
    vm.wait_pass(Duration::from_secs(180))
        .context("the balloon guest on QEMU")?;
    Ok(Run {
        launch_s,
        inflate_s,
        returned_bytes: rss_before.saturating_sub(rss_after),
        flushes: flushes_after - flushes_before,
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
    // QEMU boots a tiny guest first, so a QEMU that cannot start here fails now with its own
    // message rather than in the middle of the first repetition.
    qemu::check_starts(&a.qemu, &vmm::guests::resolve("memtouch")?)?;
    let dir = std::env::temp_dir().join(format!("peer-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let peers = [Peer::Gather, Peer::PerPage, Peer::Qemu];
    let mut runs: Vec<Vec<Run>> = peers.iter().map(|_| Vec::new()).collect();
    for rep in 0..a.reps {
        for (i, &p) in peers.iter().enumerate() {
            eprintln!("rep {}/{}: {}", rep + 1, a.reps, p.name());
            let r = match p {
                Peer::Gather => run_ours(&a, "gather", &dir)?,
                Peer::PerPage => run_ours(&a, "per-page", &dir)?,
                Peer::Qemu => run_qemu(&a, &dir)?,
            };
            runs[i].push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gib = a.balloon as f64 / (1u64 << 30) as f64;
    let med = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    let qemu = peers.iter().position(|&p| p == Peer::Qemu).unwrap();
    println!(
        "command: peer-compare --memory {} --balloon {} --reps {} (1 vCPU; medians)\n",
        a.memory >> 20,
        a.balloon >> 20,
        a.reps
    );
    println!("| VMM | launch s | inflate s | MiB/s | host MiB returned | KVM flush requests | per GiB | speed vs QEMU | QEMU flushes / these |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in peers.iter().enumerate() {
        let inflate = med(i, |r| r.inflate_s);
        let flushes = med(i, |r| r.flushes as f64);
        println!(
            "| {} | {:.2} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.0}x |",
            p.name(),
            med(i, |r| r.launch_s),
            inflate,
            a.balloon as f64 / (1u64 << 20) as f64 / inflate,
            med(i, |r| r.returned_bytes as f64) / (1u64 << 20) as f64,
            flushes,
            flushes / gib,
            med(qemu, |r| r.inflate_s) / inflate,
            med(qemu, |r| r.flushes as f64) / flushes.max(1.0),
        );
    }
    Ok(())
}
