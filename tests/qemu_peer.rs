//! QEMU boots the very same memtouch binary through its PVH entry and exits through
//! isa-debug-exit with the pass code (0x10 → status 33).

mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn qemu_boots_memtouch_through_pvh() {
    require_kvm!("qemu_boots_memtouch_through_pvh");
    let Some(qemu) = common::qemu() else {
        println!("SKIPPED: qemu-system-x86_64 not installed (apt-get install qemu-system-x86; .ci/run installs it)");
        eprintln!("SKIPPED: qemu-system-x86_64 not installed");
        return;
    };
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-kernel",
        common::guest("memtouch").to_str().unwrap(),
        "-append",
        "rounds=2 bytes=64M",
    ]);
    let r = common::run_with_timeout(cmd, Duration::from_secs(120));
    assert_eq!(
        r.status,
        Some(33),
        "QEMU did not exit with the pass code\n{}",
        r.all()
    );
    assert!(
        r.stdout
            .contains("memtouch: PASS vcpus=1 rounds=2 bytes_touched=134217728 errors=0"),
        "{}",
        r.all()
    );
}
