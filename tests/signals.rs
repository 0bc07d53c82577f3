//! SIGTERM and SIGINT during an inflate stop the VMM cleanly: every vCPU thread is kicked
//! out of KVM_RUN and joined, the control socket is removed, and the exit status is 128+N.

mod common;

use common::{scratch, vmm_guest, Need};
use guest_mm::reclaim::{ReclaimConfig, Strategy};
use std::time::{Duration, Instant};

/// The balloon target the signal interrupts.
const TARGET_MIB: u64 = 384;

fn stop_mid_inflate(signal: i32, test: &str) {
    require!(test, Need::Kvm);
    let sock = scratch(&format!("{test}.sock"));
    let mut vm = vmm_guest("balloon")
        .vcpus(2)
        .memory("512M")
        .api_sock(&sock)
        .cmdline("changes=10 touch=8M")
        // Slow on purpose: the signal lands mid-inflate.
        .reclaim(ReclaimConfig::with_strategy(Strategy::PerPage))
        .spawn();
    let api = vm.api();
    let start = Instant::now();
    while !api.reclaim().is_ok_and(|r| r.guest.updates > 0) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "driver never ready\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    api.set_balloon_mib(TARGET_MIB).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let actual = api.reclaim().unwrap().actual_bytes;
    assert!(
        actual < TARGET_MIB << 20,
        "the inflate should still be running (actual {actual} of {} bytes)",
        TARGET_MIB << 20
    );
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, signal) }, 0);
    let r = vm.finish(Duration::from_secs(20));
    assert!(
        !r.timed_out,
        "the VMM did not stop after signal {signal}\n{}",
        r.all()
    );
    assert_eq!(r.status, Some(128 + signal), "{}", r.all());
    assert!(
        r.stderr
            .contains(&format!("vmm: stopped by signal {signal}")),
        "{}",
        r.all()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.all());
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
