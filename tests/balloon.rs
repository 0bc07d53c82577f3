//! The virtio balloon end to end on KVM: the project's Linux-like driver inflates and deflates
//! against our device while verifier vCPUs keep checking their memory, and free page
//! reporting returns memory to the host.

mod common;

use common::{scratch, vmm_guest, Need, RUN_LIMIT};

/// KVM adds flush requests of its own to a zap's window beyond the one per zap call, and
/// more when the host is busy: 51 in one 64 MiB zap (3.3 ms) once while the machine compiled,
/// where the vCPUs themselves flushed only twice. Allow one per 1,024 reclaimed pages: still
/// far below one flush per 256-PFN buffer (768 here) or per page (196,608), which is what
/// this bound must catch.
const PAGES_PER_EXTRA_FLUSH: u64 = 1024;

#[test]
fn inflate_768m_of_a_1g_guest_then_deflate_to_zero() {
    require!("inflate_768m_of_a_1g_guest_then_deflate_to_zero", Need::Kvm);
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("balloon")
        .vcpus(2)
        .memory("1G")
        .balloon_steps(&["768M", "0"])
        .cmdline("changes=2 touch=16M")
        .passes_with_report(&scratch("balloon-768m.json"), RUN_LIMIT);
    r.assert_stdout_has(&[
        "balloon: reached 196608 pages (768 MiB)",
        "balloon: reached 0 pages (0 MiB)",
        "reuse errors 0",
    ]);
    let verifier = r.expect_line("balloon: cpu 1 verified its 4096 pages");
    assert!(verifier.ends_with(", 0 errors"), "{}", r.all());
    let rep = r.report();
    let ballooned = 768u64 << 20;
    let [inflate, deflate] = rep.steps.as_slice() else {
        panic!("two balloon steps: {:#?}\n{}", rep.steps, r.all());
    };
    assert_eq!((inflate.step, inflate.target_bytes), (1, ballooned));
    assert!(inflate.reached_s.is_some(), "{inflate:?}");
    let fell = inflate.held_before.saturating_sub(inflate.held_after);
    assert!(
        fell as f64 >= 0.95 * ballooned as f64,
        "memfd fell by only {fell} bytes of {ballooned}: {inflate:?}\n{}",
        r.all()
    );
    assert_eq!((deflate.step, deflate.target_bytes), (2, 0));
    assert!(deflate.reached_s.is_some(), "{deflate:?}");
    assert_eq!(rep.actual_bytes, 0, "{rep:#?}");
    let d = &rep.device;
    assert_eq!(
        (
            d.pages_inflated,
            d.pages_deflated,
            d.invalid_frames,
            d.malformed_buffers
        ),
        (196608, 196608, 0, 0),
        "{rep:#?}"
    );
    // Coalescing: far fewer ranges than pages, and KVM flushes about once per zap call, not
    // once per buffer or page.
    let g = &rep.gather;
    assert!(g.ranges < 1000, "{g:#?}");
    assert!(g.spans <= g.ranges, "{g:#?}");
    assert!(
        g.kvm_flush_requests <= g.spans + g.pages_reclaimed / PAGES_PER_EXTRA_FLUSH,
        "{} KVM flush requests for {} zap calls: {g:#?}",
        g.kvm_flush_requests,
        g.spans
    );
    assert!(rep.guest.updates >= 1, "stats queue never filled: {rep:#?}");
}

#[test]
fn free_page_reporting_returns_memory_to_the_host() {
    require!("free_page_reporting_returns_memory_to_the_host", Need::Kvm);
    let _alone = common::counting_kvm_flushes();
    let r = vmm_guest("balloon")
        .vcpus(1)
        .memory("512M")
        .cmdline("report=1 changes=0")
        .passes_with_report(&scratch("balloon-report.json"), RUN_LIMIT);
    r.assert_stdout_has(&["balloon: reported"]);
    let rep = r.report();
    let reported = rep.device.pages_reported * 4096;
    assert!(
        reported >= 400 << 20,
        "only {reported} bytes reported: {rep:#?}"
    );
    // The guest touched all its memory first; reporting handed the reported part back.
    let (held, ram) = (rep.host_bytes_held, rep.guest_ram_bytes);
    assert!(
        held <= ram - reported * 95 / 100,
        "host still holds {held} of {ram} after {reported} reported: {rep:#?}"
    );
}
