//! The reclaim probe (port 0xf6): a verification device for the Stage2Gather on KVM.
//!
//! A guest (`reclaimcheck`) fills a region with a known pattern and writes the guest-physical
//! address of a mailbox to the port. The VMM then, on the writing vCPU's thread while the
//! other vCPUs keep running, reclaims a scattered, deterministic set of the region's frames
//! (or, on request, all of them) through the gather (in Linux-sized buffers of 256 descending frames), measures the memfd's
//! allocated bytes and KVM's flush counters around it, writes the sorted list of reclaimed
//! frames back into the guest, and marks them returned (the guest may use them again; they
//! read as zeros). The guest then checks every frame of the region.
//!
//! The mailbox comes from the guest and is validated like any guest input: every address
//! must lie in RAM and the list must not overlap the region. An invalid mailbox gets a
//! logged error and a status code in the mailbox; nothing is reclaimed.

use crate::memory::MemoryManager;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::Gfn;
use std::time::Instant;
use vm_memory::{ByteValued, Bytes, GuestAddress};

pub const PROBE_PORT: u16 = 0xf6;
const MAGIC: u64 = u64::from_le_bytes(*b"RECLAIM1");
/// Frames per buffer, as Linux's virtio_balloon sends them.
const BUFFER_PFNS: usize = 256;

const PATTERN_CONTIGUOUS: u64 = 1;

pub const STATUS_OK: u64 = 0;
pub const STATUS_BAD_MAILBOX: u64 = 1;
pub const STATUS_BAD_REGION: u64 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Mailbox {
    magic: u64,
    region_gfn: u64,
    region_pages: u64,
    list_gfn: u64,
    list_capacity: u64,
    /// 0: a scattered set of runs; 1: every frame of the region (one contiguous run).
    pattern: u64,
    // Written by the VMM:
    reclaimed: u64,
    status: u64,
}

// SAFETY: plain old data, any bit pattern is valid.
unsafe impl ByteValued for Mailbox {}

/// Frames to reclaim from `[start, start+pages)`: runs of 1..=16 frames with gaps of
/// 1..=16, from a fixed seed, so that both ranges and holes are scattered.
pub fn scattered_frames(start: Gfn, pages: u64, limit: u64) -> Vec<Gfn> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        1 + x % n
    };
    let mut out = Vec::new();
    let mut g = start + next(16);
    while g < start + pages && (out.len() as u64) < limit {
        let run = next(16);
        for f in g..(g + run).min(start + pages) {
            if (out.len() as u64) < limit {
                out.push(f);
            }
        }
        g += run + next(16);
    }
    out
}

fn in_ram(mm: &MemoryManager, gfn: u64, pages: u64) -> bool {
    mm.ram.layout().range_of_frames(gfn, pages).is_some()
}

/// Handles a write of `mailbox_gpa` to the probe port.
pub fn handle(mm: &MemoryManager, mailbox_gpa: u64) {
    let mem = mm.ram.memory();
    if !mailbox_gpa.is_multiple_of(8) || !in_ram(mm, mailbox_gpa / PAGE_SIZE, 1) {
        tracing::error!(
            "reclaim probe: mailbox address {mailbox_gpa:#x} is not in guest RAM; ignored"
        );
        return;
    }
    let addr = GuestAddress(mailbox_gpa);
    let Ok(mut mb) = mem.read_obj::<Mailbox>(addr) else {
        tracing::error!("reclaim probe: cannot read mailbox at {mailbox_gpa:#x}");
        return;
    };
    let status = if mb.magic != MAGIC {
        STATUS_BAD_MAILBOX
    } else if !in_ram(mm, mb.region_gfn, mb.region_pages)
        || !in_ram(mm, mb.list_gfn, (mb.list_capacity * 8).div_ceil(PAGE_SIZE))
        || (mb.list_gfn < mb.region_gfn + mb.region_pages
            && mb.region_gfn < mb.list_gfn + (mb.list_capacity * 8).div_ceil(PAGE_SIZE))
    {
        STATUS_BAD_REGION
    } else {
        STATUS_OK
    };
    if status != STATUS_OK {
        tracing::error!("reclaim probe: invalid mailbox {mb:?} (status {status})");
        mb.status = status;
        let _ = mem.write_obj(mb, addr);
        return;
    }

    let frames = match mb.pattern {
        PATTERN_CONTIGUOUS => {
            (mb.region_gfn..mb.region_gfn + mb.region_pages.min(mb.list_capacity)).collect()
        }
        _ => scattered_frames(mb.region_gfn, mb.region_pages, mb.list_capacity),
    };
    let mut gather = mm.gather.lock().unwrap();
    let strategy = gather.config().strategy;
    let before_bytes = mm.ram.host_bytes_held().unwrap_or(0);
    let before_flushes = mm.flush_requests();
    let before_calls = gather.stats().host_calls;
    let before_ranges = gather.stats().ranges;
    let t = Instant::now();
    let mut invalid = 0;
    for chunk in frames.chunks(BUFFER_PFNS) {
        let buffer: Vec<Gfn> = chunk.iter().rev().copied().collect();
        invalid += gather.add_buffer(&buffer).invalid.len();
    }
    gather.flush();
    let elapsed = t.elapsed();
    let after_bytes = mm.ram.host_bytes_held().unwrap_or(0);
    let flushes = before_flushes.zip(mm.flush_requests()).map(|(b, a)| a - b);
    let host_calls = gather.stats().host_calls - before_calls;
    let ranges = gather.stats().ranges - before_ranges;
    crate::report::say(&format!(
        "reclaim-probe: strategy={strategy} region_gfn={:#x} pages={} ranges={ranges} host_calls={host_calls} zap_calls={ranges} \
         kvm_flush_requests={} host_bytes_before={before_bytes} host_bytes_after={after_bytes} \
         freed={} invalid={invalid} elapsed_us={}",
        mb.region_gfn,
        frames.len(),
        flushes.map_or("unavailable".into(), |f| f.to_string()),
        before_bytes.saturating_sub(after_bytes),
        elapsed.as_micros()
    ));
    gather.return_frames(&frames);
    drop(gather);

    for (i, g) in frames.iter().enumerate() {
        let _ = mem.write_obj(*g, GuestAddress(mb.list_gfn * PAGE_SIZE + i as u64 * 8));
    }
    mb.reclaimed = frames.len() as u64;
    mb.status = STATUS_OK;
    let _ = mem.write_obj(mb, addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_frames_are_sorted_unique_bounded_and_scattered() {
        let f = scattered_frames(1000, 4096, u64::MAX);
        assert!(f.windows(2).all(|w| w[0] < w[1]));
        assert!(f.iter().all(|&g| (1000..1000 + 4096).contains(&g)));
        let runs = 1 + f.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert!(runs > 100, "expected many separate runs, got {runs}");
        assert!(f.len() > 1000 && f.len() < 3500);
        assert_eq!(scattered_frames(1000, 4096, 10).len(), 10);
    }
}
