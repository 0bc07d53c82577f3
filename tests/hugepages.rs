//! Guest RAM on 2 MiB pages, on real KVM: shmem transparent huge pages on a private tmpfs
//! mounted with huge=always, and hugetlb pages reserved for the test. The balloon guest's
//! 4 KiB frames are gathered into 2 MiB blocks and each complete block goes back to the host
//! with one zap and one release; partial blocks are held, or split when allowed; the guest is
//! mapped with 2 MiB stage-2 entries. Missing prerequisites are clear errors.
//!
//! The tests create what they need and undo it (CI runs as root): a tmpfs mount in a scratch
//! directory, unmounted after; hugetlb pages added to nr_hugepages, given back after.

mod common;

use std::path::Path;

/// Runs the balloon guest on `backend` args with `steps`; returns (run, report).
fn balloon_on(
    test: &str,
    backend: &[&str],
    steps: &str,
    cmdline: &str,
    extra: &[&str],
) -> (common::Run, serde_json::Value) {
    let json = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.json"));
    let mut args = vec![
        "run",
        "--guest",
        "balloon",
        "--vcpus",
        "2",
        "--memory",
        "512M",
        "--balloon-steps",
        steps,
        "--cmdline",
        cmdline,
        "--report-json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(backend);
    args.extend_from_slice(extra);
    let r = common::vmm(&args);
    assert_eq!(r.status, Some(0), "{}", r.all());
    let rep = common::read_json(&json);
    (r, rep)
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Host bytes the memfd fell by in balloon step 1 (from the VMM's step line).
fn step1_fell(stderr: &str) -> u64 {
    let l = stderr
        .lines()
        .find(|l| l.contains("balloon step 1 reached"))
        .unwrap_or_else(|| panic!("no step 1 line:\n{stderr}"));
    let field = |k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.trim_end_matches(']').parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {l}"))
    };
    field("held_before=") - field("held_after=")
}

/// The whole inflate of 256 MiB goes back in whole blocks.
fn whole_blocks(r: &common::Run, rep: &serde_json::Value, backend: &str) {
    let g = &rep["gather"];
    assert_eq!(rep["memory_backend"], backend, "{rep}");
    let blocks = num(&g["blocks_released"]);
    // 128 blocks of 256 MiB; the driver's own pages keep one or two partial.
    assert!(blocks >= 120, "{rep}");
    assert_eq!(num(&g["pages_reclaimed"]), blocks * 512, "{rep}");
    assert_eq!(
        num(&g["host_calls"]),
        2 * num(&g["ranges"]),
        "one zap and one release per run of blocks: {rep}"
    );
    assert!(
        step1_fell(&r.stderr) >= blocks * (2 << 20),
        "the host got back less than the released blocks\n{}",
        r.all()
    );
    assert!(
        num(&rep["kvm_pages_2m"]) > 0,
        "the guest is mapped with 2 MiB stage-2 entries: {rep}"
    );
    r.assert_stdout_has(&["reuse errors 0", "balloon: cpu 1 verified its"]);
    assert!(
        !r.stdout.contains(" errors\n")
            || r.stdout
                .lines()
                .filter(|l| l.contains("verified its"))
                .all(|l| l.ends_with(" 0 errors")),
        "{}",
        r.all()
    );
}

#[test]
fn shmem_huge_pages_go_back_in_whole_2mib_blocks() {
    let test = "shmem_huge_pages_go_back_in_whole_2mib_blocks";
    if !common::kvm_as_root_or_skip(test, "needs root to mount a private tmpfs") {
        return;
    }
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp", "huge=always,size=600m").unwrap();
    let dir = m.dir.to_str().unwrap();
    let (r, rep) = balloon_on(
        test,
        &["--memory-backend", "shmem-thp", "--memory-path", dir],
        "256M,0",
        "changes=2",
        &[],
    );
    whole_blocks(&r, &rep, "shmem-thp");
}

#[test]
fn hugetlb_pages_go_back_in_whole_2mib_blocks() {
    let test = "hugetlb_pages_go_back_in_whole_2mib_blocks";
    if !common::kvm_as_root_or_skip(test, "needs root to reserve hugetlb pages") {
        return;
    }
    let _alone = common::counting_kvm_flushes();
    // 512 MiB of guest RAM, and a few to spare.
    let pages = match common::HugetlbPages::reserve(260) {
        Ok(p) => p,
        Err(e) => return common::skip(test, &format!("cannot reserve 2 MiB hugetlb pages: {e}")),
    };
    let (r, rep) = balloon_on(
        test,
        &["--memory-backend", "hugetlb"],
        "256M,0",
        "changes=2",
        &[],
    );
    drop(pages);
    whole_blocks(&r, &rep, "hugetlb");
}

/// A fragmented guest's inflate leaves 2 MiB blocks partly ballooned: they are held and
/// reported, or, with --partial-blocks split on shmem huge pages, released at 4 KiB once the
/// balloon reaches its target.
#[test]
fn partial_blocks_are_held_or_split_when_allowed() {
    let test = "partial_blocks_are_held_or_split_when_allowed";
    if !common::kvm_as_root_or_skip(test, "needs root to mount a private tmpfs") {
        return;
    }
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp-partial", "huge=always,size=600m").unwrap();
    let dir = m.dir.to_str().unwrap();
    let backend = ["--memory-backend", "shmem-thp", "--memory-path", dir];
    // One change: the guest ends with the balloon inflated, so the report shows what is held.
    let (_, hold) = balloon_on(
        &format!("{test}-hold"),
        &backend,
        "96M",
        "changes=1 fragment=1",
        &[],
    );
    let (_, split) = balloon_on(
        &format!("{test}-split"),
        &backend,
        "96M",
        "changes=1 fragment=1",
        &["--partial-blocks", "split"],
    );
    let (gh, gs) = (&hold["gather"], &split["gather"]);
    assert!(
        num(&gh["partial_blocks"]) > 0,
        "a fragmented inflate leaves partial blocks: {hold}"
    );
    assert!(num(&hold["partial_block_bytes"]) > 0, "{hold}");
    assert_eq!(num(&gh["blocks_split"]), 0, "{hold}");
    assert_eq!(
        num(&hold["partial_block_bytes"]) / 4096 + num(&gh["pages_reclaimed"]),
        24576,
        "every ballooned frame is reclaimed or held in a partial block: {hold}"
    );
    assert_eq!(num(&gs["partial_blocks"]), 0, "{split}");
    assert!(num(&gs["blocks_split"]) > 0, "{split}");
    assert_eq!(num(&gs["pages_reclaimed"]), 24576, "{split}");
    assert!(
        num(&split["host_bytes_held"]) + num(&hold["partial_block_bytes"])
            <= num(&hold["host_bytes_held"]) + (4 << 20),
        "splitting gives the held frames back to the host: hold {hold} split {split}"
    );
}

/// Linux reports free memory in order-9 (2 MiB, aligned) blocks: on huge pages each reported
/// block is reclaimed whole and given back to the guest.
#[test]
fn free_page_reports_go_back_as_whole_blocks() {
    let test = "free_page_reports_go_back_as_whole_blocks";
    if !common::kvm_as_root_or_skip(test, "needs root to mount a private tmpfs") {
        return;
    }
    let _alone = common::counting_kvm_flushes();
    let m = common::TmpfsMount::new("thp-report", "huge=always,size=600m").unwrap();
    let dir = m.dir.to_str().unwrap();
    let (r, rep) = balloon_on(
        test,
        &["--memory-backend", "shmem-thp", "--memory-path", dir],
        "64M,0",
        "changes=2 report=1",
        &[],
    );
    let reported = num(&rep["device"]["pages_reported"]);
    assert!(
        reported >= 100 * 512,
        "the guest reported its free memory: {rep}"
    );
    assert_eq!(reported % 512, 0, "{rep}");
    let g = &rep["gather"];
    assert_eq!(
        num(&g["pages_reclaimed"]),
        num(&g["blocks_released"]) * 512,
        "only whole blocks: {rep}"
    );
    assert_eq!(num(&g["partial_blocks"]), 0, "{rep}");
    r.assert_stdout_has(&["balloon: reported", "reuse errors 0"]);
}

#[test]
fn missing_huge_page_prerequisites_are_errors_that_say_what_to_do() {
    let test = "missing_huge_page_prerequisites_are_errors_that_say_what_to_do";
    if !common::kvm_or_skip(test) {
        return;
    }
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--guest", "memtouch"];
        all.extend_from_slice(args);
        if !args.contains(&"--memory") {
            all.extend_from_slice(&["--memory", "64M"]);
        }
        common::vmm(&all)
    };
    let expect = |r: common::Run, needle: &str| {
        assert_eq!(r.status, Some(2), "{}", r.all());
        assert!(r.stderr.contains(needle), "no '{needle}' in\n{}", r.all());
    };
    // A directory on neither tmpfs nor hugetlbfs (the build tree).
    let here = env!("CARGO_TARGET_TMPDIR");
    expect(
        run(&["--memory-backend", "shmem-thp", "--memory-path", here]),
        "is on neither tmpfs nor hugetlbfs",
    );
    expect(
        run(&["--memory-backend", "shmem-thp"]),
        "needs --memory-path DIR",
    );
    expect(
        run(&["--memory-backend", "hugetlb", "--partial-blocks", "split"]),
        "hugetlb pages cannot be freed in part",
    );
    expect(
        run(&["--memory-backend", "hugetlb", "--memory", "65M"]),
        "not a whole number of 2 MiB huge pages",
    );
    // More hugetlb pages than any host has reserved for us.
    expect(
        run(&["--memory-backend", "hugetlb", "--memory", "200G"]),
        "2 MiB hugetlb pages, but only",
    );
    if common::is_root() {
        let m = common::TmpfsMount::new("no-huge", "size=64m").unwrap();
        expect(
            run(&[
                "--memory-backend",
                "shmem-thp",
                "--memory-path",
                m.dir.to_str().unwrap(),
            ]),
            "is mounted without huge=always or huge=within_size",
        );
    }
}
