//! Booting the memtouch guest on 1, 2 and 4 vCPUs under KVM, and the VMM's exit status
//! following the guest's verdict.

mod common;

use common::{vmm_guest, Need, RUN_LIMIT};

fn memtouch_passes_on(vcpus: u32, test: &str) {
    require!(test, Need::Kvm);
    let r = vmm_guest("memtouch")
        .vcpus(vcpus)
        .memory("256M")
        .cmdline("rounds=2")
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(0), "vmm failed\n{}", r.all());
    r.assert_stdout_has(&[
        &format!("memtouch: PASS vcpus={vcpus} rounds=2"),
        "errors=0",
    ]);
    for cpu in 0..vcpus {
        assert!(
            r.find(&format!("memtouch: cpu {cpu} touched")).is_some(),
            "vCPU {cpu} did not report\n{}",
            r.all()
        );
    }
    r.assert_stderr_has(&["guest verdict PASS"]);
}

#[test]
fn memtouch_passes_on_one_vcpu() {
    memtouch_passes_on(1, "memtouch_passes_on_one_vcpu");
}

#[test]
fn memtouch_passes_on_two_vcpus() {
    memtouch_passes_on(2, "memtouch_passes_on_two_vcpus");
}

#[test]
fn memtouch_passes_on_four_vcpus() {
    memtouch_passes_on(4, "memtouch_passes_on_four_vcpus");
}

#[test]
fn memtouch_touches_ram_above_4g() {
    require!("memtouch_touches_ram_above_4g", Need::Kvm);
    // 3.5 GiB of RAM puts 512 MiB above the MMIO hole; touch all of it once.
    let r = vmm_guest("memtouch")
        .vcpus(2)
        .memory("3584M")
        .cmdline("rounds=1")
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(0), "{}", r.all());
    r.assert_stdout_has(&["memtouch: PASS vcpus=2 rounds=1"]);
}

#[test]
fn guest_fail_verdict_gives_exit_status_1() {
    require!("guest_fail_verdict_gives_exit_status_1", Need::Kvm);
    let r = vmm_guest("faulty")
        .vcpus(2)
        .cmdline("mode=fail")
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(1), "{}", r.all());
    r.assert_stderr_has(&["guest verdict FAIL (exit port value 0x11)"]);
}

#[test]
fn guest_exception_is_reported_by_the_guest_and_fails() {
    require!(
        "guest_exception_is_reported_by_the_guest_and_fails",
        Need::Kvm
    );
    let r = vmm_guest("faulty").cmdline("mode=exception").run(RUN_LIMIT);
    assert_eq!(r.status, Some(1), "{}", r.all());
    r.assert_stdout_has(&["rt: EXCEPTION vector=6"]);
}

#[test]
fn triple_fault_is_an_error_with_registers() {
    require!("triple_fault_is_an_error_with_registers", Need::Kvm);
    let r = vmm_guest("faulty")
        .vcpus(2)
        .cmdline("mode=triple-fault")
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&[
        "guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU 0",
        "rip=0x",
        "cr3=0x10000",
    ]);
}

#[test]
fn vcpus_stopping_without_verdict_is_a_failure() {
    require!("vcpus_stopping_without_verdict_is_a_failure", Need::Kvm);
    let r = vmm_guest("faulty")
        .vcpus(3)
        .cmdline("mode=stop")
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(1), "{}", r.all());
    r.assert_stderr_has(&["every vCPU stopped without a verdict"]);
}
