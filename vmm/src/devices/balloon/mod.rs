//! virtio-balloon (virtio 1.2 §5.5) whose inflate and free-page-reporting queues feed the
//! Stage2Gather.
//!
//! Queues (indices compact, as Linux and QEMU number them: only negotiated features have a
//! queue): 0 inflate, 1 deflate, 2 stats, then free page hinting (if negotiated), then free
//! page reporting (`QueueRole`). Features offered: VERSION_1, STATS_VQ, DEFLATE_ON_OOM,
//! FREE_PAGE_REPORTING, and FREE_PAGE_HINT when the VM was started with hinting on
//! (`hinting`).
//!
//! Where buffers are processed: inflate, deflate and stats buffers on the vCPU thread that
//! notified, inside its MMIO exit (no ioeventfd): handing them to another thread cost the
//! driver vCPU a context switch per buffer on an oversubscribed host (docs/BENCHMARKS.md,
//! "Where the time went"). Free page reports, which must be reclaimed before they are
//! returned, go through an ioeventfd to the event-loop thread (`attach`).
//!
//! When an inflate buffer is acknowledged: as soon as its frames are Gathered (checked and
//! marked in the stage-2 map), before any host call. Linux sends one buffer and waits for
//! its ack; the gather's worker thread runs the batch when it is full or its window passes.
//! With per-page and per-buffer the buffer's frames are released before the ack.
//!
//! Deflate is safe at any time: a frame still waiting in a batch leaves it and is never
//! zapped or freed after being handed back; a frame in a batch in flight is handed back once
//! that batch has ended (the deflate waits); a released frame reads as zeros when reused.
//!
//! Free page reporting: reported ranges are reclaimed (gather, zap, invalidate, release)
//! before the buffer is returned, without the device lock held, and exactly the frames
//! accepted become the guest's again on return; a reported frame that is in the balloon
//! stays there.
//!
//! Who owns a frame is one state machine in the stage-2 map (`guest_mm::stage2_map`): the
//! queues, the reclaim probe and reset move frames only along its transitions, and only a
//! deflate, a completed report or a reset gives a ballooned frame back. A reset empties the
//! balloon. `ownership::check` states the invariants the tests and fuzzers hold it to.
//!
//! The frames holding the active queues' rings are DeviceMapped from DRIVER_OK until reset,
//! so a driver that puts them in the balloon has them refused rather than reclaimed under
//! the device; a ring placed in a frame that is in the balloon makes DRIVER_OK fail with
//! DEVICE_NEEDS_RESET.
//!
//! Malformed buffers (wrong direction, length not a multiple of 4, more than
//! MAX_BUFFER_PFNS frames, addresses outside RAM) are logged with detail and returned
//! unprocessed with used length 0; invalid frames inside a good buffer are logged and skipped.
//! Neither stops the device or the VMM.

mod attach;
pub mod hinting;
pub mod ownership;
mod queues;
pub mod steps;
#[cfg(test)]
mod tests;

use crate::devices::virtio::{Interrupt, VirtioDevice, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::memory::MemoryManager;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::reclaim::PartialBlocks;
use guest_mm::Reader;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use attach::{
    serve_inline, BalloonDevice, BalloonHandler, Deferred, BALLOON_GSI, BALLOON_MMIO_BASE,
};
pub use queues::BufferError;

use abi::virtio::balloon::{CONFIG_ACTUAL, CONFIG_FREE_PAGE_HINT_CMD_ID, CONFIG_NUM_PAGES};
pub use abi::virtio::balloon::{
    DEFLATE_Q, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_FREE_PAGE_REPORTING, F_STATS_VQ, HINTING_Q,
    INFLATE_Q, REPORTING_Q, REPORTING_Q_AFTER_HINTING, STATS_Q,
};
use hinting::Hinting;
pub const VIRTIO_ID_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
const QUEUE_SIZE: u16 = 256;
/// Largest inflate/deflate buffer accepted, in frames (Linux sends at most 256).
pub const MAX_BUFFER_PFNS: usize = 16 * 1024;

/// The driver's statistics, by virtio tag (virtio 1.2 §5.5.6.3; VIRTIO_BALLOON_S_*), named
/// exactly as Firecracker's API names them (tags 10-15 are singular there: `oom_kill`, not
/// `oom_kills`). The plural names this VMM used before are accepted when reading (serde
/// aliases, e.g. an old `--report-json` file) but never written. Memory amounts are bytes, the others counts; a tag the
/// driver never sent stays `None` and is left out of the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatValues {
    /// 0: bytes swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// 1: bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// 2: major page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// 3: minor page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// 4: memory the guest does not use at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// 5: memory the guest has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// 6: memory available for new work (free plus reclaimable caches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// 7: disk caches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// 8: successful hugetlb page allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// 9: failed hugetlb page allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// 10: processes the guest's OOM killer killed (Linux 6.12+ sends 10-15).
    #[serde(skip_serializing_if = "Option::is_none", alias = "oom_kills")]
    pub oom_kill: Option<u64>,
    /// 11: allocations that stalled for reclaim.
    #[serde(skip_serializing_if = "Option::is_none", alias = "alloc_stalls")]
    pub alloc_stall: Option<u64>,
    /// 12: pages scanned by background reclaim (kswapd).
    #[serde(skip_serializing_if = "Option::is_none", alias = "async_scans")]
    pub async_scan: Option<u64>,
    /// 13: pages scanned by direct reclaim.
    #[serde(skip_serializing_if = "Option::is_none", alias = "direct_scans")]
    pub direct_scan: Option<u64>,
    /// 14: pages reclaimed by background reclaim.
    #[serde(skip_serializing_if = "Option::is_none", alias = "async_reclaims")]
    pub async_reclaim: Option<u64>,
    /// 15: pages reclaimed by direct reclaim.
    #[serde(skip_serializing_if = "Option::is_none", alias = "direct_reclaims")]
    pub direct_reclaim: Option<u64>,
}

/// What the driver sent: its statistics and how many buffers it sent them in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStats {
    #[serde(flatten)]
    pub values: StatValues,
    /// Entries with a tag this device does not know (ignored, counted).
    pub unknown_tags: u64,
    /// Statistics buffers received.
    pub updates: u64,
}

impl GuestStats {
    /// Records one (tag, value) entry.
    fn record(&mut self, tag: u16, val: u64) {
        let v = &mut self.values;
        let slot = match tag {
            0 => &mut v.swap_in,
            1 => &mut v.swap_out,
            2 => &mut v.major_faults,
            3 => &mut v.minor_faults,
            4 => &mut v.free_memory,
            5 => &mut v.total_memory,
            6 => &mut v.available_memory,
            7 => &mut v.disk_caches,
            8 => &mut v.hugetlb_allocations,
            9 => &mut v.hugetlb_failures,
            10 => &mut v.oom_kill,
            11 => &mut v.alloc_stall,
            12 => &mut v.async_scan,
            13 => &mut v.direct_scan,
            14 => &mut v.async_reclaim,
            15 => &mut v.direct_reclaim,
            _ => {
                self.unknown_tags += 1;
                return;
            }
        };
        *slot = Some(val);
    }
}

/// `GET /balloon/statistics`: Firecracker's shape, the target and actual size and the
/// driver's statistics under its names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    pub target_pages: u64,
    pub actual_pages: u64,
    pub target_mib: u64,
    pub actual_mib: u64,
    #[serde(flatten)]
    pub values: StatValues,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonCounters {
    pub inflate_buffers: u64,
    pub deflate_buffers: u64,
    pub report_buffers: u64,
    pub pages_inflated: u64,
    pub pages_deflated: u64,
    /// Reported frames whose host pages were freed.
    pub pages_reported: u64,
    /// Reported frames taken but not freed, given back with their contents: on a 2 MiB
    /// backing, those of blocks not all free (or in the balloon).
    pub pages_reported_not_freed: u64,
    /// Frames a device reset took out of the balloon and gave back to the guest.
    pub pages_returned_by_reset: u64,
    pub invalid_frames: u64,
    pub malformed_buffers: u64,
    /// Free page hint buffers taken; hinted frames whose host pages were freed; hinted
    /// frames taken but not freed (given back with their contents: on a 2 MiB backing, those
    /// of blocks not all free); hinted frames ignored (sent under a stale command id or
    /// after the run ended).
    pub hint_buffers: u64,
    pub pages_hinted: u64,
    pub pages_hinted_not_freed: u64,
    pub hinted_pages_ignored: u64,
    /// Interrupts signalled through the irqfd: used-ring updates and configuration changes
    /// (filled in from the transport's interrupt when a report is made).
    pub used_ring_interrupts: u64,
    pub config_interrupts: u64,
}

/// The optional features the device offers (`vmm run --balloon-free-page-hinting`,
/// `--balloon-free-page-reporting false`). STATS_VQ and DEFLATE_ON_OOM are always offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonFeatures {
    pub free_page_hinting: bool,
    pub free_page_reporting: bool,
}

impl Default for BalloonFeatures {
    fn default() -> Self {
        Self {
            free_page_hinting: false,
            free_page_reporting: true,
        }
    }
}

impl BalloonFeatures {
    /// The feature bits these options offer, with the ones always offered.
    pub fn bits(self) -> u64 {
        let mut bits = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM;
        if self.free_page_hinting {
            bits |= F_FREE_PAGE_HINT;
        }
        if self.free_page_reporting {
            bits |= F_FREE_PAGE_REPORTING;
        }
        bits
    }
}

/// The balloon reached its target (target and `actual` became equal, whoever's change made
/// them so). On 2 MiB pages with `--partial-blocks split`, the frames still waiting in
/// partial blocks then go back to the host at 4 KiB: the target can only be met by
/// splitting them (the pending batch is flushed first, so that nothing the driver sent is
/// left waiting).
pub fn split_at_target(memory: &MemoryManager) {
    let gather = &memory.gather;
    if gather.config().partial_blocks != PartialBlocks::Split {
        return;
    }
    if let Some(r) = gather.split_partial_blocks() {
        tracing::info!(
            "balloon: target reached; split partial 2 MiB blocks, releasing {} frames at 4 KiB",
            r.pages
        );
    }
}

/// What a queue index is for, given the negotiated features (compact numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Hinting,
    Reporting,
}

/// The queues a driver with `features` has, in index order (no allocation: it is asked on
/// every queue notification).
pub fn queue_roles(features: u64) -> impl Iterator<Item = QueueRole> {
    [
        (0, QueueRole::Inflate),
        (0, QueueRole::Deflate),
        (F_STATS_VQ, QueueRole::Stats),
        (F_FREE_PAGE_HINT, QueueRole::Hinting),
        (F_FREE_PAGE_REPORTING, QueueRole::Reporting),
    ]
    .into_iter()
    .filter(move |&(bit, _)| bit == 0 || features & bit != 0)
    .map(|(_, role)| role)
}

/// Serves the reports the device has parsed with exclusive access to its transport (tests,
/// fuzzing): the steps of `BalloonDevice::serve_reports` without a lock to drop between them.
pub fn serve_reports_exclusive(t: &mut crate::devices::virtio::MmioTransport<Balloon>) {
    let Some(index) = t.device().index_of(QueueRole::Reporting) else {
        return;
    };
    loop {
        t.process_queue(index);
        let (mut reports, generation) = t.device_mut().drain_reports();
        if reports.is_empty() {
            return;
        }
        let memory = t.device().memory().clone();
        for r in &mut reports {
            r.reclaim(&memory);
        }
        t.with_device_and_queue(index, |dev, q, mem| {
            dev.complete_reports(reports, generation, q, mem)
        });
    }
}

/// A register write's effect served with exclusive access to the transport (tests,
/// fuzzing), as `BalloonDevice::mmio_write` and the event loop serve it: inline queues,
/// then the hint buffers taken, then free page reports.
pub fn serve_exclusive(
    t: &mut crate::devices::virtio::MmioTransport<Balloon>,
    effect: Option<crate::devices::virtio::Effect>,
) {
    let deferred = serve_inline(t, effect);
    if let Some(taken) = deferred.hints {
        serve_hints_exclusive(t, taken);
    }
    if deferred.reports {
        serve_reports_exclusive(t);
    }
}

/// Serves the hint buffers the device has taken, with exclusive access to its transport
/// (tests, fuzzing): `BalloonDevice::serve_hints` without a lock to drop.
pub fn serve_hints_exclusive(
    t: &mut crate::devices::virtio::MmioTransport<Balloon>,
    taken: (Vec<Report>, u64),
) {
    let mut next = Some(taken);
    while let Some((hints, generation)) = next.take() {
        let memory = t.device().memory().clone();
        let reclaimed = Report::reclaim_all(hints, &memory);
        next = attach::finish_hints(t, reclaimed, generation);
    }
}

/// One free page report buffer: parsed under the device lock, reclaimed without it.
pub struct Report {
    head: u16,
    frames: Result<Vec<u64>, BufferError>,
    reclaimed: Option<guest_mm::reclaim::ReclaimOutcome>,
}

impl Report {
    /// Reclaims the reported frames (gather, zap, invalidate, release) and gives exactly
    /// those accepted back to the guest. A reported frame that is in the balloon (or a
    /// device's) is refused and stays where it is.
    pub fn reclaim(&mut self, memory: &MemoryManager) {
        if let Ok(frames) = &self.frames {
            self.reclaimed = Some(memory.gather.reclaim_and_give_back([frames.as_slice()]));
        }
    }

    /// Reclaims several buffers' frames in one pass (one flush for all of them: hint
    /// buffers taken at one notification) and records each buffer's share of the outcome.
    pub fn reclaim_all(mut buffers: Vec<Report>, memory: &MemoryManager) -> Vec<Report> {
        let out = memory.gather.reclaim_and_give_back(
            buffers
                .iter()
                .filter_map(|b| b.frames.as_ref().ok())
                .map(|f| f.as_slice()),
        );
        // Each frame is credited to the first buffer naming it (a frame named twice was
        // accepted once and refused once).
        let mut accepted: std::collections::HashSet<u64> = out.accepted.into_iter().collect();
        let mut freed: std::collections::HashSet<u64> = out.freed.into_iter().collect();
        let mut invalid = out.invalid;
        for b in &mut buffers {
            if let Ok(frames) = &b.frames {
                let claim = |set: &mut std::collections::HashSet<u64>| {
                    frames.iter().copied().filter(|g| set.remove(g)).collect()
                };
                b.reclaimed = Some(guest_mm::reclaim::ReclaimOutcome {
                    accepted: claim(&mut accepted),
                    freed: claim(&mut freed),
                    invalid: std::mem::take(&mut invalid),
                    flushed: Vec::new(),
                });
            }
        }
        buffers
    }
}

pub struct Balloon {
    memory: Arc<MemoryManager>,
    interrupt: Arc<Interrupt>,
    /// The event-loop thread's reader handle: it reads guest buffers.
    reader: Reader,
    num_pages: u32,
    actual: u32,
    acked: u64,
    stats_head: Option<u16>,
    /// Frames holding the active queues' rings, DeviceMapped in the stage-2 map so that a
    /// driver that balloons them is refused (`FrameError::DeviceMapped`).
    ring_frames: Vec<u64>,
    /// Free page reports parsed and not yet completed.
    reports: Vec<Report>,
    /// The optional features offered.
    offered: BalloonFeatures,
    pub hinting: Hinting,
    /// Hint buffers taken and not yet completed.
    hints: Vec<Report>,
    /// Bumped by every reset: a report taken before a reset is not completed after it.
    generation: u64,
    pub guest_stats: GuestStats,
    pub counters: BalloonCounters,
}

impl Balloon {
    pub fn new(
        memory: Arc<MemoryManager>,
        interrupt: Arc<Interrupt>,
        offered: BalloonFeatures,
    ) -> Self {
        let reader = memory.readers.register("balloon", None);
        Self {
            memory,
            interrupt,
            reader,
            num_pages: 0,
            actual: 0,
            acked: 0,
            stats_head: None,
            ring_frames: Vec::new(),
            reports: Vec::new(),
            offered,
            hinting: Hinting::default(),
            hints: Vec::new(),
            generation: 0,
            guest_stats: GuestStats::default(),
            counters: BalloonCounters::default(),
        }
    }

    /// Target balloon size in 4 KiB pages (what the guest should give up).
    pub fn num_pages(&self) -> u32 {
        self.num_pages
    }

    /// Balloon size the driver reports.
    pub fn actual(&self) -> u32 {
        self.actual
    }

    /// Sets the target; returns whether it changed (the caller signals a config change). A
    /// new target equal to the driver's `actual` is reached at once: a driver with nothing to
    /// do writes nothing (Linux does not), so then the caller, once it has dropped the device
    /// lock, calls `split_at_target` (it waits for a batch: no lock a vCPU exit needs is held
    /// across it).
    pub fn set_num_pages(&mut self, pages: u32) -> bool {
        let changed = self.num_pages != pages;
        self.num_pages = pages;
        changed
    }

    /// Whether the driver's `actual` equals a non-zero target.
    pub fn target_met(&self) -> bool {
        self.num_pages > 0 && self.num_pages == self.actual
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    /// The optional features the device offers.
    pub fn offered(&self) -> BalloonFeatures {
        self.offered
    }

    /// Whether the device offers free page hinting.
    pub fn hinting_offered(&self) -> bool {
        self.offered.free_page_hinting
    }

    /// What queue `index` is for (numbered by `queue_features`).
    pub fn role(&self, index: usize) -> Option<QueueRole> {
        queue_roles(self.queue_features()).nth(index)
    }

    /// The index of the queue with `role`, if the driver has one.
    pub fn index_of(&self, role: QueueRole) -> Option<usize> {
        queue_roles(self.queue_features()).position(|r| r == role)
    }

    /// The features the queues are numbered by: the negotiated ones once the driver
    /// acknowledged them, every offered one before.
    fn queue_features(&self) -> u64 {
        if self.acked != 0 {
            self.acked
        } else {
            self.device_features()
        }
    }

    fn complete(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) {
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::error!("balloon: cannot return buffer {head} to the used ring: {e:?}");
        }
    }

    /// Inflate and deflate buffers, on the thread that notified (a vCPU thread): each is
    /// parsed, applied and acknowledged in turn. An inflate returns once its frames are
    /// recorded (the gather strategy) and never waits for a host call; a deflate of frames
    /// whose batch is in flight waits for that batch to end.
    fn process_frames(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) {
        loop {
            self.reader.enter();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = queues::pfn_buffer(chain, mem, MAX_BUFFER_PFNS);
            // The gather may wait for a batch: hold no guest references across it.
            self.reader.quiesce();
            match parsed {
                Err(e) => {
                    self.counters.malformed_buffers += 1;
                    tracing::error!("balloon: malformed buffer {head} on queue {index}: {e}; returned unprocessed");
                }
                Ok(frames) => self.apply(index, &frames),
            }
            self.complete(queue, mem, head);
        }
        self.reader.quiesce();
        self.interrupt.raise(INT_USED_RING);
    }

    fn apply(&mut self, index: usize, frames: &[u64]) {
        let gather = &self.memory.gather;
        let invalid = if index == INFLATE_Q {
            self.counters.inflate_buffers += 1;
            let out = gather.add_buffer(frames);
            self.counters.pages_inflated += out.accepted.len() as u64;
            out.invalid
        } else {
            self.counters.deflate_buffers += 1;
            let out = gather.return_frames(frames);
            self.counters.pages_deflated += out.given_back();
            out.invalid
        };
        self.note_invalid(index, &invalid);
    }

    fn note_invalid(&mut self, index: usize, invalid: &[guest_mm::FrameError]) {
        if let Some(first) = invalid.first() {
            self.counters.invalid_frames += invalid.len() as u64;
            tracing::warn!(
                "balloon: {} invalid frame(s) on queue {index} skipped, first: {first}",
                invalid.len(),
            );
        }
    }

    /// Free page reports: parsed here, under the device lock; reclaimed by the caller with
    /// the lock dropped (`Report::reclaim`), then completed (`complete_reports`).
    fn take_reports(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) {
        while !self.taken_enough(&self.reports) {
            self.reader.enter();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let frames = queues::reported_frames(chain, self.memory.ram.layout());
            self.reader.quiesce();
            self.reports.push(Report {
                head,
                frames,
                reclaimed: None,
            });
        }
        self.reader.quiesce();
    }

    /// Whether the buffers taken and not yet reclaimed name as many frames as RAM has: the
    /// rest wait on the ring for the next round (`serve_reports`, `serve_hints` loop), so a
    /// guest cannot make the device hold more frame lists at once than one RAM's worth.
    fn taken_enough(&self, taken: &[Report]) -> bool {
        let named: usize = taken
            .iter()
            .map(|r| r.frames.as_ref().map_or(0, Vec::len))
            .sum();
        named as u64 >= self.memory.ram.layout().total_bytes() / PAGE_SIZE
    }

    /// The reports parsed so far, and the device generation they belong to.
    pub fn drain_reports(&mut self) -> (Vec<Report>, u64) {
        (std::mem::take(&mut self.reports), self.generation)
    }

    /// Returns reclaimed report buffers to the driver, unless the device was reset since
    /// they were taken (their ring is gone; their frames were given back all the same).
    pub fn complete_reports(
        &mut self,
        reports: Vec<Report>,
        generation: u64,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) {
        if generation != self.generation {
            tracing::info!(
                "balloon: {} free page report(s) finished after a reset; not returned",
                reports.len()
            );
            return;
        }
        for r in reports {
            match (r.frames, r.reclaimed) {
                (Err(e), _) => {
                    self.counters.malformed_buffers += 1;
                    tracing::error!(
                        "balloon: malformed report buffer {}: {e}; returned unprocessed",
                        r.head
                    );
                }
                (Ok(_), Some(out)) => {
                    self.counters.report_buffers += 1;
                    let freed = out.freed.len() as u64;
                    self.counters.pages_reported += freed;
                    self.counters.pages_reported_not_freed +=
                        (out.accepted.len() as u64).saturating_sub(freed);
                    let index = self.index_of(QueueRole::Reporting).unwrap_or(REPORTING_Q);
                    self.note_invalid(index, &out.invalid);
                }
                (Ok(_), None) => {}
            }
            self.complete(queue, mem, r.head);
        }
        self.interrupt.raise(INT_USED_RING);
    }

    /// Free page hint buffers: parsed here, under the device lock; their run's frames are
    /// reclaimed by the caller with the lock dropped, then completed (`complete_hints`).
    fn take_hints(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) {
        while !self.taken_enough(&self.hints) {
            self.reader.enter();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = queues::hint_buffer(chain, mem, self.memory.ram.layout());
            self.reader.quiesce();
            let frames = parsed.map(|entries| {
                let a = self.hinting.accept(&entries);
                self.counters.hinted_pages_ignored += a.ignored_pages;
                a.frames
            });
            if frames.is_err() {
                // Counted in flight all the same: `complete_hints` completes every buffer.
                self.hinting.accept(&[]);
            }
            self.hints.push(Report {
                head,
                frames,
                reclaimed: None,
            });
        }
        self.reader.quiesce();
    }

    /// The hint buffers taken so far, and the device generation they belong to.
    pub fn drain_hints(&mut self) -> (Vec<Report>, u64) {
        (std::mem::take(&mut self.hints), self.generation)
    }

    /// Returns reclaimed hint buffers to the driver; returns whether the configuration
    /// changed (DONE written, once nothing hinted is still being released).
    pub fn complete_hints(
        &mut self,
        hints: Vec<Report>,
        generation: u64,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> bool {
        if generation != self.generation {
            return false;
        }
        let mut changed = false;
        let any = !hints.is_empty();
        for h in hints {
            match (h.frames, h.reclaimed) {
                (Err(e), _) => {
                    self.counters.malformed_buffers += 1;
                    tracing::error!(
                        "balloon: malformed hint buffer {}: {e}; returned unprocessed",
                        h.head
                    );
                }
                (Ok(_), out) => {
                    self.counters.hint_buffers += 1;
                    if let Some(out) = out {
                        let freed = out.freed.len() as u64;
                        self.counters.pages_hinted += freed;
                        self.counters.pages_hinted_not_freed +=
                            (out.accepted.len() as u64).saturating_sub(freed);
                        let index = self.index_of(QueueRole::Hinting).unwrap_or(HINTING_Q);
                        self.note_invalid(index, &out.invalid);
                    }
                }
            }
            self.complete(queue, mem, h.head);
            changed |= self.hinting.complete();
        }
        if any {
            self.interrupt.raise(INT_USED_RING);
        }
        changed
    }

    /// After the driver's write of `actual`: if it made target and `actual` equal, the
    /// balloon has reached its target (a target change that does is handled by its caller).
    fn on_target(&mut self) {
        if self.target_met() {
            split_at_target(&self.memory);
        }
    }

    fn process_stats(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) {
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match queues::stats_buffer(chain, mem) {
                Ok(stats) => {
                    for (tag, val) in stats {
                        self.guest_stats.record(tag, val);
                    }
                    self.guest_stats.updates += 1;
                }
                Err(e) => {
                    self.counters.malformed_buffers += 1;
                    tracing::error!("balloon: malformed stats buffer {head}: {e}");
                }
            }
            // Keep the newest buffer: returning it is how the device asks for fresh stats.
            if let Some(old) = self.stats_head.replace(head) {
                self.complete(queue, mem, old);
            }
        }
    }

    /// Asks the driver for fresh statistics by returning the buffer it left with us.
    pub fn request_stats(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) {
        if let Some(head) = self.stats_head.take() {
            self.complete(queue, mem, head);
            self.interrupt.raise(INT_USED_RING);
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn device_features(&self) -> u64 {
        self.offered.bits()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; queue_roles(self.device_features()).count()]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        let (target, actual) = (CONFIG_NUM_PAGES as usize, CONFIG_ACTUAL as usize);
        let hint = CONFIG_FREE_PAGE_HINT_CMD_ID as usize;
        cfg[target..target + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[actual..actual + 4].copy_from_slice(&self.actual.to_le_bytes());
        cfg[hint..hint + 4].copy_from_slice(&self.hinting.host_cmd().to_le_bytes());
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, le32) is driver-writable.
        if offset == CONFIG_ACTUAL && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().unwrap());
            let ram_pages = (self.memory.ram.layout().total_bytes() / PAGE_SIZE) as u32;
            if v > ram_pages {
                tracing::error!("balloon: driver reported actual={v} pages, more than the guest's {ram_pages}; ignored");
                return;
            }
            self.actual = v;
            self.on_target();
        } else {
            tracing::warn!(
                "balloon: write of {} bytes at config offset {offset} ignored",
                data.len()
            );
        }
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
        tracing::info!("balloon: driver ready, features {acked:#x}");
    }

    fn reset(&mut self) {
        // A reset empties the balloon: the next driver starts from an empty one and will use
        // every frame, so they are all the guest's again (pending ones are never zapped,
        // released ones read as zeros).
        let back = self.memory.gather.return_all();
        if back.given_back() > 0 {
            tracing::info!(
                "balloon: reset gave {} frame(s) back to the guest",
                back.given_back()
            );
        }
        self.counters.pages_returned_by_reset += back.given_back();
        self.actual = 0;
        self.acked = 0;
        self.stats_head = None;
        self.reports.clear();
        self.hints.clear();
        self.hinting.reset();
        self.generation += 1;
    }

    fn set_rings(&mut self, rings: &[std::ops::Range<u64>]) -> Result<(), String> {
        // The transport validated the rings (inside RAM) before handing them over.
        let map = &self.memory.map;
        for g in std::mem::take(&mut self.ring_frames) {
            let _ = map.unmap_device(g);
        }
        let mut frames: Vec<u64> = rings
            .iter()
            .filter(|r| r.start < r.end)
            .flat_map(|r| (r.start / PAGE_SIZE)..r.end.div_ceil(PAGE_SIZE))
            .collect();
        frames.sort_unstable();
        frames.dedup();
        for &g in &frames {
            if let Err(e) = map.map_device(g) {
                // A ring in a frame the guest gave to the balloon (or one the map does not
                // know): the device cannot use it. Undo and refuse.
                for &done in self.ring_frames.iter() {
                    let _ = map.unmap_device(done);
                }
                self.ring_frames.clear();
                return Err(format!("a ring lies in frame {g:#x}: {e}"));
            }
            self.ring_frames.push(g);
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) {
        match self.role(index).filter(|_| self.acked != 0) {
            Some(QueueRole::Inflate | QueueRole::Deflate) => self.process_frames(index, queue, mem),
            Some(QueueRole::Stats) => self.process_stats(queue, mem),
            Some(QueueRole::Hinting) => self.take_hints(queue, mem),
            Some(QueueRole::Reporting) => self.take_reports(queue, mem),
            None => tracing::warn!(
                "balloon: notify for queue {index}, which was not negotiated; ignored"
            ),
        }
    }
}
