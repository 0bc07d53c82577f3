//! An ordered record of every phase of every batch and the thread it ran on, for tests that
//! check the order (zap < invalidate < release, a reader's reference dropped before a
//! release) and where the work happens (never on the thread that fed the batch).

use crate::gfn::GfnRange;
use std::sync::Mutex;

/// One step of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Zap(GfnRange),
    Invalidated,
    Release(GfnRange),
    /// A note from outside the protocol (a test marks when a reader dropped its reference,
    /// or when a device acknowledged a buffer).
    External(&'static str),
}

/// One recorded step: the batch (`u64::MAX` for external notes), the phase, and the name of
/// the thread that recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub batch: u64,
    pub phase: Phase,
    pub thread: String,
}

#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
}

impl EventLog {
    pub fn record(&self, batch: u64, phase: Phase) {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        self.events.lock().unwrap().push(Event {
            batch,
            phase,
            thread,
        });
    }

    /// A note from outside the protocol.
    pub fn note(&self, what: &'static str) {
        self.record(u64::MAX, Phase::External(what));
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}
