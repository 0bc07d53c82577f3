//! Guest RAM on 2 MiB pages, on real KVM: shmem transparent huge pages on a private tmpfs
//! mounted with huge=always, and hugetlb pages reserved for the test. The balloon guest's
//! 4 KiB frames are gathered into 2 MiB blocks and each complete block goes back to the host
//! with one zap and one release; partial blocks are held, or split when allowed; the guest is
//! mapped with 2 MiB stage-2 entries. Missing prerequisites are clear errors.
//!
//! The tests create what they need and undo it (CI runs as root): a tmpfs mount in a scratch
//! directory, unmounted after; hugetlb pages added to nr_hugepages, given back after.

mod common;

use common::{scratch, vmm_guest, Need, RUN_LIMIT};
use guest_mm::reclaim::{PartialBlocks, ReclaimConfig};
use guest_mm::Backing;
use vmm_harness::{Finished, VmmRun};

/// The balloon guest on 2 vCPUs (vCPU 1 verifies its memory throughout) with 512 MiB on
/// `backing`, driven through `steps`; it must pass and write its report.
fn balloon_on(test: &str, backing: Backing, steps: &[&str], cmdline: &str) -> VmmRun {
    vmm_guest("balloon")
        .vcpus(2)
        .memory("512M")
        .backing(backing)
        .balloon_steps(steps)
        .cmdline(cmdline)
        .report_json(&scratch(&format!("{test}.json")))
}

fn passes(run: &VmmRun) -> Finished {
    let r = run.run(RUN_LIMIT);
    assert_eq!(r.status, Some(0), "{}", r.all());
    r.report();
    r
}

fn shmem(m: &common::TmpfsMount) -> Backing {
    Backing::ShmemThp { dir: m.dir.clone() }
}

/// The guest's verifier vCPUs (all but vCPU 0, which drives the balloon) each reported their
/// final check, and none found a lost or corrupted word.
fn verifiers_found_no_errors(r: &Finished, vcpus: u32) {
    let lines: Vec<&str> = r
        .console
        .iter()
        .map(|(_, l)| l.as_str())
        .filter(|l| l.contains(" verified its "))
        .collect();
    for cpu in 1..vcpus {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("balloon: cpu {cpu} verified its "))),
            "verifier vCPU {cpu} reported no final check\n{}",
            r.all()
        );
    }
    assert_eq!(lines.len(), vcpus as usize - 1, "{}", r.all());
    for l in &lines {
        assert!(l.ends_with(" 0 errors"), "{l}\n{}", r.all());
    }
    let (checks, errors) = vmm_harness::console::verifier_totals(&r.stdout());
    assert!(checks > 0, "the verifiers checked nothing\n{}", r.all());
    assert_eq!(errors, 0, "{}", r.all());
}

/// The whole inflate of 256 MiB goes back in whole blocks.
fn whole_blocks(r: &Finished, backend: &str) {
    let rep = r.report();
    let g = &rep.gather;
    assert_eq!(rep.memory_backend, backend, "{rep:#?}");
    // 128 blocks of 256 MiB; the driver's own pages keep one or two partial.
    assert!(g.blocks_released >= 120, "{g:#?}");
    assert_eq!(g.pages_reclaimed, g.blocks_released * 512, "{g:#?}");
    assert_eq!(
        g.host_calls,
        2 * g.ranges,
        "one zap and one release per run of blocks: {g:#?}"
    );
    let inflate = rep
        .steps
        .first()
        .unwrap_or_else(|| panic!("no balloon step in the report\n{}", r.all()));
    assert_eq!(inflate.target_bytes, 256 << 20, "{inflate:?}");
    let fell = inflate.held_before.saturating_sub(inflate.held_after);
    assert!(
        fell >= g.blocks_released * (2 << 20),
        "the host got back {fell} bytes, less than the {} released blocks: {inflate:?}\n{}",
        g.blocks_released,
        r.all()
    );
    assert!(
        rep.kvm_pages_2m.is_some_and(|n| n > 0),
        "the guest is mapped with 2 MiB stage-2 entries: {rep:#?}"
    );
    r.assert_stdout_has(&["reuse errors 0"]);
    verifiers_found_no_errors(r, 2);
}

#[test]
fn shmem_huge_pages_go_back_in_whole_2mib_blocks() {
    let test = "shmem_huge_pages_go_back_in_whole_2mib_blocks";
    require!(
        test,
        Need::Kvm,
        Need::Root("needs root to mount a private tmpfs")
    );
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp", "huge=always,size=600m").unwrap();
    let r = passes(&balloon_on(test, shmem(&m), &["256M", "0"], "changes=2"));
    whole_blocks(&r, "shmem-thp");
}

#[test]
fn hugetlb_pages_go_back_in_whole_2mib_blocks() {
    let test = "hugetlb_pages_go_back_in_whole_2mib_blocks";
    require!(
        test,
        Need::Kvm,
        Need::Root("needs root to reserve hugetlb pages")
    );
    let _alone = common::counting_kvm_flushes();
    // 512 MiB of guest RAM, and a few to spare.
    let pages = common::HugetlbPages::reserve(260);
    require!(
        test,
        Need::That(
            pages.is_ok(),
            format!(
                "cannot reserve 2 MiB hugetlb pages: {}",
                pages.as_ref().err().map_or("", String::as_str)
            )
        )
    );
    let r = passes(&balloon_on(
        test,
        Backing::Hugetlb,
        &["256M", "0"],
        "changes=2",
    ));
    drop(pages);
    whole_blocks(&r, "hugetlb");
}

/// A fragmented guest's inflate leaves 2 MiB blocks partly ballooned: they are held and
/// reported, or, with --partial-blocks split on shmem huge pages, released at 4 KiB once the
/// balloon reaches its target.
#[test]
fn partial_blocks_are_held_or_split_when_allowed() {
    let test = "partial_blocks_are_held_or_split_when_allowed";
    require!(
        test,
        Need::Kvm,
        Need::Root("needs root to mount a private tmpfs")
    );
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp-partial", "huge=always,size=600m").unwrap();
    // One change: the guest ends with the balloon inflated, so the report shows what is held.
    let run = |name: &str, partial: PartialBlocks| {
        passes(
            &balloon_on(
                &format!("{test}-{name}"),
                shmem(&m),
                &["96M"],
                "changes=1 fragment=1",
            )
            .reclaim(ReclaimConfig {
                partial_blocks: partial,
                ..ReclaimConfig::default()
            }),
        )
    };
    let (hold, split) = (
        run("hold", PartialBlocks::Hold),
        run("split", PartialBlocks::Split),
    );
    let (hold, split) = (hold.report(), split.report());
    let (gh, gs) = (&hold.gather, &split.gather);
    assert!(
        gh.partial_blocks > 0,
        "a fragmented inflate leaves partial blocks: {hold:#?}"
    );
    assert!(hold.partial_block_bytes > 0, "{hold:#?}");
    assert_eq!(gh.blocks_split, 0, "{hold:#?}");
    assert_eq!(
        hold.partial_block_bytes / 4096 + gh.pages_reclaimed,
        24576,
        "every ballooned frame is reclaimed or held in a partial block: {hold:#?}"
    );
    assert_eq!(gs.partial_blocks, 0, "{split:#?}");
    assert!(gs.blocks_split > 0, "{split:#?}");
    assert_eq!(gs.pages_reclaimed, 24576, "{split:#?}");
    assert!(
        split.host_bytes_held + hold.partial_block_bytes <= hold.host_bytes_held + (4 << 20),
        "splitting gives the held frames back to the host: hold {hold:#?} split {split:#?}"
    );
}

/// Linux reports free memory in order-9 (2 MiB, aligned) blocks: on huge pages each reported
/// block is reclaimed whole and given back to the guest.
#[test]
fn free_page_reports_go_back_as_whole_blocks() {
    let test = "free_page_reports_go_back_as_whole_blocks";
    require!(
        test,
        Need::Kvm,
        Need::Root("needs root to mount a private tmpfs")
    );
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp-report", "huge=always,size=600m").unwrap();
    let r = passes(&balloon_on(
        test,
        shmem(&m),
        &["64M", "0"],
        "changes=2 report=1",
    ));
    let rep = r.report();
    let reported = rep.device.pages_reported;
    assert!(
        reported >= 100 * 512,
        "the guest reported its free memory: {rep:#?}"
    );
    assert_eq!(reported % 512, 0, "{rep:#?}");
    let g = &rep.gather;
    assert_eq!(
        g.pages_reclaimed,
        g.blocks_released * 512,
        "only whole blocks: {g:#?}"
    );
    assert_eq!(g.partial_blocks, 0, "{g:#?}");
    r.assert_stdout_has(&["balloon: reported", "reuse errors 0"]);
}

#[test]
fn missing_huge_page_prerequisites_are_errors_that_say_what_to_do() {
    let test = "missing_huge_page_prerequisites_are_errors_that_say_what_to_do";
    require!(test, Need::Kvm);
    let memtouch = || vmm_guest("memtouch").memory("64M");
    let expect = |run: VmmRun, needle: &str| {
        let r = run.run(RUN_LIMIT);
        assert_eq!(r.status, Some(2), "{}", r.all());
        r.assert_stderr_has(&[needle]);
    };
    // A directory on neither tmpfs nor hugetlbfs (the build tree).
    expect(
        memtouch().backing(Backing::ShmemThp {
            dir: env!("CARGO_TARGET_TMPDIR").into(),
        }),
        "is on neither tmpfs nor hugetlbfs",
    );
    // No directory at all: not something a `Backing` can say.
    expect(
        memtouch().arg("--memory-backend").arg("shmem-thp"),
        "needs --memory-path DIR",
    );
    expect(
        memtouch().backing(Backing::Hugetlb).reclaim(ReclaimConfig {
            partial_blocks: PartialBlocks::Split,
            ..ReclaimConfig::default()
        }),
        "hugetlb pages cannot be freed in part",
    );
    expect(
        memtouch().backing(Backing::Hugetlb).memory("65M"),
        "not a whole number of 2 MiB huge pages",
    );
    // More hugetlb pages than any host has reserved for us.
    expect(
        memtouch().backing(Backing::Hugetlb).memory("200G"),
        "2 MiB hugetlb pages, but only",
    );
    if vmm_harness::skip::is_root() {
        let m = common::TmpfsMount::new("no-huge", "size=64m").unwrap();
        expect(
            memtouch().backing(shmem(&m)),
            "is mounted without huge=always or huge=within_size",
        );
    }
}
