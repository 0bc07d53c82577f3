//! Linux's own virtio_balloon driver against this VMM's device, on this host: the test kernel
//! (Linux 6.1 from Debian's linux-source-6.1 with guest-kernels/linux's config fragment and
//! patches, built by ./setup.sh) boots to its initramfs, whose init follows the host and
//! prints the driver's features and /proc/vmstat's balloon counters every second
//! (`vmm-init:` lines). Guest ring 0 is emulated here, so a boot takes about half a minute
//! and each step several seconds; every wait is bounded.
//!
//! - The driver follows targets set through the API (inflate, then deflate), on 2 vCPUs: the
//!   host's bytes fall, the guest's counters agree with the device's, its statistics arrive
//!   with Linux's tags, and the used-ring and configuration interrupts are delivered (the
//!   driver waits for them; it does not poll).
//! - Free page reporting returns the guest's free memory at boot; deflate-on-oom gives the
//!   balloon back under a memory-pressure tool with every page the guest owns intact, and the
//!   host backs the deflated pages again.
//! - On shmem huge pages the balloon's frames go back in 2 MiB blocks (split at the target).
//! - Free page hinting gives back memory the guest freed, with every page it holds intact.

mod common;

use common::{scratch, Need, TmpfsMount};
use std::time::{Duration, Instant};
use vmm::api::ApiClient;
use vmm::report::BalloonReport;
use vmm_harness::console::vmm_init_value;
use vmm_harness::{RunningVm, VmmRun};

/// Until the initramfs is up: about 25-35 s here with a core to itself, more while other
/// tests boot beside it.
const READY_LIMIT: Duration = Duration::from_secs(300);
/// One balloon step (64-128 MiB at a few MiB per second here, Linux's driver in emulated
/// ring 0).
const STEP_LIMIT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

/// A booted test kernel with its control socket.
struct Linux {
    vm: RunningVm,
    api: ApiClient,
}

/// `vmm run` of the test kernel with `vcpus` and `memory`; `extra` goes on its command line.
fn test_kernel(name: &str, vcpus: u32, memory: &str, extra: &str) -> VmmRun {
    let (kernel, initrd) = common::linux_test_kernel();
    common::vmm_kernel(&kernel, Some(&initrd))
        .no_acpi()
        .vcpus(vcpus)
        .memory(memory)
        .api_sock(&scratch(&format!("{name}.sock")))
        .cmdline(format!("console=ttyS0 panic=1 {extra}"))
}

impl Linux {
    fn boot(run: VmmRun) -> Self {
        let mut vm = run.spawn();
        if let Err(e) = vm.wait_for("vmm-init: ready", READY_LIMIT) {
            panic!("the test kernel did not reach its initramfs: {e}");
        }
        let api = vm.api();
        Self { vm, api }
    }

    fn console(&self) -> String {
        self.vm
            .console()
            .into_iter()
            .map(|(_, l)| l + "\n")
            .collect()
    }

    /// The latest value of `key` in the init's round lines.
    fn guest(&self, key: &str) -> u64 {
        vmm_init_value(&self.console(), key).unwrap_or(0)
    }

    fn report(&self) -> BalloonReport {
        self.api.reclaim().expect("GET /vm/reclaim")
    }

    /// Polls the report (and the console) until `done` holds; fails after `STEP_LIMIT`
    /// with both.
    fn wait(
        &self,
        what: &str,
        mut done: impl FnMut(&Self, &BalloonReport) -> bool,
    ) -> BalloonReport {
        let start = Instant::now();
        loop {
            let r = self.report();
            if done(self, &r) {
                return r;
            }
            assert!(
                start.elapsed() < STEP_LIMIT,
                "{what}: not after {STEP_LIMIT:?}\n{r:#?}\n--- console ---\n{}\n--- stderr ---\n{}",
                self.console(),
                self.vm.stderr()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn set_balloon(&self, mib: u64) {
        self.api.set_balloon_mib(mib).expect("PATCH /balloon");
    }

    /// The init's line naming the features the balloon driver negotiated.
    fn features(&self) -> String {
        let console = self.console();
        console
            .lines()
            .find(|l| l.contains("driver virtio_balloon features"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no features line\n{console}"))
    }

    /// The hold's verification lines so far (`vmm.hold`), each checked to say "bad pages 0".
    fn hold_passes(&self) -> usize {
        let console = self.console();
        let passes: Vec<&str> = console
            .lines()
            .filter(|l| l.contains("vmm-init: mem hold pass"))
            .collect();
        for p in &passes {
            assert!(p.trim_end().ends_with("bad pages 0"), "{p}");
        }
        passes.len()
    }
}

/// Linux's own virtio_balloon driver follows targets set through the control socket, on 2
/// vCPUs (the test kernel brings up its APs here: no KVM hypercalls, patch 0004).
#[test]
fn linux_balloon_driver_follows_targets_from_the_control_socket() {
    let name = "linux_balloon_driver_follows_targets_from_the_control_socket";
    require!(name, Need::Kvm);
    let linux = Linux::boot(test_kernel(name, 2, "512M", ""));
    let console = linux.console();
    assert!(console.contains("vmm-init: kernel "), "{console}");
    assert!(
        console.contains(", 2 CPUs"),
        "both vCPUs came up\n{console}"
    );
    let features = linux.features();
    for f in ["STATS_VQ", "DEFLATE_ON_OOM", "REPORTING", "VERSION_1"] {
        assert!(features.contains(f), "{f} not negotiated: {features}");
    }

    // The statistics arrive, under Firecracker's names, with the tags Linux 6.1 sends (this
    // kernel has no hugetlb, so no tags 8 and 9).
    let start = Instant::now();
    let stats = loop {
        let s = linux.api.statistics().expect("GET /balloon/statistics");
        let v = &s.values;
        let all = [
            v.swap_in,
            v.swap_out,
            v.major_faults,
            v.minor_faults,
            v.free_memory,
            v.total_memory,
            v.available_memory,
            v.disk_caches,
        ];
        if all.iter().all(Option::is_some) {
            break s;
        }
        assert!(
            start.elapsed() < STEP_LIMIT,
            "statistics incomplete: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let total = stats.values.total_memory.unwrap();
    assert!(
        total > 400 * MIB && total <= 512 * MIB,
        "total_memory {total} for a 512 MiB guest"
    );

    // Inflate by 128 MiB: the driver reaches it, every frame it gave goes through zap and
    // release, and the guest's own counter says the same as the device's. (The host's bytes
    // barely move here: free page reporting gave the guest's untouched free memory back at
    // boot, so the balloon takes frames the host no longer holds. What holds is that the host
    // never holds the balloon's frames; the fall itself is shown under pressure below.)
    linux.set_balloon(128);
    let inflated = linux.wait("inflate to 128 MiB", |l, r| {
        r.actual_bytes == 128 * MIB
            && r.gather.pages_reclaimed >= r.device.pages_reported + 32768
            && l.guest("balloon_inflate") == r.device.pages_inflated
    });
    assert_eq!(inflated.device.pages_inflated, 32768, "{inflated:#?}");
    assert_eq!(inflated.frames_in_balloon, 32768, "{inflated:#?}");
    assert!(
        inflated.host_bytes_held + 128 * MIB <= inflated.guest_ram_bytes,
        "the host holds balloon frames: {inflated:#?}"
    );
    assert_eq!(inflated.device.invalid_frames, 0, "{inflated:#?}");
    assert_eq!(inflated.device.malformed_buffers, 0, "{inflated:#?}");

    // Interrupts: the target change raised the configuration interrupt, each returned buffer
    // the used-ring one, and the guest took them (/proc/interrupts' virtio line).
    let d = &inflated.device;
    assert!(d.config_interrupts >= 1, "{d:#?}");
    assert!(d.used_ring_interrupts >= d.inflate_buffers, "{d:#?}");
    let irqs_after_inflate = linux.guest("virtio_irqs");
    assert!(
        irqs_after_inflate > 0,
        "no virtio interrupt reached Linux\n{}",
        linux.console()
    );

    // Deflate to 0: everything comes out of the balloon and the counters agree again.
    linux.set_balloon(0);
    let deflated = linux.wait("deflate to 0", |l, r| {
        r.actual_bytes == 0
            && r.frames_in_balloon == 0
            && l.guest("balloon_deflate") == r.device.pages_deflated
    });
    assert_eq!(deflated.device.pages_deflated, 32768, "{deflated:#?}");
    assert!(
        linux.guest("virtio_irqs") > irqs_after_inflate,
        "no interrupt for the deflate\n{}",
        linux.console()
    );
    let end = linux.vm.stop(Duration::from_secs(30));
    assert!(!end.timed_out, "{}", end.all());
}

/// Free page reporting gives the guest's free memory back at boot. With the balloon at 192
/// MiB of 256 MiB, the init's memory-pressure tool allocates 80 MiB: Linux's OOM notifier
/// deflates the balloon (DEFLATE_ON_OOM) while the target stays, every page the tool and a
/// 16 MiB hold wrote reads back intact, and the host backs the deflated pages again. (Linux
/// reports again only once enough of a zone is free in unreported 2 MiB blocks, which 80 MiB
/// freed in a 256 MiB guest does not reach: what is checked of reporting is the boot's.)
#[test]
fn linux_free_page_reporting_and_deflate_on_oom_keep_every_page() {
    let name = "linux_free_page_reporting_and_deflate_on_oom_keep_every_page";
    require!(name, Need::Kvm);
    let linux = Linux::boot(test_kernel(name, 1, "256M", "vmm.hold=16 vmm.pressure=80"));
    let reported = linux.wait("free page reports", |_, r| {
        r.device.report_buffers > 0 && r.device.pages_reported >= 8192
    });
    assert!(
        reported.gather.pages_reclaimed >= reported.device.pages_reported,
        "reported frames went through the protocol: {reported:#?}"
    );
    assert!(
        reported.host_bytes_held + 32 * MIB <= reported.guest_ram_bytes,
        "the host holds {} of {} bytes after the reports: {reported:#?}",
        reported.host_bytes_held,
        reported.guest_ram_bytes
    );
    assert_eq!(
        reported.frames_in_balloon, 0,
        "reported frames are the guest's again"
    );

    linux.set_balloon(192);
    let at_target = linux.wait("inflate to 192 MiB", |_, r| {
        r.actual_bytes == 192 * MIB && r.gather.pages_reclaimed >= r.device.pages_reported + 49152
    });
    // The pressure tool starts once the balloon has stopped changing, and needs more than is
    // free: the driver gives pages back below the target. Meanwhile the host backs what the
    // tool touches.
    let mut peak = at_target.host_bytes_held;
    let start = Instant::now();
    while !linux.console().contains("vmm-init: mem pressure PASS")
        && !linux.console().contains("vmm-init: mem pressure FAIL")
    {
        peak = peak.max(linux.report().host_bytes_held);
        assert!(
            start.elapsed() < STEP_LIMIT,
            "the pressure tool did not finish\n{}",
            linux.console()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let console = linux.console();
    assert!(
        console.contains("vmm-init: mem pressure PASS: 80 MiB x 1 rounds, bad pages 0"),
        "{console}"
    );
    let after = linux.report();
    let peak = peak.max(after.host_bytes_held);
    assert!(
        after.device.pages_deflated > 0,
        "no deflate-on-oom: {after:#?}"
    );
    assert!(linux.guest("balloon_deflate") > 0, "{console}");
    assert_eq!(
        after.target_bytes,
        192 * MIB,
        "the target stays: {after:#?}"
    );
    assert!(
        peak >= at_target.host_bytes_held + 32 * MIB,
        "the host did not back the deflated pages again: {} -> peak {peak}",
        at_target.host_bytes_held
    );
    // The hold verified its 16 MiB every second through all of it.
    assert!(linux.hold_passes() >= 5, "{}", linux.console());
    let end = linux.vm.stop(Duration::from_secs(30));
    assert!(!end.timed_out, "{}", end.all());
}

/// On shmem huge pages the gather gives the balloon's frames back in whole 2 MiB blocks, and
/// with `--partial-blocks split` the rest of the target at 4 KiB once the driver reached it:
/// none of Linux's 64 MiB of scattered 4 KiB balloon pages is left waiting in a block.
#[test]
fn linux_balloon_on_shmem_huge_pages_gives_back_the_whole_target() {
    let name = "linux_balloon_on_shmem_huge_pages_gives_back_the_whole_target";
    require!(
        name,
        Need::Kvm,
        Need::Root("needs root to mount a private tmpfs")
    );
    let tmpfs = TmpfsMount::new(name, "huge=always,size=300m").expect("a huge=always tmpfs");
    let run = test_kernel(name, 1, "256M", "")
        .backing(guest_mm::Backing::ShmemThp {
            dir: tmpfs.dir.clone(),
        })
        .reclaim(guest_mm::ReclaimConfig {
            partial_blocks: guest_mm::reclaim::PartialBlocks::Split,
            ..guest_mm::ReclaimConfig::default()
        });
    let linux = Linux::boot(run);
    let before = linux.report();
    assert_eq!(before.memory_backend, "shmem-thp");
    linux.set_balloon(64);
    // Split at the target: nothing of the balloon is left waiting in a partial block.
    let r = linux.wait("inflate to 64 MiB", |_, r| {
        r.actual_bytes == 64 * MIB
            && r.frames_in_balloon == 16384
            && r.partial_block_bytes == 0
            && r.gather.pages_reclaimed >= r.device.pages_reported + 16384
    });
    let g = &r.gather;
    assert!(g.blocks_released + g.blocks_split > 0, "{r:#?}");
    // As on the memfd, free page reporting already gave the untouched memory back at boot;
    // the host holds none of the balloon's frames.
    assert!(
        r.host_bytes_held + 64 * MIB <= r.guest_ram_bytes,
        "the host holds balloon frames: {r:#?}"
    );
    let end = linux.vm.stop(Duration::from_secs(30));
    assert!(!end.timed_out, "{}", end.all());
}

/// Linux's free page hinting against this device: with reporting left out (so that what
/// comes back is hinting's doing), memory the guest wrote and freed is still held by the
/// host; a hinting run started through the API gives it back, the driver's STOP brings
/// DONE, and a hold that verifies its pattern every second sees every byte all along.
/// Linux kicks once per 4 MiB block and lists the block (where its shrinker may hand it
/// back) only after the kick returns, so each block is released inside its kick: one
/// invalidation per block (reported, not bounded here).
#[test]
fn linux_free_page_hinting_returns_freed_memory_and_keeps_every_page() {
    let name = "linux_free_page_hinting_returns_freed_memory_and_keeps_every_page";
    require!(name, Need::Kvm);
    let run = test_kernel(name, 1, "256M", "vmm.hold=16 vmm.pressure=96@2")
        .free_page_hinting()
        .no_free_page_reporting();
    let linux = Linux::boot(run);
    // The pressure tool wrote 96 MiB and freed it: free in the guest, held by the host.
    linux.wait("the pressure tool", |l, _| {
        l.console().contains("vmm-init: after pressure")
    });
    let console = linux.console();
    assert!(
        console.contains("vmm-init: mem pressure PASS: 96 MiB x 1 rounds, bad pages 0"),
        "{console}"
    );
    let features = linux.features();
    assert!(features.contains("FREE_PAGE_HINT"), "{features}");
    assert!(
        !features.contains("REPORTING"),
        "reporting was not offered: {features}"
    );
    let before = linux.report();
    assert_eq!(
        before.device.report_buffers, 0,
        "reporting is off: {before:#?}"
    );
    linux
        .api
        .start_hinting(true)
        .expect("PATCH /balloon/hinting/start");
    let started = Instant::now();
    let mut status = None;
    linux.wait("DONE after the driver's STOP", |l, _| {
        let s = l.api.hinting_status().expect("GET /balloon/hinting/status");
        status = Some(s);
        s.host_cmd == vmm::devices::balloon::hinting::CMD_ID_DONE
    });
    let took = started.elapsed();
    let status = status.expect("polled at least once");
    assert_eq!(
        status.guest_cmd,
        Some(0),
        "the driver ended with STOP: {status:?}"
    );
    let after = linux.report();
    let fell = before.host_bytes_held.saturating_sub(after.host_bytes_held);
    let hinted = after.device.pages_hinted * 4096;
    let flushes = after
        .kvm_remote_tlb_flush_requests
        .zip(before.kvm_remote_tlb_flush_requests)
        .map_or(0, |(a, b)| a - b);
    eprintln!(
        "linux hinting: {} MiB hinted in {took:.1?}, host bytes fell by {} MiB, {} hint buffers, {flushes} KVM flush requests ({}/GiB hinted)",
        hinted / MIB,
        fell / MIB,
        after.device.hint_buffers,
        flushes * (1 << 30) / hinted.max(1)
    );
    assert!(
        fell >= 64 * MIB,
        "host bytes fell by {fell}: {before:#?} -> {after:#?}"
    );
    assert!(hinted >= fell, "{after:#?}");
    assert_eq!(
        after.frames_in_balloon, 0,
        "hinted frames are the guest's: {after:#?}"
    );
    // The hold keeps verifying after DONE, when the driver has freed the hinted pages.
    let passes_then = linux.hold_passes();
    linux.wait("two more hold passes", |l, _| {
        l.hold_passes() >= passes_then + 2
    });
    let end = linux.vm.stop(Duration::from_secs(30));
    assert!(!end.timed_out, "{}", end.all());
}
