//! The stage-2 gather: the batcher, the protocol and the metrics put together.
//!
//! Frames arrive in small buffers (`add_buffer`); the batcher records them at once, so the
//! device can acknowledge the buffer before any host call. A batch closes when it holds
//! `batch_pages` frames or `batch_window_ms` after its first frame; the protocol then runs it
//! (zap → invalidate → release).
//!
//! Where the protocol runs:
//! - on a worker thread of its own (`spawn_worker`, what the VMM does): no thread that feeds
//!   frames or acknowledges buffers ever waits for a host call or a grace period, and no lock
//!   a vCPU exit needs is held across one (the worker holds only its batch);
//! - inline, on the thread that closes the batch (tests, fuzzing, the stage-2 model), where
//!   every step is deterministic.
//!
//! Either way one batch runs at a time, and a frame in a batch in flight cannot be given
//! back: `return_frames` waits for that batch to end, then gives the frame back Released.
//! The per-page and per-buffer strategies (the peers' behaviour, for comparison) release a
//! buffer's frames before `add_buffer` returns.

use super::batcher::{Batcher, BufferOutcome, ReclaimOutcome, ReturnOutcome, Taken};
use super::config::{ConfigError, ReclaimConfig};
use super::events::EventLog;
use super::metrics::{BatchReport, KvmCounters, Metrics, ReclaimStats};
use super::protocol::{self, Pipeline};
use crate::backend::{Capabilities, Stage2Backend};
use crate::gfn::{Gfn, GfnRange};
use crate::grace::Readers;
use crate::stage2_map::{FrameState, Stage2Map};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

/// What callers and the worker share, under the front lock.
struct Front {
    batcher: Batcher,
    config: ReclaimConfig,
    /// Flush requests: each asks that every frame accepted before it be through the protocol.
    flush_asked: u64,
    flush_done: u64,
    /// Requests to release the frames waiting in partial blocks at 4 KiB.
    split_asked: u64,
    split_done: u64,
    /// Batches ended; a caller waiting for frames in flight watches this.
    batches_done: u64,
    stop: bool,
    /// The worker ended by a panic: nobody will end the batches in flight.
    worker_died: bool,
}

/// What a batch runs against; held for the whole batch, so one batch runs at a time.
struct Runner {
    backend: Arc<dyn Stage2Backend>,
    readers: Arc<Readers>,
    log: Option<Arc<EventLog>>,
}

struct Shared {
    front: Mutex<Front>,
    /// Signalled when work arrives, a batch ends, or a request is served.
    changed: Condvar,
    runner: Mutex<Runner>,
    metrics: Mutex<Metrics>,
    counters: RwLock<Option<Arc<dyn KvmCounters>>>,
    caps: Capabilities,
    map: Arc<Stage2Map>,
}

pub struct Stage2Gather {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn snapshot(&self) -> super::metrics::CounterSnapshot {
        let c = self.counters.read().unwrap_or_else(|e| e.into_inner());
        c.as_ref().map(|c| c.snapshot()).unwrap_or_default()
    }

    /// Waits until a batch ends or a request is served. Only a live worker (or a caller
    /// running the protocol itself) can end a batch in flight: a dead one is a panic here,
    /// not a wait forever.
    fn wait_for_change<'a>(&'a self, f: MutexGuard<'a, Front>) -> MutexGuard<'a, Front> {
        assert!(
            !f.worker_died,
            "the reclaim worker died; batches in flight cannot end"
        );
        self.changed.wait(f).unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the pending batch (and, if asked, the partial-block split), runs it through the
    /// protocol without the front lock, and marks the requests seen at the start served.
    fn serve<'a>(&'a self, mut f: MutexGuard<'a, Front>) -> MutexGuard<'a, Front> {
        let (flush_ticket, split_ticket) = (f.flush_asked, f.split_asked);
        let config = f.config;
        let mut taken: Vec<Taken> = f.batcher.take(&config).into_iter().collect();
        if split_ticket > f.split_done {
            taken.extend(f.batcher.take_partial(&config));
        }
        drop(f);
        let mut ended: Vec<Vec<GfnRange>> = Vec::new();
        if !taken.is_empty() {
            let runner = lock(&self.runner);
            let counters = self
                .counters
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let pipeline = Pipeline {
                map: &self.map,
                backend: runner.backend.as_ref(),
                readers: &runner.readers,
                counters: counters.as_deref(),
                log: runner.log.as_deref(),
            };
            for t in taken {
                let ran = protocol::run(t.batch, &pipeline);
                lock(&self.metrics).record(ran);
                ended.push(t.ranges);
            }
        }
        let mut f = lock(&self.front);
        for ranges in &ended {
            f.batcher.finished(ranges);
        }
        f.batches_done += ended.len() as u64;
        f.flush_done = f.flush_done.max(flush_ticket);
        f.split_done = f.split_done.max(split_ticket);
        self.changed.notify_all();
        f
    }

    /// The worker: serves whenever the batch is full, its window has passed, or a request
    /// is waiting; on stop, serves what is pending and ends.
    fn work(&self) {
        struct DiesLoudly<'a>(&'a Shared);
        impl Drop for DiesLoudly<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    lock(&self.0.front).worker_died = true;
                    self.0.changed.notify_all();
                }
            }
        }
        let _guard = DiesLoudly(self);
        let mut f = lock(&self.front);
        loop {
            let now = Instant::now();
            let deadline = f.batcher.deadline(f.config.window());
            let pending = f.batcher.pending_pages();
            let due = pending >= f.config.batch_pages
                || deadline.is_some_and(|d| now >= d)
                || f.flush_asked > f.flush_done
                || f.split_asked > f.split_done
                || (f.stop && pending > 0);
            if due {
                f = self.serve(f);
            } else if f.stop {
                return;
            } else {
                f = match deadline {
                    Some(d) => {
                        self.changed
                            .wait_timeout(f, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => self.changed.wait(f).unwrap_or_else(|e| e.into_inner()),
                };
            }
        }
    }
}

impl Stage2Gather {
    /// A gather that runs the protocol inline; `spawn_worker` moves it to a thread.
    pub fn new(
        config: ReclaimConfig,
        map: Arc<Stage2Map>,
        backend: Arc<dyn Stage2Backend>,
        readers: Arc<Readers>,
    ) -> Result<Self, ConfigError> {
        let caps = backend.capabilities();
        config.validate(caps.granule)?;
        let front = Front {
            batcher: Batcher::new(map.clone(), caps),
            config,
            flush_asked: 0,
            flush_done: 0,
            split_asked: 0,
            split_done: 0,
            batches_done: 0,
            stop: false,
            worker_died: false,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                front: Mutex::new(front),
                changed: Condvar::new(),
                runner: Mutex::new(Runner {
                    backend,
                    readers,
                    log: None,
                }),
                metrics: Mutex::new(Metrics::default()),
                counters: RwLock::new(None),
                caps,
                map,
            }),
            worker: None,
        })
    }

    /// Runs the protocol on a thread of its own, named `reclaim`, from now on.
    pub fn spawn_worker(mut self) -> std::io::Result<Self> {
        let shared = self.shared.clone();
        self.worker = Some(
            std::thread::Builder::new()
                .name("reclaim".into())
                .spawn(move || shared.work())?,
        );
        Ok(self)
    }

    /// Records every phase of every batch in `log` (tests).
    pub fn with_event_log(self, log: Arc<EventLog>) -> Self {
        self.set_event_log(log);
        self
    }

    /// Records every phase of every batch from now on in `log` (tests).
    pub fn set_event_log(&self, log: Arc<EventLog>) {
        lock(&self.shared.runner).log = Some(log);
    }

    /// KVM's counters: each batch then reports the flush requests it caused, each vCPU's TLB
    /// flushes and the refaults after it.
    pub fn set_counters(&self, c: Arc<dyn KvmCounters>) {
        *self
            .shared
            .counters
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    pub fn capabilities(&self) -> Capabilities {
        self.shared.caps
    }

    pub fn map(&self) -> &Arc<Stage2Map> {
        &self.shared.map
    }

    pub fn config(&self) -> ReclaimConfig {
        lock(&self.shared.front).config
    }

    /// Changes the settings (validated); the pending batch keeps going under the new ones.
    pub fn set_config(&self, config: ReclaimConfig) -> Result<(), ConfigError> {
        config.validate(self.shared.caps.granule)?;
        lock(&self.shared.front).config = config;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Changes the fields `changes` names (a JSON object with `ReclaimConfig`'s field names).
    pub fn patch_config(
        &self,
        changes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<ReclaimConfig, ConfigError> {
        let mut f = lock(&self.shared.front);
        let c = f.config.patched(changes, self.shared.caps.granule)?;
        f.config = c;
        self.shared.changed.notify_all();
        Ok(c)
    }

    pub fn pending_pages(&self) -> u64 {
        lock(&self.shared.front).batcher.pending_pages()
    }

    /// Totals, the newest batches and histograms, as of now.
    pub fn stats(&self) -> ReclaimStats {
        let counts = lock(&self.shared.front).batcher.counts();
        let now = self.shared.snapshot();
        lock(&self.shared.metrics).report(&now, counts)
    }

    /// Offers one buffer of frames for reclaim. Each frame is checked (RAM, not already in
    /// the balloon, not device memory); refused frames come back with their reason. Returns
    /// once the frames are recorded; with the per-page and per-buffer strategies, once they
    /// are released.
    pub fn add_buffer(&self, gfns: &[Gfn]) -> BufferOutcome {
        let mut f = lock(&self.shared.front);
        let opened = f.batcher.pending_pages() == 0;
        let mut out = f.batcher.accept(gfns);
        if f.config.strategy.releases_before_ack() {
            drop(f);
            out.flushed = self.flush();
        } else if f.batcher.pending_pages() < f.config.batch_pages {
            // The worker sleeps until the next deadline; a new batch has a new one. (Only
            // then: waking it for every buffer would cost a context switch per buffer.)
            if opened && !out.accepted.is_empty() && self.worker.is_some() {
                self.shared.changed.notify_all();
            }
        } else if self.worker.is_some() {
            // Full: the worker takes it now.
            self.shared.changed.notify_all();
        } else {
            let first = f.batcher.next_id();
            drop(self.shared.serve(f));
            out.flushed = self.batches_since(first);
        }
        out
    }

    fn batches_since(&self, first: u64) -> Vec<BatchReport> {
        let now = self.shared.snapshot();
        lock(&self.shared.metrics).batches_since(first, &now)
    }

    /// Waits until the requests up to `ticket` (of `asked`/`done`) are served, serving them
    /// on this thread when there is no worker.
    fn wait_served<'a>(
        &'a self,
        mut f: MutexGuard<'a, Front>,
        served: impl Fn(&Front) -> bool,
    ) -> MutexGuard<'a, Front> {
        if self.worker.is_none() {
            f = self.shared.serve(f);
        }
        self.shared.changed.notify_all();
        while !served(&f) {
            f = self.shared.wait_for_change(f);
        }
        f
    }

    /// Runs every frame accepted so far through zap → invalidate → release and returns once
    /// they are through, with the reports of the batches that ran.
    pub fn flush(&self) -> Vec<BatchReport> {
        let mut f = lock(&self.shared.front);
        let first = f.batcher.next_id();
        f.flush_asked += 1;
        let ticket = f.flush_asked;
        drop(self.wait_served(f, |f| f.flush_done >= ticket));
        self.batches_since(first)
    }

    /// Inline gathers: closes the pending batch if its window has passed (a worker does this
    /// by itself).
    pub fn poll(&self) -> Vec<BatchReport> {
        let f = lock(&self.shared.front);
        if self.worker.is_some() {
            return Vec::new();
        }
        match f.batcher.deadline(f.config.window()) {
            Some(d) if Instant::now() >= d => {
                let first = f.batcher.next_id();
                drop(self.shared.serve(f));
                self.batches_since(first)
            }
            _ => Vec::new(),
        }
    }

    /// Block backings that can split (shmem THP): flushes, then releases every frame waiting
    /// in a partial block at 4 KiB; the kernel splits each huge page it punches part of.
    /// Returns the split batch's report, if there was one.
    pub fn split_partial_blocks(&self) -> Option<BatchReport> {
        self.flush();
        let mut f = lock(&self.shared.front);
        let first = f.batcher.next_id();
        f.split_asked += 1;
        let ticket = f.split_asked;
        drop(self.wait_served(f, |f| f.split_done >= ticket));
        self.batches_since(first).pop()
    }

    /// The guest takes frames back (a deflate). A frame still pending leaves the batch and is
    /// never zapped or freed; a released frame becomes usable again and reads as zeros; a
    /// frame in a batch in flight is given back once that batch has ended (this waits). A
    /// frame that is not in the balloon is refused with its reason.
    pub fn return_frames(&self, gfns: &[Gfn]) -> ReturnOutcome {
        self.give_back(gfns, None)
    }

    /// `return_frames`, adding the frames whose host pages had been freed to `freed`.
    fn give_back(&self, gfns: &[Gfn], mut freed: Option<&mut Vec<Gfn>>) -> ReturnOutcome {
        let mut total = ReturnOutcome::default();
        let mut todo = gfns.to_vec();
        let mut f = lock(&self.shared.front);
        loop {
            let seen = f.batches_done;
            let (out, in_flight) = f.batcher.give_back(&todo, freed.as_deref_mut());
            total.ungathered += out.ungathered;
            total.repopulated += out.repopulated;
            total.retained += out.retained;
            total.invalid.extend(out.invalid);
            if in_flight.is_empty() {
                return total;
            }
            todo = in_flight;
            while f.batches_done == seen {
                f = self.shared.wait_for_change(f);
            }
        }
    }

    /// Reclaims frames the guest keeps (a free page report of its own free frames, or the
    /// reclaim probe): the buffers are gathered and flushed through the protocol at once,
    /// and exactly the frames accepted are given back; the outcome says which of them were
    /// freed (on a 2 MiB backing, frames of a block not all in the balloon are not). Frames
    /// refused (already in the balloon, device-mapped, not RAM) stay where they were.
    pub fn reclaim_and_give_back<'a>(
        &self,
        buffers: impl IntoIterator<Item = &'a [Gfn]>,
    ) -> ReclaimOutcome {
        let mut out = ReclaimOutcome::default();
        {
            let mut f = lock(&self.shared.front);
            for b in buffers {
                let o = f.batcher.accept(b);
                out.accepted.extend(o.accepted);
                out.invalid.extend(o.invalid);
            }
        }
        out.flushed = self.flush();
        let back = self.give_back(&out.accepted, Some(&mut out.freed));
        out.freed.sort_unstable();
        if let Some(first) = back.invalid.first() {
            // Only a guest that deflated frames it had just reported, while the report was
            // being reclaimed, gets here: those frames are already its own again.
            tracing::warn!(
                "{} reported frame(s) were given back by the guest before the report ended, first: {first}",
                back.invalid.len()
            );
        }
        out
    }

    /// Empties the balloon (a device reset): every frame it holds is given back to the
    /// guest, pending ones before they are zapped. A full scan of the map.
    pub fn return_all(&self) -> ReturnOutcome {
        let frames = self.shared.map.frames_in(&FrameState::BALLOON);
        self.return_frames(&frames)
    }
}

impl Drop for Stage2Gather {
    fn drop(&mut self) {
        // Frames the guest gave away are not left half-reclaimed.
        match self.worker.take() {
            Some(w) => {
                lock(&self.shared.front).stop = true;
                self.shared.changed.notify_all();
                let _ = w.join();
            }
            None if !std::thread::panicking() => drop(self.shared.serve(lock(&self.shared.front))),
            None => {}
        }
    }
}
