//! Step 1 of reclaim, the gather proper: frames offered by the guest are checked and recorded
//! (Gathered in the stage-2 map), wait in the pending batch, and are taken as one planned
//! batch (Batched) when the batch closes. Frames given back leave the pending batch before
//! they are ever zapped; a frame in a batch already taken is refused as in flight until that
//! batch ends.

use super::config::ReclaimConfig;
use super::granularity::{self, Granularity};
use super::metrics::{BatchReport, FrameCounts};
use super::plan;
use super::protocol::Batch;
use crate::backend::Capabilities;
use crate::gfn::{FrameError, Gfn, GfnRange};
use crate::stage2_map::{FrameState, GivenBack, Stage2Map};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What happened to one buffer of frames offered for reclaim.
#[derive(Debug, Default)]
pub struct BufferOutcome {
    /// The frames now in the balloon, in the buffer's order.
    pub accepted: Vec<Gfn>,
    /// The frames refused, each with its reason; they stay with their owner.
    pub invalid: Vec<FrameError>,
    /// Batches that ran before the call returned (per-page and per-buffer strategies, a full
    /// batch on an inline gather, a free page report).
    pub flushed: Vec<BatchReport>,
}

/// What reclaiming frames the guest keeps did (a free page report, the reclaim probe:
/// `Stage2Gather::reclaim_and_give_back`).
#[derive(Debug, Default)]
pub struct ReclaimOutcome {
    /// The frames taken (all of them the guest's again on return), in the buffers' order.
    pub accepted: Vec<Gfn>,
    /// Of those, the frames whose host pages were freed (they read as zeros), ascending. The
    /// others went back with their contents: on a 2 MiB backing, frames of a block not all
    /// in the balloon wait and are never freed; elsewhere, frames whose host call failed.
    pub freed: Vec<Gfn>,
    /// The frames refused, each with its reason; they stay with their owner.
    pub invalid: Vec<FrameError>,
    /// The batches that ran.
    pub flushed: Vec<BatchReport>,
}

/// What happened to frames given back to the guest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReturnOutcome {
    /// Frames taken out of the pending batch before they were zapped.
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

/// A batch taken for the protocol, with the ranges it will release.
pub struct Taken {
    pub batch: Batch,
    pub ranges: Vec<GfnRange>,
}

pub struct Batcher {
    map: Arc<Stage2Map>,
    caps: Capabilities,
    granularity: Box<dyn Granularity>,
    pending: Vec<Gfn>,
    pending_since: Option<Instant>,
    /// The ranges of the batches taken and not yet `finished`, sorted: their frames are in
    /// flight until then, Released ones included, so that a give-back never comes between
    /// the release and the block bookkeeping of `finished`.
    in_flight: Vec<GfnRange>,
    next_id: u64,
    gathered: u64,
    returned: u64,
    invalid: u64,
}

impl Batcher {
    pub fn new(map: Arc<Stage2Map>, caps: Capabilities) -> Self {
        let granularity = granularity::for_granule(caps.granule, map.layout());
        Self {
            map,
            caps,
            granularity,
            pending: Vec::new(),
            pending_since: None,
            in_flight: Vec::new(),
            next_id: 0,
            gathered: 0,
            returned: 0,
            invalid: 0,
        }
    }

    pub fn map(&self) -> &Arc<Stage2Map> {
        &self.map
    }

    /// Checks each frame (RAM, not already in the balloon, not device memory) and records
    /// the accepted ones in the pending batch.
    pub fn accept(&mut self, gfns: &[Gfn]) -> BufferOutcome {
        let mut out = BufferOutcome::default();
        for &g in gfns {
            match self.map.gather(g) {
                Ok(()) => {
                    self.pending.push(g);
                    self.granularity.accepted(g);
                    out.accepted.push(g);
                }
                Err(e) => out.invalid.push(e),
            }
        }
        self.gathered += out.accepted.len() as u64;
        self.invalid += out.invalid.len() as u64;
        if !out.accepted.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        out
    }

    pub fn pending_pages(&self) -> u64 {
        self.pending.len() as u64
    }

    /// The id the next batch taken will have.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// When the pending batch closes by its window, if there is one.
    pub fn deadline(&self, window: Duration) -> Option<Instant> {
        self.pending_since.map(|t| t + window)
    }

    /// Takes every pending frame that may go now as one planned batch.
    pub fn take(&mut self, config: &ReclaimConfig) -> Option<Taken> {
        let first = self.pending_since.take()?;
        let pending = std::mem::take(&mut self.pending);
        let frames = self.granularity.ready(&self.map, pending);
        self.plan(frames, config, first)
    }

    /// Takes the frames waiting in partial 2 MiB blocks as one batch released at 4 KiB, where
    /// the backend can split huge pages.
    pub fn take_partial(&mut self, config: &ReclaimConfig) -> Option<Taken> {
        let frames = self.granularity.take_partial(&self.map)?;
        self.plan(frames, config, Instant::now())
    }

    fn plan(
        &mut self,
        mut frames: Vec<Gfn>,
        config: &ReclaimConfig,
        first_frame_at: Instant,
    ) -> Option<Taken> {
        if frames.is_empty() {
            return None;
        }
        let unit = self.granularity.unit();
        let p = plan::plan(&mut frames, config, &self.caps, unit, &self.map);
        for r in &p.ranges {
            for g in r.iter() {
                self.map.mark_batched(g);
            }
        }
        self.in_flight.extend_from_slice(&p.ranges);
        self.in_flight.sort_unstable_by_key(|r| r.start);
        let id = self.next_id;
        self.next_id += 1;
        let wait_us = first_frame_at.elapsed().as_micros() as u64;
        Some(Taken {
            batch: Batch::new(id, p.spans, wait_us),
            ranges: p.ranges,
        })
    }

    /// A taken batch ended (its frames are Released, or Retained where a call failed).
    pub fn finished(&mut self, ranges: &[GfnRange]) {
        self.granularity.released(&self.map, ranges);
        // Batches never share a frame, so a range's start names it.
        let mut done: Vec<Gfn> = ranges.iter().map(|r| r.start).collect();
        done.sort_unstable();
        self.in_flight
            .retain(|r| done.binary_search(&r.start).is_err());
    }

    /// Whether `g` is in a batch taken and not yet finished.
    fn in_flight(&self, g: Gfn) -> bool {
        let i = self.in_flight.partition_point(|r| r.start <= g);
        i > 0 && self.in_flight[i - 1].contains(g)
    }

    /// The guest takes frames back (a deflate, the end of a report, a reset). A pending frame
    /// leaves the batch and is never zapped or freed; a released frame reads as zeros when
    /// touched. Frames in a batch in flight (taken and not yet `finished`, whatever their
    /// state) are returned in the second list: give them back once that batch has ended.
    /// With `freed`, the frames given back whose host pages had been freed are added to it:
    /// those Released when the call began (giving back one frame of a block that was a hole
    /// makes the others Partial, held again, but their pages had been freed all the same).
    pub fn give_back(
        &mut self,
        gfns: &[Gfn],
        mut freed: Option<&mut Vec<Gfn>>,
    ) -> (ReturnOutcome, Vec<Gfn>) {
        let mut out = ReturnOutcome::default();
        let mut in_flight = Vec::new();
        let mut ungathered = Vec::new();
        let was_released: Vec<bool> = match freed {
            Some(_) => gfns
                .iter()
                .map(|&g| self.map.state(g) == Ok(FrameState::Released))
                .collect(),
            None => Vec::new(),
        };
        for (i, &g) in gfns.iter().enumerate() {
            if self.in_flight(g) {
                in_flight.push(g);
                continue;
            }
            let was = self.map.state(g);
            match self.map.give_back(g) {
                Ok(how) => {
                    if let Ok(was) = was {
                        self.granularity.returned(&self.map, g, was, how);
                    }
                    if let (Some(f), Some(true)) = (freed.as_deref_mut(), was_released.get(i)) {
                        f.push(g);
                    }
                    match how {
                        GivenBack::Ungathered => {
                            ungathered.push(g);
                            out.ungathered += 1;
                        }
                        GivenBack::Repopulated => out.repopulated += 1,
                        GivenBack::Retained => out.retained += 1,
                    }
                }
                Err(FrameError::InFlight(g)) => in_flight.push(g),
                Err(e) => out.invalid.push(e),
            }
        }
        if !ungathered.is_empty() {
            ungathered.sort_unstable();
            self.pending
                .retain(|g| ungathered.binary_search(g).is_err());
            if self.pending.is_empty() {
                self.pending_since = None;
            }
        }
        self.returned += out.given_back();
        self.invalid += out.invalid.len() as u64;
        (out, in_flight)
    }

    pub fn counts(&self) -> FrameCounts {
        let b = self.granularity.counts();
        FrameCounts {
            pages_gathered: self.gathered,
            pages_returned: self.returned,
            invalid_frames: self.invalid,
            partial_blocks: b.partial,
            blocks_released: b.released,
            blocks_split: b.split,
        }
    }
}
