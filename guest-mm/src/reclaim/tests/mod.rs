//! The stage-2 gather as a whole: strategies, batching, failures, the order against readers,
//! the worker thread, and (property tests) spans and 2 MiB blocks.

use super::*;
use crate::backend::{
    BackendError, Capabilities, Granule, OwnershipChecked, Stage2Backend, BLOCK_FRAMES,
};
use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::grace::Readers;
use crate::layout::Layout;
use crate::stage2_map::{FrameState, Stage2Map};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records every host call, so tests can see the calls each strategy makes.
#[derive(Default)]
struct Recording {
    /// Whether its zap destroys contents (like guest_memfd punch-hole).
    destroys: bool,
    /// A 2 MiB block backend (and whether it can split), instead of 4 KiB pages.
    block: Option<bool>,
    spans: Mutex<Vec<ZapSpan>>,
    zaps: Mutex<Vec<GfnRange>>,
    releases: Mutex<Vec<GfnRange>>,
    /// While set, a zap waits until the flag is cleared (tests of who waits for whom).
    gate: Mutex<bool>,
    gate_changed: std::sync::Condvar,
}

impl Recording {
    fn close_gate(&self) {
        *self.gate.lock().unwrap() = true;
    }
    fn open_gate(&self) {
        *self.gate.lock().unwrap() = false;
        self.gate_changed.notify_all();
    }
}

impl Stage2Backend for Recording {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "recording",
            granule: match self.block {
                None => Granule::Page,
                Some(can_split) => Granule::Block { can_split },
            },
            zap_keeps_contents: !self.destroys,
        }
    }
    fn zap(&self, s: &ZapSpan) -> Result<(), BackendError> {
        let mut closed = self.gate.lock().unwrap();
        while *closed {
            closed = self.gate_changed.wait(closed).unwrap();
        }
        self.zaps.lock().unwrap().push(s.span);
        self.spans.lock().unwrap().push(s.clone());
        Ok(())
    }
    fn release(&self, r: GfnRange) -> Result<(), BackendError> {
        self.releases.lock().unwrap().push(r);
        Ok(())
    }
}

fn gather_on(
    config: ReclaimConfig,
    backend: Arc<dyn Stage2Backend>,
) -> (Stage2Gather, Arc<Readers>, Arc<EventLog>) {
    let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
    let readers = Readers::new();
    let log = Arc::new(EventLog::default());
    let g = Stage2Gather::new(config, map, backend, readers.clone())
        .unwrap()
        .with_event_log(log.clone());
    (g, readers, log)
}

/// A gather with `config` over `rec`, whose every host call is checked against the frames'
/// owners (`OwnershipChecked`) and then recorded.
fn checked_gather(
    config: ReclaimConfig,
    rec: Recording,
) -> (Stage2Gather, Arc<Recording>, Arc<Stage2Map>) {
    let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
    let rec = Arc::new(rec);
    let checked = Arc::new(OwnershipChecked::new(rec.clone(), map.clone()));
    let g = Stage2Gather::new(config, map.clone(), checked, Readers::new()).unwrap();
    (g, rec, map)
}

fn setup(strategy: Strategy) -> (Stage2Gather, Arc<Recording>, Arc<Readers>, Arc<EventLog>) {
    let rec = Arc::new(Recording::default());
    let (g, readers, log) = gather_on(ReclaimConfig::with_strategy(strategy), rec.clone());
    (g, rec, readers, log)
}

/// A gather with `config` on a recording backend, its protocol on the `reclaim` worker
/// thread; the backend and the gather's event log.
fn with_worker(config: ReclaimConfig) -> (Stage2Gather, Arc<Recording>, Arc<EventLog>) {
    let rec = Arc::new(Recording::default());
    let (g, _, log) = gather_on(config, rec.clone());
    (g.spawn_worker().unwrap(), rec, log)
}

/// Two buffers of Linux-style descending PFNs that together form one run.
fn two_buffers() -> (Vec<Gfn>, Vec<Gfn>) {
    ((1000..1256).rev().collect(), (1256..1512).rev().collect())
}

#[test]
fn strategies_make_the_host_calls_their_peers_make() {
    let (a, b) = two_buffers();
    let (g, rec, _, _) = setup(Strategy::PerPage);
    g.add_buffer(&a);
    g.add_buffer(&b);
    assert_eq!(
        rec.zaps.lock().unwrap().len(),
        512,
        "per-page: one zap per page"
    );

    let (g, rec, _, _) = setup(Strategy::PerBuffer);
    g.add_buffer(&a);
    g.add_buffer(&b);
    assert_eq!(
        *rec.zaps.lock().unwrap(),
        vec![GfnRange::new(1000, 256), GfnRange::new(1256, 256)]
    );

    let (g, rec, _, _) = setup(Strategy::Gather);
    g.add_buffer(&a);
    g.add_buffer(&b);
    assert!(
        rec.zaps.lock().unwrap().is_empty(),
        "gather waits for the window"
    );
    let report = g.flush().pop().unwrap();
    assert_eq!(*rec.zaps.lock().unwrap(), vec![GfnRange::new(1000, 512)]);
    assert_eq!(
        *rec.releases.lock().unwrap(),
        vec![GfnRange::new(1000, 512)]
    );
    assert_eq!(
        (report.pages, report.ranges, report.host_calls),
        (512, 1, 2)
    );
    assert_eq!(g.map().count(FrameState::Released), 512);
}

#[test]
fn gather_flushes_when_the_batch_is_full_or_the_window_passes() {
    let (g, rec, _, _) = setup(Strategy::Gather);
    g.set_config(ReclaimConfig {
        batch_pages: 300,
        batch_window_ms: 5,
        ..g.config()
    })
    .unwrap();
    let (a, b) = two_buffers();
    assert!(g.add_buffer(&a).flushed.is_empty());
    assert_eq!(
        g.add_buffer(&b).flushed.len(),
        1,
        "512 >= 300 pages: flushed"
    );
    g.add_buffer(&[5]);
    assert!(g.poll().is_empty());
    std::thread::sleep(Duration::from_millis(6));
    assert_eq!(g.poll().first().map(|r| r.pages), Some(1));
    assert_eq!(rec.releases.lock().unwrap().len(), 2);
}

#[test]
fn invalid_frames_are_reported_never_dropped() {
    let (g, rec, _, _) = setup(Strategy::PerBuffer);
    let beyond = (64 << 20) / 4096;
    let out = g.add_buffer(&[3, 3, beyond, 4]);
    assert_eq!(out.accepted, vec![3, 4]);
    assert_eq!(
        out.invalid,
        vec![
            FrameError::AlreadyGathered(3),
            FrameError::OutsideRam(beyond)
        ]
    );
    assert_eq!(*rec.zaps.lock().unwrap(), vec![GfnRange::new(3, 2)]);
    let again = g.add_buffer(&[4]);
    assert_eq!(again.invalid, vec![FrameError::AlreadyReleased(4)]);
    assert_eq!(g.stats().invalid_frames, 3);
}

#[test]
fn a_frame_returned_while_pending_is_never_zapped_or_freed() {
    let (g, rec, _, _) = setup(Strategy::Gather);
    g.add_buffer(&[10, 11, 12]);
    let r = g.return_frames(&[11]);
    assert_eq!(r.ungathered, 1);
    g.flush();
    // One span zaps 10..13, bridging frame 11 (its contents stay); only 10 and 12 are
    // released.
    assert_eq!(*rec.zaps.lock().unwrap(), vec![GfnRange::new(10, 3)]);
    assert_eq!(
        *rec.releases.lock().unwrap(),
        vec![GfnRange::new(10, 1), GfnRange::new(12, 1)]
    );
    assert_eq!(g.map().state(11), Ok(FrameState::Mapped));
    // Released frames come back as Mapped (they read as zeros on KVM).
    let r = g.return_frames(&[10, 12, 13]);
    assert_eq!(r.repopulated, 2);
    assert_eq!(r.invalid, vec![FrameError::NotInBalloon(13)]);
    assert_eq!(g.map().state(10), Ok(FrameState::Mapped));
}

/// Fails zaps of ranges that start at an odd frame, and every release.
struct Failing;

impl Stage2Backend for Failing {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "failing",
            granule: Granule::Page,
            zap_keeps_contents: true,
        }
    }
    fn zap(&self, s: &ZapSpan) -> Result<(), BackendError> {
        let r = s.span;
        if r.start % 2 == 1 {
            let err = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(BackendError::HostCall {
                call: "madvise(MADV_DONTNEED)",
                start: r.start,
                count: r.count,
                err,
            });
        }
        Ok(())
    }
    fn release(&self, r: GfnRange) -> Result<(), BackendError> {
        let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
        Err(BackendError::HostCall {
            call: "fallocate(PUNCH_HOLE)",
            start: r.start,
            count: r.count,
            err,
        })
    }
}

#[test]
fn failed_host_calls_are_reported_with_context_and_never_dropped() {
    let (g, _, _) = gather_on(
        ReclaimConfig::with_strategy(Strategy::PerPage),
        Arc::new(Failing),
    );
    let map = g.map().clone();
    let out = g.add_buffer(&[10, 11]);
    let report = &out.flushed[0];
    // Frame 11's zap failed and frame 10's release failed: the guest gave both away, so
    // both stay in the balloon, Retained (the host still holds their pages), and the
    // errors say which call failed on which frames.
    assert_eq!(map.state(11), Ok(FrameState::Retained));
    assert_eq!(map.state(10), Ok(FrameState::Retained));
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    assert!(report
        .errors
        .iter()
        .any(|e| e.contains("madvise(MADV_DONTNEED) on guest frames 0xb+1 failed")));
    assert!(report
        .errors
        .iter()
        .any(|e| e.contains("fallocate(PUNCH_HOLE) on guest frames 0xa+1 failed")));
    assert_eq!(g.stats().host_call_errors, 2);
    assert_eq!(
        (report.pages, g.stats().pages_reclaimed),
        (0, 0),
        "nothing reached the host"
    );
    // Still the balloon's: offering them again is refused, a deflate gives them back
    // with their contents, and then they can be offered again.
    assert_eq!(
        g.add_buffer(&[11]).invalid,
        vec![FrameError::AlreadyGathered(11)]
    );
    let back = g.return_frames(&[10, 11]);
    assert_eq!(back.retained, 2);
    assert_eq!(map.state(11), Ok(FrameState::Mapped));
    assert_eq!(g.add_buffer(&[11]).accepted, vec![11]);
}

/// Per batch in `events`: every zap < the invalidation < every release.
fn assert_ordered(events: &[Event], what: &str) {
    let batches: std::collections::BTreeSet<u64> = events
        .iter()
        .map(|e| e.batch)
        .filter(|&b| b != u64::MAX)
        .collect();
    for b in batches {
        let idx = |pred: &dyn Fn(&Phase) -> bool| -> Vec<usize> {
            events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.batch == b && pred(&e.phase))
                .map(|(i, _)| i)
                .collect()
        };
        let zaps = idx(&|p| matches!(p, Phase::Zap(_)));
        let inv = idx(&|p| *p == Phase::Invalidated);
        let rel = idx(&|p| matches!(p, Phase::Release(_)));
        assert_eq!(inv.len(), 1);
        assert!(
            zaps.iter().all(|&z| z < inv[0]),
            "{what}: zap after invalidate"
        );
        assert!(
            rel.iter().all(|&r| r > inv[0]),
            "{what}: release before invalidate"
        );
        assert_eq!(zaps.len(), rel.len());
    }
}

#[test]
fn release_waits_for_a_reader_holding_a_reference_for_every_strategy() {
    for strategy in [Strategy::PerPage, Strategy::PerBuffer, Strategy::Gather] {
        for worker in [false, true] {
            let (g, _, readers, log) = setup(strategy);
            let g = if worker { g.spawn_worker().unwrap() } else { g };
            let device = readers.register("device-worker", None);
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let log2 = log.clone();
            let t = std::thread::spawn(move || {
                let guard = device.read();
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                log2.note("reference dropped");
                drop(guard);
            });
            held_rx.recv().unwrap();
            g.add_buffer(&[20, 21, 23]);
            g.flush();
            t.join().unwrap();

            let events = log.events();
            let what = format!("{strategy}, worker {worker}");
            let dropped = events
                .iter()
                .position(|e| e.phase == Phase::External("reference dropped"))
                .unwrap();
            let first_release = events
                .iter()
                .position(|e| matches!(e.phase, Phase::Release(_)))
                .unwrap();
            assert!(
                dropped < first_release,
                "{what}: released while a reader held a reference: {events:?}"
            );
            assert_ordered(&events, &what);
        }
    }
}

/// The design the VMM relies on: with a worker, the thread that offers a buffer returns as
/// soon as the frames are recorded, never waits for a host call, and no zap or release runs
/// on it. The zap here blocks until the test opens a gate: if `add_buffer` waited for it,
/// it would never return.
#[test]
fn with_a_worker_the_feeding_thread_never_waits_for_the_protocol_nor_runs_it() {
    let (g, rec, log) = with_worker(ReclaimConfig {
        batch_pages: 256,
        ..ReclaimConfig::default()
    });
    rec.close_gate();
    let (a, b) = two_buffers();
    let out = g.add_buffer(&a);
    assert_eq!(out.accepted.len(), 256);
    log.note("buffer 1 recorded");
    let out = g.add_buffer(&b);
    assert_eq!(out.accepted.len(), 256);
    log.note("buffer 2 recorded");
    // The worker is inside (or about to enter) the first zap, held by the gate; both
    // buffers were recorded meanwhile.
    while g.map().count(FrameState::Batched) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(rec.zaps.lock().unwrap().is_empty());
    rec.open_gate();
    g.flush();
    assert_eq!(g.map().count(FrameState::Released), 512);
    let events = log.events();
    let recorded = events
        .iter()
        .position(|e| e.phase == Phase::External("buffer 2 recorded"))
        .unwrap();
    let first_zap = events
        .iter()
        .position(|e| matches!(e.phase, Phase::Zap(_)))
        .unwrap();
    assert!(recorded < first_zap, "{events:?}");
    let me = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    for e in events.iter().filter(|e| e.batch != u64::MAX) {
        assert_eq!(
            e.thread, "reclaim",
            "{:?} ran on {} (the test is {me})",
            e.phase, e.thread
        );
    }
    assert_ordered(&events, "worker");
}

/// A batch that never fills closes by its window on the worker, with nothing else to wake
/// it (the worker sleeps until the batch's deadline).
#[test]
fn with_a_worker_a_batch_closes_by_its_window() {
    let (g, _, _) = with_worker(ReclaimConfig {
        batch_window_ms: 20,
        ..ReclaimConfig::default()
    });
    for round in 0..3u64 {
        g.add_buffer(&[100 + round]);
        let start = std::time::Instant::now();
        while g.map().state(100 + round) != Ok(FrameState::Released) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "round {round}: the batch never closed by its window"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(g.stats().batches, 3);
}

/// A deflate of frames whose batch is in flight waits for the batch to end and gets them
/// back Released (they read as zeros): never a release after the guest has them again.
#[test]
fn frames_in_flight_are_given_back_only_after_their_batch_ends() {
    let (g, rec, _) = with_worker(ReclaimConfig {
        batch_pages: 4,
        ..ReclaimConfig::default()
    });
    let g = Arc::new(g);
    rec.close_gate();
    g.add_buffer(&[40, 41, 42, 43]);
    while g.map().count(FrameState::Batched) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let g2 = g.clone();
    let deflate = std::thread::spawn(move || g2.return_frames(&[41, 42, 99]));
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !deflate.is_finished(),
        "gave back frames of a batch in flight"
    );
    rec.open_gate();
    let out = deflate.join().unwrap();
    assert_eq!(out.repopulated, 2);
    assert_eq!(out.invalid, vec![FrameError::NotInBalloon(99)]);
    assert_eq!(g.map().state(41), Ok(FrameState::Mapped));
    assert_eq!(g.map().state(40), Ok(FrameState::Released));
}

mod spans {
    use super::Strategy as Reclaim;
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::Strategy;

    #[derive(Clone, Debug)]
    enum Op {
        Inflate(Vec<Gfn>),
        Deflate(Vec<Gfn>),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Frames from a small window so that batches interleave with in-use frames and
        // with frames earlier batches took.
        let frames = prop::collection::vec(0..512u64, 1..64);
        prop_oneof![
            4 => frames.clone().prop_map(Op::Inflate),
            2 => frames.prop_map(Op::Deflate),
            2 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Zap spans under any sequence of inflates, deflates and flushes: every host call
        /// is checked against the frames' owners (`OwnershipChecked`); releases are exactly
        /// the reclaimed ranges; a frame a span bridged keeps its state; and a backend
        /// whose zap destroys contents never gets a span over anything but its range.
        #[test]
        fn releases_are_the_reclaimed_ranges_and_destroying_zaps_get_no_spans(
            ops in prop::collection::vec(op(), 1..30),
            destroys in any::<bool>(),
            gap in prop_oneof![Just(0u64), 1..4u64, Just(64u64)],
        ) {
            let (g, rec, map) = checked_gather(
                ReclaimConfig { zap_span_gap: gap, ..ReclaimConfig::with_strategy(Reclaim::Gather) },
                Recording { destroys, ..Recording::default() },
            );
            for op in ops {
                let before: Vec<FrameState> = (0..600).map(|f| map.state(f).unwrap()).collect();
                let zaps_before = rec.spans.lock().unwrap().len();
                match op {
                    Op::Inflate(f) => { g.add_buffer(&f); }
                    Op::Deflate(f) => { g.return_frames(&f); }
                    Op::Flush => { g.flush(); }
                }
                for s in &rec.spans.lock().unwrap()[zaps_before..] {
                    if destroys || gap == 0 {
                        prop_assert_eq!(&s.ranges, &vec![s.span], "no bridging");
                    }
                    for f in s.span.iter().filter(|&f| !s.ranges.iter().any(|r| r.contains(f))) {
                        prop_assert_eq!(map.state(f).unwrap(), before[f as usize],
                            "bridged frame {} changed state", f);
                    }
                }
            }
            g.flush();
            let ranges: Vec<GfnRange> =
                rec.spans.lock().unwrap().iter().flat_map(|s| s.ranges.clone()).collect();
            prop_assert_eq!(&*rec.releases.lock().unwrap(), &ranges);
        }
    }
}

mod blocks;
mod shmem_host;
mod split;
