//! The modelled machine: one guest's stage-2 table, each vCPU's TLB, the host frames behind
//! guest memory, the reverse map (host frame → guest frame), the backing store that writeback
//! fills, and the checker that watches every access.
//!
//! Semantics (chosen to be the strictest a reclaim path must meet):
//! - Reclaim is a swap-out: a dirty frame's content is written to the backing store before
//!   the frame is freed, and a later guest access faults the content back in. A balloon may
//!   discard content instead; a path that keeps every write also keeps the guest isolated.
//! - A vCPU instruction translates through its TLB (filling it from the table on a miss and
//!   setting accessed/dirty bits), then accesses the frame, in one atomic step. It answers
//!   flush requests (the IPI) only between instructions, so an instruction may run on a stale
//!   entry after a zap until the vCPU has taken the IPI: exactly the window the order must
//!   cover.
//! - Between zap and release a guest frame is "invalidating": a fault on it waits (KVM's
//!   `mmu_invalidate_in_progress` retry, held until the release), so nothing is mapped again
//!   behind the gather's back.
//! - The checker: every access must reach a frame owned by the guest for that guest frame
//!   (else use-after-free); every read must see the last value written to the guest frame,
//!   a frame freed clean must hold nothing newer than the backing store, and at the end every
//!   guest frame must show its last write (else lost write). A violation panics with the vCPU,
//!   frames, owner and the last steps of the interleaving; shuttle then prints the schedule
//!   that replays it.

use crate::ept::{Ept, ACCESSED, DIRTY, LARGE_FRAMES};
use crate::host::{HostFrames, Owner};
use crate::tlb::{Tlb, TlbEntry};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The order in which the model's backend performs reclaim. Only `Correct` is reachable from
/// the gather's types; the others exist in the model alone, to prove the checker can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// zap the span + flush (acknowledged by every vCPU) → release the reclaimed ranges:
    /// drop rmap, write back, free. Bridged frames keep their frame and rmap.
    Correct,
    /// Release (drop rmap, write back, free) inside zap, before the flush is sent.
    FreeBeforeFlush,
    /// Drop the rmap inside zap, before the flush; write back and free at release (the 2022
    /// race: writeback no longer finds the mapping, so it does not flush the stale TLB).
    EarlyRmapDrop,
    /// Release the whole span, the in-use frames it bridged included (punch-hole discards
    /// their contents).
    ReleaseWholeSpan,
    /// Drop the rmap of the in-use frames a span bridges inside zap, before the flush (the
    /// 2022 race, on frames the guest never gave away).
    EarlyBridgedRmapDrop,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "correct" => Ok(Order::Correct),
            "free-before-flush" => Ok(Order::FreeBeforeFlush),
            "early-rmap-drop" => Ok(Order::EarlyRmapDrop),
            "release-whole-span" => Ok(Order::ReleaseWholeSpan),
            "early-bridged-rmap-drop" => Ok(Order::EarlyBridgedRmapDrop),
            o => Err(format!(
                "unknown order '{o}': use correct, free-before-flush, early-rmap-drop, release-whole-span or early-bridged-rmap-drop"
            )),
        }
    }
}

/// A guest frame's backing in the model's memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Backed(u64),
    /// Zapped, not yet released: faults wait. The frame, if there was one.
    Invalidating(Option<u64>),
    /// Released: the content is in the backing store.
    Unbacked,
}

/// One guest memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Write(u64, u64),
}

#[derive(Clone, Copy, Debug)]
struct Request {
    id: u64,
    start: u64,
    count: u64,
    /// The vCPU was in guest mode when the request was sent: an IPI went out and the sender
    /// waits for this vCPU's acknowledgement. Otherwise the vCPU handles the request before
    /// it re-enters the guest and nobody waits (KVM's `kvm_make_all_cpus_request`).
    ipi: bool,
}

/// Declares `Counters` from its fields (every one a u64 count) and `add`, which sums them all,
/// so that no count is left out of the sum.
macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident,)+) => {
        /// What the model counted in one execution.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Counters {
            $($(#[$doc])* pub $field: u64,)+
        }

        impl Counters {
            pub fn add(&mut self, o: &Counters) {
                $(self.$field += o.$field;)+
            }
        }
    };
}

counters! {
    flush_rounds,
    ipis,
    acks,
    tlb_hits,
    stale_hits,
    tlb_fills,
    faults,
    fault_waits,
    refaults,
    /// Faults on frames a span bridged: mapped again to the same host frame.
    bridged_refaults,
    /// In-use frames zapped by spans.
    bridged_zaps,
    writebacks,
    frames_freed,
}

/// How many recent steps a violation report shows (`STAGE2_MODEL_TRACE` overrides).
fn trace_tail() -> usize {
    std::env::var("STAGE2_MODEL_TRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

pub struct MachineConfig {
    pub vcpus: usize,
    pub frames: u64,
    /// Map 2 MiB-aligned runs of 512 frames with 2 MiB leaves at start.
    pub large_pages: bool,
    pub tlb_sets: usize,
    pub tlb_ways: usize,
    pub order: Order,
}

pub struct Machine {
    ept: Ept,
    tlbs: Vec<Tlb>,
    host: HostFrames,
    slots: Vec<Slot>,
    rmap: Vec<Option<u64>>,
    backing: Vec<u64>,
    truth: Vec<u64>,
    last_writer: Vec<Option<usize>>,
    mailbox: Vec<Vec<Request>>,
    in_guest: Vec<bool>,
    under_writeback: BTreeSet<u64>,
    /// Guest frames given away (in a zap's reclaimed ranges) and not faulted in since.
    given_away: Vec<bool>,
    /// Guest frames whose stage-2 leaf a span zapped while they stayed in use.
    bridged: Vec<bool>,
    /// For the release-whole-span order: each reclaimed range's span.
    span_of: BTreeMap<u64, (u64, u64)>,
    outstanding: BTreeMap<u64, usize>,
    next_request: u64,
    order: Order,
    trace: VecDeque<String>,
    trace_tail: usize,
    pub counters: Counters,
}

impl Machine {
    /// Guest frames `0..frames` backed by host frames `0..frames` (identity, so 2 MiB runs can
    /// use large leaves); twice as many host frames again are spare, for refaults.
    pub fn new(c: &MachineConfig) -> Self {
        let mut ept = Ept::new();
        let mut host = HostFrames::new(c.frames * 3);
        let mut g = 0;
        while g < c.frames {
            if c.large_pages && g.is_multiple_of(LARGE_FRAMES) && g + LARGE_FRAMES <= c.frames {
                ept.map_2m(g, g, true);
                g += LARGE_FRAMES;
            } else {
                ept.map_4k(g, g, true);
                g += 1;
            }
        }
        for g in 0..c.frames {
            host.claim(g, Owner::Guest(g));
        }
        Self {
            ept,
            tlbs: (0..c.vcpus)
                .map(|_| Tlb::new(c.tlb_sets, c.tlb_ways))
                .collect(),
            host,
            slots: (0..c.frames).map(Slot::Backed).collect(),
            rmap: (0..c.frames * 3)
                .map(|h| (h < c.frames).then_some(h))
                .collect(),
            backing: vec![0; c.frames as usize],
            truth: vec![0; c.frames as usize],
            last_writer: vec![None; c.frames as usize],
            mailbox: vec![Vec::new(); c.vcpus],
            in_guest: vec![true; c.vcpus],
            under_writeback: BTreeSet::new(),
            given_away: vec![false; c.frames as usize],
            bridged: vec![false; c.frames as usize],
            span_of: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_request: 0,
            order: c.order,
            trace: VecDeque::new(),
            trace_tail: trace_tail(),
            counters: Counters::default(),
        }
    }

    pub fn order(&self) -> Order {
        self.order
    }

    pub fn frames(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The vCPU leaves guest mode (a fault it must wait out, or the end of its work): IPIs
    /// are no longer sent to it, nor waited for.
    pub fn exit_guest(&mut self, cpu: usize) -> usize {
        self.in_guest[cpu] = false;
        self.service(cpu)
    }

    /// Re-entry: pending requests are handled first, as KVM does before VM entry.
    pub fn enter_guest(&mut self, cpu: usize) {
        self.service(cpu);
        self.in_guest[cpu] = true;
    }

    fn step(&mut self, line: String) {
        if self.trace.len() >= self.trace_tail {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    /// Fails the execution with a violation found outside the machine (the backend's checks).
    pub fn violation_report(&self, what: String) -> ! {
        self.violation(what)
    }

    /// Fails the execution with the violation and the interleaving that led to it.
    fn violation(&self, what: String) -> ! {
        let steps: Vec<&str> = self.trace.iter().map(String::as_str).collect();
        panic!(
            "VIOLATION: {what}\ninterleaving (last {} steps, oldest first):\n  {}",
            steps.len(),
            steps.join("\n  ")
        );
    }

    /// One guest instruction on `cpu`. Returns false if it faulted on a frame being
    /// reclaimed and must be retried later.
    pub fn execute(&mut self, cpu: usize, op: Op) -> bool {
        let (g, write) = match op {
            Op::Read(g) => (g, false),
            Op::Write(g, _) => (g, true),
        };
        let mut stale = false;
        let hfn = match self.tlbs[cpu].lookup(g).copied() {
            Some(e) if !write || (e.writable && e.dirty) => {
                self.counters.tlb_hits += 1;
                stale = self.ept.walk(g).map(|t| t.hfn) != Some(e.hfn);
                self.counters.stale_hits += u64::from(stale);
                e.hfn
            }
            _ => loop {
                // A miss, or the first write through a clean entry: the walker sets A (and D).
                match self.ept.walk(g) {
                    Some(t) if !write || t.writable => {
                        let bits = if write { ACCESSED | DIRTY } else { ACCESSED };
                        self.ept.set_bits(t.leaf, bits);
                        self.tlbs[cpu].insert(TlbEntry {
                            gfn: g,
                            hfn: t.hfn,
                            writable: t.writable,
                            dirty: write,
                        });
                        self.counters.tlb_fills += 1;
                        break t.hfn;
                    }
                    _ => {
                        self.tlbs[cpu].invalidate(g, 1);
                        if !self.fault(cpu, g) {
                            return false;
                        }
                    }
                }
            },
        };
        let owner = self.host.owner(hfn);
        let via = if stale {
            "a stale TLB entry"
        } else {
            "its TLB"
        };
        if owner != Owner::Guest(g) {
            let access = if write { "wrote" } else { "read" };
            self.step(format!(
                "vcpu{cpu}: {access} gfn {g:#x} through {via} → host frame {hfn:#x}"
            ));
            self.violation(format!(
                "use-after-free: vcpu{cpu} {access} gfn {g:#x} through {via} into host frame {hfn:#x}, which now belongs to {owner}"
            ));
        }
        match op {
            Op::Write(_, v) => {
                self.host.write(hfn, v);
                self.truth[g as usize] = v;
                self.last_writer[g as usize] = Some(cpu);
                self.step(format!(
                    "vcpu{cpu}: write {v:#x} to gfn {g:#x} through {via} → host frame {hfn:#x}"
                ));
            }
            Op::Read(_) => {
                let got = self.host.content(hfn);
                self.step(format!(
                    "vcpu{cpu}: read gfn {g:#x} through {via} → host frame {hfn:#x} = {got:#x}"
                ));
                let want = self.truth[g as usize];
                if got != want {
                    self.violation(format!(
                        "lost write: vcpu{cpu} read {got:#x} from gfn {g:#x} (host frame {hfn:#x}), but the last write to it was {want:#x} by vcpu{}",
                        self.last_writer[g as usize].map_or("-".into(), |c| c.to_string())
                    ));
                }
            }
        }
        true
    }

    /// An EPT violation on `g`. Returns false if the frame is being reclaimed (retry later).
    fn fault(&mut self, cpu: usize, g: u64) -> bool {
        self.counters.faults += 1;
        match self.slots[g as usize] {
            Slot::Invalidating(_) => {
                self.counters.fault_waits += 1;
                self.step(format!(
                    "vcpu{cpu}: EPT violation on gfn {g:#x}, being reclaimed: waits"
                ));
                false
            }
            Slot::Backed(h) => {
                // A frame a span bridged comes back as the very same host frame.
                if std::mem::take(&mut self.bridged[g as usize]) {
                    self.counters.bridged_refaults += 1;
                    self.step(format!(
                        "vcpu{cpu}: EPT violation on bridged gfn {g:#x}: mapped again to host frame {h:#x}"
                    ));
                }
                self.ept.map_4k(g, h, true);
                true
            }
            Slot::Unbacked => {
                self.given_away[g as usize] = false;
                let h = self.host.alloc(Owner::Guest(g));
                self.host.write(h, self.backing[g as usize]);
                self.rmap[h as usize] = Some(g);
                self.ept.map_4k(g, h, true);
                self.slots[g as usize] = Slot::Backed(h);
                self.counters.refaults += 1;
                self.step(format!(
                    "vcpu{cpu}: EPT violation on gfn {g:#x}: faulted in as host frame {h:#x}"
                ));
                true
            }
        }
    }

    /// Handles every pending request on `cpu`: flush the ranges, acknowledge the IPIs.
    /// Returns how many acknowledgements were sent.
    pub fn service(&mut self, cpu: usize) -> usize {
        let mut acks = 0;
        for r in std::mem::take(&mut self.mailbox[cpu]) {
            let n = self.tlbs[cpu].invalidate(r.start, r.count);
            if r.ipi {
                acks += 1;
                self.counters.acks += 1;
                if let Some(left) = self.outstanding.get_mut(&r.id) {
                    *left -= 1;
                    if *left == 0 {
                        self.outstanding.remove(&r.id);
                    }
                }
            }
            let how = if r.ipi {
                "takes IPI"
            } else {
                "on entry, handles request"
            };
            self.step(format!(
                "vcpu{cpu}: {how} #{}: flushes gfns {:#x}+{} ({n} entries){}",
                r.id,
                r.start,
                r.count,
                if r.ipi { ", acks" } else { "" }
            ));
        }
        acks
    }

    /// Sends a flush of `[start, start+count)` to every vCPU; returns the request to wait on.
    fn post_flush(&mut self, start: u64, count: u64, who: &str) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let mut n = 0;
        for (m, &ipi) in self.mailbox.iter_mut().zip(&self.in_guest) {
            m.push(Request {
                id,
                start,
                count,
                ipi,
            });
            n += usize::from(ipi);
        }
        if n > 0 {
            self.outstanding.insert(id, n);
        }
        self.counters.flush_rounds += 1;
        self.counters.ipis += n as u64;
        self.step(format!(
            "{who}: flush #{id} of gfns {start:#x}+{count}: IPIs to the {n} vCPUs in guest mode"
        ));
        id
    }

    pub fn acknowledged(&self, id: u64) -> bool {
        !self.outstanding.contains_key(&id)
    }

    /// Zap of one span: clear every leaf of `[start, start+count)` (taking its dirty bit into
    /// the host's dirty flag), mark the frames of the reclaimed `ranges` invalidating, leave
    /// the in-use frames between them backed by their frame and reverse map, and send one
    /// flush. What else happens before the flush depends on the order. Returns the flush
    /// request to wait for.
    pub fn zap(&mut self, start: u64, count: u64, ranges: &[(u64, u64)]) -> u64 {
        let reclaimed = |g: u64| ranges.iter().any(|&(s, n)| (s..s + n).contains(&g));
        let (mut dirty, mut bridged) = (0, 0);
        for g in start..start + count {
            let frame = match self.slots[g as usize] {
                Slot::Backed(h) | Slot::Invalidating(Some(h)) => Some(h),
                _ => None,
            };
            if let (Some(old), Some(h)) = (self.ept.zap(g), frame) {
                if old & DIRTY != 0 {
                    self.host.set_dirty(h, true);
                    dirty += 1;
                }
            }
            if reclaimed(g) {
                self.slots[g as usize] = Slot::Invalidating(frame);
                self.given_away[g as usize] = true;
            } else if frame.is_some() {
                self.bridged[g as usize] = true;
                bridged += 1;
            }
        }
        self.counters.bridged_zaps += bridged;
        for &(s, _) in ranges {
            self.span_of.insert(s, (start, count));
        }
        self.step(format!(
            "gather: zaps gfns {start:#x}+{count} ({} reclaimed ranges, {bridged} in-use frames bridged, {dirty} dirty bits taken)",
            ranges.len()
        ));
        match self.order {
            Order::Correct | Order::ReleaseWholeSpan => {}
            Order::FreeBeforeFlush => {
                for &(s, n) in ranges {
                    self.free_range(s, n, "gather (free before flush)");
                }
            }
            Order::EarlyRmapDrop => {
                for &(s, n) in ranges {
                    for g in s..s + n {
                        if let Slot::Invalidating(Some(h)) = self.slots[g as usize] {
                            self.rmap[h as usize] = None;
                        }
                    }
                    self.step(format!(
                        "gather: drops the rmap of gfns {s:#x}+{n} before the flush"
                    ));
                }
            }
            Order::EarlyBridgedRmapDrop => {
                for g in (start..start + count).filter(|&g| !reclaimed(g)) {
                    if let Slot::Backed(h) = self.slots[g as usize] {
                        self.rmap[h as usize] = None;
                        self.step(format!(
                            "gather: drops the rmap of bridged in-use gfn {g:#x} before the flush"
                        ));
                    }
                }
            }
        }
        self.post_flush(start, count, "gather")
    }

    /// Release: drop the rmap, write dirty frames back, free them (each goes to another
    /// tenant at once).
    pub fn release(&mut self, start: u64, count: u64) {
        match self.order {
            Order::FreeBeforeFlush => {}
            Order::ReleaseWholeSpan => {
                let (s, n) = self.span_of.get(&start).copied().unwrap_or((start, count));
                self.free_range(s, n, "gather (releases the whole span)");
            }
            _ => self.free_range(start, count, "gather"),
        }
    }

    fn free_range(&mut self, start: u64, count: u64, who: &str) {
        for g in start..start + count {
            match self.slots[g as usize] {
                Slot::Invalidating(Some(h)) => {
                    if self.under_writeback.contains(&h) {
                        self.violation(format!(
                            "{who} frees host frame {h:#x} of gfn {g:#x} while it is under writeback"
                        ));
                    }
                    self.rmap[h as usize] = None;
                    if self.host.is_dirty(h) {
                        self.backing[g as usize] = self.host.content(h);
                        self.counters.writebacks += 1;
                    }
                    let content = self.host.content(h);
                    if content != self.backing[g as usize] {
                        self.step(format!(
                            "{who}: frees clean host frame {h:#x} of gfn {g:#x} holding {content:#x}"
                        ));
                        self.violation(format!(
                            "lost write: host frame {h:#x} of gfn {g:#x} is freed as clean, but holds {content:#x} (written by vcpu{}) that never reached the backing store ({:#x})",
                            self.last_writer[g as usize].map_or("-".into(), |c| c.to_string()),
                            self.backing[g as usize]
                        ));
                    }
                    let next = self.host.free_and_reuse(h);
                    self.counters.frames_freed += 1;
                    self.step(format!(
                        "{who}: frees host frame {h:#x} of gfn {g:#x}; it now belongs to {next}"
                    ));
                }
                Slot::Invalidating(None) => {}
                Slot::Backed(h) if !self.given_away[g as usize] => {
                    // A frame the guest never gave away: a punch-hole discards its contents
                    // (the guest's next access reads zeros) and the host frame goes to
                    // another tenant.
                    self.rmap[h as usize] = None;
                    self.backing[g as usize] = 0;
                    let next = self.host.free_and_reuse(h);
                    self.counters.frames_freed += 1;
                    self.step(format!(
                        "{who}: frees host frame {h:#x} of in-use gfn {g:#x}, discarding its contents; it now belongs to {next}"
                    ));
                }
                Slot::Backed(h) => self.violation(format!(
                    "release of gfn {g:#x} (host frame {h:#x}) that was never zapped"
                )),
                Slot::Unbacked => continue,
            }
            self.slots[g as usize] = Slot::Unbacked;
        }
    }

    /// Host frames the writeback should look at: guest frames the host knows are dirty, or
    /// whose leaf is dirty; lowest guest frames first, at most `max`.
    pub fn writeback_candidates(&self, max: usize) -> Vec<u64> {
        (0..self.frames())
            .filter_map(|g| match self.slots[g as usize] {
                Slot::Backed(h) | Slot::Invalidating(Some(h)) => Some((g, h)),
                _ => None,
            })
            .filter(|&(g, h)| {
                self.host.is_dirty(h)
                    || self
                        .ept
                        .walk(g)
                        .is_some_and(|t| self.ept.entry(t.leaf) & DIRTY != 0)
            })
            .map(|(_, h)| h)
            .take(max)
            .collect()
    }

    /// Writeback, first half (Linux's `folio_clear_dirty_for_io`): walk the frame's rmap;
    /// for the mapping found, move the leaf's dirty bit into the host's flag, clear it and
    /// flush the TLBs that may cache it (`folio_mkclean`); then, if the frame is dirty, clear
    /// the flag and mark the frame under writeback. A write made after this re-dirties the
    /// frame (through a fresh walk, taken by the next zap or writeback), so it is never lost.
    /// Returns the flush to wait for (None if the rmap had no mapping: nothing to flush) and
    /// whether the frame is now under writeback.
    pub fn mkclean(&mut self, h: u64) -> (Option<u64>, bool) {
        let Owner::Guest(g) = self.host.owner(h) else {
            return (None, false);
        };
        let flush = match self.rmap[h as usize] {
            Some(mapped) => {
                debug_assert_eq!(g, mapped);
                if self.ept.clean(g) {
                    self.host.set_dirty(h, true);
                }
                Some(self.post_flush(g, 1, "writeback (rmap walk)"))
            }
            None => {
                self.step(format!(
                    "writeback: rmap of host frame {h:#x} (gfn {g:#x}) is empty: nothing to clean or flush"
                ));
                None
            }
        };
        let writing = self.host.is_dirty(h);
        if writing {
            self.host.set_dirty(h, false);
            self.under_writeback.insert(h);
            self.step(format!(
                "writeback: host frame {h:#x} (gfn {g:#x}) marked clean, under writeback"
            ));
        }
        (flush, writing)
    }

    /// Writeback, second half, once the flush is acknowledged: the frame's content goes to
    /// the backing store (the I/O), and the frame may be freed again.
    pub fn write_back(&mut self, h: u64) {
        if !self.under_writeback.remove(&h) {
            return;
        }
        let Owner::Guest(g) = self.host.owner(h) else {
            self.violation(format!("host frame {h:#x} was freed while under writeback"));
        };
        let v = self.host.content(h);
        self.backing[g as usize] = v;
        self.counters.writebacks += 1;
        self.step(format!(
            "writeback: host frame {h:#x} (gfn {g:#x}) = {v:#x} written to the backing store"
        ));
    }

    /// Whether a frame of `[start, start+count)` is under writeback: freeing waits for it
    /// (Linux's `folio_wait_writeback`).
    pub fn writeback_pending(&self, start: u64, count: u64) -> bool {
        (start..start + count).any(|g| match self.slots[g as usize] {
            Slot::Backed(h) | Slot::Invalidating(Some(h)) => self.under_writeback.contains(&h),
            _ => false,
        })
    }

    /// End of an execution: every guest frame shows its last write and is backed
    /// consistently, and no frame the host believes clean holds data the backing store lacks
    /// (the host may drop a clean frame at any time: that data would be lost).
    pub fn check_final(&self) {
        for g in 0..self.frames() {
            if let Slot::Backed(h) = self.slots[g as usize] {
                let leaf_dirty = self
                    .ept
                    .walk(g)
                    .is_some_and(|t| self.ept.entry(t.leaf) & DIRTY != 0);
                let content = self.host.content(h);
                if !leaf_dirty && !self.host.is_dirty(h) && content != self.backing[g as usize] {
                    self.violation(format!(
                        "lost write: host frame {h:#x} of gfn {g:#x} is clean (no dirty leaf, no dirty flag) but holds {content:#x} (written by vcpu{}) that never reached the backing store ({:#x}): the host may drop it",
                        self.last_writer[g as usize].map_or("-".into(), |c| c.to_string()),
                        self.backing[g as usize]
                    ));
                }
            }
            let (visible, frame) = match self.slots[g as usize] {
                Slot::Backed(h) | Slot::Invalidating(Some(h)) => (self.host.content(h), Some(h)),
                _ => (self.backing[g as usize], None),
            };
            if let Some(h) = frame {
                if self.host.owner(h) != Owner::Guest(g) {
                    self.violation(format!(
                        "isolation: gfn {g:#x} is backed by host frame {h:#x}, which belongs to {}",
                        self.host.owner(h)
                    ));
                }
            }
            let want = self.truth[g as usize];
            if visible != want {
                self.violation(format!(
                    "lost write: at the end gfn {g:#x} holds {visible:#x}, but its last write was {want:#x} by vcpu{}",
                    self.last_writer[g as usize].map_or("-".into(), |c| c.to_string())
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(order: Order) -> Machine {
        Machine::new(&MachineConfig {
            vcpus: 1,
            frames: 4,
            large_pages: false,
            tlb_sets: 2,
            tlb_ways: 2,
            order,
        })
    }

    /// The sequence the first 8-vCPU device run found when the model's writeback cleared the
    /// host's dirty flag after copying the frame instead of before: a zap re-dirtied the frame
    /// between the two, the copy took the flag with it, and a write through the zap's not yet
    /// flushed TLB entry was lost. With `folio_clear_dirty_for_io` semantics it is kept.
    #[test]
    fn a_frame_redirtied_while_under_writeback_is_written_back_again_at_release() {
        let mut m = machine(Order::Correct);
        assert!(m.execute(0, Op::Write(1, 1)));
        let (flush, writing) = m.mkclean(1);
        assert!(writing);
        m.service(0);
        assert!(m.acknowledged(flush.unwrap()));
        assert!(
            m.execute(0, Op::Write(1, 2)),
            "a fresh walk sets the dirty bit again"
        );
        let zap = m.zap(1, 1, &[(1, 1)]);
        m.write_back(1);
        assert!(
            m.execute(0, Op::Write(1, 3)),
            "the zap's flush is not taken yet"
        );
        assert_eq!(m.counters.stale_hits, 1);
        m.service(0);
        assert!(m.acknowledged(zap));
        m.release(1, 1);
        assert!(
            m.execute(0, Op::Read(1)),
            "faults the frame back in from the backing store"
        );
        m.check_final();
    }

    #[test]
    #[should_panic(expected = "lost write: host frame 0x1 of gfn 0x1 is freed as clean")]
    fn without_the_rmap_writeback_cannot_flush_and_the_stale_write_is_lost() {
        let mut m = machine(Order::EarlyRmapDrop);
        assert!(m.execute(0, Op::Write(1, 1)));
        m.zap(1, 1, &[(1, 1)]);
        let (flush, writing) = m.mkclean(1);
        assert!(flush.is_none() && writing);
        m.write_back(1);
        assert!(m.execute(0, Op::Write(1, 2)));
        m.service(0);
        m.release(1, 1);
    }
}
