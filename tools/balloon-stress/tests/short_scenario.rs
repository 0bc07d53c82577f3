//! A short balloon-stress scenario on KVM: every step reached, zero guest errors, and the
//! JSON report and the charts written; and the memory backend options refused as `vmm run`
//! refuses them.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vmm::report::BalloonReport;
use vmm_harness::{require, Need};

fn vmm_binary() -> PathBuf {
    // target/<profile>/balloon-stress → target/<profile>/vmm (built by `cargo test --workspace`).
    let p = Path::new(env!("CARGO_BIN_EXE_balloon-stress")).with_file_name("vmm");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p vmm)",
        p.display()
    );
    p
}

fn markers() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn balloon_stress(args: &[&str]) -> (Output, String) {
    let r = Command::new(env!("CARGO_BIN_EXE_balloon-stress"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    (r, text)
}

/// The parts of balloon-stress's JSON report this test reads.
#[derive(Deserialize)]
struct Written {
    steps: Vec<StepWritten>,
    final_stats: BalloonReport,
}

#[derive(Deserialize)]
struct StepWritten {
    reached: bool,
}

#[test]
fn short_sawtooth_scenario_passes_and_writes_report_and_plots() {
    let name = "short_sawtooth_scenario_passes_and_writes_report_and_plots";
    if !require(markers(), name, &[Need::Kvm]) {
        return;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("balloon-stress-short");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let json = out.join("report.json");
    let vmm = vmm_binary();
    let (r, text) = balloon_stress(&[
        "--vmm",
        vmm.to_str().unwrap(),
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--touch",
        "8M",
        "--pattern",
        "sawtooth",
        "--cycles",
        "1",
        "--free-page-reporting",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{text}");
    assert!(
        text.contains("guest: verifier errors 0, reuse errors 0, verdict PASS"),
        "{text}"
    );
    assert!(
        text.contains("latency p50/p90/p99 us: batch wait "),
        "{text}"
    );
    let written = std::fs::read_to_string(&json).unwrap();
    let rep: Written = serde_json::from_str(&written).unwrap();
    assert_eq!(rep.steps.len(), 5, "sawtooth: 4 inflates and a deflate");
    assert!(rep.steps.iter().all(|s| s.reached), "{written}");
    // The balloon peaked at 192 MiB (75% of 256 MiB). Host bytes may fall by less: free
    // page reporting already returned the guest's untouched free memory.
    let device = &rep.final_stats.device;
    assert!(device.pages_inflated * 4096 >= 192 << 20, "{device:?}");
    assert!(device.pages_reported > 0, "{device:?}");
    for f in [
        "host-vs-target.svg",
        "reclaim-rate.svg",
        "phase-latency.svg",
        "flushes-per-step.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.len() > 1000,
            "{f} looks empty"
        );
    }
}

#[test]
fn memory_backend_options_are_refused_as_vmm_run_refuses_them() {
    // Refused before any VM starts: exit status 2 with `vmm run`'s message.
    for (args, message) in [
        (
            &["--memory-backend", "shmem-thp"][..],
            "error: --memory-backend shmem-thp needs --memory-path DIR",
        ),
        (
            &["--memory-path", "/tmp"][..],
            "error: --memory-path is only for --memory-backend shmem-thp",
        ),
    ] {
        let (r, text) = balloon_stress(args);
        assert_eq!(r.status.code(), Some(2), "{text}");
        assert!(text.contains(message), "{text}");
    }
}

#[test]
fn a_memory_path_the_vmm_refuses_ends_the_run_with_the_vmms_error() {
    let name = "a_memory_path_the_vmm_refuses_ends_the_run_with_the_vmms_error";
    if !require(markers(), name, &[Need::Kvm]) {
        return;
    }
    let vmm = vmm_binary();
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-dir");
    let (r, text) = balloon_stress(&[
        "--vmm",
        vmm.to_str().unwrap(),
        "--memory",
        "256M",
        "--memory-backend",
        "shmem-thp",
        "--memory-path",
        missing.to_str().unwrap(),
        "--quiet",
        "--json",
        "/dev/null",
    ]);
    assert_eq!(r.status.code(), Some(2), "{text}");
    assert!(
        text.contains("error: the VM ended waiting for the control socket"),
        "{text}"
    );
    assert!(
        text.contains("does not exist or is not a directory"),
        "{text}"
    );
}
