//! peer-compare: the same balloon guest on this VMM, QEMU and Firecracker, side by side in one
//! run, with the host's floor for the same number of bytes.
//!
//! Each repetition boots the `balloon` test guest once per peer (interleaved, so machine noise
//! spreads over all of them), waits `--settle-ms`, sets the balloon target through the peer's
//! API (ours and Firecracker's `PATCH /balloon`, QEMU's QMP `balloon`), polls its actual size
//! every 5 ms until it equals the target, and records:
//! - launch: process start to the guest's driver being ready;
//! - time to target: from setting the target until the driver's `actual` equals it;
//! - host memory back: from setting the target until the host memory the guest holds has
//!   fallen by 99% of what it finally falls by (sampled with the polling), and what it fell
//!   by. Measured the same way for every peer where guest RAM is a memfd (ours, QEMU: the
//!   memfd's allocated bytes, `host::guest_memfd_bytes`); Firecracker's guest RAM is anonymous,
//!   so its resident bytes (`host::resident_bytes`);
//! - KVM flush requests during the inflate (`remote_tlb_flush_requests`: our API, QEMU's QMP
//!   `query-stats`); Firecracker has no such statistics, so with `--count-calls` one more run
//!   per peer counts the host calls themselves under `strace -f -e madvise,fallocate`;
//! - the guest's own memory throughput during the inflate against before it (its verifier
//!   vCPUs' `balloon: throughput` line).
//!
//! The floor: one zap and one release over the same number of bytes as one contiguous range,
//! on the same backing, with the same vCPUs running (the `reclaimcheck` guest through the
//! reclaim probe, batched into one batch): how far each peer is from what the host can do.
//!
//! QEMU and Firecracker start only the boot vCPU at the PVH entry; the guest brings up the
//! others itself (`cpus=N`), so every peer runs the same N vCPUs. The VMs are killed after
//! the inflate (the guest's integrity checks are the test suite's job).

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use guest_mm::backing::HUGE_PAGE;
use guest_mm::reclaim::config::{MAX_BATCH_PAGES, MAX_BATCH_WINDOW_MS};
use guest_mm::reclaim::{ReclaimConfig, Strategy};
use guest_mm::{Backing, Granule};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmm::config::parse_size;
use vmm::report::median;
use vmm_harness::console::{guest_cmdline, throughputs, Throughput};
use vmm_harness::firecracker::{FirecrackerConfig, FirecrackerVm};
use vmm_harness::qemu::{self, QemuProcess};
use vmm_harness::qmp::Qmp;
use vmm_harness::{host, VmmRun};

/// Compare balloon inflation on this VMM, QEMU and Firecracker with the same guest.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// A Firecracker binary (built from its repository; docs/BENCHMARKS.md says how). Without
    /// one the Firecracker row is left out, with a note.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// The peers, in the order they run in each repetition.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "gather,per-buffer,qemu,firecracker,floor"
    )]
    peers: Vec<Peer>,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Balloon size to inflate to.
    #[arg(long, default_value = "768M", value_parser = parse_size)]
    balloon: u64,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// vCPUs on every peer (vCPU 0 drives the balloon, the others verify memory).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Fragment the guest's allocator first: inflates get scattered frames. With more than
    /// one vCPU the verifiers then work on the frames the fragmenting kept (`hot=1`), the
    /// working set interleaved with the balloon.
    #[arg(long)]
    fragment: bool,
    /// What backs guest RAM on every peer (Firecracker: `huge_pages: "2M"` for hugetlb, no
    /// shmem-thp; QEMU: a memfd with hugetlb=on, or a file under --memory-path).
    #[command(flatten)]
    backing: guest_mm::backing::BackingArgs,
    /// Wait this long before the inflate, so the guest measures its throughput before it.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// One more run per peer that counts the host calls (madvise, fallocate) made during the
    /// inflate under strace (the only count Firecracker allows; strace slows the run, which
    /// is not timed).
    #[arg(long)]
    count_calls: bool,
    /// Firecracker as an earlier comparison ran it: without `cpus=N` on the guest's command
    /// line, so only its boot vCPU runs whatever --vcpus says (Firecracker starts only the
    /// boot vCPU at the PVH entry). Not a fair comparison: for reproducing that one.
    #[arg(long)]
    firecracker_boot_vcpu_only: bool,
    /// Linux as the client instead of the balloon test guest: this kernel (a vmlinux with a
    /// PVH note, e.g. target/linux-test-kernel/vmlinux), with --initrd. The run waits for the
    /// initramfs's "vmm-init: ready", and also times the deflate back to 0 (no verifier
    /// vCPUs, so no throughput column).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// The initramfs for --kernel (e.g. target/linux-test-kernel/initramfs.cpio).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Free page hinting instead of an inflate: every peer offers hinting, the balloon guest
    /// (`hint=1`) waits for a run, the host starts one (`PATCH /balloon/hinting/start`, the
    /// same call on this VMM and on Firecracker), and the time to target is the time until
    /// the host said DONE (the guest hinted all its free memory and sent STOP). QEMU frees
    /// nothing on hints outside a migration and the floor has no hinting counterpart: both
    /// rows are left out, with a note.
    #[arg(long, conflicts_with_all = ["kernel", "fragment"])]
    hinting: bool,
    /// Also write the runs and the medians as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Peer {
    /// This VMM, gather strategy with zap spans (its default).
    Gather,
    /// This VMM, merging within one buffer and releasing before the ack (Firecracker's
    /// batching).
    PerBuffer,
    /// This VMM, one host call per page (QEMU's).
    PerPage,
    Qemu,
    Firecracker,
    /// One zap and one release of the same bytes as one contiguous range.
    Floor,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Gather => "this VMM, gather (zap spans)",
            Peer::PerBuffer => "this VMM, per-buffer",
            Peer::PerPage => "this VMM, per-page",
            Peer::Qemu => "QEMU (microvm, virtio-balloon-device)",
            Peer::Firecracker => "Firecracker 1.17.0-dev",
            Peer::Floor => "floor: one zap + one release",
        }
    }

    fn ours(self) -> Option<Strategy> {
        match self {
            Peer::Gather => Some(Strategy::Gather),
            Peer::PerBuffer => Some(Strategy::PerBuffer),
            Peer::PerPage => Some(Strategy::PerPage),
            _ => None,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize)]
struct Run {
    launch_s: f64,
    /// Until the driver's `actual` equalled the target.
    target_s: f64,
    /// Until the host memory held had fallen by 99% of its final fall.
    returned_s: f64,
    returned_bytes: u64,
    /// KVM flush requests during the inflate, where the peer reports them (VM-wide: KVM's
    /// own flushes for the guest's activity count too).
    flushes: Option<u64>,
    /// Of those, the ones that came while this VMM's zap calls ran (its gather's
    /// `kvm_flush_requests`); None for other peers.
    zap_flushes: Option<u64>,
    throughput: Option<Throughput>,
    /// Linux clients: from setting the target back to 0 until the driver's `actual` is 0.
    deflate_s: Option<f64>,
}

/// Host calls counted under strace during one inflate.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Calls {
    madvise: u64,
    fallocate: u64,
}

const POLL: Duration = Duration::from_millis(5);
/// Until the client's driver is ready (a Linux boot takes about 30 s here).
const READY: Duration = Duration::from_secs(300);

/// The client's kernel: the balloon test guest, or --kernel.
fn client(a: &Args) -> Result<PathBuf> {
    Ok(match &a.kernel {
        Some(k) => k.clone(),
        None => vmm::guests::resolve("balloon")?,
    })
}
const TIMEOUT: Duration = Duration::from_secs(300);

/// The console line that says the guest's balloon driver is ready.
fn ready_line(a: &Args) -> &'static str {
    if a.kernel.is_some() {
        "vmm-init: ready"
    } else if a.hinting {
        "balloon: waiting for a free page hinting run"
    } else {
        "balloon: driver ready"
    }
}

/// The client's command line: the balloon test guest's, or Linux's (the VMMs append their
/// virtio-mmio entries).
fn client_cmdline(a: &Args) -> String {
    if a.kernel.is_some() {
        return "console=ttyS0 panic=1".into();
    }
    balloon_cmdline(a)
}

/// The guest's command line for the balloon guest.
fn balloon_cmdline(a: &Args) -> String {
    if a.hinting {
        // changes=1: the guest stays up after DONE (it waits for a target) until the run ends.
        return "hint=1 changes=1".into();
    }
    let mut c = "changes=2".to_string();
    if a.fragment {
        c.push_str(" fragment=1");
        if a.vcpus > 1 {
            c.push_str(" hot=1");
        }
    }
    c
}

fn backing(a: &Args) -> Result<Backing> {
    a.backing.backing().map_err(anyhow::Error::msg)
}

fn strace(pid: u32, out: &Path) -> Result<std::process::Child> {
    let child = Command::new("strace")
        .args(["-f", "-qq", "-c", "-e", "trace=madvise,fallocate", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start strace (Debian's strace package)")?;
    // strace attaches to every thread before the inflate starts.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

/// Stops strace and reads its `-c` summary: calls per system call.
fn strace_calls(mut child: std::process::Child, out: &Path) -> Result<Calls> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    let text = std::fs::read_to_string(out)?;
    let calls = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .and_then(|l| {
                // "% time seconds usecs/call calls [errors] syscall"
                l.split_whitespace().nth(3)?.parse().ok()
            })
            .unwrap_or(0)
    };
    Ok(Calls {
        madvise: calls("madvise"),
        fallocate: calls("fallocate"),
    })
}

/// A peer's running VM, as the measurement needs it.
trait PeerVm {
    fn pid(&self) -> u32;
    /// The host memory its guest holds, measured the same way for every run of this peer.
    fn host_bytes(&self) -> u64;
    fn set_target(&mut self, balloon: u64) -> Result<()>;
    fn reached(&mut self, balloon: u64) -> Result<bool>;
    /// KVM's `remote_tlb_flush_requests` for the VM, where the peer reports it.
    fn flush_requests(&mut self) -> Result<Option<u64>>;
    /// The part of them that grew during this VMM's zap calls.
    fn zap_flush_requests(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()>;
    fn console(&self) -> String;
    /// Starts a free page hinting run (acknowledged on the driver's STOP).
    fn start_hinting(&mut self) -> Result<()> {
        bail!("this peer has no free page hinting API")
    }
    /// Whether the host has said DONE.
    fn hinting_done(&mut self) -> Result<bool> {
        bail!("this peer has no free page hinting API")
    }
}

/// A peer driven through the Firecracker-style balloon API (`PATCH /balloon`, `GET
/// /balloon/statistics`): this VMM or Firecracker, with a client of that API.
struct ApiPeer {
    vm: ApiPeerVm,
    api: vmm::api::ApiClient,
}

enum ApiPeerVm {
    Ours(vmm_harness::RunningVm),
    Firecracker(FirecrackerVm),
}

impl PeerVm for ApiPeer {
    fn pid(&self) -> u32 {
        match &self.vm {
            ApiPeerVm::Ours(vm) => vm.pid(),
            ApiPeerVm::Firecracker(vm) => vm.pid(),
        }
    }
    fn host_bytes(&self) -> u64 {
        match self.vm {
            ApiPeerVm::Ours(_) => host::guest_memfd_bytes(self.pid()),
            // Guest RAM is anonymous (or hugetlb) memory: what the process holds resident.
            ApiPeerVm::Firecracker(_) => host::resident_bytes(self.pid()),
        }
    }
    fn set_target(&mut self, balloon: u64) -> Result<()> {
        Ok(self.api.set_balloon_mib(balloon >> 20)?)
    }
    fn reached(&mut self, balloon: u64) -> Result<bool> {
        Ok(self.api.statistics()?.actual_mib == balloon >> 20)
    }
    fn flush_requests(&mut self) -> Result<Option<u64>> {
        match self.vm {
            ApiPeerVm::Ours(_) => Ok(self.api.reclaim()?.kvm_remote_tlb_flush_requests),
            // Firecracker reports no KVM statistics: --count-calls counts its host calls instead.
            ApiPeerVm::Firecracker(_) => Ok(None),
        }
    }
    fn zap_flush_requests(&mut self) -> Result<Option<u64>> {
        match self.vm {
            ApiPeerVm::Ours(_) => Ok(Some(self.api.reclaim()?.gather.kvm_flush_requests)),
            ApiPeerVm::Firecracker(_) => Ok(None),
        }
    }
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        match &mut self.vm {
            ApiPeerVm::Ours(vm) => vm
                .wait_for(needle, timeout)
                .map(drop)
                .map_err(anyhow::Error::msg),
            ApiPeerVm::Firecracker(vm) => vm.wait_for(needle, timeout),
        }
    }
    fn console(&self) -> String {
        match &self.vm {
            ApiPeerVm::Ours(vm) => vm.console().into_iter().map(|(_, l)| l + "\n").collect(),
            ApiPeerVm::Firecracker(vm) => vm.console(),
        }
    }
    fn start_hinting(&mut self) -> Result<()> {
        Ok(self.api.start_hinting(true)?)
    }
    fn hinting_done(&mut self) -> Result<bool> {
        Ok(self.api.hinting_status()?.host_cmd == vmm::devices::balloon::hinting::CMD_ID_DONE)
    }
}

struct Qemu(QemuProcess, Qmp, u64);

impl Qemu {
    fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let r = self.1.execute(cmd, args);
        Ok(r.map_err(|e| self.0.qmp_error(e))?)
    }
}

impl PeerVm for Qemu {
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn host_bytes(&self) -> u64 {
        host::guest_memfd_bytes(self.pid())
    }
    fn set_target(&mut self, balloon: u64) -> Result<()> {
        // QEMU's `balloon` takes the guest's logical size, not the balloon's.
        let logical = self.2 - balloon;
        self.execute("balloon", json!({ "value": logical }))
            .map(drop)
    }
    fn reached(&mut self, balloon: u64) -> Result<bool> {
        Ok(self.execute("query-balloon", json!({}))?["actual"] == self.2 - balloon)
    }
    fn flush_requests(&mut self) -> Result<Option<u64>> {
        let r = self.execute("query-stats", json!({ "target": "vm" }))?;
        Ok(Qmp::stat(&r, "remote_tlb_flush_requests"))
    }
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        Ok(self.0.wait_for_stdout(needle, timeout)?)
    }
    fn console(&self) -> String {
        self.0.stdout()
    }
}

/// The measurement, the same for every peer: settle, set the target, poll until the driver
/// reached it while sampling the host memory, let the host memory settle, read the counters
/// and the guest's throughput line.
fn measure(
    a: &Args,
    vm: &mut dyn PeerVm,
    launch_s: f64,
    dir: &Path,
    count: bool,
) -> Result<(Run, Option<Calls>)> {
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let flushes_before = vm.flush_requests()?;
    let zap_flushes_before = vm.zap_flush_requests()?;
    let pid = vm.pid();
    let before = vm.host_bytes();
    let mut samples = Vec::new();
    let trace_out = dir.join("strace.txt");
    let trace = count.then(|| strace(pid, &trace_out)).transpose()?;
    let t = Instant::now();
    if a.hinting {
        vm.start_hinting()?;
    } else {
        vm.set_target(a.balloon)?;
    }
    while !(if a.hinting {
        vm.hinting_done()?
    } else {
        vm.reached(a.balloon)?
    }) {
        samples.push((t.elapsed().as_secs_f64(), vm.host_bytes()));
        if t.elapsed() > TIMEOUT {
            bail!("the target was not reached in {TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
    let target_s = t.elapsed().as_secs_f64();
    let (returned_s, returned_bytes) = settle(&*vm, before, &mut samples, t);
    let calls = trace.map(|c| strace_calls(c, &trace_out)).transpose()?;
    let flushes_after = vm.flush_requests()?;
    let zap_flushes_after = vm.zap_flush_requests()?;
    let want = format!("throughput inflate to {} pages", a.balloon >> 12);
    let throughput = if a.kernel.is_none()
        && !a.hinting
        && a.vcpus > 1
        && vm.wait_for(&want, Duration::from_secs(10)).is_ok()
    {
        throughputs(&vm.console()).first().copied()
    } else {
        None
    };
    let deflate_s = match a.kernel {
        Some(_) => {
            let t = Instant::now();
            vm.set_target(0)?;
            while !vm.reached(0)? {
                if t.elapsed() > TIMEOUT {
                    bail!("the deflate did not end in {TIMEOUT:?}");
                }
                std::thread::sleep(POLL);
            }
            Some(t.elapsed().as_secs_f64())
        }
        None => None,
    };
    Ok((
        Run {
            launch_s,
            target_s,
            returned_s,
            returned_bytes,
            flushes: flushes_before
                .zip(flushes_after)
                .map(|(b, a)| a.saturating_sub(b)),
            zap_flushes: zap_flushes_before
                .zip(zap_flushes_after)
                .map(|(b, a)| a.saturating_sub(b)),
            throughput,
            deflate_s,
        },
        calls,
    ))
}

/// After the target is reached: samples the host memory until it has not moved for 200 ms
/// (at most 5 s); then (seconds until 99% of its fall, bytes fallen).
fn settle(vm: &dyn PeerVm, before: u64, samples: &mut Vec<(f64, u64)>, t: Instant) -> (f64, u64) {
    let start = Instant::now();
    let mut stable_since = Instant::now();
    let mut last = vm.host_bytes();
    while stable_since.elapsed() < Duration::from_millis(200)
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(POLL);
        let v = vm.host_bytes();
        samples.push((t.elapsed().as_secs_f64(), v));
        if v != last {
            stable_since = Instant::now();
            last = v;
        }
    }
    let fell = before.saturating_sub(last);
    let mark = before.saturating_sub(fell / 100 * 99);
    let at = samples
        .iter()
        .find(|(_, v)| *v <= mark)
        .map_or(0.0, |s| s.0);
    (at, fell)
}

fn run_ours(a: &Args, strategy: Strategy, dir: &Path, count: bool) -> Result<(Run, Option<Calls>)> {
    let sock = dir.join(format!("vmm-{strategy}.sock"));
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let run = match (&a.kernel, &a.initrd) {
        (Some(k), initrd) => VmmRun::kernel(&a.vmm, k, initrd.as_deref()),
        _ => VmmRun::guest(&a.vmm, "balloon"),
    };
    let run = run
        .vcpus(a.vcpus)
        .memory(a.memory.to_string())
        .cmdline(client_cmdline(a))
        .reclaim(ReclaimConfig::with_strategy(strategy))
        .backing(backing(a)?)
        .api_sock(&sock);
    let run = if a.hinting {
        run.free_page_hinting()
    } else {
        run
    };
    let mut vm = run.spawn();
    vm.wait_for(ready_line(a), READY)
        .map_err(anyhow::Error::msg)?;
    let launch_s = t0.elapsed().as_secs_f64();
    let api = vm.api();
    let mut peer = ApiPeer {
        vm: ApiPeerVm::Ours(vm),
        api,
    };
    measure(a, &mut peer, launch_s, dir, count)
}

fn run_qemu(a: &Args, dir: &Path, count: bool) -> Result<(Run, Option<Calls>)> {
    let qmp_path = dir.join("qemu.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mem = format!("{}M", a.memory >> 20);
    let guest = client(a)?;
    let ram = match backing(a)? {
        Backing::Memfd => format!("memory-backend-memfd,id=ram,size={mem},share=on"),
        Backing::Hugetlb => {
            format!("memory-backend-memfd,id=ram,size={mem},share=on,hugetlb=on,hugetlbsize=2M")
        }
        Backing::ShmemThp { dir } => format!(
            "memory-backend-file,id=ram,size={mem},share=on,mem-path={}/qemu-ram",
            dir.display()
        ),
    };
    let mut cmd = Command::new(&a.qemu);
    cmd.args(qemu::microvm_args(&mem, a.vcpus))
        .args(["-machine", "memory-backend=ram", "-object", &ram])
        .args(qemu::balloon_and_qmp_args(&qmp_path))
        .arg("-kernel")
        .arg(&guest)
        .args(["-append", &guest_cmdline(&client_cmdline(a), a.vcpus)]);
    if let Some(initrd) = &a.initrd {
        // The test kernel has no ACPI: without it microvm announces its virtio-mmio devices
        // on the kernel's command line.
        cmd.arg("-initrd")
            .arg(initrd)
            .args(["-machine", "acpi=off"]);
    }
    let t0 = Instant::now();
    let mut vm = QemuProcess::spawn(cmd)?;
    let qmp = vm.connect_qmp(&qmp_path, Duration::from_secs(30))?;
    vm.wait_for_stdout(ready_line(a), READY)?;
    let launch_s = t0.elapsed().as_secs_f64();
    measure(a, &mut Qemu(vm, qmp, a.memory), launch_s, dir, count)
}

fn run_firecracker(a: &Args, bin: &Path, dir: &Path, count: bool) -> Result<(Run, Option<Calls>)> {
    let hugetlb = match backing(a)? {
        Backing::Memfd => false,
        Backing::Hugetlb => true,
        Backing::ShmemThp { .. } => bail!("Firecracker has no shmem-thp guest memory"),
    };
    let guest = client(a)?;
    let cmdline = client_cmdline(a);
    let t0 = Instant::now();
    let mut vm = FirecrackerVm::spawn(
        bin,
        &FirecrackerConfig {
            guest: &guest,
            initrd: a.initrd.as_deref(),
            cmdline: &cmdline,
            vcpus: a.vcpus,
            memory_mib: a.memory >> 20,
            hugetlb,
            start_all_vcpus: !a.firecracker_boot_vcpu_only,
            free_page_hinting: a.hinting,
        },
        dir,
    )?;
    vm.wait_for(ready_line(a), READY)?;
    let launch_s = t0.elapsed().as_secs_f64();
    let api = vm.api()?;
    let mut peer = ApiPeer {
        vm: ApiPeerVm::Firecracker(vm),
        api,
    };
    measure(a, &mut peer, launch_s, dir, count)
}

/// One zap and one release of `--balloon` bytes as one contiguous range: the reclaim probe
/// in one batch (the batch bound and window at their largest), same vCPUs and backing.
fn run_floor(a: &Args, dir: &Path) -> Result<(Run, Option<Calls>)> {
    let report = dir.join("floor.json");
    let backing = backing(a)?;
    // On 2 MiB pages the range starts on a block, so that every block of it is released.
    let align = match backing.granule() {
        Granule::Page => String::new(),
        Granule::Block { .. } => format!(" align={HUGE_PAGE}"),
    };
    let t0 = Instant::now();
    let done = VmmRun::guest(&a.vmm, "reclaimcheck")
        .vcpus(a.vcpus)
        .memory(a.memory.to_string())
        .cmdline(format!("bytes={} pattern=contiguous{align}", a.balloon))
        .reclaim(ReclaimConfig {
            batch_pages: MAX_BATCH_PAGES,
            batch_window_ms: MAX_BATCH_WINDOW_MS,
            ..ReclaimConfig::default()
        })
        .backing(backing)
        .reclaim_probe()
        .report_json(&report)
        .run(TIMEOUT);
    if done.status != Some(0) {
        bail!("the floor run failed:\n{}", done.all());
    }
    let r = done.report();
    let (Some(probe), Some(batch)) = (r.probes.first(), r.gather.recent_batches.back()) else {
        bail!("the floor run reported no probe or batch:\n{}", done.all());
    };
    let host_calls_s = (batch.zap_us + batch.invalidate_us + batch.release_us) as f64 / 1e6;
    Ok((
        Run {
            launch_s: t0.elapsed().as_secs_f64(),
            target_s: host_calls_s,
            returned_s: host_calls_s,
            returned_bytes: probe
                .host_bytes_before
                .saturating_sub(probe.host_bytes_after),
            flushes: batch.kvm_flush_requests,
            zap_flushes: None,
            throughput: None,
            deflate_s: None,
        },
        Some(Calls {
            madvise: batch.spans,
            fallocate: batch.ranges,
        }),
    ))
}

fn run_peer(a: &Args, p: Peer, dir: &Path, count: bool) -> Result<(Run, Option<Calls>)> {
    if let Some(s) = p.ours() {
        return run_ours(a, s, dir, count);
    }
    match p {
        Peer::Qemu => run_qemu(a, dir, count),
        Peer::Firecracker => {
            let bin = a.firecracker.as_deref().context("no --firecracker")?;
            run_firecracker(a, bin, dir, count)
        }
        _ => run_floor(a, dir),
    }
}

#[derive(Serialize)]
struct Row {
    peer: Peer,
    name: &'static str,
    runs: Vec<Run>,
    calls: Option<Calls>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut peers = a.peers.clone();
    let mut notes = Vec::new();
    if peers.contains(&Peer::Firecracker) && a.firecracker.is_none() {
        peers.retain(|&p| p != Peer::Firecracker);
        notes.push("Firecracker left out: no --firecracker binary given (docs/BENCHMARKS.md says how to build one)".to_string());
    }
    if peers.contains(&Peer::Firecracker) && a.backing.memory_backend == "shmem-thp" {
        peers.retain(|&p| p != Peer::Firecracker);
        notes.push("Firecracker left out: it has no shmem-thp guest memory".to_string());
    }
    if a.firecracker_boot_vcpu_only && peers.contains(&Peer::Firecracker) {
        notes.push(format!(
            "--firecracker-boot-vcpu-only: the Firecracker row ran only its boot vCPU, not {}",
            a.vcpus
        ));
    }
    if a.hinting {
        for (p, why) in [
            (
                Peer::Qemu,
                "QEMU left out: it frees nothing on free page hints outside a migration",
            ),
            (
                Peer::Floor,
                "floor left out: it has no free page hinting counterpart",
            ),
            (
                Peer::PerBuffer,
                "per-buffer left out: hints are released per notification whatever the strategy",
            ),
        ] {
            if peers.contains(&p) {
                peers.retain(|&q| q != p);
                notes.push(why.to_string());
            }
        }
        notes.push("--hinting: time to target is the time from PATCH /balloon/hinting/start until the host said DONE; MiB/s and flushes per GiB are of host MiB returned, not of --balloon".to_string());
    }
    if peers.contains(&Peer::Qemu) {
        // A QEMU that cannot start here fails now with its own message, not mid-run.
        qemu::check_starts(&a.qemu, &vmm::guests::resolve("memtouch")?)?;
    }
    let dir = std::env::temp_dir().join(format!("peer-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows: Vec<Row> = peers
        .iter()
        .map(|&p| Row {
            peer: p,
            name: p.name(),
            runs: Vec::new(),
            calls: None,
        })
        .collect();
    for rep in 0..a.reps {
        for row in rows.iter_mut() {
            eprintln!("rep {}/{}: {}", rep + 1, a.reps, row.name);
            let (run, calls) = run_peer(&a, row.peer, &dir, false)
                .with_context(|| format!("{} (rep {})", row.name, rep + 1))?;
            row.runs.push(run);
            if row.peer == Peer::Floor {
                row.calls = calls;
            }
        }
    }
    if a.count_calls {
        for row in rows.iter_mut().filter(|r| r.peer != Peer::Floor) {
            eprintln!("counting host calls: {}", row.name);
            row.calls = run_peer(&a, row.peer, &dir, true)?.1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&a, &rows, &notes);
    if let Some(path) = &a.json {
        let out = json!({ "command": command_line(&a), "notes": notes, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

fn command_line(a: &Args) -> String {
    std::iter::once("peer-compare".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(
            " (memory {} MiB, balloon {} MiB, {} reps)",
            a.memory >> 20,
            a.balloon >> 20,
            a.reps
        )
}

fn print_table(a: &Args, rows: &[Row], notes: &[String]) {
    let gib = a.balloon as f64 / (1u64 << 30) as f64;
    let mib = a.balloon as f64 / (1u64 << 20) as f64;
    let med = |r: &Row, f: &dyn Fn(&Run) -> f64| median(r.runs.iter().map(f).collect());
    let range = |r: &Row, f: &dyn Fn(&Run) -> f64| {
        let v: Vec<f64> = r.runs.iter().map(f).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        format!("{:.3} ({lo:.3}–{hi:.3})", median(v))
    };
    let fc = rows
        .iter()
        .find(|r| r.peer == Peer::Firecracker)
        .map(|r| med(r, &|x| x.target_s));
    let floor = rows
        .iter()
        .find(|r| r.peer == Peer::Floor)
        .map(|r| med(r, &|x| x.target_s));
    println!("command: {}", command_line(a));
    println!(
        "{} vCPU(s), {} guest, {} backing; medians of {} interleaved runs (min–max)\n",
        a.vcpus,
        match (&a.kernel, a.fragment) {
            (Some(_), _) => "Linux (test kernel)",
            (None, true) => "fragmented balloon test",
            (None, false) => "fresh balloon test",
        },
        a.backing.memory_backend,
        a.reps
    );
    println!("| VMM | time to target s | inflate MiB/s | host memory back s | host MiB returned | KVM flush requests per GiB | host calls (madvise / fallocate) | guest throughput kept | deflate s | deflate MiB/s | target time vs Firecracker | vs floor |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let target = med(r, &|x| x.target_s);
        // With --hinting the bytes are those the host got back, not --balloon.
        let (gib, mib) = if a.hinting {
            let back = med(r, &|x| x.returned_bytes as f64).max(1.0);
            (back / (1u64 << 30) as f64, back / (1u64 << 20) as f64)
        } else {
            (gib, mib)
        };
        let flushes: Vec<f64> = r
            .runs
            .iter()
            .filter_map(|x| x.flushes.map(|f| f as f64))
            .collect();
        let zap_flushes: Vec<f64> = r
            .runs
            .iter()
            .filter_map(|x| x.zap_flushes.map(|f| f as f64))
            .collect();
        let per_gib = match (flushes.is_empty(), zap_flushes.is_empty()) {
            (true, _) => "n/a".to_string(),
            (false, true) => format!("{:.0}", median(flushes) / gib),
            (false, false) => format!(
                "{:.0} (zaps {:.0})",
                median(flushes) / gib,
                median(zap_flushes) / gib
            ),
        };
        let kept: Vec<f64> = r
            .runs
            .iter()
            .filter_map(|x| x.throughput?.retained_during())
            .collect();
        let kept = if kept.is_empty() {
            "n/a".to_string()
        } else {
            format!("{:.0}%", median(kept) * 100.0)
        };
        let calls = r
            .calls
            .map_or("n/a".into(), |c| format!("{} / {}", c.madvise, c.fallocate));
        let vs = |base: Option<f64>| base.map_or("n/a".into(), |b| format!("{:.2}x", target / b));
        let deflates: Vec<f64> = r.runs.iter().filter_map(|x| x.deflate_s).collect();
        let (deflate, deflate_rate) = if deflates.is_empty() {
            ("n/a".to_string(), "n/a".to_string())
        } else {
            let d = median(deflates);
            (format!("{d:.2}"), format!("{:.1}", mib / d))
        };
        println!(
            "| {} | {} | {:.1} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            range(r, &|x| x.target_s),
            mib / target,
            range(r, &|x| x.returned_s),
            med(r, &|x| x.returned_bytes as f64) / (1u64 << 20) as f64,
            per_gib,
            calls,
            kept,
            deflate,
            deflate_rate,
            vs(fc),
            vs(floor),
        );
    }
    for n in notes {
        println!("\nnote: {n}");
    }
}
