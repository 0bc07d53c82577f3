//! SIGTERM and SIGINT during an inflate stop the VMM cleanly: every vCPU thread is kicked
//! out of KVM_RUN and joined, the control socket is removed, and the exit status is 128+N.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stop_mid_inflate(signal: i32, test: &str) {
    if !common::kvm_or_skip(test) {
        return;
    }
    let sock = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.sock"));
    let mut vm = Command::new(common::VMM)
        .args([
            "run", "--guest", "balloon", "--vcpus", "2", "--memory", "512M",
        ])
        .args([
            "--api-sock",
            sock.to_str().unwrap(),
            "--cmdline",
            "changes=10 touch=8M",
        ])
        .args(["--reclaim-strategy", "per-page"]) // slow on purpose: the signal lands mid-inflate
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let api = vmm::api::ApiClient::new(&sock).unwrap();
    loop {
        let ready = api
            .reclaim()
            .map(|r| r["guest"]["updates"].as_u64().unwrap_or(0) > 0)
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "driver never ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    api.set_balloon_mib(384).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let actual = api.reclaim().unwrap()["actual_bytes"].as_u64().unwrap();
    assert!(
        actual < 768 << 20,
        "the inflate should still be running (actual {actual})"
    );
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(vm.id() as i32, signal) }, 0);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = vm.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the VMM did not stop after signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(128 + signal), "{err}");
    assert!(
        err.contains(&format!("vmm: stopped by signal {signal}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!sock.exists(), "control socket left behind");
}

#[test]
fn sigterm_during_inflate_stops_cleanly() {
    stop_mid_inflate(libc::SIGTERM, "sigterm_during_inflate_stops_cleanly");
}

#[test]
fn sigint_during_inflate_stops_cleanly() {
    stop_mid_inflate(libc::SIGINT, "sigint_during_inflate_stops_cleanly");
}
