//! The model as a stage-2 backend: the unchanged `Stage2Gather` drives it through the same
//! `Stage2Backend` trait it uses for KVM. `zap` of a span returns only when every vCPU has
//! taken and acknowledged its one flush (KVM's `madvise` returns after its remote TLB flush);
//! the in-use frames it bridges keep their frame and reverse map, with their dirty bits
//! carried into the host's flags, as on a shared memfd. `release` of a reclaimed range drops
//! the reverse map, writes back and frees.
//!
//! The machine sits behind one shuttle mutex and condition variable, so every step of every
//! thread is a scheduling point that shuttle can interleave.

use crate::machine::{Machine, Op, Order};
use guest_mm::backend::BLOCK_FRAMES;
use guest_mm::{BackendError, Capabilities, GfnRange, Granule, Stage2Backend, ZapSpan};
use shuttle::sync::{Condvar, Mutex, MutexGuard};
use std::sync::Arc;

/// The machine and two wake-ups: acknowledgements (for flush senders) and releases (for
/// vCPUs waiting out a fault). Waking only the threads an event concerns keeps the number of
/// schedules, and so shuttle's exhaustive search, small.
pub struct Shared {
    machine: Mutex<Machine>,
    acked: Condvar,
    released: Condvar,
    written: Condvar,
}

impl Shared {
    pub fn new(m: Machine) -> Arc<Self> {
        Arc::new(Self {
            machine: Mutex::new(m),
            acked: Condvar::new(),
            released: Condvar::new(),
            written: Condvar::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap()
    }

    /// Waits until flush request `id` is acknowledged by every vCPU it was sent to.
    fn wait_acks<'a>(&self, mut m: MutexGuard<'a, Machine>, id: u64) -> MutexGuard<'a, Machine> {
        while !m.acknowledged(id) {
            m = self.acked.wait(m).unwrap();
        }
        m
    }

    /// Waits until no frame of `r` is under writeback (freeing waits for the I/O).
    fn wait_writeback<'a>(
        &self,
        mut m: MutexGuard<'a, Machine>,
        r: GfnRange,
    ) -> MutexGuard<'a, Machine> {
        while m.writeback_pending(r.start, r.count) {
            m = self.written.wait(m).unwrap();
        }
        m
    }
}

pub struct ModelBackend {
    shared: Arc<Shared>,
    granule: Granule,
}

impl ModelBackend {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self::with_granule(shared, Granule::Page)
    }

    /// As a backend that gives memory back in `granule` (2 MiB blocks: huge pages).
    pub fn with_granule(shared: Arc<Shared>, granule: Granule) -> Self {
        Self { shared, granule }
    }

    fn check(&self, m: &Machine, r: GfnRange) -> Result<(), BackendError> {
        if r.count == 0 || r.start.checked_add(r.count).is_none_or(|e| e > m.frames()) {
            return Err(BackendError::OutsideRam {
                start: r.start,
                count: r.count,
            });
        }
        Ok(())
    }
}

impl Stage2Backend for ModelBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "stage2-model",
            granule: self.granule,
            // Like madvise(MADV_DONTNEED) on a shared memfd: bridged frames keep frame and rmap.
            zap_keeps_contents: true,
        }
    }

    fn zap(&self, span: &ZapSpan) -> Result<(), BackendError> {
        let r = span.span;
        let mut m = self.shared.lock();
        self.check(&m, r)?;
        if m.order() == Order::FreeBeforeFlush {
            m = self.shared.wait_writeback(m, r);
        }
        let ranges: Vec<(u64, u64)> = span.ranges.iter().map(|r| (r.start, r.count)).collect();
        let id = m.zap(r.start, r.count, &ranges);
        // The free-before-flush order frees inside zap: waiting vCPUs may go on.
        self.shared.released.notify_all();
        drop(self.shared.wait_acks(m, id));
        Ok(())
    }

    fn release(&self, r: GfnRange) -> Result<(), BackendError> {
        let mut m = self.shared.lock();
        self.check(&m, r)?;
        if let Granule::Block { can_split: false } = self.granule {
            let whole =
                r.start.is_multiple_of(BLOCK_FRAMES) && r.count.is_multiple_of(BLOCK_FRAMES);
            if !whole {
                m.violation_report(format!(
                    "release of gfns {:#x}+{}, part of a 2 MiB block whose huge page cannot be freed in part",
                    r.start, r.count
                ));
            }
        }
        m = self.shared.wait_writeback(m, r);
        m.release(r.start, r.count);
        self.shared.released.notify_all();
        Ok(())
    }
}

/// A vCPU thread: runs its instructions, answering IPIs after each. A fault on a frame being
/// reclaimed exits guest mode until the release; after the last instruction the vCPU leaves
/// guest mode (in the same step, to keep the exhaustive search small).
pub fn vcpu(shared: &Shared, cpu: usize, ops: &[Op]) {
    for (i, &op) in ops.iter().enumerate() {
        let mut m = shared.lock();
        loop {
            if m.execute(cpu, op) {
                let acked = if i + 1 == ops.len() {
                    m.exit_guest(cpu)
                } else {
                    m.service(cpu)
                };
                if acked > 0 {
                    shared.acked.notify_all();
                }
                break;
            }
            m.exit_guest(cpu);
            shared.acked.notify_all();
            m = shared.released.wait(m).unwrap();
            m.enter_guest(cpu);
        }
    }
    if ops.is_empty() {
        shared.lock().exit_guest(cpu);
    }
}

/// Frames one writeback pass handles at most.
const WRITEBACK_BATCH: usize = 16;

/// The host's writeback: `rounds` passes over the guest's dirty frames, each cleaned through
/// its reverse map (folio_mkclean) and written to the backing store. The lock is held for a
/// pass except while waiting for acknowledgements.
pub fn writeback(shared: &Shared, rounds: usize) {
    for _ in 0..rounds {
        let mut m = shared.lock();
        for h in m.writeback_candidates(WRITEBACK_BATCH) {
            let (flush, writing) = m.mkclean(h);
            if let Some(id) = flush {
                m = shared.wait_acks(m, id);
            }
            if writing {
                m.write_back(h);
                shared.written.notify_all();
            }
        }
    }
}
