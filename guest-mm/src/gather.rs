//! The Stage2Gather: reclaims guest frames in the order that keeps guests isolated and writes
//! from being lost.
//!
//! 1. gather: frames arrive in small buffers; each is checked and marked Gathered; a batch
//!    collects them (across buffers, bounded in pages and in time) and coalesces them into
//!    ranges, and the ranges into zap spans (`span`): where the backend's zap keeps contents,
//!    one span may bridge a bounded number of in-use frames between ranges.
//! 2. zap: one backend call per span removes the stage-2 mappings; KVM flushes every vCPU's
//!    TLB inside that call, so a batch of one span costs one invalidation however fragmented
//!    its frames are.
//! 3. invalidate: a grace period in which every VMM thread that may hold a guest address
//!    passes a quiescent point.
//! 4. release: only now the reverse-map state is dropped and the host pages of exactly the
//!    reclaimed ranges freed (never of a frame a span bridged).
//!
//! Why the order: a stale translation (a vCPU TLB entry, or a VMM thread's pointer) that
//! outlives the release writes into a page that has been freed or handed to someone else,
//! and dropping the reverse map before the flush loses the dirty state of writes made through
//! it (Linux, "mm: delay rmap removal until after TLB flush", 6.2). So each phase is a type:
//! `Batch::zap` gives a `ZappedBatch`, whose only way forward is `invalidate`, which gives the
//! `InvalidatedBatch` that alone can `release`. Release before invalidate does not compile.

use crate::backend::Stage2Backend;
use crate::backend::{Granule, BLOCK_FRAMES};
use crate::blocks::{self, Blocks};
use crate::coalesce::coalesce;
use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::grace::Readers;
use crate::span::{self, ZapSpan};
use crate::stage2_map::{FrameState, GivenBack, Stage2Map};
use crate::stats::GatherStats;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How frames are grouped into host calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// One host call per 4 KiB page, as QEMU and Cloud Hypervisor do.
    PerPage,
    /// Merge adjacent frames within one buffer, as Firecracker does.
    PerBuffer,
    /// Merge across buffers within a bounded batch and latency window (ours).
    Gather,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-page" => Ok(Strategy::PerPage),
            "per-buffer" => Ok(Strategy::PerBuffer),
            "gather" => Ok(Strategy::Gather),
            other => Err(format!(
                "unknown strategy '{other}': use per-page, per-buffer or gather"
            )),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::PerPage => "per-page",
            Strategy::PerBuffer => "per-buffer",
            Strategy::Gather => "gather",
        })
    }
}

/// Default batch bound: 64 MiB of frames. Large enough that a Linux-style inflate (256 PFNs
/// per buffer, one buffer in flight) coalesces over hundreds of buffers; small enough that a
/// batch's frames are back with the host within one window even at the slow per-4 KiB costs
/// measured here (88–250 µs per call).
pub const DEFAULT_MAX_BATCH_PAGES: u64 = 16 * 1024;
/// Default latency window: a batch is flushed this long after its first frame arrived, even
/// if it is not full, so a slow trickle of frames still reaches the host promptly. 40 ms:
/// with 4 vCPUs on 2 cores the Linux-style driver is slow enough that a 10 ms window closed
/// batches at 4,000-5,000 pages, 50-63 flushes per GiB on the fragmented balloon; at 40 ms
/// 18-19 (docs/BENCHMARKS.md, "Zap spans", the batch window), with the same reclaim rate.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(40);
/// Readers slower than this to quiesce are kicked.
pub const DEFAULT_KICK_AFTER: Duration = Duration::from_millis(1);
/// Default bound on the in-use frames one zap span may bridge per gap between reclaimed
/// ranges (gather strategy; 0 = one zap per range). Chosen by measurement, see
/// docs/BENCHMARKS.md ("Zap spans").
pub const DEFAULT_ZAP_SPAN_GAP: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GatherConfig {
    pub strategy: Strategy,
    pub max_batch_pages: u64,
    pub window: Duration,
    pub kick_after: Duration,
    /// In-use frames a zap span may bridge per gap (gather strategy only, and only where the
    /// backend's zap keeps contents). 0: one zap per range.
    pub zap_span_gap: u64,
    /// Block backends that can split (shmem THP): once the balloon reaches its target,
    /// release the frames still waiting in partial 2 MiB blocks at 4 KiB (the kernel splits
    /// each huge page). Otherwise partial blocks stay held until they complete.
    pub split_partial_blocks: bool,
}

impl GatherConfig {
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            max_batch_pages: DEFAULT_MAX_BATCH_PAGES,
            window: DEFAULT_WINDOW,
            kick_after: DEFAULT_KICK_AFTER,
            zap_span_gap: DEFAULT_ZAP_SPAN_GAP,
            split_partial_blocks: false,
        }
    }
}

/// KVM's counters around a batch: the VM's stage-2 flush requests
/// (`remote_tlb_flush_requests`) and, where available, each vCPU's statistics.
pub trait FlushCounter: Send {
    fn flush_requests(&self) -> Option<u64>;
    /// One entry per vCPU, in vCPU order; empty where per-vCPU statistics are unavailable.
    fn vcpus(&self) -> Vec<VcpuCounters> {
        Vec::new()
    }
}

/// One vCPU's KVM statistics that show an invalidation reaching it and its cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuCounters {
    /// TLB flushes the vCPU performed (KVM_REQ_TLB_FLUSH handled).
    pub tlb_flush: u64,
    /// Stage-2 page faults fixed (a refault of a zapped frame is one).
    pub pf_fixed: u64,
    /// Stage-2 page faults taken.
    pub pf_taken: u64,
    pub exits: u64,
}

/// Total stage-2 faults fixed over all vCPUs.
fn pf_fixed(v: &[VcpuCounters]) -> u64 {
    v.iter().map(|c| c.pf_fixed).sum()
}

/// One step of one batch, for the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Zap(GfnRange),
    Invalidated,
    Release(GfnRange),
    /// A note from outside the gather (tests mark when a reader dropped its reference).
    External(&'static str),
}

/// Ordered record of every phase of every batch (tests and debugging).
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<(u64, Phase)>>,
}

impl EventLog {
    pub fn record(&self, batch: u64, phase: Phase) {
        self.events.lock().unwrap().push((batch, phase));
    }

    pub fn events(&self) -> Vec<(u64, Phase)> {
        self.events.lock().unwrap().clone()
    }
}

/// The outcome of one batch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BatchReport {
    pub id: u64,
    pub pages: u64,
    pub ranges: u64,
    /// Zap calls: one per span.
    pub spans: u64,
    /// In-use frames the spans bridged (zapped, kept, never freed).
    pub bridged: u64,
    pub host_calls: u64,
    pub kvm_flush_requests: Option<u64>,
    /// Each vCPU's `tlb_flush` growth from the start of this batch's zap until the next
    /// batch (or the last time statistics were read): the invalidation reached it. A vCPU
    /// handles KVM's flush request when it next enters the guest, which may be after the zap
    /// returned, hence the later end.
    pub vcpu_tlb_flushes: Vec<u64>,
    /// Stage-2 faults fixed on all vCPUs from the end of this batch's zap until the next
    /// batch (or the last time statistics were read): refaults the batch caused, plus
    /// whatever else the guest faulted in meanwhile.
    pub refaults_after: Option<u64>,
    pub gather_us: u64,
    pub zap_us: u64,
    pub invalidate_us: u64,
    pub release_us: u64,
    /// Host calls that failed, with context. Frames whose zap failed go back to Mapped.
    #[serde(skip)]
    pub errors: Vec<String>,
}

/// Frames gathered, coalesced and planned into zap spans, not yet zapped.
pub struct Batch {
    id: u64,
    spans: Vec<ZapSpan>,
    report: BatchReport,
}

/// Stage-2 mappings removed; VMM threads may still hold references.
pub struct ZappedBatch {
    batch: Batch,
}

/// Every VMM thread has passed a quiescent point since the zap: safe to release.
pub struct InvalidatedBatch {
    batch: Batch,
}

struct Pipeline<'a> {
    map: &'a Stage2Map,
    backend: &'a dyn Stage2Backend,
    log: Option<&'a EventLog>,
}

impl Batch {
    fn zap(mut self, p: &Pipeline, flushes: Option<&dyn FlushCounter>) -> ZappedBatch {
        let t = Instant::now();
        let before = flushes.and_then(|f| f.flush_requests());
        let mut zapped = Vec::with_capacity(self.spans.len());
        for span in std::mem::take(&mut self.spans) {
            self.report.host_calls += 1;
            match p.backend.zap(&span) {
                Ok(()) => {
                    for &r in &span.ranges {
                        p.map.mark_zapped(r);
                        if let Some(log) = p.log {
                            log.record(self.id, Phase::Zap(r));
                        }
                    }
                    zapped.push(span);
                }
                Err(e) => {
                    // Nothing was removed. The guest gave the frames away, so they stay in the
                    // balloon (Retained: still backed) until it takes them back.
                    tracing::error!(
                        "stage-2 zap failed, frames stay in the balloon unreclaimed: {e}"
                    );
                    self.report.errors.push(e.to_string());
                    for &r in &span.ranges {
                        p.map.mark_retained(r);
                        // Not reclaimed: keep the batch's accounting to what was.
                        self.report.pages -= r.count;
                        self.report.ranges -= 1;
                    }
                    self.report.spans -= 1;
                    self.report.bridged -= span.bridged;
                }
            }
        }
        let after = flushes.and_then(|f| f.flush_requests());
        self.report.kvm_flush_requests = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        self.spans = zapped;
        self.report.zap_us = t.elapsed().as_micros() as u64;
        ZappedBatch { batch: self }
    }
}

impl ZappedBatch {
    fn invalidate(
        mut self,
        readers: &Readers,
        kick_after: Duration,
        log: Option<&EventLog>,
    ) -> (InvalidatedBatch, u32, u32) {
        let t = Instant::now();
        let g = readers.synchronize(kick_after);
        self.batch.report.invalidate_us = t.elapsed().as_micros() as u64;
        if let Some(log) = log {
            log.record(self.batch.id, Phase::Invalidated);
        }
        (
            InvalidatedBatch { batch: self.batch },
            g.waited_for,
            g.kicked,
        )
    }
}

impl InvalidatedBatch {
    /// Releases exactly the reclaimed ranges of every span (never a bridged frame).
    fn release(mut self, p: &Pipeline) -> BatchReport {
        let t = Instant::now();
        let ranges = std::mem::take(&mut self.batch.spans)
            .into_iter()
            .flat_map(|s| s.ranges);
        for r in ranges {
            self.batch.report.host_calls += 1;
            if let Err(e) = p.backend.release(r) {
                // The frames are gone from stage 2 and the guest gave them up; the host simply
                // did not get the memory back. Say so loudly; they stay in the balloon,
                // Retained, and are not counted as reclaimed.
                tracing::error!("release failed, host memory not returned: {e}");
                self.batch.report.errors.push(e.to_string());
                p.map.mark_retained(r);
                self.batch.report.pages -= r.count;
                self.batch.report.ranges -= 1;
                continue;
            }
            p.map.mark_released(r);
            if let Some(log) = p.log {
                log.record(self.batch.id, Phase::Release(r));
            }
        }
        self.batch.report.release_us = t.elapsed().as_micros() as u64;
        self.batch.report
    }
}

/// What happened to one buffer of frames offered for reclaim.
#[derive(Debug, Default)]
pub struct BufferOutcome {
    /// The frames now in the balloon, in the buffer's order.
    pub accepted: Vec<Gfn>,
    /// The frames refused, each with its reason; they stay with their owner.
    pub invalid: Vec<FrameError>,
    /// Batches this buffer caused to be flushed.
    pub flushed: Vec<BatchReport>,
}

/// What happened to frames given back to the guest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReturnOutcome {
    /// Frames taken out of a pending batch before they were zapped.
    pub ungathered: u64,
    /// Released frames the guest may use again (they read as zeros).
    pub repopulated: u64,
    /// Frames whose host call had failed, given back with their contents.
    pub retained: u64,
    /// Frames that were not in the balloon, each with its reason.
    pub invalid: Vec<FrameError>,
}

impl ReturnOutcome {
    /// Frames that left the balloon.
    pub fn given_back(&self) -> u64 {
        self.ungathered + self.repopulated + self.retained
    }
}

pub struct Stage2Gather {
    config: GatherConfig,
    map: Arc<Stage2Map>,
    backend: Arc<dyn Stage2Backend>,
    readers: Arc<Readers>,
    flushes: Option<Box<dyn FlushCounter>>,
    log: Option<Arc<EventLog>>,
    pending: Vec<Gfn>,
    pending_since: Option<Instant>,
    next_batch: u64,
    stats: GatherStats,
    /// 2 MiB block tracking, where the backend gives memory back in blocks.
    blocks: Option<Blocks>,
    /// Where the last batch's per-vCPU counts start from.
    last_batch_counts: Option<BatchCountsFrom>,
}

/// The vCPU counters a batch's `vcpu_tlb_flushes` and `refaults_after` are measured from.
struct BatchCountsFrom {
    tlb_flush_at_zap_start: Vec<u64>,
    pf_fixed_at_zap_end: u64,
}

impl Stage2Gather {
    pub fn new(
        config: GatherConfig,
        map: Arc<Stage2Map>,
        backend: Arc<dyn Stage2Backend>,
        readers: Arc<Readers>,
    ) -> Self {
        let blocks = match backend.granule() {
            Granule::Page => None,
            Granule::Block { .. } => Some(Blocks::new(map.layout())),
        };
        Self {
            blocks,
            config,
            map,
            backend,
            readers,
            flushes: None,
            log: None,
            pending: Vec::new(),
            pending_since: None,
            next_batch: 0,
            stats: GatherStats::default(),
            last_batch_counts: None,
        }
    }

    pub fn with_flush_counter(mut self, c: Box<dyn FlushCounter>) -> Self {
        self.flushes = Some(c);
        self
    }

    pub fn with_event_log(mut self, log: Arc<EventLog>) -> Self {
        self.log = Some(log);
        self
    }

    pub fn config(&self) -> &GatherConfig {
        &self.config
    }

    pub fn set_config(&mut self, config: GatherConfig) {
        self.config = config;
    }

    pub fn map(&self) -> &Arc<Stage2Map> {
        &self.map
    }

    pub fn stats(&self) -> &GatherStats {
        &self.stats
    }

    fn vcpu_counters(&self) -> Vec<VcpuCounters> {
        self.flushes.as_ref().map(|f| f.vcpus()).unwrap_or_default()
    }

    /// Brings the last batch's `vcpu_tlb_flushes` and `refaults_after` (and their totals) up
    /// to now; called when the next batch starts and before a report is read.
    pub fn refresh_after_counts(&mut self) {
        let Some(from) = &self.last_batch_counts else {
            return;
        };
        let now = self.vcpu_counters();
        if now.len() != from.tlb_flush_at_zap_start.len() {
            return;
        }
        let tlb: Vec<u64> = now
            .iter()
            .zip(&from.tlb_flush_at_zap_start)
            .map(|(n, s)| n.tlb_flush.saturating_sub(*s))
            .collect();
        let refaults = pf_fixed(&now).saturating_sub(from.pf_fixed_at_zap_end);
        let s = &mut self.stats;
        let Some(last) = s.recent_batches.back_mut() else {
            return;
        };
        if s.vcpu_tlb_flushes.len() < tlb.len() {
            s.vcpu_tlb_flushes.resize(tlb.len(), 0);
        }
        let old_tlb = std::mem::replace(&mut last.vcpu_tlb_flushes, tlb);
        for (i, (total, new)) in s
            .vcpu_tlb_flushes
            .iter_mut()
            .zip(&last.vcpu_tlb_flushes)
            .enumerate()
        {
            *total += new.saturating_sub(old_tlb.get(i).copied().unwrap_or(0));
        }
        let old_refaults = last.refaults_after.replace(refaults).unwrap_or(0);
        s.refaults_after += refaults.saturating_sub(old_refaults);
    }

    pub fn set_flush_counter(&mut self, c: Box<dyn FlushCounter>) {
        self.flushes = Some(c);
    }

    pub fn pending_pages(&self) -> u64 {
        self.pending.len() as u64
    }

    /// When the pending batch must be flushed by, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.config.window)
    }

    /// Offers one buffer of frames for reclaim. Each frame is checked (RAM, not already
    /// gathered or released, not device memory); refused frames are returned with their
    /// reason. Depending on the strategy the batch may be flushed before this returns.
    pub fn add_buffer(&mut self, gfns: &[Gfn]) -> BufferOutcome {
        let mut out = BufferOutcome::default();
        for &g in gfns {
            match self.map.gather(g) {
                Ok(()) => {
                    self.pending.push(g);
                    out.accepted.push(g);
                    if let Some(b) = self.blocks.as_mut() {
                        b.add(g);
                    }
                }
                Err(e) => out.invalid.push(e),
            }
        }
        self.stats.pages_gathered += out.accepted.len() as u64;
        self.stats.invalid_frames += out.invalid.len() as u64;
        if !out.accepted.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        let flush_now = match self.config.strategy {
            Strategy::PerPage | Strategy::PerBuffer => true,
            Strategy::Gather => self.pending.len() as u64 >= self.config.max_batch_pages,
        };
        if flush_now {
            out.flushed.extend(self.flush());
        }
        out
    }

    /// Flushes the pending batch if its window has passed.
    pub fn poll(&mut self) -> Option<BatchReport> {
        match self.deadline() {
            Some(d) if Instant::now() >= d => self.flush(),
            _ => None,
        }
    }

    /// In-use frames a span may bridge per gap: the configured bound for the gather strategy
    /// on a backend whose zap keeps contents, else 0 (one zap per range).
    fn span_gap(&self) -> u64 {
        if self.config.strategy == Strategy::Gather && self.backend.zap_keeps_contents() {
            self.config.zap_span_gap
        } else {
            0
        }
    }

    /// Runs the pending frames through zap → invalidate → release now.
    pub fn flush(&mut self) -> Option<BatchReport> {
        if self.pending.is_empty() {
            self.pending_since = None;
            return None;
        }
        let first_frame_at = self.pending_since.take().unwrap_or_else(Instant::now);
        let mut frames = std::mem::take(&mut self.pending);
        if self.blocks.is_some() {
            frames = self.complete_blocks(frames);
            if frames.is_empty() {
                return None;
            }
        }
        self.run_batch(frames, first_frame_at)
    }

    /// Block backends: of the pending frames, those whose 2 MiB block is now complete are
    /// returned with the rest of their block (frames that waited as Partial go back to
    /// Gathered); the others wait as Partial. A block with a frame that cannot join a batch
    /// (Retained after a failed host call) waits too.
    fn complete_blocks(&mut self, mut frames: Vec<Gfn>) -> Vec<Gfn> {
        let blocks = self.blocks.as_mut().expect("block mode");
        frames.sort_unstable();
        frames.dedup();
        let mut ready: Vec<usize> = frames
            .iter()
            .map(|&g| blocks::block_of(g))
            .filter(|&b| blocks.complete(b))
            .collect();
        ready.dedup();
        ready.retain(|&b| {
            (0..BLOCK_FRAMES).all(|i| {
                matches!(
                    self.map.state(blocks::first_frame(b) + i),
                    Ok(FrameState::Gathered | FrameState::Partial)
                )
            })
        });
        let mut out = Vec::with_capacity(ready.len() * BLOCK_FRAMES as usize);
        for &b in &ready {
            for g in blocks::first_frame(b)..blocks::first_frame(b) + BLOCK_FRAMES {
                if self.map.unpark(g).is_ok() {
                    blocks.unwait(g);
                }
                out.push(g);
            }
        }
        for g in frames {
            if ready.binary_search(&blocks::block_of(g)).is_err() {
                self.map.mark_partial(g);
                blocks.wait(g);
            }
        }
        self.stats.partial_blocks = blocks.partial_blocks();
        out
    }

    /// Block backends that can split (shmem THP): releases every frame waiting in a partial
    /// block at 4 KiB, by range; the kernel splits each huge page it punches a part of. The
    /// balloon calls this when its target is reached with memory still held in partial
    /// blocks and the user allowed splitting.
    pub fn split_partial_blocks(&mut self) -> Option<BatchReport> {
        if self.backend.granule() != (Granule::Block { can_split: true }) {
            return None;
        }
        let frames = self.map.frames_in(&[FrameState::Partial]);
        if frames.is_empty() {
            return None;
        }
        let blocks = self.blocks.as_mut().expect("block mode");
        let before = blocks.partial_blocks();
        for &g in &frames {
            if self.map.unpark(g).is_ok() {
                blocks.unwait(g);
            }
        }
        self.stats.blocks_split += before - blocks.partial_blocks();
        self.run_batch(frames, Instant::now())
    }

    /// Runs `frames` (Gathered) through zap → invalidate → release as one batch.
    fn run_batch(&mut self, mut frames: Vec<Gfn>, first_frame_at: Instant) -> Option<BatchReport> {
        let mut ranges = coalesce(&mut frames, self.map.layout()).ranges;
        if self.config.strategy == Strategy::PerPage && self.blocks.is_none() {
            ranges = ranges
                .iter()
                .flat_map(|r| r.iter().map(|g| GfnRange::new(g, 1)))
                .collect();
        }
        let id = self.next_batch;
        self.next_batch += 1;
        let pages: u64 = ranges.iter().map(|r| r.count).sum();
        let spans = span::plan(&ranges, self.map.layout(), &self.map, self.span_gap());
        let gather_us = first_frame_at.elapsed().as_micros() as u64;
        let report = BatchReport {
            id,
            pages,
            ranges: ranges.len() as u64,
            spans: spans.len() as u64,
            bridged: spans.iter().map(|s| s.bridged).sum(),
            gather_us,
            ..Default::default()
        };
        let batch = Batch { id, spans, report };

        // The previous batch's counts end where this batch begins.
        self.refresh_after_counts();
        let at_zap_start = self.vcpu_counters();
        let pipeline = Pipeline {
            map: &self.map,
            backend: self.backend.as_ref(),
            log: self.log.as_deref(),
        };
        let zapped = batch.zap(&pipeline, self.flushes.as_deref());
        let pf_fixed_at_zap_end = pf_fixed(&self.vcpu_counters());
        let (invalidated, waited, kicked) =
            zapped.invalidate(&self.readers, self.config.kick_after, self.log.as_deref());
        let report = invalidated.release(&pipeline);
        self.last_batch_counts = (!at_zap_start.is_empty()).then(|| BatchCountsFrom {
            tlb_flush_at_zap_start: at_zap_start.iter().map(|c| c.tlb_flush).collect(),
            pf_fixed_at_zap_end,
        });

        let s = &mut self.stats;
        s.batches += 1;
        s.pages_reclaimed += report.pages;
        s.ranges += report.ranges;
        s.spans += report.spans;
        s.bridged += report.bridged;
        s.host_calls += report.host_calls;
        s.kvm_flush_requests += report.kvm_flush_requests.unwrap_or(0);
        s.host_call_errors += report.errors.len() as u64;
        s.grace_waits += u64::from(waited > 0);
        s.grace_kicks += u64::from(kicked);
        s.pages_per_batch.record(report.pages);
        s.ranges_per_batch.record(report.ranges);
        s.gather_us.record(report.gather_us);
        s.zap_us.record(report.zap_us);
        s.invalidate_us.record(report.invalidate_us);
        s.release_us.record(report.release_us);
        if let Some(b) = self.blocks.as_mut() {
            // Blocks released whole: a frame given back later makes the host back them again.
            for r in &ranges {
                let whole =
                    r.start.is_multiple_of(BLOCK_FRAMES) && r.count.is_multiple_of(BLOCK_FRAMES);
                let first = r.start / BLOCK_FRAMES;
                for blk in first..first + r.count / BLOCK_FRAMES {
                    let g = blk * BLOCK_FRAMES;
                    if whole && self.map.state(g) == Ok(FrameState::Released) {
                        b.set_released_whole(blk as usize);
                        s.blocks_released += 1;
                    }
                }
            }
            s.partial_blocks = b.partial_blocks();
        }
        if s.recent_batches.len() == crate::stats::RECENT_BATCHES {
            s.recent_batches.pop_front();
        }
        s.recent_batches.push_back(report);
        // The counts so far (to the end of the release); later refreshes extend them.
        self.refresh_after_counts();
        self.stats.recent_batches.back().cloned()
    }

    /// The guest takes frames back (a deflate). A frame still in the pending batch leaves it
    /// and is never zapped or freed; a released frame becomes usable again and reads as
    /// zeros. A frame that is not in the balloon is refused with its reason.
    pub fn return_frames(&mut self, gfns: &[Gfn]) -> ReturnOutcome {
        let mut out = ReturnOutcome::default();
        let mut ungathered = Vec::new();
        for &g in gfns {
            let was_partial = self.map.state(g) == Ok(FrameState::Partial);
            let given = self.map.give_back(g);
            if let (Ok(how), Some(b)) = (&given, self.blocks.as_mut()) {
                b.remove(g);
                if was_partial {
                    b.unwait(g);
                }
                // The rest of a block released whole is backed again once the guest touches
                // this frame: it waits as Partial.
                let blk = blocks::block_of(g);
                if *how == GivenBack::Repopulated && b.take_released_whole(blk) {
                    for s in blocks::first_frame(blk)..blocks::first_frame(blk) + BLOCK_FRAMES {
                        if self.map.state(s) == Ok(FrameState::Released) {
                            self.map.rebacked(s);
                            b.wait(s);
                        }
                    }
                }
            }
            match given {
                Ok(GivenBack::Ungathered) => {
                    ungathered.push(g);
                    out.ungathered += 1;
                }
                Ok(GivenBack::Repopulated) => out.repopulated += 1,
                Ok(GivenBack::Retained) => out.retained += 1,
                Err(e) => out.invalid.push(e),
            }
        }
        if let Some(b) = &self.blocks {
            self.stats.partial_blocks = b.partial_blocks();
        }
        if !ungathered.is_empty() {
            ungathered.sort_unstable();
            self.pending
                .retain(|g| ungathered.binary_search(g).is_err());
            if self.pending.is_empty() {
                self.pending_since = None;
            }
        }
        self.stats.pages_returned += out.given_back();
        self.stats.invalid_frames += out.invalid.len() as u64;
        out
    }

    /// Reclaims frames the guest keeps (a free page report of its own free frames, or the
    /// reclaim probe): each buffer is gathered, the batch is run through zap → invalidate →
    /// release at once, and exactly the frames accepted are given back. Frames refused
    /// (already in the balloon, device-mapped, not RAM) stay where they were.
    pub fn reclaim_and_give_back<'a>(
        &mut self,
        buffers: impl IntoIterator<Item = &'a [Gfn]>,
    ) -> BufferOutcome {
        let mut out = BufferOutcome::default();
        for b in buffers {
            let o = self.add_buffer(b);
            out.accepted.extend(o.accepted);
            out.invalid.extend(o.invalid);
            out.flushed.extend(o.flushed);
        }
        out.flushed.extend(self.flush());
        let back = self.return_frames(&out.accepted);
        debug_assert!(
            back.invalid.is_empty(),
            "accepted frames are in the balloon"
        );
        out
    }

    /// Empties the balloon (a device reset): every frame it holds is given back to the
    /// guest, pending ones before they are zapped. A full scan of the map.
    pub fn return_all(&mut self) -> ReturnOutcome {
        let frames = self.map.frames_in(&FrameState::BALLOON);
        self.return_frames(&frames)
    }
}

impl Drop for Stage2Gather {
    fn drop(&mut self) {
        // Frames the guest gave away are not left half-reclaimed.
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use crate::layout::Layout;

    /// Records every host call, so tests can see the calls each strategy makes.
    #[derive(Default)]
    struct Recording {
        log: Arc<EventLog>,
        /// Whether its zap destroys contents (like guest_memfd punch-hole).
        destroys: bool,
        /// A 2 MiB block backend (and whether it can split), instead of 4 KiB pages.
        block: Option<bool>,
        spans: Mutex<Vec<ZapSpan>>,
        zaps: Mutex<Vec<GfnRange>>,
        releases: Mutex<Vec<GfnRange>>,
    }

    impl Stage2Backend for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn zap_keeps_contents(&self) -> bool {
            !self.destroys
        }
        fn granule(&self) -> Granule {
            match self.block {
                None => Granule::Page,
                Some(can_split) => Granule::Block { can_split },
            }
        }
        fn zap(&self, s: &ZapSpan) -> Result<(), BackendError> {
            self.zaps.lock().unwrap().push(s.span);
            self.spans.lock().unwrap().push(s.clone());
            Ok(())
        }
        fn release(&self, r: GfnRange) -> Result<(), BackendError> {
            self.releases.lock().unwrap().push(r);
            Ok(())
        }
    }

    fn setup(strategy: Strategy) -> (Stage2Gather, Arc<Recording>, Arc<Readers>, Arc<EventLog>) {
        let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
        let backend = Arc::new(Recording::default());
        let readers = Readers::new();
        let log = backend.log.clone();
        let g = Stage2Gather::new(
            GatherConfig::new(strategy),
            map,
            backend.clone(),
            readers.clone(),
        )
        .with_event_log(log.clone());
        (g, backend, readers, log)
    }

    /// Two buffers of Linux-style descending PFNs that together form one run.
    fn two_buffers() -> (Vec<Gfn>, Vec<Gfn>) {
        ((1000..1256).rev().collect(), (1256..1512).rev().collect())
    }

    #[test]
    fn strategies_make_the_host_calls_their_peers_make() {
        let (a, b) = two_buffers();
        let (mut g, rec, _, _) = setup(Strategy::PerPage);
        g.add_buffer(&a);
        g.add_buffer(&b);
        assert_eq!(
            rec.zaps.lock().unwrap().len(),
            512,
            "per-page: one zap per page"
        );

        let (mut g, rec, _, _) = setup(Strategy::PerBuffer);
        g.add_buffer(&a);
        g.add_buffer(&b);
        assert_eq!(
            *rec.zaps.lock().unwrap(),
            vec![GfnRange::new(1000, 256), GfnRange::new(1256, 256)]
        );

        let (mut g, rec, _, _) = setup(Strategy::Gather);
        g.add_buffer(&a);
        g.add_buffer(&b);
        assert!(
            rec.zaps.lock().unwrap().is_empty(),
            "gather waits for the window"
        );
        let report = g.flush().unwrap();
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
        let (mut g, rec, _, _) = setup(Strategy::Gather);
        g.set_config(GatherConfig {
            max_batch_pages: 300,
            window: Duration::from_millis(5),
            ..*g.config()
        });
        let (a, b) = two_buffers();
        assert!(g.add_buffer(&a).flushed.is_empty());
        assert_eq!(
            g.add_buffer(&b).flushed.len(),
            1,
            "512 >= 300 pages: flushed"
        );
        g.add_buffer(&[5]);
        assert!(g.poll().is_none());
        std::thread::sleep(Duration::from_millis(6));
        assert_eq!(g.poll().map(|r| r.pages), Some(1));
        assert_eq!(rec.releases.lock().unwrap().len(), 2);
    }

    #[test]
    fn invalid_frames_are_reported_never_dropped() {
        let (mut g, rec, _, _) = setup(Strategy::PerBuffer);
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
        let (mut g, rec, _, _) = setup(Strategy::Gather);
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
        fn name(&self) -> &'static str {
            "failing"
        }
        fn zap_keeps_contents(&self) -> bool {
            true
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
        let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
        let mut g = Stage2Gather::new(
            GatherConfig::new(Strategy::PerPage),
            map.clone(),
            Arc::new(Failing),
            Readers::new(),
        );
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

    #[test]
    fn release_waits_for_a_reader_holding_a_reference_for_every_strategy() {
        for strategy in [Strategy::PerPage, Strategy::PerBuffer, Strategy::Gather] {
            let (mut g, _, readers, log) = setup(strategy);
            let worker = readers.register("device-worker", None);
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let log2 = log.clone();
            let t = std::thread::spawn(move || {
                let guard = worker.read();
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                log2.record(u64::MAX, Phase::External("reference dropped"));
                drop(guard);
            });
            held_rx.recv().unwrap();
            g.add_buffer(&[20, 21, 23]);
            g.flush();
            t.join().unwrap();

            let events = log.events();
            let dropped = events
                .iter()
                .position(|e| e.1 == Phase::External("reference dropped"))
                .unwrap();
            let first_release = events
                .iter()
                .position(|e| matches!(e.1, Phase::Release(_)))
                .unwrap();
            assert!(
                dropped < first_release,
                "{strategy}: released while a reader held a reference: {events:?}"
            );
            // Per batch: every zap < invalidate < every release.
            let batches: std::collections::BTreeSet<u64> = events
                .iter()
                .map(|e| e.0)
                .filter(|&b| b != u64::MAX)
                .collect();
            for b in batches {
                let idx = |pred: &dyn Fn(&Phase) -> bool| -> Vec<usize> {
                    events
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.0 == b && pred(&e.1))
                        .map(|(i, _)| i)
                        .collect()
                };
                let zaps = idx(&|p| matches!(p, Phase::Zap(_)));
                let inv = idx(&|p| *p == Phase::Invalidated);
                let rel = idx(&|p| matches!(p, Phase::Release(_)));
                assert_eq!(inv.len(), 1);
                assert!(
                    zaps.iter().all(|&z| z < inv[0]),
                    "{strategy}: zap after invalidate"
                );
                assert!(
                    rel.iter().all(|&r| r > inv[0]),
                    "{strategy}: release before invalidate"
                );
                assert_eq!(zaps.len(), rel.len());
            }
        }
    }

    mod spans {
        use super::Strategy as Reclaim;
        use super::*;
        use crate::backend::OwnershipChecked;
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
                let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
                let rec = Arc::new(Recording { destroys, ..Recording::default() });
                let checked = Arc::new(OwnershipChecked::new(rec.clone(), map.clone()));
                let mut g = Stage2Gather::new(
                    GatherConfig { zap_span_gap: gap, ..GatherConfig::new(Reclaim::Gather) },
                    map.clone(),
                    checked,
                    Readers::new(),
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

    mod blocks {
        use super::Strategy as Reclaim;
        use super::*;
        use crate::backend::OwnershipChecked;
        use proptest::prelude::*;
        use proptest::strategy::Strategy;
        use std::collections::BTreeSet;

        const BLOCKS: u64 = 4;

        #[derive(Clone, Debug)]
        enum Op {
            /// A run of frames inside the first BLOCKS blocks, shuffled into buffers of 256.
            Inflate {
                start: u64,
                len: u64,
            },
            Deflate {
                start: u64,
                len: u64,
            },
            /// A free page report of one 2 MiB block (what Linux reports), or of a run.
            Report {
                start: u64,
                len: u64,
            },
            Flush,
        }

        fn run() -> impl Strategy<Value = (u64, u64)> {
            (0..BLOCKS * BLOCK_FRAMES, 1..=BLOCK_FRAMES)
                .prop_map(|(s, l)| (s, l.min(BLOCKS * BLOCK_FRAMES - s)))
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                5 => run().prop_map(|(start, len)| Op::Inflate { start, len }),
                2 => run().prop_map(|(start, len)| Op::Deflate { start, len }),
                1 => (0..BLOCKS).prop_map(|b| Op::Report { start: b * BLOCK_FRAMES, len: BLOCK_FRAMES }),
                1 => run().prop_map(|(start, len)| Op::Report { start, len }),
                3 => Just(Op::Flush),
            ]
        }

        fn setup(can_split: bool) -> (Stage2Gather, Arc<Recording>, Arc<Stage2Map>) {
            let map = Arc::new(Stage2Map::new(Layout::new(64 << 20).unwrap()));
            let rec = Arc::new(Recording {
                block: Some(can_split),
                ..Recording::default()
            });
            let checked = Arc::new(OwnershipChecked::new(rec.clone(), map.clone()));
            let g = Stage2Gather::new(
                GatherConfig::new(Reclaim::Gather),
                map.clone(),
                checked,
                Readers::new(),
            );
            (g, rec, map)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

            /// Across any interleaving of inflate, deflate and report buffers, a 2 MiB block
            /// is released exactly when all 512 of its frames are in the balloon (at the flush
            /// after its last one arrived), and only whole; a partial block is never released
            /// and its frames wait as Partial; the partial-block count is right.
            #[test]
            fn a_block_is_released_exactly_when_its_last_frame_arrives(
                ops in prop::collection::vec(op(), 1..40),
                can_split in any::<bool>(),
            ) {
                let (mut g, rec, map) = setup(can_split);
                let mut balloon: BTreeSet<u64> = BTreeSet::new();
                for op in ops {
                    match op {
                        Op::Inflate { start, len } => {
                            let frames: Vec<u64> = (start..start + len).rev().collect();
                            for b in frames.chunks(256) {
                                g.add_buffer(b);
                            }
                            balloon.extend(start..start + len);
                        }
                        Op::Deflate { start, len } => {
                            let frames: Vec<u64> = (start..start + len).collect();
                            g.return_frames(&frames);
                            for f in start..start + len {
                                balloon.remove(&f);
                            }
                        }
                        Op::Report { start, len } => {
                            let frames: Vec<u64> = (start..start + len).filter(|f| !balloon.contains(f)).collect();
                            g.reclaim_and_give_back([frames.as_slice()]);
                        }
                        Op::Flush => {
                            g.flush();
                        }
                    }
                    for r in rec.releases.lock().unwrap().iter() {
                        prop_assert!(r.start % BLOCK_FRAMES == 0 && r.count % BLOCK_FRAMES == 0, "partial release {:?}", r);
                    }
                    let pending = g.pending_pages() > 0;
                    let mut partial_blocks = 0;
                    for b in 0..BLOCKS {
                        let frames = b * BLOCK_FRAMES..(b + 1) * BLOCK_FRAMES;
                        let states: Vec<FrameState> = frames.clone().map(|f| map.state(f).unwrap()).collect();
                        let complete = frames.clone().all(|f| balloon.contains(&f));
                        let released = states.iter().filter(|s| **s == FrameState::Released).count() as u64;
                        if complete && !pending {
                            prop_assert_eq!(released, BLOCK_FRAMES, "complete block {} not released: {:?}", b, states);
                        }
                        if !complete {
                            prop_assert_eq!(released, 0, "incomplete block {} released in part", b);
                        }
                        for (f, s) in frames.zip(&states) {
                            let want_in = balloon.contains(&f);
                            prop_assert_eq!(s.owner() == crate::Owner::Balloon, want_in, "frame {} is {:?}", f, s);
                            if want_in && !complete {
                                prop_assert!(matches!(s, FrameState::Partial | FrameState::Gathered), "frame {} of incomplete block is {:?}", f, s);
                            }
                        }
                        partial_blocks += u64::from(states.contains(&FrameState::Partial));
                    }
                    prop_assert_eq!(g.stats().partial_blocks, partial_blocks);
                }
            }
        }

        #[test]
        fn a_block_goes_when_its_last_frame_comes_and_is_backed_again_when_one_goes_back() {
            let (mut g, rec, map) = setup(false);
            let block: Vec<u64> = (512..1024).collect();
            g.add_buffer(&block[..300]);
            g.flush();
            assert!(rec.releases.lock().unwrap().is_empty());
            assert_eq!(
                (map.count(FrameState::Partial), g.stats().partial_blocks),
                (300, 1)
            );
            g.add_buffer(&block[300..]);
            g.flush();
            assert_eq!(*rec.releases.lock().unwrap(), vec![GfnRange::new(512, 512)]);
            assert_eq!(
                *rec.zaps.lock().unwrap(),
                vec![GfnRange::new(512, 512)],
                "one zap, one release"
            );
            assert_eq!(
                (g.stats().blocks_released, g.stats().partial_blocks),
                (1, 0)
            );
            // One frame back to the guest: the host backs the whole block again when it is
            // touched, so the other 511 wait again, and nothing more is released...
            g.return_frames(&[700]);
            assert_eq!(map.count(FrameState::Partial), 511);
            assert_eq!(map.count(FrameState::Released), 0);
            g.flush();
            assert_eq!(rec.releases.lock().unwrap().len(), 1);
            // ...until the frame is in the balloon again: then the block goes again, whole.
            g.add_buffer(&[700]);
            g.flush();
            assert_eq!(rec.releases.lock().unwrap().len(), 2);
            assert_eq!(map.count(FrameState::Released), 512);
        }

        #[test]
        fn splitting_releases_the_waiting_frames_at_4k_only_where_the_backend_can() {
            for can_split in [true, false] {
                let (mut g, rec, map) = setup(can_split);
                g.add_buffer(&(10..20).collect::<Vec<_>>());
                g.flush();
                assert_eq!(map.count(FrameState::Partial), 10);
                assert!(
                    rec.releases.lock().unwrap().is_empty(),
                    "a partial block is never released"
                );
                let r = g.split_partial_blocks();
                if can_split {
                    assert_eq!(r.map(|r| r.pages), Some(10));
                    assert_eq!(*rec.releases.lock().unwrap(), vec![GfnRange::new(10, 10)]);
                    assert_eq!((g.stats().blocks_split, g.stats().partial_blocks), (1, 0));
                } else {
                    assert!(r.is_none(), "hugetlb pages cannot be freed in part");
                    assert_eq!(map.count(FrameState::Partial), 10);
                }
            }
        }
    }
}
