//! A short balloon-stress scenario on KVM: every step reached, zero guest errors, and the
//! JSON report and the charts written.

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn short_mixed_scenario_passes_and_writes_report_and_plots() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm not available");
        return;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("balloon-stress-short");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let json = out.join("report.json");
    let r = Command::new(env!("CARGO_BIN_EXE_balloon-stress"))
        .args([
            "--vmm",
            vmm_binary().to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory",
            "256M",
            "--touch",
            "8M",
        ])
        .args([
            "--pattern",
            "sawtooth",
            "--cycles",
            "1",
            "--free-page-reporting",
            "--quiet",
        ])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--plot",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.status.success(), "{text}");
    assert!(
        text.contains("guest: verifier errors 0, reuse errors 0, verdict PASS"),
        "{text}"
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let steps = rep["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5, "sawtooth: 4 inflates and a deflate");
    assert!(steps.iter().all(|s| s["reached"] == true), "{rep}");
    assert!(
        rep["summary"]["mib_reclaimed"].as_f64().unwrap() > 150.0,
        "{}",
        rep["summary"]
    );
    assert!(
        rep["final_stats"]["device"]["pages_reported"]
            .as_u64()
            .unwrap()
            > 0
    );
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
