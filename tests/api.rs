//! The control API against a running VM: set the balloon target and read stats through
//! `vmm balloon`, and malformed or oversized requests get an error, not a crash.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cli(sock: &str, args: &[&str]) -> common::Run {
    let mut all = vec!["balloon", "--api-sock", sock];
    all.extend_from_slice(args);
    common::vmm(&all)
}

fn raw(sock: &str, bytes: &[u8]) -> serde_json::Value {
    let mut c = UnixStream::connect(sock).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn control_socket_sets_target_reports_stats_and_rejects_bad_requests() {
    require_kvm!("control_socket_sets_target_reports_stats_and_rejects_bad_requests");
    let sock = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-test.sock");
    let sock_s = sock.to_str().unwrap().to_string();
    let mut vm = Command::new(common::VMM)
        .args([
            "run",
            "--guest",
            "balloon",
            "--vcpus",
            "2",
            "--memory",
            "512M",
            "--api-sock",
            &sock_s,
        ])
        .args(["--cmdline", "changes=2 touch=8M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the control socket", Duration::from_secs(30), || {
        sock.exists()
    });
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");

    // Hostile requests first: each gets an error response and the VM keeps serving.
    assert_eq!(raw(&sock_s, b"this is not json\n")["ok"], false);
    assert_eq!(raw(&sock_s, &vec![b'x'; 10_000])["ok"], false);
    assert_eq!(raw(&sock_s, b"{\"cmd\":\"explode\"}\n")["ok"], false);
    assert_eq!(
        raw(&sock_s, b"{\"cmd\":\"set\",\"target_bytes\":-5}\n")["ok"],
        false
    );
    let too_big = raw(
        &sock_s,
        format!("{{\"cmd\":\"set\",\"target_bytes\":{}}}\n", 1u64 << 40).as_bytes(),
    );
    assert!(
        too_big["error"]
            .as_str()
            .unwrap()
            .contains("exceeds guest RAM"),
        "{too_big}"
    );
    let r = cli(&sock_s, &["set", "100000"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(r.stderr.contains("not a multiple of 4096"), "{}", r.all());

    let r = cli(&sock_s, &["set", "256M"]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    wait_for("actual to reach 256 MiB", Duration::from_secs(60), || {
        let r = cli(&sock_s, &["stats"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v["stats"]["actual_bytes"] == 256u64 << 20
    });
    let r = cli(&sock_s, &["stats"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let s = &v["stats"];
    assert_eq!(s["target_bytes"], 256u64 << 20);
    assert!(s["host_bytes_held"].as_u64().unwrap() < 300 << 20, "{s}");
    assert!(
        s["gather"]["pages_reclaimed"].as_u64().unwrap() >= 65536,
        "{s}"
    );
    assert!(s["kvm_remote_tlb_flush_requests"].is_u64(), "{s}");

    assert_eq!(cli(&sock_s, &["set", "0"]).status, Some(0));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = vm.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the guest did not finish after deflating"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    vm.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(
        out.contains("balloon: 2 targets reached") && out.contains("reuse errors 0"),
        "{out}"
    );
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}

#[test]
fn balloon_cli_without_a_vm_says_what_to_do() {
    let r = common::vmm(&["balloon", "--api-sock", "/nonexistent/vmm.sock", "stats"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr.contains("is `vmm run --api-sock` running?"),
        "{}",
        r.all()
    );
}
