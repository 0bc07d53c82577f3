//! Free page hinting through the device: the command-id handshake, hinted ranges released
//! before their buffer is returned (and the guest's again), DONE, and reporting moved to
//! queue 4 beside it.

use super::*;
use crate::devices::balloon::hinting::{CMD_ID_DONE, CMD_ID_STOP};

const HINTED: std::ops::Range<u64> = 0x400..0x600;

fn config_u32(h: &Harness, offset: u64) -> u32 {
    read_reg(&h.t, r::CONFIG + offset)
}

/// A device offering free page hinting on a 64 MiB memfd guest, every host call checked.
fn offering_hinting() -> Harness {
    let mm = MemoryManager::checked(
        Arc::new(GuestRam::new(MEM).unwrap()),
        ReclaimConfig::with_strategy(Strategy::Gather),
    )
    .unwrap();
    Harness::on_with(Arc::new(mm), true)
}

fn send_cmd(h: &mut Harness, cmd: u32) -> u16 {
    h.mem().write_obj(cmd.to_le(), GuestAddress(BUF)).unwrap();
    h.submit(HINTING_Q, &[(BUF, 4, 0)])
}

#[test]
fn a_hinting_run_releases_the_hinted_ranges_and_ends_with_done() {
    let mut h = offering_hinting();
    assert_ne!(h.t.device().device_features() & F_FREE_PAGE_HINT, 0);
    h.init(ALL | F_FREE_PAGE_HINT, None);
    assert_eq!(h.t.device().index_of(QueueRole::Hinting), Some(HINTING_Q));
    assert_eq!(
        h.t.device().index_of(QueueRole::Reporting),
        Some(REPORTING_Q_AFTER_HINTING)
    );
    h.fill_frames(HINTED, 0xab);
    h.fill_frames(0x800..0xa00, 0xcd);

    // The host starts a run (what PATCH /balloon/hinting/start does).
    let id = h.t.device_mut().hinting.start(true);
    h.t.config_changed();
    assert_eq!(config_u32(&h, CONFIG_FREE_PAGE_HINT_CMD_ID), id);

    let held = h.mm.ram.host_bytes_held().unwrap();
    assert_eq!(send_cmd(&mut h, id), 1);
    assert_eq!(
        h.submit(HINTING_Q, &[(HINTED.start * 4096, 0x200000, 2)]),
        2,
        "the hint buffer is returned"
    );
    assert_eq!(
        held - h.mm.ram.host_bytes_held().unwrap(),
        0x200000,
        "released before the buffer came back"
    );
    for g in HINTED {
        assert_eq!(
            h.state(g),
            FrameState::Mapped,
            "frame {g:#x} is the guest's again"
        );
    }
    assert!(h.page_is(HINTED.start, 0), "a hinted frame reads as zeros");
    assert_eq!(
        config_u32(&h, CONFIG_FREE_PAGE_HINT_CMD_ID),
        id,
        "no DONE before STOP"
    );

    // STOP: with acknowledge_on_stop, DONE at once, with a configuration interrupt.
    let _ = read_reg(&h.t, r::INTERRUPT_STATUS);
    reg(&mut h.t, r::INTERRUPT_ACK, 3);
    assert_eq!(send_cmd(&mut h, CMD_ID_STOP), 3);
    assert_eq!(config_u32(&h, CONFIG_FREE_PAGE_HINT_CMD_ID), CMD_ID_DONE);
    assert_eq!(read_reg(&h.t, r::INTERRUPT_STATUS) & 2, 2);

    // A range after DONE is returned untouched.
    let held = h.mm.ram.host_bytes_held().unwrap();
    assert_eq!(h.submit(HINTING_Q, &[(0x800 * 4096, 0x200000, 2)]), 4);
    assert_eq!(h.mm.ram.host_bytes_held().unwrap(), held);
    assert!(h.page_is(0x800, 0xcd));

    // The guest reuses a hinted frame: it is simply backed again.
    h.fill(HINTED.start, 0x11);
    assert!(h.page_is(HINTED.start, 0x11));

    let c = &h.t.device().counters;
    assert_eq!(
        (c.hint_buffers, c.pages_hinted, c.hinted_pages_ignored),
        (4, 512, 512)
    );
    assert_eq!(
        h.t.device().hinting.status(),
        crate::devices::balloon::hinting::HintingStatus {
            host_cmd: CMD_ID_DONE,
            guest_cmd: Some(CMD_ID_STOP)
        }
    );

    // Reporting works on its moved queue.
    let held = h.mm.ram.host_bytes_held().unwrap();
    assert_eq!(
        h.submit(REPORTING_Q_AFTER_HINTING, &[(0x800 * 4096, 0x200000, 2)]),
        1
    );
    assert_eq!(held - h.mm.ram.host_bytes_held().unwrap(), 0x200000);
    assert!(h.canary_intact());
}

#[test]
fn malformed_hint_buffers_are_returned_unprocessed() {
    let mut h = offering_hinting();
    h.init(ALL | F_FREE_PAGE_HINT, None);
    let id = h.t.device_mut().hinting.start(true);
    send_cmd(&mut h, id);
    let held = h.mm.ram.host_bytes_held().unwrap();
    // A readable descriptor of 8 bytes, an unaligned range, a range past RAM.
    assert_eq!(h.submit(HINTING_Q, &[(BUF, 8, 0)]), 2);
    assert_eq!(h.submit(HINTING_Q, &[(0x400800, 0x1000, 2)]), 3);
    assert_eq!(h.submit(HINTING_Q, &[(MEM - 0x1000, 0x2000, 2)]), 4);
    assert_eq!(h.mm.ram.host_bytes_held().unwrap(), held);
    assert_eq!(h.t.device().counters.malformed_buffers, 3);
    assert!(h.canary_intact());
}

#[test]
fn without_hinting_negotiated_reporting_keeps_queue_3() {
    let mut h = offering_hinting();
    h.init(ALL, None);
    assert_eq!(h.t.device().index_of(QueueRole::Hinting), None);
    assert_eq!(
        h.t.device().index_of(QueueRole::Reporting),
        Some(REPORTING_Q)
    );
    h.fill_frames(HINTED, 0xab);
    let held = h.mm.ram.host_bytes_held().unwrap();
    assert_eq!(
        h.submit(REPORTING_Q, &[(HINTED.start * 4096, 0x200000, 2)]),
        1
    );
    assert_eq!(held - h.mm.ram.host_bytes_held().unwrap(), 0x200000);
}

#[test]
fn queues_are_numbered_by_the_negotiated_features() {
    use QueueRole::*;
    let all = BalloonFeatures {
        free_page_hinting: true,
        free_page_reporting: true,
    };
    assert_eq!(
        queue_roles(all.bits()).collect::<Vec<_>>(),
        [Inflate, Deflate, Stats, Hinting, Reporting]
    );
    assert_eq!(
        queue_roles(BalloonFeatures::default().bits()).collect::<Vec<_>>(),
        [Inflate, Deflate, Stats, Reporting]
    );
    let hinting_only = BalloonFeatures {
        free_page_hinting: true,
        free_page_reporting: false,
    };
    assert_eq!(
        queue_roles(hinting_only.bits()).collect::<Vec<_>>(),
        [Inflate, Deflate, Stats, Hinting]
    );
    // A driver without STATS_VQ (compact: the next queue takes index 2).
    assert_eq!(
        queue_roles(F_FREE_PAGE_REPORTING).collect::<Vec<_>>(),
        [Inflate, Deflate, Reporting]
    );
}

/// Buffers that together name more frames than RAM has are taken in rounds (the device never
/// holds more than one RAM's worth of frame lists), and a frame named twice in one round is
/// credited once: the device's counts stay equal to the gather's (`Harness::check`).
#[test]
fn more_than_a_rams_worth_of_hints_is_served_in_rounds_and_counted_once() {
    let mut h = offering_hinting();
    h.init(ALL | F_FREE_PAGE_HINT, None);
    let id = h.t.device_mut().hinting.start(true);
    send_cmd(&mut h, id);
    // 30 MiB (7,680 frames) of a 64 MiB guest, above the canary, named by four buffers made
    // available at once: the first three fill a round (23,040 >= 16,384 frames), the fourth
    // waits for the next.
    const RANGE: (u64, u32) = (33 << 20, 30 << 20);
    h.fill_frames((RANGE.0 / 4096)..(RANGE.0 / 4096 + 7680), 0xab);
    for _ in 0..4 {
        h.make_available(HINTING_Q, &[(RANGE.0, RANGE.1, 2)]);
    }
    reg(&mut h.t, r::QUEUE_NOTIFY, HINTING_Q as u32);
    h.check();
    let used: u16 = h
        .mem()
        .read_obj(GuestAddress(RING_BASE + HINTING_Q as u64 * 0x3000 + 0x2002))
        .unwrap();
    assert_eq!(used, 5, "the id and all four buffers returned");
    let c = &h.t.device().counters;
    assert_eq!(
        (c.pages_hinted, c.invalid_frames),
        (15360, 15360),
        "round one: the first buffer's frames, the next two refused as duplicates; round two: \
         the fourth's"
    );
    assert!(h.page_is(RANGE.0 / 4096, 0));
    assert!(h.canary_intact());
}
