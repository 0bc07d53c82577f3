//! Stock Linux through this VMM: Debian's kernel and the test initramfs that ./setup.sh
//! fetches and builds (guest-kernels/linux/).
//!
//! - The PVH path on 1 and 2 vCPUs and the bzImage path: what Linux prints of our boot
//!   protocol (banner, `Command line:`, the BIOS-e820 map, `ACPI: RSDP`, `smpboot`).
//! - On hosts without VMX/SVM (nested PVM: guest ring 0 is emulated) Linux gets through early
//!   boot and stops at the first instruction KVM cannot emulate; the run must end with the
//!   readable emulation-failure error, exit status 2. Where KVM has VMX or SVM the same
//!   tests wait for the initramfs instead.
//! - The ACPI tables through `iasl -d` (acpica-tools).
//! - The initramfs itself on QEMU's TCG (no KVM), so that the guest side of the full boot
//!   is known to work on every host.
//! - The full boot of Debian's kernel with its own virtio_balloon driver against our device,
//!   where KVM has VMX or SVM; here it is SKIPPED, counted by its reason. On this host the
//!   test kernel (linux_balloon.rs) runs Linux's driver instead.

mod common;

use common::{scratch, Need};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmm::boot::memmap::{linux_e820, linux_log_line};
use vmm::emulation::host_has_hardware_virtualization;
use vmm_harness::{Finished, VmmRun};

/// Longest a boot test may run: the 2-vCPU run reaches the int3 self-test in about 100 s
/// here when it has a core to itself.
const BOOT_LIMIT: Duration = Duration::from_secs(420);
const NO_HARDWARE_VIRT: &str =
    "stock Linux cannot boot on this host (no VMX/SVM: guest ring 0 is emulated)";

fn linux_file(name: &str) -> PathBuf {
    common::linux_guest().join(name)
}

/// `vmm run` of the test kernel `kernel` (vmlinux or vmlinuz) with the test initramfs,
/// `memory` and `vcpus`; the test adds its own options.
fn linux(kernel: &str, memory: &str, vcpus: u32) -> VmmRun {
    common::vmm_kernel(&linux_file(kernel), Some(&linux_file("initramfs.cpio")))
        .memory(memory)
        .vcpus(vcpus)
}

/// A Linux run watched until it ended or the test stopped it.
struct Watched {
    run: Finished,
    /// Whether the test stopped the VM (SIGTERM) because what it waited for was seen.
    stopped: bool,
}

/// The run's console, stderr and status.
impl std::ops::Deref for Watched {
    type Target = Finished;
    fn deref(&self) -> &Finished {
        &self.run
    }
}

impl Watched {
    fn expect(&self, needle: &str) -> &str {
        self.run.expect_line(needle)
    }

    fn all(&self) -> String {
        format!("stopped by the test: {}\n{}", self.stopped, self.run.all())
    }
}

/// Runs `run` until it exits, or until `done(console lines so far, time since start)` holds
/// (then the VM is stopped with SIGTERM), or until `BOOT_LIMIT` (then it is killed and the
/// test fails, showing what the console printed). `done` may drive the VM meanwhile.
fn watch(run: VmmRun, mut done: impl FnMut(&[(f64, String)], Duration) -> bool) -> Watched {
    let start = Instant::now();
    let mut vm = run.spawn();
    let seen = vm.wait_until(BOOT_LIMIT, "what the test waits for", |lines| {
        done(lines, start.elapsed())
    });
    let (run, stopped) = match seen {
        Ok(()) => (vm.stop(Duration::from_secs(30)), true),
        // It ended by itself (finish returns at once), or it ran past the limit (finish
        // kills it and says so).
        Err(_) => (vm.finish(Duration::from_secs(5)), false),
    };
    let w = Watched { run, stopped };
    assert!(!w.run.timed_out, "{}", w.all());
    w
}

/// The console text after Linux's `[    0.000000] ` timestamp.
fn message(line: &str) -> &str {
    match line.find("] ") {
        Some(i) if line.starts_with('[') => &line[i + 2..],
        _ => line,
    }
}

/// Stops the VM once the initramfs is up: only reached where KVM runs guest ring 0 natively.
fn initramfs_ready(lines: &[(f64, String)], _: Duration) -> bool {
    lines.iter().any(|(_, l)| l.contains("vmm-init: ready"))
}

/// What Linux's early boot says of the machine the VMM gave it.
fn check_early_boot(w: &Watched, memory: u64, vcpus: u32) {
    w.expect("Linux version ");
    let passed = w
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: command line: "))
        .unwrap_or_else(|| panic!("the VMM did not print its command line\n{}", w.all()));
    let echoed = message(w.expect("Command line: "));
    assert_eq!(
        echoed,
        format!("Command line: {passed}"),
        "Linux's echo differs from what the VMM passed\n{}",
        w.all()
    );

    let layout = guest_mm::layout::Layout::new(memory).unwrap();
    let expected: Vec<String> = linux_e820(&layout).iter().map(linux_log_line).collect();
    let seen: Vec<&str> = w
        .console
        .iter()
        .map(|(_, l)| message(l))
        .filter(|m| m.starts_with("BIOS-e820: "))
        .collect();
    assert_eq!(
        seen,
        expected,
        "Linux's BIOS-e820 map is not the VMM's layout\n{}",
        w.all()
    );

    let rsdp = format!("ACPI: RSDP 0x{:016X}", vmm::acpi::RSDP_ADDR);
    w.expect(&rsdp);
    w.expect(&format!("smpboot: Allowing {vcpus} CPUs"));
}

/// The end of a boot test: the emulation-failure error naming `insn` on hosts without
/// VMX/SVM, the initramfs elsewhere.
fn check_end(w: &Watched, insn: &str) {
    if host_has_hardware_virtualization() {
        w.expect("vmm-init: ready");
        return;
    }
    assert!(!w.stopped, "{}", w.all());
    assert_eq!(
        w.status,
        Some(2),
        "the run should end with KVM's emulation failure\n{}",
        w.all()
    );
    let error = w
        .stderr
        .lines()
        .find(|l| l.contains("KVM could not emulate"))
        .unwrap_or_else(|| panic!("no emulation-failure error\n{}", w.all()));
    for part in [
        "vCPU 0: ",
        &format!("could not emulate {insn} at RIP 0xffffffff"),
        "(CPL 0; instruction bytes ",
        "no VT-x/AMD-V here",
    ] {
        assert!(error.contains(part), "no '{part}' in: {error}\n{}", w.all());
    }
    assert!(!w.stderr.contains("panicked"), "{}", w.all());
}

#[test]
fn pvh_vmlinux_on_one_vcpu_gets_through_early_boot() {
    require!("pvh_vmlinux_on_one_vcpu_gets_through_early_boot", Need::Kvm);
    // The default command line, which has earlyprintk: the console before Linux's own.
    let w = watch(linux("vmlinux", "512M", 1), initramfs_ready);
    w.assert_stderr_has(&["(ELF vmlinux, PVH entry"]);
    check_early_boot(&w, 512 << 20, 1);
    check_end(&w, "cmpxchg16b");
    print_timings(&w);
}

/// When the milestones arrived (docs/BENCHMARKS.md, "Stock Linux").
fn print_timings(w: &Watched) {
    let t = |n: &str| w.find(n).map_or("-".into(), |(t, _)| format!("{t:.1} s"));
    println!(
        "banner {}, ACPI: RSDP {}, smpboot {}, Memory: {}, last line {:.1} s",
        t("Linux version"),
        t("ACPI: RSDP"),
        t("smpboot:"),
        t("Memory:"),
        w.console.last().map_or(0.0, |(t, _)| *t)
    );
}

/// 5 GiB puts 2 GiB above the MMIO hole. `mem=768M` keeps Linux from initialising all of it
/// (slow in emulated ring 0) after it has printed the firmware map; `clearcpuid=cx16 noxsave`
/// takes it past cmpxchg16b and xrstor to the int3 self-test.
#[test]
fn pvh_vmlinux_on_two_vcpus_sees_ram_above_4g() {
    require!("pvh_vmlinux_on_two_vcpus_sees_ram_above_4g", Need::Kvm);
    let cmdline = format!(
        "{} mem=768M clearcpuid=cx16 noxsave",
        vmm::boot::linux::DEFAULT_CMDLINE
    );
    let w = watch(linux("vmlinux", "5G", 2).cmdline(cmdline), initramfs_ready);
    check_early_boot(&w, 5 << 30, 2);
    assert!(
        w.find("BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable")
            .is_some(),
        "{}",
        w.all()
    );
    check_end(&w, "int3");
    print_timings(&w);
}

/// Without ACPI, Linux takes its CPUs from the MP table (which it finds at once in the EBDA)
/// and the balloon from the command line only. Stopped once SMP setup is printed.
#[test]
fn without_acpi_linux_finds_its_cpus_in_the_mp_table() {
    require!(
        "without_acpi_linux_finds_its_cpus_in_the_mp_table",
        Need::Kvm
    );
    let w = watch(linux("vmlinux", "512M", 2).no_acpi(), |lines, _| {
        lines.iter().any(|(_, l)| l.contains("smpboot: Allowing"))
    });
    w.expect("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]");
    w.expect("smpboot: Allowing 2 CPUs");
    assert!(w.find("ACPI: RSDP 0x").is_none(), "{}", w.all());
    assert!(!w.stderr.contains("vmm: ACPI:"), "{}", w.all());
    assert!(
        w.stopped || !host_has_hardware_virtualization(),
        "{}",
        w.all()
    );
    print_timings(&w);
}

/// The bzImage path. Here its decompressor (guest ring 0) takes minutes, so the test gives
/// it 20 s: a wrong entry, zero page or page table would fault in the first milliseconds
/// (a triple fault or an error ends the run), and a zero page the decompressor rejects
/// makes it print "-- System halted"; a bzImage still running quietly then is one the VMM
/// entered correctly. With VMX/SVM it waits for the initramfs. (This is weaker than the
/// PVH tests: nothing here shows the decompressor finishing.)
#[test]
fn bzimage_enters_through_the_64_bit_boot_protocol() {
    require!("bzimage_enters_through_the_64_bit_boot_protocol", Need::Kvm);
    let hardware = host_has_hardware_virtualization();
    let w = watch(linux("vmlinuz", "512M", 1), |lines, elapsed| {
        initramfs_ready(lines, elapsed) || (!hardware && elapsed > Duration::from_secs(20))
    });
    w.assert_stderr_has(&["(bzImage, 64-bit boot protocol"]);
    assert!(w.stopped, "the bzImage run ended by itself\n{}", w.all());
    assert_eq!(w.status, Some(128 + libc::SIGTERM), "{}", w.all());
    // A decompressor that rejects what it was given prints why through earlyprintk and halts
    // with interrupts off, which neither faults nor exits.
    assert!(w.find("System halted").is_none(), "{}", w.all());
    w.assert_stderr_has(&["vmm: stopped by signal 15"]);
    if hardware {
        check_early_boot(&w, 512 << 20, 1);
    }
}

/// iasl disassembles every table the VMM writes without an error or a warning, and compiles
/// the disassembled DSDT back without one. The RSDP is not given to iasl: it is a pointer
/// structure without a table header, which `iasl -d` (20200925) needs to read a binary
/// file; its checksums are unit tests in `vmm::acpi`, and Linux's `ACPI: RSDP` line above
/// shows it found it.
#[test]
fn acpi_tables_pass_iasl() {
    let iasl = Command::new("iasl").arg("-v").output();
    assert!(
        iasl.is_ok(),
        "iasl is not installed: run ./setup.sh (it installs Debian's acpica-tools)"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tables = vmm::acpi::build(&vmm::vm::acpi_platform(4)).unwrap();
    let iasl = |args: &[&str]| {
        let (o, text) = vmm_harness::output_text(Command::new("iasl").args(args).current_dir(&dir));
        (o.status.success(), text)
    };
    for t in tables.iter().filter(|t| t.signature != "RSDP") {
        let file = format!("{}.dat", t.signature.to_lowercase());
        std::fs::write(dir.join(&file), &t.bytes).unwrap();
        let (ok, text) = iasl(&["-d", &file]);
        assert!(ok, "iasl -d {file} failed:\n{text}");
        println!("iasl -d {file}: {}", text.lines().last().unwrap_or(""));
        for bad in ["Error", "Warning", "Invalid", "Unknown"] {
            assert!(!text.contains(bad), "iasl -d {file} says '{bad}':\n{text}");
        }
    }
    let (ok, text) = iasl(&["dsdt.dsl"]);
    assert!(ok, "iasl dsdt.dsl failed:\n{text}");
    assert!(
        text.contains("0 Errors, 0 Warnings"),
        "iasl dsdt.dsl:\n{text}"
    );
    println!(
        "iasl dsdt.dsl: {}",
        text.lines().rfind(|l| l.contains("Errors")).unwrap_or("")
    );
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    for device in ["\"LNRO0005\"", "\"PNP0501\"", "_S5_"] {
        assert!(dsl.contains(device), "no {device} in the DSDT:\n{dsl}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test initramfs with Debian's bzImage on QEMU's TCG (no KVM, so it boots on any
/// host): Linux's virtio_balloon binds to a virtio-mmio balloon found through ACPI, the init
/// reports what it negotiated, and its round lines follow a balloon target set through QMP
/// (the same lines the full-boot test reads on this VMM).
#[test]
fn the_test_initramfs_follows_linux_balloon_driver_on_qemu_tcg() {
    let qemu = common::qemu_that_starts();
    let qmp_path = scratch("linux-tcg.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,acpi=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
    ])
    .args(["-m", "512M", "-nographic", "-no-reboot"])
    .arg("-kernel")
    .arg(linux_file("vmlinuz"))
    .arg("-initrd")
    .arg(linux_file("initramfs.cpio"))
    // Under TCG the PIT calibration of the TSC fails about one boot in three here, and
    // Linux then hangs before it reaches the initramfs; a given TSC rate skips it.
    .args(["-append", "console=ttyS0 panic=1 tsc_early_khz=2000000"])
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .args(vmm_harness::qemu::balloon_and_qmp_args(&qmp_path));
    let mut q = vmm_harness::qemu::QemuProcess::spawn(cmd).unwrap();
    let limit = Duration::from_secs(180);
    q.wait_for_stdout("vmm-init: ready", limit)
        .unwrap_or_else(|e| panic!("{e}\n{}", q.stdout()));
    let console = q.stdout();
    let features = console
        .lines()
        .find(|l| l.contains("vmm-init: balloon ") && l.contains("driver virtio_balloon"))
        .unwrap_or_else(|| panic!("virtio_balloon did not bind\n{console}"));
    for f in ["VERSION_1", "STATS_VQ", "DEFLATE_ON_OOM", "REPORTING"] {
        assert!(features.contains(f), "{f} not negotiated: {features}");
    }
    let mut qmp = q.connect_qmp(&qmp_path, limit).unwrap();
    // QEMU's "balloon" takes the guest's new size: 512 - 128 MiB, then all of it back.
    for (size, counter) in [
        (384u64 << 20, "balloon_inflate"),
        (512 << 20, "balloon_deflate"),
    ] {
        qmp.execute("balloon", serde_json::json!({ "value": size }))
            .unwrap();
        let start = Instant::now();
        while balloon_counter(q.stdout().lines(), counter) < 32768 {
            assert!(
                start.elapsed() < limit,
                "{counter} never reached 128 MiB\n{}",
                q.stdout()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The latest value of /proc/vmstat's `counter` (pages) in the init's round lines.
fn balloon_counter<'a>(lines: impl Iterator<Item = &'a str>, counter: &str) -> u64 {
    let log: String = lines.map(|l| format!("{l}\n")).collect();
    vmm_harness::console::vmm_init_value(&log, counter).unwrap_or(0)
}

/// Debian's stock kernel's virtio_balloon driver follows targets set through the control
/// socket: where KVM has VMX or SVM (here it is skipped; the test kernel does the same on this
/// host in linux_balloon.rs).
#[test]
fn stock_linux_balloon_driver_follows_targets_from_the_control_socket() {
    let name = "stock_linux_balloon_driver_follows_targets_from_the_control_socket";
    require!(
        name,
        Need::Kvm,
        Need::That(
            host_has_hardware_virtualization(),
            NO_HARDWARE_VIRT.to_string()
        )
    );
    let sock = scratch(&format!("{name}.sock"));
    let mut step = 0;
    let mut api = None;
    let mut since = Instant::now();
    let mut held_before = 0;
    let mut seen = Vec::new();
    let w = watch(linux("vmlinux", "1G", 2).api_sock(&sock), |lines, _| {
        if api.is_none() {
            if !initramfs_ready(lines, Duration::ZERO) {
                return false;
            }
            api = Some(vmm::api::ApiClient::new(&sock).unwrap());
            since = Instant::now();
        }
        let api = api.as_ref().unwrap();
        let r = api.reclaim().unwrap();
        assert!(
            since.elapsed() < Duration::from_secs(90),
            "step {step} stuck: {r:#?}"
        );
        let guest = |counter| balloon_counter(lines.iter().map(|(_, l)| l.as_str()), counter);
        match step {
            // Inflate by 256 MiB (65536 pages) once the guest prints its round lines.
            0 if lines.iter().any(|(_, l)| l.contains("vmm-init: round ")) => {
                held_before = r.host_bytes_held;
                api.set_balloon_mib(256).unwrap();
                (step, since) = (1, Instant::now());
            }
            // The driver acknowledges before the `reclaim` worker gives the frames back to
            // the host (within a batch window), so the host's bytes are waited for too:
            // a step still short of them after 90 s fails as stuck.
            1 if r.actual_bytes == 256 << 20
                && held_before.saturating_sub(r.host_bytes_held) >= 200 << 20 =>
            {
                seen.push(format!("inflated: {r:?}"));
                (step, since) = (2, Instant::now());
            }
            // The guest's own counters say so, and its statistics arrive.
            2 if guest("balloon_inflate") >= 65536 && r.guest.updates > 0 => {
                assert!(r.guest.values.total_memory.is_some(), "{r:#?}");
                api.set_balloon_mib(0).unwrap();
                (step, since) = (3, Instant::now());
            }
            3 if r.actual_bytes == 0 && r.frames_in_balloon == 0 => {
                seen.push(format!("deflated: {r:?}"));
                (step, since) = (4, Instant::now());
            }
            4 if guest("balloon_deflate") >= 65536 => return true,
            _ => {}
        }
        false
    });
    assert!(w.stopped, "the guest stopped at step {step}\n{}", w.all());
    w.expect("driver virtio_balloon features");
    println!("{}", seen.join("\n"));
}
