//! Grace periods over the VMM's own references to guest memory (the "second TLB").
//!
//! Threads that may hold guest addresses (vCPU threads handling exits, device workers) are
//! readers. Each has a sequence number: odd while it may hold references, even while it holds
//! none. A vCPU thread is even while inside KVM_RUN: it holds no VMM reference there.
//!
//! `synchronize` snapshots every reader; it returns once each reader that was odd has moved
//! on (passed a quiescent point). Readers that take longer than the kick threshold are kicked
//! (a callback, e.g. a signal) and waited for, never skipped: releasing memory under a reader
//! would let its write land in a freed page.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type KickFn = Box<dyn Fn(&str) + Send + Sync>;

struct Slot {
    name: String,
    seq: AtomicU64,
    kick: Option<KickFn>,
}

/// The registry of reader threads.
#[derive(Default)]
pub struct Readers {
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// What one grace period did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraceReport {
    /// Readers that were inside a critical section and had to be waited for.
    pub waited_for: u32,
    /// Of those, how many were kicked for being slow.
    pub kicked: u32,
}

impl Readers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a reader, initially quiescent. `kick` is called if it is slow to quiesce.
    pub fn register(self: &Arc<Self>, name: &str, kick: Option<KickFn>) -> Reader {
        let slot = Arc::new(Slot {
            name: name.to_string(),
            seq: AtomicU64::new(0),
            kick,
        });
        self.slots.lock().unwrap().push(slot.clone());
        Reader {
            slot,
            readers: self.clone(),
        }
    }

    /// Waits until every reader that may hold a reference taken before this call has dropped
    /// it. Kicks readers that take longer than `kick_after`.
    pub fn synchronize(&self, kick_after: Duration) -> GraceReport {
        // Order the caller's zap before the snapshot: a reader that enters after this fence
        // cannot have taken a reference from before the zap.
        fence(Ordering::SeqCst);
        let snapshot: Vec<(Arc<Slot>, u64)> = self
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.clone(), s.seq.load(Ordering::SeqCst)))
            .filter(|(_, seq)| seq % 2 == 1)
            .collect();
        let mut report = GraceReport {
            waited_for: snapshot.len() as u32,
            kicked: 0,
        };
        let start = Instant::now();
        for (slot, seq) in snapshot {
            let mut kicked = false;
            let mut spins = 0u32;
            while slot.seq.load(Ordering::SeqCst) == seq {
                if !kicked && start.elapsed() >= kick_after {
                    if let Some(k) = &slot.kick {
                        k(&slot.name);
                    }
                    kicked = true;
                    report.kicked += 1;
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        fence(Ordering::SeqCst);
        report
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One reader thread's handle.
pub struct Reader {
    slot: Arc<Slot>,
    readers: Arc<Readers>,
}

impl Reader {
    /// Marks the start of a section that may hold guest-memory references.
    pub fn enter(&self) {
        let s = self.slot.seq.load(Ordering::Relaxed);
        if s.is_multiple_of(2) {
            self.slot.seq.store(s + 1, Ordering::SeqCst);
        }
    }

    /// A quiescent point: this thread holds no guest-memory references.
    pub fn quiesce(&self) {
        let s = self.slot.seq.load(Ordering::Relaxed);
        if s % 2 == 1 {
            self.slot.seq.store(s + 1, Ordering::SeqCst);
        }
    }

    /// A scoped critical section.
    pub fn read(&self) -> ReadGuard<'_> {
        self.enter();
        ReadGuard { reader: self }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.quiesce();
        self.readers
            .slots
            .lock()
            .unwrap()
            .retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

pub struct ReadGuard<'a> {
    reader: &'a Reader,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.reader.quiesce();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn quiescent_readers_are_not_waited_for() {
        let readers = Readers::new();
        let _a = readers.register("a", None);
        assert_eq!(
            readers.synchronize(Duration::from_millis(1)),
            GraceReport::default()
        );
    }

    #[test]
    fn waits_for_a_reader_inside_a_section_and_kicks_it() {
        let readers = Readers::new();
        let kicked = Arc::new(AtomicBool::new(false));
        let k = kicked.clone();
        let r = readers.register(
            "worker",
            Some(Box::new(move |_| k.store(true, Ordering::SeqCst))),
        );
        let released = Arc::new(AtomicBool::new(false));
        let rel = released.clone();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _g = r.read();
            entered_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            rel.store(true, Ordering::SeqCst);
        });
        entered_rx.recv().unwrap();
        let report = readers.synchronize(Duration::from_millis(5));
        assert!(
            released.load(Ordering::SeqCst),
            "synchronize returned while the reader was inside"
        );
        assert_eq!(report.waited_for, 1);
        assert_eq!(report.kicked, 1);
        assert!(kicked.load(Ordering::SeqCst));
        t.join().unwrap();
    }
}
