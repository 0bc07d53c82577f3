//! Bad input gives a one-line error with a hint, and exit status 2, never a panic.

mod common;

use common::{scratch, vmm_guest, vmm_kernel, vmm_nothing, Need, RUN_LIMIT};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use vmm_harness::{RunningVm, VmmRun};

fn assert_error(run: VmmRun, expect: &str) {
    let r = run.run(RUN_LIMIT);
    let what = format!("{:?}", run.command());
    assert_eq!(r.status, Some(2), "{what}\n{}", r.all());
    assert!(
        r.stderr.contains(expect),
        "{what}: expected '{expect}'\n{}",
        r.all()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.all());
}

#[test]
fn missing_kvm_device() {
    assert_error(
        vmm_guest("memtouch").kvm_device(Path::new("/nonexistent/kvm")),
        "KVM is not available: /nonexistent/kvm missing (load kvm_intel/kvm_amd",
    );
}

/// The runuser binary, if this host has one.
fn runuser() -> Option<&'static str> {
    ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// `cmd` (a `vmm` command line) as the unprivileged user `nobody`.
fn as_nobody(runuser: &str, cmd: &Command) -> Command {
    let mut c = Command::new(runuser);
    c.args(["-u", "nobody", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

#[test]
fn kvm_device_without_permission() {
    let test = "kvm_device_without_permission";
    use std::os::unix::fs::PermissionsExt;
    // Run as an unprivileged user who cannot open the root-only /dev/kvm: that takes KVM, a
    // /dev/kvm others cannot open, root (to switch users), runuser, and a `vmm` binary that
    // user can execute.
    let kvm_is_root_only =
        std::fs::metadata("/dev/kvm").is_ok_and(|m| m.permissions().mode() & 0o006 == 0);
    require!(
        test,
        Need::Kvm,
        Need::That(
            kvm_is_root_only,
            "/dev/kvm is accessible to every user here".into()
        ),
        Need::Root("needs root to run the VMM as an unprivileged user"),
        Need::That(
            runuser().is_some(),
            "no runuser to run the VMM as an unprivileged user".into()
        ),
    );
    let runuser = runuser().expect("required");
    let mut version = Command::new(common::VMM);
    version.arg("--version");
    let can_execute = as_nobody(runuser, &version)
        .output()
        .is_ok_and(|o| o.status.success());
    require!(
        test,
        Need::That(
            can_execute,
            "the unprivileged user cannot execute the vmm binary here".into()
        )
    );
    let run = vmm_guest(common::guest("memtouch").to_str().unwrap());
    let r = RunningVm::spawn_command(as_nobody(runuser, &run.command()))
        .finish(std::time::Duration::from_secs(30));
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&[
        "no permission to open /dev/kvm (run as root or add your user to the 'kvm' group)",
    ]);
}

#[test]
fn zero_vcpus() {
    assert_error(vmm_guest("memtouch").vcpus(0), "--vcpus must be at least 1");
}

#[test]
fn more_vcpus_than_kvm_allows() {
    require!("more_vcpus_than_kvm_allows", Need::Kvm);
    assert_error(
        vmm_guest("memtouch").vcpus(100000),
        "exceeds this host's KVM limit of",
    );
}

#[test]
fn more_vcpus_than_the_test_guests_support() {
    require!("more_vcpus_than_the_test_guests_support", Need::Kvm);
    assert_error(
        vmm_guest("memtouch").vcpus(65),
        "exceeds the 64 vCPUs the project's test guests support",
    );
}

#[test]
fn memory_not_page_aligned() {
    require!("memory_not_page_aligned", Need::Kvm);
    assert_error(
        vmm_guest("memtouch").memory("1000001"),
        "is not a multiple of the 4 KiB page size",
    );
}

#[test]
fn memory_too_small_for_the_guest() {
    require!("memory_too_small_for_the_guest", Need::Kvm);
    assert_error(
        vmm_guest("memtouch").memory("2M"),
        "--memory 2 MiB is too small for guest",
    );
}

#[test]
fn memory_size_that_is_not_a_size() {
    assert_error(
        vmm_guest("memtouch").memory("12Q"),
        "unknown size suffix 'Q'",
    );
}

#[test]
fn guest_that_does_not_exist() {
    assert_error(
        vmm_guest("no-such-guest"),
        "guest 'no-such-guest' not found",
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = scratch(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn guest_that_is_not_an_elf() {
    require!("guest_that_is_not_an_elf", Need::Kvm);
    let p = temp_file("not-an-elf", b"#!/bin/sh\necho hello\n");
    assert_error(vmm_guest(p.to_str().unwrap()), "is not an ELF file");
}

#[test]
fn guest_for_another_architecture() {
    require!("guest_for_another_architecture", Need::Kvm);
    // A 64-bit little-endian ELF header for AArch64 (e_machine 183).
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[6] = 1;
    h[16] = 2;
    h[18..20].copy_from_slice(&183u16.to_le_bytes());
    let p = temp_file("aarch64-elf", &h);
    assert_error(
        vmm_guest(p.to_str().unwrap()),
        "is an ELF for AArch64, not x86_64",
    );
}

#[test]
fn help_lists_every_run_option() {
    let r = vmm_nothing().arg("--help").run(RUN_LIMIT);
    assert_eq!(r.status, Some(0), "{}", r.all());
    for opt in [
        "--guest",
        "--kernel",
        "--initrd",
        "--no-acpi",
        "--vcpus",
        "--memory",
        "--cmdline",
        "--kvm-device",
        "Exit status",
        "earlyprintk=ttyS0",
    ] {
        r.assert_stdout_has(&[opt]);
    }
}

#[test]
fn a_report_on_a_full_disk_is_an_error_with_context_not_a_silent_drop() {
    require!(
        "a_report_on_a_full_disk_is_an_error_with_context_not_a_silent_drop",
        Need::Kvm
    );
    // Every write to /dev/full fails with ENOSPC, as on a full disk: the guest passes, but the
    // run must still fail and say which file and why. A raw argument, not `report_json`: the
    // harness removes a run's old report before it starts and reads the new one after.
    assert_error(
        vmm_guest("memtouch")
            .vcpus(1)
            .memory("64M")
            .arg("--report-json")
            .arg("/dev/full"),
        "cannot write report to /dev/full: No space left on device",
    );
}

/// Files that are not what `--kernel`/`--initrd` need, and limits of the Linux boot, are
/// refused before anything runs, each with what is wrong.
#[test]
fn bad_kernels_initrds_and_linux_limits_are_refused_with_the_reason() {
    require!(
        "bad_kernels_initrds_and_linux_limits_are_refused_with_the_reason",
        Need::Kvm
    );
    let dir = common::linux_guest();
    let (vmlinux, vmlinuz) = (dir.join("vmlinux"), dir.join("vmlinuz"));
    let garbage = temp_file("not-a-kernel", &[0x5a; 8192]);
    let empty = temp_file("empty-initrd", b"");
    let long = "a".repeat(3000);
    let cases: [(VmmRun, &str); 7] = [
        (
            vmm_kernel(&garbage, None),
            "is neither an ELF vmlinux nor a bzImage",
        ),
        (vmm_kernel(&vmlinux, Some(&empty)), "is empty"),
        (
            vmm_kernel(&vmlinux, None).memory("32M"),
            "--memory 32 MiB is too small for this kernel: the kernel's ELF segments need RAM up to 0x",
        ),
        (
            vmm_kernel(&vmlinuz, None).memory("16M"),
            "--memory 16 MiB is too small for this kernel: the kernel needs RAM up to 0x",
        ),
        (
            vmm_kernel(&vmlinux, None).vcpus(255),
            "--vcpus 255 exceeds the 254 vCPUs",
        ),
        (
            vmm_kernel(&vmlinux, None).cmdline(long),
            "this guest accepts at most 2047",
        ),
        (
            vmm_guest("memtouch").arg("--initrd").arg(&empty),
            "'--guest <GUEST>' cannot be used with '--initrd <INITRD>'",
        ),
    ];
    for (run, expect) in cases {
        assert_error(run, expect);
    }
}
