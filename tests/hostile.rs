//! A hostile guest on real KVM: the `hostile` test guest attacks the virtio-balloon from
//! inside (adversarial PFNs, descriptor loops, rings outside RAM or over each other, status
//! and feature writes after DRIVER_OK, resets during inflate, inflating pages other vCPUs
//! write or that sit between pages other vCPUs write, touching frames after giving them
//! away). The guest itself asserts each defined
//! outcome (see docs/SECURITY.md) and that its own pages stay intact; this test checks its
//! verdict, one line per attack, and that the VMM counted what it refused.

mod common;

use common::{scratch, vmm_guest, Need, RUN_LIMIT};

const ATTACKS: &[&str] = &[
    "pfns",
    "written",
    "neighbours",
    "random",
    "descriptors",
    "rings",
    "renegotiate",
    "reset",
    "touch",
    "final",
];

/// N and M from the guest's "expected at least N invalid frames and M malformed buffers" (the
/// guest's console, not the VMM's).
fn expected(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("hostile: expected at least "))
        .expect("no expectation line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn every_attack_from_inside_has_its_defined_outcome() {
    require!(
        "every_attack_from_inside_has_its_defined_outcome",
        Need::Kvm
    );
    let r = vmm_guest("hostile")
        .vcpus(3)
        .memory("256M")
        .cmdline("attack=all")
        .passes_with_report(&scratch("hostile.json"), RUN_LIMIT);
    assert!(r.find("FAILED").is_none(), "{}", r.all());
    for a in ATTACKS {
        let prefix = format!("hostile: {a}: ");
        let (_, line) = r
            .console
            .iter()
            .find(|(_, l)| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no outcome line for attack {a}\n{}", r.all()));
        assert!(
            *a == "final" || line.ends_with("device alive"),
            "{line}\n{}",
            r.all()
        );
    }
    r.assert_stdout_has(&[
        "returned used_len=0",
        "the ring frames were not (rings intact)",
        "kept their pattern (0 bad words)",
        "the victims read zero once reclaimed; the 512 neighbours kept every write (0 bad words)",
        "each set NEEDS_RESET (0x40) at DRIVER_OK",
        "canary of 256 pages intact",
    ]);
    // The VMM logged each refusal with its reason.
    r.assert_stderr_has(&[
        "invalid frame(s) on queue 0 skipped",
        "malformed buffer",
        "have rings outside guest RAM",
        "rings of queues 0 and 1 overlap; device needs reset",
        "written while the device needs a reset",
        "without a reset; ignored",
        "written outside feature negotiation; ignored",
    ]);
    // ... and counted it: at least what the guest knows it sent (resets make some more).
    let (min_invalid, min_malformed) = expected(&r.stdout());
    let rep = r.report();
    let dev = &rep.device;
    assert!(min_invalid > 600 && min_malformed >= 6, "{}", r.all());
    assert!(dev.invalid_frames >= min_invalid, "{rep:#?}\n{}", r.all());
    assert!(dev.malformed_buffers >= min_malformed, "{rep:#?}");
    // Everything the guest gave away came back, through a deflate or a reset (which empties
    // the balloon: the reset attack leaves 256 inflated frames pending in the batch, and up
    // to 256 more from the inflate in flight).
    assert_eq!(
        dev.pages_inflated,
        dev.pages_deflated + dev.pages_returned_by_reset,
        "{rep:#?}"
    );
    assert!(
        (256..=512).contains(&dev.pages_returned_by_reset),
        "{rep:#?}"
    );
    assert_eq!(rep.frames_in_balloon, 0, "{rep:#?}");
    assert_eq!(rep.gather.host_call_errors, 0, "{rep:#?}");
    // The `neighbours` victims were reclaimed through zap spans over the written frames.
    assert!(rep.gather.bridged > 0, "{rep:#?}");
}
