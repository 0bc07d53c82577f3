//! The virtio balloon end to end on KVM: the project's Linux-like driver inflates and deflates
//! against our device while verifier vCPUs keep checking their memory, and free page
//! reporting returns memory to the host.

mod common;

use std::collections::HashMap;

/// The key=value pairs in brackets of each "step N reached" line, by step.
fn steps(stderr: &str) -> HashMap<u64, HashMap<String, f64>> {
    stderr
        .lines()
        .filter(|l| l.starts_with("vmm: balloon step") && l.contains("reached"))
        .filter_map(|l| l.split_once('[').map(|(_, kv)| kv.trim_end_matches(']')))
        .map(|kv| {
            let m: HashMap<String, f64> = kv
                .split_whitespace()
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
                .collect();
            (m["step"] as u64, m)
        })
        .collect()
}

#[test]
fn inflate_768m_of_a_1g_guest_then_deflate_to_zero() {
    require_kvm!("inflate_768m_of_a_1g_guest_then_deflate_to_zero");
    let _alone = common::counting_kvm_flushes();
    let json = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("balloon-768m.json");
    let r = common::vmm(&[
        "run",
        "--guest",
        "balloon",
        "--vcpus",
        "2",
        "--memory",
        "1G",
        "--balloon-steps",
        "768M,0",
        "--cmdline",
        "changes=2 touch=16M",
        "--report-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    r.assert_stdout_has(&["balloon: reached 196608 pages (768 MiB)"]);
    r.assert_stdout_has(&["balloon: reached 0 pages (0 MiB)"]);
    r.assert_stdout_has(&["reuse errors 0"]);
    assert!(
        r.stdout.contains("balloon: cpu 1 verified its 4096 pages")
            && r.stdout.contains(", 0 errors"),
        "{}",
        r.all()
    );
    let s = steps(&r.stderr);
    let ballooned = 768.0 * (1 << 20) as f64;
    let inflate = &s[&1];
    assert_eq!(inflate["target_bytes"], ballooned);
    let fell = inflate["held_before"] - inflate["held_after"];
    assert!(
        fell >= 0.95 * ballooned,
        "memfd fell by only {fell} bytes of {ballooned}\n{}",
        r.all()
    );
    let deflate = &s[&2];
    assert_eq!(deflate["target_bytes"], 0.0);
    let rep = common::read_json(&json);
    assert_eq!(rep["actual_bytes"], 0);
    assert_eq!(rep["device"]["pages_inflated"], 196608);
    assert_eq!(rep["device"]["pages_deflated"], 196608);
    assert_eq!(rep["device"]["invalid_frames"], 0);
    assert_eq!(rep["device"]["malformed_buffers"], 0);
    // Coalescing: far fewer ranges than pages, and KVM flushes at most one per zap plus slack.
    let ranges = rep["gather"]["ranges"].as_u64().unwrap();
    assert!(ranges < 1000, "{rep}");
    assert!(
        rep["gather"]["kvm_flush_requests"].as_u64().unwrap() <= ranges + 8,
        "{rep}"
    );
    assert!(
        rep["guest"]["updates"].as_u64().unwrap() >= 1,
        "stats queue never filled: {rep}"
    );
}

#[test]
fn free_page_reporting_returns_memory_to_the_host() {
    require_kvm!("free_page_reporting_returns_memory_to_the_host");
    let _alone = common::counting_kvm_flushes();
    let json = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("balloon-report.json");
    let r = common::vmm(&[
        "run",
        "--guest",
        "balloon",
        "--vcpus",
        "1",
        "--memory",
        "512M",
        "--cmdline",
        "report=1 changes=0",
        "--report-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    r.assert_stdout_has(&["balloon: reported"]);
    let rep = common::read_json(&json);
    let reported = rep["device"]["pages_reported"].as_u64().unwrap() * 4096;
    assert!(
        reported >= 400 << 20,
        "only {reported} bytes reported: {rep}"
    );
    // The guest touched all its memory first; reporting handed the reported part back.
    let held = rep["host_bytes_held"].as_u64().unwrap();
    let ram = rep["guest_ram_bytes"].as_u64().unwrap();
    assert!(
        held <= ram - reported * 95 / 100,
        "host still holds {held} of {ram} after {reported} reported: {rep}"
    );
}
