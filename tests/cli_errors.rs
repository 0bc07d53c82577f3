//! Bad input gives a one-line error with a hint, and exit status 2, never a panic.

mod common;

use std::io::Write;
use std::process::Command;

fn assert_error(args: &[&str], expect: &str) {
    let r = common::vmm(args);
    assert_eq!(r.status, Some(2), "args {args:?}\n{}", r.all());
    assert!(
        r.stderr.contains(expect),
        "args {args:?}: expected '{expect}'\n{}",
        r.all()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.all());
}

#[test]
fn missing_kvm_device() {
    assert_error(
        &[
            "run",
            "--guest",
            "memtouch",
            "--kvm-device",
            "/nonexistent/kvm",
        ],
        "KVM is not available: /nonexistent/kvm missing (load kvm_intel/kvm_amd",
    );
}

#[test]
fn kvm_device_without_permission() {
    if !common::kvm_or_skip("kvm_device_without_permission") {
        return;
    }
    // Run as an unprivileged user who cannot open the root-only /dev/kvm.
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let runuser = ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let (Some(runuser), true) = (runuser, meta.permissions().mode() & 0o006 == 0) else {
        println!("SKIPPED: cannot run as an unprivileged user here (no runuser, or /dev/kvm is world-accessible)");
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: not root, cannot switch to an unprivileged user");
        return;
    }
    let mut cmd = Command::new(runuser);
    cmd.args([
        "-u",
        "nobody",
        "--",
        common::VMM,
        "run",
        "--guest",
        common::guest("memtouch").to_str().unwrap(),
    ]);
    let r = common::run_with_timeout(cmd, std::time::Duration::from_secs(30));
    if r.stderr.contains("Permission denied") && r.stderr.contains("runuser") {
        println!("SKIPPED: the unprivileged user cannot execute the test binary here");
        return;
    }
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr.contains(
            "no permission to open /dev/kvm (run as root or add your user to the 'kvm' group)"
        ),
        "{}",
        r.all()
    );
}

#[test]
fn zero_vcpus() {
    assert_error(
        &["run", "--guest", "memtouch", "--vcpus", "0"],
        "--vcpus must be at least 1",
    );
}

#[test]
fn more_vcpus_than_kvm_allows() {
    if !common::kvm_or_skip("more_vcpus_than_kvm_allows") {
        return;
    }
    assert_error(
        &["run", "--guest", "memtouch", "--vcpus", "100000"],
        "exceeds this host's KVM limit of",
    );
}

#[test]
fn more_vcpus_than_the_test_guests_support() {
    if !common::kvm_or_skip("more_vcpus_than_the_test_guests_support") {
        return;
    }
    assert_error(
        &["run", "--guest", "memtouch", "--vcpus", "65"],
        "exceeds the 64 vCPUs the project's test guests support",
    );
}

#[test]
fn memory_not_page_aligned() {
    if !common::kvm_or_skip("memory_not_page_aligned") {
        return;
    }
    assert_error(
        &["run", "--guest", "memtouch", "--memory", "1000001"],
        "is not a multiple of the 4 KiB page size",
    );
}

#[test]
fn memory_too_small_for_the_guest() {
    if !common::kvm_or_skip("memory_too_small_for_the_guest") {
        return;
    }
    assert_error(
        &["run", "--guest", "memtouch", "--memory", "2M"],
        "--memory 2 MiB is too small for guest",
    );
}

#[test]
fn memory_size_that_is_not_a_size() {
    let r = common::vmm(&["run", "--guest", "memtouch", "--memory", "12Q"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(r.stderr.contains("unknown size suffix 'Q'"), "{}", r.all());
}

#[test]
fn guest_that_does_not_exist() {
    assert_error(
        &["run", "--guest", "no-such-guest"],
        "guest 'no-such-guest' not found",
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn guest_that_is_not_an_elf() {
    if !common::kvm_or_skip("guest_that_is_not_an_elf") {
        return;
    }
    let p = temp_file("not-an-elf", b"#!/bin/sh\necho hello\n");
    assert_error(
        &["run", "--guest", p.to_str().unwrap()],
        "is not an ELF file",
    );
}

#[test]
fn guest_for_another_architecture() {
    if !common::kvm_or_skip("guest_for_another_architecture") {
        return;
    }
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
        &["run", "--guest", p.to_str().unwrap()],
        "is an ELF for AArch64, not x86_64",
    );
}

#[test]
fn help_lists_every_run_option() {
    let r = common::vmm(&["run", "--help"]);
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
        assert!(r.stdout.contains(opt), "--help lacks {opt}\n{}", r.all());
    }
}

#[test]
fn a_report_on_a_full_disk_is_an_error_with_context_not_a_silent_drop() {
    if !common::kvm_or_skip("a_report_on_a_full_disk_is_an_error_with_context_not_a_silent_drop") {
        return;
    }
    // Every write to /dev/full fails with ENOSPC, as on a full disk: the guest passes, but the
    // run must still fail and say which file and why.
    assert_error(
        &[
            "run",
            "--guest",
            "memtouch",
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--report-json",
            "/dev/full",
        ],
        "cannot write report to /dev/full: No space left on device",
    );
}

/// Files that are not what `--kernel`/`--initrd` need, and limits of the Linux boot, are
/// refused before anything runs, each with what is wrong.
#[test]
fn bad_kernels_initrds_and_linux_limits_are_refused_with_the_reason() {
    if !common::kvm_or_skip("bad_kernels_initrds_and_linux_limits_are_refused_with_the_reason") {
        return;
    }
    let dir = common::linux_guest();
    let (vmlinux, vmlinuz) = (dir.join("vmlinux"), dir.join("vmlinuz"));
    let (vmlinux, vmlinuz) = (vmlinux.to_str().unwrap(), vmlinuz.to_str().unwrap());
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let garbage = scratch.join("not-a-kernel");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let empty = scratch.join("empty-initrd");
    std::fs::write(&empty, b"").unwrap();
    let (garbage, empty) = (garbage.to_str().unwrap(), empty.to_str().unwrap());
    let long = "a".repeat(3000);
    let cases: [(&[&str], &str); 7] = [
        (
            &["run", "--kernel", garbage],
            "is neither an ELF vmlinux nor a bzImage",
        ),
        (
            &["run", "--kernel", vmlinux, "--initrd", empty],
            "is empty",
        ),
        (
            &["run", "--kernel", vmlinux, "--memory", "32M"],
            "--memory 32 MiB is too small for this kernel: the kernel's ELF segments need RAM up to 0x",
        ),
        (
            &["run", "--kernel", vmlinuz, "--memory", "16M"],
            "--memory 16 MiB is too small for this kernel: the kernel needs RAM up to 0x",
        ),
        (
            &["run", "--kernel", vmlinux, "--vcpus", "255"],
            "--vcpus 255 exceeds the 254 vCPUs",
        ),
        (
            &["run", "--kernel", vmlinux, "--cmdline", &long],
            "this guest accepts at most 2047",
        ),
        (
            &["run", "--guest", "memtouch", "--initrd", empty],
            "'--guest <GUEST>' cannot be used with '--initrd <INITRD>'",
        ),
    ];
    for (args, expect) in cases {
        assert_error(args, expect);
    }
}
