//! Free page reports and the reclaim probe on a 2 MiB block backend: frames of a block they do
//! not cover whole cannot be freed (they wait, and go back to the guest with their contents),
//! so the report counters and the probe's list count only the frames freed on the host.

use super::*;
use crate::devices::reclaim_probe;
use abi::probe::{self, Mailbox};

const MAILBOX_GPA: u64 = 0x50000;
const LIST_GFN: u64 = 0x60;

/// The reclaim probe over `pages` frames from `first`, every frame of the region taken.
fn probe(h: &Harness, first: u64, pages: u64) -> (reclaim_probe::ProbeOutcome, Mailbox) {
    let mb = Mailbox {
        magic: probe::MAGIC,
        region_gfn: first,
        region_pages: pages,
        list_gfn: LIST_GFN,
        list_capacity: pages,
        pattern: probe::PATTERN_CONTIGUOUS,
        ..Mailbox::default()
    };
    h.write_mailbox(&mb, MAILBOX_GPA);
    let out = reclaim_probe::handle(&h.mm, MAILBOX_GPA)
        .expect("mailbox in RAM")
        .expect("a valid mailbox");
    let word = |i: u64| {
        h.mem()
            .read_obj::<u64>(GuestAddress(MAILBOX_GPA + i * 8))
            .unwrap()
    };
    let back = Mailbox {
        reclaimed: word(6),
        status: word(7),
        ..mb
    };
    (out, back)
}

#[test]
fn the_probe_lists_only_frames_it_freed_on_a_block_backend() {
    for can_split in [true, false] {
        let mut h = Harness::with_blocks(Strategy::Gather, Some(can_split));
        h.init(ALL, None);
        // Part of a block: taken, but nothing can be freed.
        h.fill_frames(0x1000..0x1010, 0x5a);
        let (out, mb) = probe(&h, 0x1000, 16);
        assert_eq!(out.reclaimed, Vec::<u64>::new(), "can_split={can_split}");
        assert_eq!((mb.status, mb.reclaimed), (probe::STATUS_OK, 0));
        assert_eq!((out.report.pages, out.not_freed), (0, 16));
        h.outside.not_freed += out.not_freed;
        assert!(
            (0x1000..0x1010).all(|g| h.page_is(g, 0x5a)),
            "the frames kept their contents"
        );
        // A whole block: freed, listed, reading as zeros.
        h.fill_frames(0x1200..0x1400, 0x5a);
        let (out, mb) = probe(&h, 0x1200, 512);
        assert_eq!(out.reclaimed, (0x1200..0x1400).collect::<Vec<_>>());
        assert_eq!((mb.status, mb.reclaimed), (probe::STATUS_OK, 512));
        assert!((0x1200..0x1400).all(|g| h.page_is(g, 0)));
        h.outside.reclaimed += out.reclaimed.len() as u64;
        h.check();
    }
}

#[test]
fn a_report_of_part_of_a_block_counts_nothing_as_reported() {
    for can_split in [true, false] {
        let mut h = Harness::with_blocks(Strategy::Gather, Some(can_split));
        h.init(ALL, None);
        h.fill_frames(0x1000..0x1010, 0x5a);
        h.submit(REPORTING_Q, &[(0x1000 * 4096, 16 * 4096, 2)]);
        assert_eq!(h.counters().pages_reported, 0, "can_split={can_split}");
        assert_eq!(h.counters().pages_reported_not_freed, 16);
        assert!(
            (0x1000..0x1010).all(|g| h.page_is(g, 0x5a)),
            "nothing was freed"
        );
        // A whole block is freed, and counted.
        h.submit(REPORTING_Q, &[(0x1200 * 4096, 512 * 4096, 2)]);
        assert_eq!(h.counters().pages_reported, 512);
        assert!((0x1200..0x1400).all(|g| h.page_is(g, 0)));
    }
}
