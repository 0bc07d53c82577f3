//! The reclaim probe (port 0xf6): a test device that verifies the Stage2Gather on KVM. It is
//! off unless the VMM runs with `--reclaim-probe` (the tests and reclaim-bench pass it); when
//! off, the port is unclaimed like any other.
//!
//! A guest (`reclaimcheck`) fills a region with a known pattern and writes the guest-physical
//! address of a mailbox (`abi::probe::Mailbox`) to the port. The VMM then, on the writing
//! vCPU's thread while the other vCPUs keep running, reclaims a scattered, deterministic set
//! of the region's frames (or, on request, all of them) through the gather, in Linux-sized
//! buffers of 256 descending frames; measures the memfd's allocated bytes and KVM's flush
//! counters around it; gives every frame it took back to the guest; and lists, sorted, those
//! whose host pages it freed (they read as zeros). Frames it took but could not free (on a
//! 2 MiB backing, those of a block the region does not cover whole; a frame whose host call
//! failed) go back with their contents and are not listed. Frames the gather refuses (in the
//! balloon, device-mapped) are not listed and stay with their owner. The guest then checks
//! every frame of the region.
//!
//! The mailbox comes from the guest and is validated like any guest input, with checked
//! arithmetic: every address must lie in RAM and the list must not overlap the region. An
//! invalid mailbox gets a logged error and a status code in the mailbox; nothing is
//! reclaimed.

use crate::memory::MemoryManager;
use abi::probe::{self, Mailbox};
use guest_mm::layout::{Layout, PAGE_SIZE};
use guest_mm::{Gfn, GfnRange};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress};

pub use abi::PROBE_PORT;

/// Frames per buffer, as Linux's virtio_balloon sends them.
const BUFFER_PFNS: usize = 256;

/// The mailbox as guest memory holds it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
struct MailboxBytes(Mailbox);

// SAFETY: `Mailbox` is repr(C) plain old data of u64 fields: any bit pattern is valid.
unsafe impl ByteValued for MailboxBytes {}

/// Why a mailbox was refused; each maps to the status the guest reads.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("region {gfn:#x}+{pages} is not inside one RAM range")]
    RegionOutsideRam { gfn: u64, pages: u64 },
    #[error("list capacity {0} entries is larger than any guest")]
    ListTooLarge(u64),
    #[error("list {gfn:#x}+{pages} pages is not inside one RAM range")]
    ListOutsideRam { gfn: u64, pages: u64 },
    #[error("list {list:#x}+{list_pages} overlaps region {region:#x}+{region_pages}")]
    Overlap {
        list: u64,
        list_pages: u64,
        region: u64,
        region_pages: u64,
    },
}

impl ProbeError {
    pub fn status(&self) -> u64 {
        match self {
            ProbeError::BadMagic(_) => probe::STATUS_BAD_MAILBOX,
            _ => probe::STATUS_BAD_REGION,
        }
    }
}

/// A validated request: the region, and a list that lies in RAM apart from it.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    region: GfnRange,
    list_gfn: Gfn,
    list_capacity: u64,
    contiguous: bool,
}

fn validate(mb: &Mailbox, layout: &Layout) -> Result<Request, ProbeError> {
    if mb.magic != probe::MAGIC {
        return Err(ProbeError::BadMagic(mb.magic));
    }
    let region = layout
        .range_of_frames(mb.region_gfn, mb.region_pages)
        .map(|_| GfnRange::new(mb.region_gfn, mb.region_pages))
        .ok_or(ProbeError::RegionOutsideRam {
            gfn: mb.region_gfn,
            pages: mb.region_pages,
        })?;
    let list_pages = mb
        .list_capacity
        .checked_mul(probe::LIST_ENTRY_BYTES)
        .ok_or(ProbeError::ListTooLarge(mb.list_capacity))?
        .div_ceil(PAGE_SIZE);
    layout
        .range_of_frames(mb.list_gfn, list_pages)
        .ok_or(ProbeError::ListOutsideRam {
            gfn: mb.list_gfn,
            pages: list_pages,
        })?;
    // Both lie inside RAM, so neither end overflows.
    let list = GfnRange::new(mb.list_gfn, list_pages);
    if list.start < region.end() && region.start < list.end() {
        return Err(ProbeError::Overlap {
            list: list.start,
            list_pages,
            region: region.start,
            region_pages: region.count,
        });
    }
    Ok(Request {
        region,
        list_gfn: mb.list_gfn,
        list_capacity: mb.list_capacity,
        contiguous: mb.pattern == probe::PATTERN_CONTIGUOUS,
    })
}

/// What one probe did.
#[derive(Debug, Default, PartialEq)]
pub struct ProbeOutcome {
    /// Frames reclaimed (their host pages freed) and given back, sorted, as listed to the
    /// guest.
    pub reclaimed: Vec<Gfn>,
    /// Frames taken but not freed, given back with their contents (not listed).
    pub not_freed: u64,
    /// Frames the gather refused.
    pub invalid: u64,
    pub report: ProbeReport,
}

/// What one probe measured: printed as the `reclaim-probe:` line and kept in the run's
/// report (`BalloonReport::probes`) for tools and tests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub strategy: String,
    pub region_gfn: u64,
    /// Frames reclaimed (their host pages freed) and given back.
    pub pages: u64,
    /// Frames taken but not freed (part of a 2 MiB block), given back with their contents.
    #[serde(default)]
    pub not_freed: u64,
    pub ranges: u64,
    pub host_calls: u64,
    pub zap_calls: u64,
    pub bridged: u64,
    /// KVM flush requests over the whole probe (zaps and releases).
    pub kvm_flush_requests: Option<u64>,
    /// KVM flush requests during the zap calls alone.
    pub zap_flush_requests: u64,
    /// Each vCPU's TLB flushes after the zaps (empty where KVM does not report them).
    pub vcpu_tlb_flushes: Vec<u64>,
    pub host_bytes_before: u64,
    pub host_bytes_after: u64,
    /// Frames the gather refused (not listed, not given back).
    pub invalid: u64,
    pub elapsed_us: u64,
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tlb = if self.vcpu_tlb_flushes.is_empty() {
            "unavailable".to_string()
        } else {
            let v: Vec<String> = self.vcpu_tlb_flushes.iter().map(u64::to_string).collect();
            v.join(",")
        };
        write!(
            f,
            "reclaim-probe: strategy={} region_gfn={:#x} pages={} ranges={} host_calls={} zap_calls={} \
             bridged={} kvm_flush_requests={} zap_flush_requests={} vcpu_tlb_flushes={tlb} host_bytes_before={} host_bytes_after={} \
             freed={} not_freed={} invalid={} elapsed_us={}",
            self.strategy,
            self.region_gfn,
            self.pages,
            self.ranges,
            self.host_calls,
            self.zap_calls,
            self.bridged,
            self.kvm_flush_requests.map_or("unavailable".into(), |f| f.to_string()),
            self.zap_flush_requests,
            self.host_bytes_before,
            self.host_bytes_after,
            self.host_bytes_before.saturating_sub(self.host_bytes_after),
            self.not_freed,
            self.invalid,
            self.elapsed_us
        )
    }
}

/// Handles a write of `mailbox_gpa` to the probe port. `None` when the mailbox itself is
/// not in RAM (nothing can be answered).
pub fn handle(mm: &MemoryManager, mailbox_gpa: u64) -> Option<Result<ProbeOutcome, ProbeError>> {
    let mem = mm.ram.memory();
    let size = std::mem::size_of::<Mailbox>() as u64;
    let in_ram = mailbox_gpa.is_multiple_of(8)
        && mailbox_gpa.checked_add(size).is_some_and(|end| {
            mm.ram
                .layout()
                .range_of(mailbox_gpa)
                .is_some_and(|r| end <= r.end())
        });
    if !in_ram {
        tracing::error!(
            "reclaim probe: mailbox address {mailbox_gpa:#x} is not in guest RAM; ignored"
        );
        return None;
    }
    let addr = GuestAddress(mailbox_gpa);
    let Ok(MailboxBytes(mut mb)) = mem.read_obj::<MailboxBytes>(addr) else {
        tracing::error!("reclaim probe: cannot read mailbox at {mailbox_gpa:#x}");
        return None;
    };
    let result = validate(&mb, mm.ram.layout()).map(|req| reclaim(mm, &req));
    match &result {
        Err(e) => {
            tracing::error!("reclaim probe: invalid mailbox {mb:?}: {e}");
            mb.status = e.status();
            mb.reclaimed = 0;
        }
        Ok(out) => {
            let list: Vec<u8> = out.reclaimed.iter().flat_map(|g| g.to_le_bytes()).collect();
            // Validated: the list lies in RAM and holds list_capacity >= reclaimed entries.
            let at = GuestAddress(mb.list_gfn * PAGE_SIZE);
            if let Err(e) = mem.write_slice(&list, at) {
                tracing::error!("reclaim probe: cannot write the list at {at:?}: {e}");
            }
            mb.reclaimed = out.reclaimed.len() as u64;
            mb.status = probe::STATUS_OK;
        }
    }
    let _ = mem.write_obj(MailboxBytes(mb), addr);
    Some(result)
}

/// Reclaims the request's frames through the gather and gives them back.
fn reclaim(mm: &MemoryManager, req: &Request) -> ProbeOutcome {
    let frames: Vec<Gfn> = if req.contiguous {
        req.region.iter().take(req.list_capacity as usize).collect()
    } else {
        probe::scattered_frames(req.region.start, req.region.count, req.list_capacity).collect()
    };
    // Linux sends descending PFNs, 256 per buffer.
    let buffers: Vec<Vec<Gfn>> = frames
        .chunks(BUFFER_PFNS)
        .map(|c| c.iter().rev().copied().collect())
        .collect();
    let gather = &mm.gather;
    let strategy = gather.config().strategy;
    let before_bytes = mm.ram.host_bytes_held().unwrap_or(0);
    let before_flushes = mm.flush_requests();
    let t = Instant::now();
    let out = gather.reclaim_and_give_back(buffers.iter().map(Vec::as_slice));
    let elapsed = t.elapsed();
    let after_bytes = mm.ram.host_bytes_held().unwrap_or(0);
    let flushes = before_flushes
        .zip(mm.flush_requests())
        .map(|(b, a)| a.saturating_sub(b));
    let sum = |f: fn(&guest_mm::BatchReport) -> u64| out.flushed.iter().map(f).sum::<u64>();
    // Each vCPU's TLB flushes after the zaps: the invalidation reached it.
    let mut tlb = Vec::<u64>::new();
    for b in &out.flushed {
        guest_mm::reclaim::metrics::add_per_vcpu(&mut tlb, &b.vcpu_tlb_flushes);
    }
    let reclaimed = out.freed;
    let not_freed = (out.accepted.len() as u64).saturating_sub(reclaimed.len() as u64);
    let report = ProbeReport {
        strategy: strategy.to_string(),
        region_gfn: req.region.start,
        pages: reclaimed.len() as u64,
        not_freed,
        ranges: sum(|b| b.ranges),
        host_calls: sum(|b| b.host_calls),
        zap_calls: sum(|b| b.spans),
        bridged: sum(|b| b.bridged),
        kvm_flush_requests: flushes,
        zap_flush_requests: sum(|b| b.kvm_flush_requests.unwrap_or(0)),
        vcpu_tlb_flushes: tlb,
        host_bytes_before: before_bytes,
        host_bytes_after: after_bytes,
        invalid: out.invalid.len() as u64,
        elapsed_us: elapsed.as_micros() as u64,
    };
    crate::report::say(&report.to_string());
    if let Some(e) = out.invalid.first() {
        tracing::warn!(
            "reclaim probe: {} frame(s) refused and not listed, first: {e}",
            out.invalid.len()
        );
    }
    if not_freed > 0 {
        tracing::info!(
            "reclaim probe: {not_freed} frame(s) taken could not be freed (part of a 2 MiB block); given back with their contents, not listed"
        );
    }
    ProbeOutcome {
        reclaimed,
        not_freed,
        invalid: out.invalid.len() as u64,
        report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mm::{GuestRam, ReclaimConfig};
    use std::sync::Arc;

    #[test]
    fn scattered_frames_are_sorted_unique_bounded_and_scattered() {
        let scattered_frames = |s, p, l| probe::scattered_frames(s, p, l).collect::<Vec<_>>();
        let f = scattered_frames(1000, 4096, u64::MAX);
        assert!(f.windows(2).all(|w| w[0] < w[1]));
        assert!(f.iter().all(|&g| (1000..1000 + 4096).contains(&g)));
        let runs = 1 + f.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert!(runs > 100, "expected many separate runs, got {runs}");
        assert!(f.len() > 1000 && f.len() < 3500);
        assert_eq!(scattered_frames(1000, 4096, 10).len(), 10);
    }

    fn mailbox(region_gfn: u64, region_pages: u64, list_gfn: u64, list_capacity: u64) -> Mailbox {
        Mailbox {
            magic: probe::MAGIC,
            region_gfn,
            region_pages,
            list_gfn,
            list_capacity,
            ..Mailbox::default()
        }
    }

    #[test]
    fn list_capacities_whose_byte_count_overflows_are_refused() {
        let layout = Layout::new(64 << 20).unwrap();
        // 2^61+1 entries of 8 bytes wrap to 8 bytes in unchecked u64 arithmetic: one page
        // would be checked while 8 KiB are written past it.
        for cap in [(1u64 << 61) + 1, u64::MAX, 1 << 62] {
            assert_eq!(
                validate(&mailbox(0x1000, 16, 0x2000, cap), &layout),
                Err(ProbeError::ListTooLarge(cap)),
                "capacity {cap:#x}"
            );
        }
        // The largest capacity that does not overflow still has to fit in RAM.
        let cap = u64::MAX / 8;
        assert!(matches!(
            validate(&mailbox(0x1000, 16, 0x2000, cap), &layout),
            Err(ProbeError::ListOutsideRam { .. })
        ));
    }

    #[test]
    fn regions_and_lists_at_the_end_of_the_address_space_are_refused_without_overflow() {
        let layout = Layout::new(64 << 20).unwrap();
        assert!(matches!(
            validate(&mailbox(u64::MAX, 2, 0x2000, 16), &layout),
            Err(ProbeError::RegionOutsideRam { .. })
        ));
        assert!(matches!(
            validate(&mailbox(0x1000, 16, u64::MAX, 16), &layout),
            Err(ProbeError::ListOutsideRam { .. })
        ));
        assert!(matches!(
            validate(&mailbox(0x1000, 16, 0x1008, 16), &layout),
            Err(ProbeError::Overlap { .. })
        ));
        assert!(validate(&mailbox(0x1000, 16, 0x2000, 16), &layout).is_ok());
    }

    #[test]
    fn frames_already_in_the_balloon_are_neither_listed_nor_handed_back() {
        let ram = Arc::new(GuestRam::new(64 << 20).unwrap());
        let mm = MemoryManager::checked(ram.clone(), ReclaimConfig::default()).unwrap();
        // The guest ballooned the region's first 8 frames before asking the probe.
        let ballooned: Vec<Gfn> = (0x1000..0x1008).collect();
        mm.gather.add_buffer(&ballooned);
        mm.gather.flush();
        let mb = mailbox(0x1000, 16, 0x2000, 16);
        ram.memory()
            .write_obj(
                MailboxBytes(Mailbox {
                    pattern: probe::PATTERN_CONTIGUOUS,
                    ..mb
                }),
                GuestAddress(0x3000),
            )
            .unwrap();
        let out = handle(&mm, 0x3000).unwrap().unwrap();
        assert_eq!(out.reclaimed, (0x1008..0x1010).collect::<Vec<_>>());
        assert_eq!(out.invalid, 8);
        for g in ballooned {
            assert_eq!(
                mm.map.owner(g),
                Ok(guest_mm::stage2_map::Owner::Balloon),
                "frame {g:#x} stays in the balloon"
            );
        }
        let MailboxBytes(back) = ram.memory().read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!((back.status, back.reclaimed), (probe::STATUS_OK, 8));
    }
}
