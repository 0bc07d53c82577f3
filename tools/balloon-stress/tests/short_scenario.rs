//! A short balloon-stress scenario on KVM: every step reached, zero guest errors, and the
//! JSON report and the charts written; and the memory backend options refused as `vmm run`
//! refuses them.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vmm::report::BalloonReport;
use vmm_harness::Need;

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

/// The skip idiom of the project's KVM tests (`vmm_harness::require`, markers in
/// CARGO_TARGET_TMPDIR): returns from the test when a need is not met.
macro_rules! require {
    ($test:expr $(, $need:expr)* $(,)?) => {
        if !vmm_harness::require(Path::new(env!("CARGO_TARGET_TMPDIR")), $test, &[$($need),*]) {
            return;
        }
    };
}

fn balloon_stress(args: &[&str]) -> (Output, String) {
    vmm_harness::output_text(Command::new(env!("CARGO_BIN_EXE_balloon-stress")).args(args))
}

/// balloon-stress driving the `vmm` binary next to it (`--vmm`), with `args`.
fn balloon_stress_with_vmm(args: &[&str]) -> (Output, String) {
    let vmm = vmm_binary();
    let mut all = vec!["--vmm", vmm.to_str().unwrap()];
    all.extend_from_slice(args);
    balloon_stress(&all)
}

/// Asserts that balloon-stress's output `text` holds every one of `needles`.
fn assert_says(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "no '{n}' in:\n{text}");
    }
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
    require!(
        "short_sawtooth_scenario_passes_and_writes_report_and_plots",
        Need::Kvm
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("balloon-stress-short");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let json = out.join("report.json");
    let (r, text) = balloon_stress_with_vmm(&[
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
    assert_says(
        &text,
        &[
            "guest: verifier errors 0, reuse errors 0, verdict PASS",
            "latency p50/p90/p99 us: batch wait ",
        ],
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
        assert_says(&text, &[message]);
    }
}

#[test]
fn a_memory_path_the_vmm_refuses_ends_the_run_with_the_vmms_error() {
    require!(
        "a_memory_path_the_vmm_refuses_ends_the_run_with_the_vmms_error",
        Need::Kvm
    );
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-dir");
    let (r, text) = balloon_stress_with_vmm(&[
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
    assert_says(
        &text,
        &[
            "error: the VM ended waiting for the control socket",
            "does not exist or is not a directory",
        ],
    );
}
