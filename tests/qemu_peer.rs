//! QEMU boots the very same guest binaries through their PVH entry (bringing up their other
//! vCPUs themselves) and exits through isa-debug-exit with the pass code (0x10 → status 33).
//! Before either test, QEMU boots a tiny guest once (`common::qemu_that_starts`), so a QEMU
//! that cannot start on this host fails with its own message.

mod common;

use common::Need;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmm_harness::qemu::{guest_cmdline, microvm_args, QemuProcess};

/// QEMU's microvm with the project's conventions (`vmm_harness::qemu::microvm_args`) and
/// `vcpus` vCPUs booting test guest `guest` with `append`; `extra` arguments go before
/// `-kernel`.
fn qemu_microvm(
    qemu: &Path,
    memory: &str,
    vcpus: u32,
    extra: &[&str],
    guest: &str,
    append: &str,
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(microvm_args(memory, vcpus))
        .args(extra)
        .arg("-kernel")
        .arg(common::guest(guest))
        .args(["-append", &guest_cmdline(append, vcpus)]);
    cmd
}

/// Runs `cmd` to QEMU's exit, which must be the guest's pass code; the guest's console.
fn passes(cmd: Command, timeout: Duration) -> String {
    let mut q = QemuProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    q.wait_pass(timeout).unwrap_or_else(|e| {
        panic!(
            "QEMU did not exit with the pass code: {e}\n--- guest console ---\n{}",
            q.stdout()
        )
    });
    q.stdout()
}

fn assert_has(console: &str, needles: &[&str]) {
    for n in needles {
        assert!(console.contains(n), "no '{n}' in the console\n{console}");
    }
}

#[test]
fn qemu_boots_memtouch_through_pvh() {
    require!("qemu_boots_memtouch_through_pvh", Need::Kvm);
    let qemu = common::qemu_that_starts();
    let cmd = qemu_microvm(&qemu, "256M", 1, &[], "memtouch", "rounds=2 bytes=64M");
    let console = passes(cmd, Duration::from_secs(120));
    assert_has(
        &console,
        &["memtouch: PASS vcpus=1 rounds=2 bytes_touched=134217728 errors=0"],
    );
}

/// The same binary on 3 vCPUs under QEMU: the guest's runtime brings up the application
/// processors itself with INIT/SIPI (QEMU's PVH entry starts only the boot vCPU).
#[test]
fn qemu_runs_memtouch_on_application_processors_the_guest_starts() {
    require!(
        "qemu_runs_memtouch_on_application_processors_the_guest_starts",
        Need::Kvm
    );
    let qemu = common::qemu_that_starts();
    let cmd = qemu_microvm(&qemu, "256M", 3, &[], "memtouch", "rounds=2 bytes=48M");
    let console = passes(cmd, Duration::from_secs(180));
    assert_has(&console, &["memtouch: PASS vcpus=3 rounds=2"]);
    for cpu in 0..3 {
        assert_has(&console, &[&format!("memtouch: cpu {cpu} touched")]);
    }
}

/// Our balloon driver against QEMU's own virtio-balloon-device (modern virtio-mmio), with
/// the target set through QMP `balloon`: a device nobody here wrote. Two vCPUs: the second
/// verifies its memory during the inflate and deflate.
#[test]
fn balloon_guest_inflates_and_deflates_against_qemus_device() {
    require!(
        "balloon_guest_inflates_and_deflates_against_qemus_device",
        Need::Kvm
    );
    let qemu = common::qemu_that_starts();
    let qmp_path = common::scratch("qemu-balloon-qmp.sock");
    let _ = std::fs::remove_file(&qmp_path);
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let extra = [
        "-device",
        "virtio-balloon-device,free-page-reporting=on",
        "-qmp",
        qmp_arg.as_str(),
    ];
    let cmd = qemu_microvm(&qemu, "256M", 2, &extra, "balloon", "changes=2 report=1");
    let mut vm = QemuProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let mut qmp = vm
        .connect_qmp(&qmp_path, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut execute = |vm: &mut QemuProcess, cmd: &str, args: serde_json::Value| {
        qmp.execute(cmd, args).unwrap_or_else(|e| {
            panic!(
                "{}\n--- guest console ---\n{}",
                vm.qmp_error(e),
                vm.stdout()
            )
        })
    };
    // QMP's value is the guest's logical memory size: 128 MiB means a 128 MiB balloon.
    execute(
        &mut vm,
        "balloon",
        serde_json::json!({"value": 128u64 << 20}),
    );
    let start = std::time::Instant::now();
    loop {
        // QEMU's reply (QMP is QEMU's protocol, not this VMM's).
        let r = execute(&mut vm, "query-balloon", serde_json::json!({}));
        if r["actual"] == 128u64 << 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "QEMU never saw the inflate: {r}\n--- guest console ---\n{}",
            vm.stdout()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    execute(
        &mut vm,
        "balloon",
        serde_json::json!({"value": 256u64 << 20}),
    );
    vm.wait_pass(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n--- guest console ---\n{}", vm.stdout()));
    let console = vm.stdout();
    assert_has(
        &console,
        &[
            "balloon: reached 32768 pages (128 MiB)",
            "balloon: reached 0 pages (0 MiB)",
            // Free page reporting against QEMU.
            "balloon: reported",
            "reuse errors 0",
            "balloon: cpu 1 verified its",
        ],
    );
    assert!(
        console
            .lines()
            .map(str::trim_end)
            .any(|l| l.starts_with("balloon: cpu 1 verified its") && l.ends_with(" 0 errors")),
        "{console}"
    );
}
