//! The Stage2Gather on real KVM: a guest populates memory; the host reclaims a scattered set
//! of its frames through each strategy (the reclaim probe, port 0xf6, a test device enabled
//! with --reclaim-probe). The memfd's allocated bytes fall by exactly the reclaimed amount,
//! the reclaimed frames read zero inside the guest while every other frame keeps its
//! pattern, and KVM's remote_tlb_flush_requests grow by at most one per zap call: one per
//! span with zap spans, one per range without.

mod common;

use common::{scratch, vmm_guest, Need, RUN_LIMIT};
use guest_mm::reclaim::{ReclaimConfig, Strategy};
use vmm::devices::reclaim_probe::ProbeReport;
use vmm_harness::Finished;

/// KVM may add flushes of its own (e.g. when it breaks a long mmu_lock hold, or a shadow
/// page is zapped for another reason); allow this many beyond one per zap call.
const FLUSH_SLACK: u64 = 4;

/// The one probe a reclaimcheck run made, from its report.
fn the_probe(r: &Finished) -> &ProbeReport {
    match r.report().probes.as_slice() {
        [p] => p,
        other => panic!("one reclaim probe expected, got {other:#?}\n{}", r.all()),
    }
}

/// The run reclaimed nothing: no probe answered, no frame went through the gather.
fn nothing_reclaimed(r: &Finished) {
    let rep = r.report();
    assert!(
        rep.probes.is_empty(),
        "nothing may be reclaimed: {:#?}",
        rep.probes
    );
    assert_eq!(rep.gather.pages_reclaimed, 0, "{:#?}", rep.gather);
}

/// Host bytes the probe freed (the memfd's allocated bytes before minus after).
fn freed(p: &ProbeReport) -> u64 {
    p.host_bytes_before.saturating_sub(p.host_bytes_after)
}

/// Runs reclaimcheck with `strategy` and `span_gap` (the caller has required KVM) and checks
/// what every strategy must do; the probe's report.
fn reclaim_with(strategy: Strategy, span_gap: u64, test: &str) -> ProbeReport {
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("reclaimcheck")
        .vcpus(2)
        .memory("256M")
        .cmdline("bytes=32M")
        .reclaim(ReclaimConfig {
            zap_span_gap: span_gap,
            ..ReclaimConfig::with_strategy(strategy)
        })
        .reclaim_probe()
        .passes_with_report(&scratch(&format!("{test}.json")), RUN_LIMIT);
    r.assert_stdout_has(&[
        "reclaimcheck: PASS",
        "not_zero=0 corrupted=0 reuse_errors=0 unlisted=0",
    ]);
    let p = the_probe(&r).clone();
    assert_eq!(p.strategy, strategy.to_string(), "{p:#?}");
    assert!(p.pages > 1000, "{p:#?}");
    r.assert_stdout_has(&[&format!("reclaimed={} zero_ok={}", p.pages, p.pages)]);
    assert_eq!(p.invalid, 0, "{p:#?}");
    assert_eq!(
        freed(&p),
        p.pages * 4096,
        "memfd did not fall by exactly the reclaimed bytes: {p:#?}"
    );
    assert_eq!(
        p.host_calls,
        p.zap_calls + p.ranges,
        "one zap per span and one release per range: {p:#?}"
    );
    let flushes = p
        .kvm_flush_requests
        .unwrap_or_else(|| panic!("KVM reported no remote_tlb_flush_requests: {p:#?}"));
    assert!(
        flushes <= p.zap_calls + FLUSH_SLACK,
        "{flushes} KVM flush requests for {} zap calls: {p:#?}",
        p.zap_calls
    );
    // The running vCPU (1; vCPU 0 is in the VMM handling the probe) took the flushes: its
    // tlb_flush grew from the zap on (it handles the request at its next guest entry).
    assert_eq!(p.vcpu_tlb_flushes.len(), 2, "{p:#?}");
    assert!(
        p.vcpu_tlb_flushes[1] > 0,
        "the invalidation never reached vCPU 1: {p:#?}"
    );
    p
}

#[test]
fn gather_reclaims_scattered_frames_through_zap_spans_on_kvm() {
    let test = "gather_reclaims_scattered_frames_through_zap_spans_on_kvm";
    require!(test, Need::Kvm);
    let p = reclaim_with(Strategy::Gather, 64, test);
    // 32 MiB of scattered runs: hundreds of ranges in one batch, gaps of at most 16.
    assert!(p.ranges > 300, "{p:#?}");
    assert_eq!(p.zap_calls, 1, "one span for the batch: {p:#?}");
    assert!(p.bridged > 1000, "{p:#?}");
}

#[test]
fn gather_by_range_reclaims_scattered_frames_on_kvm() {
    let test = "gather_by_range_reclaims_scattered_frames_on_kvm";
    require!(test, Need::Kvm);
    let p = reclaim_with(Strategy::Gather, 0, test);
    assert!(p.ranges < p.pages / 4, "gather should coalesce: {p:#?}");
    assert_eq!(p.zap_calls, p.ranges, "{p:#?}");
    assert_eq!(p.bridged, 0, "{p:#?}");
}

#[test]
fn per_buffer_reclaims_scattered_frames_on_kvm() {
    let test = "per_buffer_reclaims_scattered_frames_on_kvm";
    require!(test, Need::Kvm);
    reclaim_with(Strategy::PerBuffer, 64, test);
}

#[test]
fn per_page_reclaims_scattered_frames_on_kvm() {
    let test = "per_page_reclaims_scattered_frames_on_kvm";
    require!(test, Need::Kvm);
    let p = reclaim_with(Strategy::PerPage, 64, test);
    assert_eq!(p.ranges, p.pages, "per-page: one range per page: {p:#?}");
}

#[test]
fn reclaim_above_4g() {
    require!("reclaim_above_4g", Need::Kvm);
    let _alone = common::counting_kvm_flushes();
    // 3.25 GiB puts 256 MiB above the MMIO hole, in the second memslot; the guest places
    // its region there.
    let r = vmm_guest("reclaimcheck")
        .vcpus(1)
        .memory("3328M")
        .cmdline("bytes=32M above4g=1")
        .reclaim_probe()
        .passes_with_report(&scratch("reclaim_above_4g.json"), RUN_LIMIT);
    let p = the_probe(&r);
    assert!(
        p.region_gfn >= (1 << 32) / 4096,
        "region not above 4 GiB: {p:#?}"
    );
    assert_eq!(freed(p), p.pages * 4096, "{p:#?}");
}

#[test]
fn hostile_probe_mailboxes_are_refused_and_the_vm_keeps_running() {
    require!(
        "hostile_probe_mailboxes_are_refused_and_the_vm_keeps_running",
        Need::Kvm
    );
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("faulty")
        .cmdline("mode=bad-probe")
        .reclaim_probe()
        .passes_with_report(&scratch("hostile-probe.json"), RUN_LIMIT);
    r.assert_stdout_has(&[
        "bad magic: status=1",
        "region in the MMIO hole: status=2",
        "list overlapping the region: status=2",
        "list capacity 2^61+1: status=2 reclaimed=0",
        "list capacity u64::MAX: status=2 reclaimed=0",
    ]);
    nothing_reclaimed(&r);
    r.assert_stderr_has(&["mailbox address 0xf0000000 is not in guest RAM"]);
}

#[test]
fn the_reclaim_probe_is_off_unless_enabled() {
    require!("the_reclaim_probe_is_off_unless_enabled", Need::Kvm);
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("reclaimcheck")
        .cmdline("bytes=4M")
        .report_json(&scratch("probe-off.json"))
        .run(RUN_LIMIT);
    assert_eq!(
        r.status,
        Some(1),
        "the guest fails without a probe\n{}",
        r.all()
    );
    r.assert_stdout_has(&[
        "no reclaim probe answered on port 0xf6 (run the VMM with --reclaim-probe)",
    ]);
    r.assert_stderr_has(&["the probe is off (vmm run --reclaim-probe)"]);
    nothing_reclaimed(&r);
}

/// Zap spans under writers: the other vCPUs keep rewriting and verifying the region's frames
/// that stay in use (interleaved with the reclaimed ones, so inside the spans) while the VMM
/// zaps them; none loses a write, the reclaimed frames read zero, and the invalidation
/// reaches every running vCPU.
#[test]
fn frames_written_during_a_span_zap_keep_their_contents() {
    require!(
        "frames_written_during_a_span_zap_keep_their_contents",
        Need::Kvm
    );
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("reclaimcheck")
        .vcpus(3)
        .memory("512M")
        .cmdline("bytes=128M writers=1")
        .reclaim(ReclaimConfig {
            zap_span_gap: 64,
            ..ReclaimConfig::default()
        })
        .reclaim_probe()
        .passes_with_report(&scratch("span-writers.json"), RUN_LIMIT);
    r.assert_stdout_has(&[
        "reclaimcheck: PASS",
        "not_zero=0 corrupted=0 reuse_errors=0 unlisted=0",
    ]);
    for cpu in [1, 2] {
        let line = r.expect_line(&format!("reclaimcheck: cpu {cpu} rewrote its"));
        assert!(line.ends_with(" 0 errors"), "{line}");
    }
    let p = the_probe(&r);
    assert!(p.bridged > 10_000, "{p:#?}");
    assert!(p.zap_calls <= 2, "{p:#?}");
    // The zap phase's flush requests: one per zap call, plus those KVM adds when it yields in
    // the middle of a long zap (it flushes before every yield, and it yields when the host is
    // busy). Measured on 6.18 for this span of about 2,000 ranges: 1 flush request in every
    // run on a quiet host, at most 2 with two CPU hogs, and 60 while another VM ran beside
    // it. What the test can promise under any load is that the span keeps the count far
    // below the one flush per range that zapping range by range costs (here about 2,000): at
    // most one extra flush per 16 ranges. (The old bound, "zap calls + 256", was looser than
    // that and did not depend on the plan at all.) The releases that follow are not bounded
    // here: with host fault-around on (a host where it cannot be turned off, or
    // --keep-host-fault-around), the writers' refaults may pull reclaimed frames back in
    // before their release (docs/ARCHITECTURE.md, "Host fault-around off").
    assert!(
        p.zap_flush_requests <= p.zap_calls + p.ranges / 16,
        "{} flush requests during {} zap calls over {} ranges: {p:#?}",
        p.zap_flush_requests,
        p.zap_calls,
        p.ranges
    );
    assert!(
        p.vcpu_tlb_flushes.len() == 3 && p.vcpu_tlb_flushes[1] > 0 && p.vcpu_tlb_flushes[2] > 0,
        "every running vCPU flushed: {p:#?}"
    );
}
