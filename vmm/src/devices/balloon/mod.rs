//! virtio-balloon (virtio 1.2 §5.5) whose inflate and free-page-reporting queues feed the
//! Stage2Gather.
//!
//! Queues (indices compact, as Linux and QEMU number them): 0 inflate, 1 deflate, 2 stats,
//! 3 free page reporting. Features offered: VERSION_1, STATS_VQ, DEFLATE_ON_OOM,
//! FREE_PAGE_REPORTING.
//!
//! When an inflate buffer is acknowledged: as soon as its frames are Gathered (checked and
//! marked in the stage-2 map), before they are zapped. Linux sends one buffer and waits for
//! its ack, so acknowledging only after release would serialise every buffer behind a full
//! batch; with the gather strategy the batch is flushed when full or when its window passes.
//! With per-page and per-buffer the batch is flushed before the ack.
//!
//! Deflate is safe at any time: a frame still waiting in a batch leaves it and is never
//! zapped or freed after being handed back; a released frame reads as zeros when reused.
//!
//! Free page reporting: reported ranges are reclaimed at once (gather, zap, invalidate,
//! release) before the buffer is returned, and exactly the frames accepted become the
//! guest's again on return; a reported frame that is in the balloon stays there.
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
pub mod ownership;
mod queues;
pub mod steps;
#[cfg(test)]
mod tests;

use crate::devices::virtio::{Interrupt, VirtioDevice, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::memory::MemoryManager;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::Reader;
use serde::Serialize;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use attach::{BalloonDevice, BalloonHandler, BALLOON_GSI, BALLOON_MMIO_BASE};
pub use queues::BufferError;

pub const VIRTIO_ID_BALLOON: u32 = 5;
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_FREE_PAGE_REPORTING: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
/// Largest inflate/deflate buffer accepted, in frames (Linux sends at most 256).
pub const MAX_BUFFER_PFNS: usize = 16 * 1024;

pub const INFLATE_Q: usize = 0;
pub const DEFLATE_Q: usize = 1;
pub const STATS_Q: usize = 2;
pub const REPORTING_Q: usize = 3;

/// Guest statistics, by virtio tag (virtio 1.2 §5.5.6.3; VIRTIO_BALLOON_S_*), named as
/// Firecracker's API names them. Memory amounts are bytes, the others counts; a tag the
/// driver never sent stays `None`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuestStats {
    /// 0: bytes swapped in.
    pub swap_in: Option<u64>,
    /// 1: bytes swapped out.
    pub swap_out: Option<u64>,
    /// 2: major page faults.
    pub major_faults: Option<u64>,
    /// 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// 4: memory the guest does not use at all.
    pub free_memory: Option<u64>,
    /// 5: memory the guest has.
    pub total_memory: Option<u64>,
    /// 6: memory available for new work (free plus reclaimable caches).
    pub available_memory: Option<u64>,
    /// 7: disk caches.
    pub disk_caches: Option<u64>,
    /// 8: successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// 9: failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// 10: processes the guest's OOM killer killed (Linux 6.12+ sends 10-15).
    pub oom_kills: Option<u64>,
    /// 11: allocations that stalled for reclaim.
    pub alloc_stalls: Option<u64>,
    /// 12: pages scanned by background reclaim (kswapd).
    pub async_scans: Option<u64>,
    /// 13: pages scanned by direct reclaim.
    pub direct_scans: Option<u64>,
    /// 14: pages reclaimed by background reclaim.
    pub async_reclaims: Option<u64>,
    /// 15: pages reclaimed by direct reclaim.
    pub direct_reclaims: Option<u64>,
    /// Entries with a tag this device does not know (ignored, counted).
    pub unknown_tags: u64,
    /// Statistics buffers received.
    pub updates: u64,
}

impl GuestStats {
    /// Records one (tag, value) entry.
    fn record(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scans,
            13 => &mut self.direct_scans,
            14 => &mut self.async_reclaims,
            15 => &mut self.direct_reclaims,
            _ => {
                self.unknown_tags += 1;
                return;
            }
        };
        *slot = Some(val);
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BalloonCounters {
    pub inflate_buffers: u64,
    pub deflate_buffers: u64,
    pub report_buffers: u64,
    pub pages_inflated: u64,
    pub pages_deflated: u64,
    pub pages_reported: u64,
    /// Frames a device reset took out of the balloon and gave back to the guest.
    pub pages_returned_by_reset: u64,
    pub invalid_frames: u64,
    pub malformed_buffers: u64,
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
    pub guest_stats: GuestStats,
    pub counters: BalloonCounters,
}

impl Balloon {
    pub fn new(memory: Arc<MemoryManager>, interrupt: Arc<Interrupt>) -> Self {
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

    /// Sets the target; returns whether it changed (the caller signals a config change).
    pub fn set_num_pages(&mut self, pages: u32) -> bool {
        let changed = self.num_pages != pages;
        self.num_pages = pages;
        changed
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    fn complete(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) {
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::error!("balloon: cannot return buffer {head} to the used ring: {e:?}");
        }
    }

    fn process_frames(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) {
        loop {
            self.reader.enter();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = match index {
                REPORTING_Q => queues::reported_frames(chain, self.memory.ram.layout()),
                _ => queues::pfn_buffer(chain, mem, MAX_BUFFER_PFNS),
            };
            // The gather may wait for a grace period: hold no guest references across it.
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
        let mut gather = self.memory.gather.lock().unwrap();
        let invalid = match index {
            INFLATE_Q => {
                self.counters.inflate_buffers += 1;
                let out = gather.add_buffer(frames);
                self.counters.pages_inflated += out.accepted.len() as u64;
                out.invalid
            }
            DEFLATE_Q => {
                self.counters.deflate_buffers += 1;
                let out = gather.return_frames(frames);
                self.counters.pages_deflated += out.given_back();
                out.invalid
            }
            _ => {
                // The guest keeps its free frames: reclaim them now and give back exactly
                // those accepted. A frame the report names that is in the balloon (or a
                // device's) is refused and stays where it is.
                self.counters.report_buffers += 1;
                let out = gather.reclaim_and_give_back([frames]);
                self.counters.pages_reported += out.accepted.len() as u64;
                out.invalid
            }
        };
        if !invalid.is_empty() {
            self.counters.invalid_frames += invalid.len() as u64;
            tracing::warn!(
                "balloon: {} invalid frame(s) on queue {index} skipped, first: {}",
                invalid.len(),
                invalid[0]
            );
        }
    }

    /// The driver reports the target reached. On 2 MiB pages with `--partial-blocks split`,
    /// the frames still waiting in partial blocks then go back to the host at 4 KiB: the
    /// target can only be met by splitting them (the pending batch is flushed first, so that
    /// nothing the driver sent is left waiting).
    fn target_reached(&mut self) {
        let mut gather = self.memory.gather.lock().unwrap();
        if !gather.config().split_partial_blocks {
            return;
        }
        let _ = gather.flush();
        if let Some(r) = gather.split_partial_blocks() {
            tracing::info!(
                "balloon: target reached; split partial 2 MiB blocks, releasing {} frames at 4 KiB",
                r.pages
            );
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
        VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_REPORTING
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 4]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        cfg[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, le32) is driver-writable.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().unwrap());
            let ram_pages = (self.memory.ram.layout().total_bytes() / PAGE_SIZE) as u32;
            if v > ram_pages {
                tracing::error!("balloon: driver reported actual={v} pages, more than the guest's {ram_pages}; ignored");
                return;
            }
            self.actual = v;
            if v > 0 && v == self.num_pages {
                self.target_reached();
            }
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
        let back = self.memory.gather.lock().unwrap().return_all();
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
        match index {
            INFLATE_Q | DEFLATE_Q => self.process_frames(index, queue, mem),
            STATS_Q if self.acked & F_STATS_VQ != 0 => self.process_stats(queue, mem),
            REPORTING_Q if self.acked & F_FREE_PAGE_REPORTING != 0 => {
                self.process_frames(index, queue, mem)
            }
            other => tracing::warn!(
                "balloon: notify for queue {other}, which was not negotiated; ignored"
            ),
        }
    }
}
