//! Booting the memtouch guest on 1, 2 and 4 vCPUs under KVM, and the VMM's exit status
//! following the guest's verdict.

mod common;

fn memtouch_passes_on(vcpus: u32, test: &str) {
    require_kvm!(test);
    let n = vcpus.to_string();
    let r = common::vmm(&[
        "run",
        "--guest",
        "memtouch",
        "--vcpus",
        &n,
        "--memory",
        "256M",
        "--cmdline",
        "rounds=2",
    ]);
    assert_eq!(r.status, Some(0), "vmm failed\n{}", r.all());
    let verdict = format!("memtouch: PASS vcpus={vcpus} rounds=2");
    assert!(
        r.stdout.contains(&verdict),
        "no '{verdict}' in output\n{}",
        r.all()
    );
    r.assert_stdout_has(&["errors=0"]);
    for cpu in 0..vcpus {
        let line = format!("memtouch: cpu {cpu} touched");
        assert!(
            r.stdout.contains(&line),
            "vCPU {cpu} did not report\n{}",
            r.all()
        );
    }
    assert!(r.stderr.contains("guest verdict PASS"), "{}", r.all());
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
    require_kvm!("memtouch_touches_ram_above_4g");
    // 3.5 GiB of RAM puts 512 MiB above the MMIO hole; touch all of it once.
    let r = common::vmm(&[
        "run",
        "--guest",
        "memtouch",
        "--vcpus",
        "2",
        "--memory",
        "3584M",
        "--cmdline",
        "rounds=1",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    r.assert_stdout_has(&["memtouch: PASS vcpus=2 rounds=1"]);
}

#[test]
fn guest_fail_verdict_gives_exit_status_1() {
    require_kvm!("guest_fail_verdict_gives_exit_status_1");
    let r = common::vmm(&[
        "run",
        "--guest",
        "faulty",
        "--vcpus",
        "2",
        "--cmdline",
        "mode=fail",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.all());
    assert!(
        r.stderr
            .contains("guest verdict FAIL (exit port value 0x11)"),
        "{}",
        r.all()
    );
}

#[test]
fn guest_exception_is_reported_by_the_guest_and_fails() {
    require_kvm!("guest_exception_is_reported_by_the_guest_and_fails");
    let r = common::vmm(&["run", "--guest", "faulty", "--cmdline", "mode=exception"]);
    assert_eq!(r.status, Some(1), "{}", r.all());
    r.assert_stdout_has(&["rt: EXCEPTION vector=6"]);
}

#[test]
fn triple_fault_is_an_error_with_registers() {
    require_kvm!("triple_fault_is_an_error_with_registers");
    let r = common::vmm(&[
        "run",
        "--guest",
        "faulty",
        "--vcpus",
        "2",
        "--cmdline",
        "mode=triple-fault",
    ]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr
            .contains("guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU 0"),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains("rip=0x") && r.stderr.contains("cr3=0x10000"),
        "{}",
        r.all()
    );
}

#[test]
fn vcpus_stopping_without_verdict_is_a_failure() {
    require_kvm!("vcpus_stopping_without_verdict_is_a_failure");
    let r = common::vmm(&[
        "run",
        "--guest",
        "faulty",
        "--vcpus",
        "3",
        "--cmdline",
        "mode=stop",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.all());
    assert!(
        r.stderr.contains("every vCPU stopped without a verdict"),
        "{}",
        r.all()
    );
}
