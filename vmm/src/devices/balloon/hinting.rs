//! Free page hinting (virtio 1.2 §5.5.6.7, VIRTIO_BALLOON_F_FREE_PAGE_HINT): the command-id
//! handshake and which hinted ranges a run may reclaim.
//!
//! The host starts a run by writing a new command id (2 or more) to the configuration; the
//! driver answers with a 4-byte device-readable buffer holding that id, then hands over free
//! ranges in device-writable buffers, then sends STOP (0). The host ends the run with DONE (1),
//! after which the driver frees the hinted pages back to its allocator. Ranges sent under
//! an id other than the current run's, or after the host said DONE or STOP, are ignored.
//!
//! Hinted ranges go through the gather like free page reports (zap, invalidate, release,
//! then the frames are the guest's again) and are released before their buffer is
//! returned, on the notifying vCPU's exit: Linux's driver puts a hinted block on its list
//! (where its shrinker may hand it back to the guest's allocator at any time) only after the
//! kick returns, so a block released inside the kick is never one the guest could be using.
//! DONE is written only once no hinted buffer is being reclaimed.

pub use abi::virtio::balloon::{HINT_CMD_ID_DONE as CMD_ID_DONE, HINT_CMD_ID_STOP as CMD_ID_STOP};
use serde::{Deserialize, Serialize};
/// The first id of a run (0 and 1 are reserved).
const FIRST_RUN_ID: u32 = 2;

/// `GET /balloon/hinting/status`, as Firecracker answers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStatus {
    /// The last command the host issued (a run id, DONE or STOP).
    pub host_cmd: u32,
    /// The last command id the driver sent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// One entry of a free page hint buffer, as the driver laid it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintEntry {
    /// A device-readable 4-byte command id.
    Cmd(u32),
    /// A device-writable free range: first frame and frame count (validated: in RAM).
    Range { first: u64, pages: u64 },
}

/// The hinting state of one device.
#[derive(Debug, Default)]
pub struct Hinting {
    host_cmd: u32,
    last_run_id: u32,
    guest_cmd: Option<u32>,
    acknowledge_on_stop: bool,
    /// Hint buffers taken and not yet completed (their frames are being reclaimed).
    in_flight: usize,
    /// DONE is owed (the driver sent STOP with acknowledge_on_stop, or the API stopped the
    /// run) and is written once `in_flight` is 0.
    done_owed: bool,
}

/// What a run's hint buffer asks for: the frames to reclaim, and how many were ignored.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub frames: Vec<u64>,
    pub ignored_pages: u64,
}

impl Hinting {
    pub fn status(&self) -> HintingStatus {
        HintingStatus {
            host_cmd: self.host_cmd,
            guest_cmd: self.guest_cmd,
        }
    }

    /// The value of the configuration's `free_page_hint_cmd_id`.
    pub fn host_cmd(&self) -> u32 {
        self.host_cmd
    }

    /// Starts a new run; returns its id (the caller signals the configuration change).
    pub fn start(&mut self, acknowledge_on_stop: bool) -> u32 {
        let mut id = self.last_run_id.wrapping_add(1);
        if id < FIRST_RUN_ID {
            id = FIRST_RUN_ID;
        }
        self.last_run_id = id;
        self.acknowledge_on_stop = acknowledge_on_stop;
        self.done_owed = false;
        self.host_cmd = id;
        id
    }

    /// Ends the run: DONE now if nothing is being reclaimed, else once it is. Returns whether
    /// the configuration changed now.
    pub fn stop(&mut self) -> bool {
        self.done_owed = true;
        self.settle()
    }

    /// Takes one hint buffer's entries in order, as the driver sent them, and returns the
    /// frames to reclaim. The buffer counts as in flight until `complete`.
    pub fn accept(&mut self, entries: &[HintEntry]) -> Accepted {
        self.in_flight += 1;
        let mut out = Accepted::default();
        for e in entries {
            match *e {
                HintEntry::Cmd(cmd) => {
                    self.guest_cmd = Some(cmd);
                    if cmd == CMD_ID_STOP || cmd == CMD_ID_DONE {
                        if cmd == CMD_ID_DONE {
                            tracing::warn!(
                                "balloon: the driver sent DONE as a hint command; taken as STOP"
                            );
                        }
                        if self.acknowledge_on_stop && self.run_active() {
                            self.done_owed = true;
                        }
                    }
                }
                HintEntry::Range { first, pages } => {
                    if self.run_active() && self.guest_cmd == Some(self.host_cmd) {
                        out.frames.extend(first..first + pages);
                    } else {
                        out.ignored_pages += pages;
                    }
                }
            }
        }
        out
    }

    /// A buffer taken by `accept` has been reclaimed and returned. Returns whether the
    /// configuration changed (DONE written).
    pub fn complete(&mut self) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.settle()
    }

    fn run_active(&self) -> bool {
        self.host_cmd >= FIRST_RUN_ID
    }

    fn settle(&mut self) -> bool {
        if self.done_owed && self.in_flight == 0 {
            self.done_owed = false;
            if self.host_cmd != CMD_ID_DONE {
                self.host_cmd = CMD_ID_DONE;
                return true;
            }
        }
        false
    }

    /// A device reset: no run, nothing in flight (buffers taken before it are not completed).
    pub fn reset(&mut self) {
        let last_run_id = self.last_run_id;
        *self = Self {
            last_run_id,
            ..Self::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u64, pages: u64) -> HintEntry {
        HintEntry::Range { first, pages }
    }

    #[test]
    fn run_ids_skip_the_reserved_values_and_wrap() {
        let mut h = Hinting::default();
        assert_eq!(h.start(true), 2);
        assert_eq!(h.start(true), 3);
        h.last_run_id = u32::MAX;
        assert_eq!(h.start(true), 2, "0 and 1 are never run ids");
    }

    #[test]
    fn only_ranges_of_the_current_run_are_reclaimed() {
        let mut h = Hinting::default();
        // Before any run: ignored.
        assert_eq!(
            h.accept(&[HintEntry::Cmd(5), range(10, 2)]).frames,
            Vec::<u64>::new()
        );
        h.complete();
        let stale = h.start(true);
        let id = h.start(true);
        let a = h.accept(&[HintEntry::Cmd(stale), range(10, 2)]);
        assert_eq!(
            (a.frames.len(), a.ignored_pages),
            (0, 2),
            "a stale id's ranges"
        );
        h.complete();
        let a = h.accept(&[HintEntry::Cmd(id), range(10, 2), range(20, 1)]);
        assert_eq!(a.frames, [10, 11, 20]);
        h.complete();
        // A range buffer after the id buffer belongs to the id the driver sent last.
        assert_eq!(h.accept(&[range(30, 1)]).frames, [30]);
        h.complete();
        assert_eq!(
            h.status(),
            HintingStatus {
                host_cmd: id,
                guest_cmd: Some(id)
            }
        );
    }

    #[test]
    fn done_waits_for_every_buffer_in_flight() {
        let mut h = Hinting::default();
        let id = h.start(true);
        let a = h.accept(&[HintEntry::Cmd(id), range(10, 4)]);
        assert_eq!(a.frames.len(), 4);
        // STOP arrives on another vCPU while the first buffer is still being reclaimed.
        h.accept(&[HintEntry::Cmd(CMD_ID_STOP)]);
        assert!(
            !h.complete(),
            "the STOP buffer completes, one still in flight"
        );
        assert_eq!(
            h.host_cmd(),
            id,
            "no DONE while hinted frames are being released"
        );
        assert!(h.complete(), "DONE once the last buffer is through");
        assert_eq!(h.host_cmd(), CMD_ID_DONE);
        // After DONE, ranges are ignored.
        assert_eq!(h.accept(&[range(40, 1)]).ignored_pages, 1);
    }

    #[test]
    fn without_acknowledge_on_stop_only_the_api_says_done() {
        let mut h = Hinting::default();
        let id = h.start(false);
        h.accept(&[HintEntry::Cmd(id), range(1, 1), HintEntry::Cmd(CMD_ID_STOP)]);
        assert!(!h.complete());
        assert_eq!(h.host_cmd(), id);
        assert!(h.stop());
        assert_eq!(h.host_cmd(), CMD_ID_DONE);
        assert!(!h.stop(), "a second stop changes nothing");
    }

    #[test]
    fn a_reset_forgets_the_run_but_not_its_id() {
        let mut h = Hinting::default();
        let id = h.start(true);
        h.accept(&[HintEntry::Cmd(id)]);
        h.reset();
        assert_eq!(h.status(), HintingStatus::default());
        assert_eq!(h.start(true), id + 1);
        assert!(
            !h.complete(),
            "a buffer from before the reset does not underflow"
        );
    }
}
