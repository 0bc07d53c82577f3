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
fn short_sawtooth_scenario_passes_and_writes_report_and_plots() {
    let name = "short_sawtooth_scenario_passes_and_writes_report_and_plots";
    let markers = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvm-tests");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let kind = if kvm { "ran" } else { "skipped" };
    std::fs::create_dir_all(markers.join(kind)).unwrap();
    std::fs::write(markers.join(kind).join(name), b"").unwrap();
    if !kvm {
        println!("SKIPPED: /dev/kvm not available ({name})");
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
    // The balloon peaked at 192 MiB (75% of 256 MiB). Host bytes may fall by less: free
    // page reporting already returned the guest's untouched free memory.
    let inflated = rep["final_stats"]["device"]["pages_inflated"]
        .as_u64()
        .unwrap()
        * 4096;
    assert!(inflated >= 192 << 20, "{}", rep["final_stats"]["device"]);
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
