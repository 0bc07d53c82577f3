//! QEMU boots the very same memtouch binary through its PVH entry and exits through
//! isa-debug-exit with the pass code (0x10 → status 33).

mod common;

use std::time::Duration;

#[test]
fn qemu_boots_memtouch_through_pvh() {
    require_kvm!("qemu_boots_memtouch_through_pvh");
    let Some(qemu) = common::qemu() else {
        println!("SKIPPED: qemu-system-x86_64 not installed (apt-get install qemu-system-x86; .ci/run installs it)");
        eprintln!("SKIPPED: qemu-system-x86_64 not installed");
        return;
    };
    let cmd = common::qemu_microvm(&qemu, "256M", &[], "memtouch", "rounds=2 bytes=64M");
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

/// Our balloon driver against QEMU's own virtio-balloon-device (modern virtio-mmio), with
/// the target set through QMP `balloon`: a device nobody here wrote.
#[test]
fn balloon_guest_inflates_and_deflates_against_qemus_device() {
    require_kvm!("balloon_guest_inflates_and_deflates_against_qemus_device");
    let Some(qemu) = common::qemu() else {
        println!("SKIPPED: qemu-system-x86_64 not installed (apt-get install qemu-system-x86; .ci/run installs it)");
        eprintln!("SKIPPED: qemu-system-x86_64 not installed");
        return;
    };
    let qmp_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-balloon-qmp.sock");
    let _ = std::fs::remove_file(&qmp_path);
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let extra = [
        "-device",
        "virtio-balloon-device,free-page-reporting=on",
        "-qmp",
        qmp_arg.as_str(),
    ];
    let cmd = common::qemu_microvm(&qemu, "256M", &extra, "balloon", "changes=2 report=1");
    let driver = std::thread::spawn(move || {
        let mut qmp = vmm::qmp::Qmp::connect(&qmp_path, Duration::from_secs(30)).expect("QMP");
        // QMP's value is the guest's logical memory size: 128 MiB means a 128 MiB balloon.
        qmp.execute("balloon", serde_json::json!({"value": 128u64 << 20}))
            .expect("balloon");
        let start = std::time::Instant::now();
        loop {
            let r = qmp
                .execute("query-balloon", serde_json::json!({}))
                .expect("query-balloon");
            if r["actual"] == 128u64 << 20 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "QEMU never saw the inflate: {r}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        qmp.execute("balloon", serde_json::json!({"value": 256u64 << 20}))
            .expect("deflate");
    });
    let r = common::run_with_timeout(cmd, Duration::from_secs(120));
    driver.join().expect("QMP side failed");
    assert_eq!(
        r.status,
        Some(33),
        "QEMU did not exit with the pass code\n{}",
        r.all()
    );
    r.assert_stdout_has(&["balloon: reached 32768 pages (128 MiB)"]);
    r.assert_stdout_has(&["balloon: reached 0 pages (0 MiB)"]);
    assert!(
        r.stdout.contains("balloon: reported"),
        "free page reporting against QEMU\n{}",
        r.all()
    );
    r.assert_stdout_has(&["reuse errors 0"]);
}
