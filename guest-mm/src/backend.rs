//! The stage-2 backend: the seam between the gather and how a range of guest frames is
//! zapped from stage 2 and returned to the host. The gather never knows which backend it has.
//!
//! `KvmMemfd` is the KVM backend on the memfd-backed RAM of `GuestRam`:
//! - zap: `madvise(MADV_DONTNEED)` on the MAP_SHARED mapping of the span. The mmu-notifier
//!   makes KVM zap the stage-2 (EPT or shadow) entries and flush every vCPU's TLB before the
//!   call returns: one KVM flush per call, so the number of calls is the cost. The pages stay
//!   in the memfd, so a VMM thread still writing through an old pointer writes into the same
//!   page, not into a new one (nothing is lost yet), and in-use frames a span bridges fault
//!   back in with their contents: the zap keeps contents (`zap_keeps_contents`). Guest RAM is
//!   never mlocked; if it were, MADV_DONTNEED would fail on it (EINVAL) and the zap would need
//!   MADV_DONTNEED_LOCKED.
//! - release: `fallocate(PUNCH_HOLE)` on the memfd frees the pages; the memfd's allocated
//!   blocks fall by exactly the range. A later guest access faults in a zero page.
//!
//! Every call is checked to lie inside one RAM range before it is made: no host call ever
//! covers memory outside guest RAM.

pub use crate::backing::Granule;
use crate::gfn::GfnRange;
use crate::layout::PAGE_SIZE;
use crate::ram::GuestRam;
use crate::stage2_map::{FrameState, Stage2Map};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("range {start:#x}+{count} is not whole 2 MiB blocks, and this backend's huge pages cannot be freed in part; refusing the host call")]
    PartialBlock { start: u64, count: u64 },
    #[error("range {start:#x}+{count} is not inside one guest RAM range; refusing the host call")]
    OutsideRam { start: u64, count: u64 },
    #[error("{call} on guest frames {start:#x}+{count} failed: {err}")]
    HostCall {
        call: &'static str,
        start: u64,
        count: u64,
        err: std::io::Error,
    },
}

/// One zap call: `span`, covering the reclaimed `ranges` (ascending, inside `span`, the first
/// starting and the last ending where the span does) and `bridged` in-use frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZapSpan {
    pub span: GfnRange,
    pub ranges: Vec<GfnRange>,
    /// Frames in the span that the guest or a device owns (they may refault).
    pub bridged: u64,
}

impl ZapSpan {
    pub fn single(r: GfnRange) -> Self {
        Self {
            span: r,
            ranges: vec![r],
            bridged: 0,
        }
    }

    /// Frames of the span in no reclaimed range.
    pub fn gap_frames(&self) -> u64 {
        self.span.count - self.ranges.iter().map(|r| r.count).sum::<u64>()
    }
}

/// What a backend can do, read once when the gather is built: callers never ask which
/// backend they have, only what it gives back in and whether a zap keeps contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub name: &'static str,
    /// What the backend gives back in. The gather holds 4 KiB frames of a block backend in
    /// their 2 MiB blocks until each block is complete.
    pub granule: Granule,
    /// Whether a zap leaves the contents of the frames it covers in place (they fault back in
    /// unchanged). Only then may a zap span bridge in-use frames; a backend whose zap destroys
    /// contents (guest_memfd punch-hole, a MAP_PRIVATE mapping) gets exactly the reclaimed
    /// ranges.
    pub zap_keeps_contents: bool,
}

pub trait Stage2Backend: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Removes the stage-2 mappings of `span.span` (which covers the reclaimed `span.ranges`
    /// and may bridge in-use frames between them); returns once the hypervisor has
    /// invalidated them on every vCPU.
    fn zap(&self, span: &ZapSpan) -> Result<(), BackendError>;
    /// Returns the host pages behind `range` to the host. Only called after the grace period.
    fn release(&self, range: GfnRange) -> Result<(), BackendError>;
}

/// KVM on a memfd mapped MAP_SHARED.
pub struct KvmMemfd {
    ram: Arc<GuestRam>,
}

impl KvmMemfd {
    pub fn new(ram: Arc<GuestRam>) -> Self {
        Self { ram }
    }

    /// Host address and memfd offset of `range`, if it lies inside one RAM range.
    fn locate(&self, range: GfnRange) -> Result<(*mut u8, u64, usize), BackendError> {
        let outside = || BackendError::OutsideRam {
            start: range.start,
            count: range.count,
        };
        let r = *self
            .ram
            .layout()
            .range_of_frames(range.start, range.count)
            .ok_or_else(outside)?;
        let (gpa, len) = (range.start * PAGE_SIZE, range.count * PAGE_SIZE);
        let off_in_range = gpa - r.gpa;
        // SAFETY: off_in_range + len <= r.size, so the pointer stays inside the mapping.
        let host = unsafe { self.ram.host_addr(&r).add(off_in_range as usize) };
        Ok((host, r.file_offset + off_in_range, len as usize))
    }
}

/// Turns a syscall's return code into a result that names the call and the frames.
fn host_call_result(
    rc: libc::c_int,
    call: &'static str,
    range: GfnRange,
) -> Result<(), BackendError> {
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(BackendError::HostCall {
        call,
        start: range.start,
        count: range.count,
        err,
    })
}

/// Frames per 2 MiB block.
pub const BLOCK_FRAMES: u64 = crate::backing::HUGE_PAGE / PAGE_SIZE;

impl KvmMemfd {
    fn granule(&self) -> Granule {
        self.ram.backing().granule()
    }

    /// On a backend whose huge pages cannot be split, only whole blocks may be zapped or
    /// released (madvise and fallocate would fail or zero the rest of the page).
    fn check_granule(&self, range: GfnRange) -> Result<(), BackendError> {
        let whole =
            range.start.is_multiple_of(BLOCK_FRAMES) && range.count.is_multiple_of(BLOCK_FRAMES);
        if self.granule() == (Granule::Block { can_split: false }) && !whole {
            return Err(BackendError::PartialBlock {
                start: range.start,
                count: range.count,
            });
        }
        Ok(())
    }
}

impl Stage2Backend for KvmMemfd {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "kvm-memfd",
            granule: self.granule(),
            // MAP_SHARED on a memfd: MADV_DONTNEED drops page-table entries, the pages stay.
            zap_keeps_contents: true,
        }
    }

    fn zap(&self, span: &ZapSpan) -> Result<(), BackendError> {
        let range = span.span;
        self.check_granule(range)?;
        let (host, _, len) = self.locate(range)?;
        // SAFETY: [host, host+len) is inside guest RAM's shared mapping (checked by locate);
        // MADV_DONTNEED on it only drops page table entries, never the mapping itself, and
        // on a shared mapping keeps the pages (and so the contents of bridged frames).
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        host_call_result(rc, "madvise(MADV_DONTNEED)", range)
    }

    fn release(&self, range: GfnRange) -> Result<(), BackendError> {
        self.check_granule(range)?;
        let (_, offset, len) = self.locate(range)?;
        // SAFETY: plain syscall on our memfd for a range inside guest RAM (checked by locate).
        let rc = unsafe {
            libc::fallocate(
                self.ram.memfd().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        host_call_result(rc, "fallocate(PUNCH_HOLE)", range)
    }
}

/// Wraps a backend and asserts, at every host call, that it harms only frames the balloon
/// owns: a zap's reclaimed ranges are Batched, the frames a span bridges are not (and there
/// are none unless the zap keeps contents), a release covers only Zapped frames, and nothing
/// is outside RAM. For tests and fuzzing: a violation panics, naming the frame and its state.
pub struct OwnershipChecked {
    inner: Arc<dyn Stage2Backend>,
    map: Arc<Stage2Map>,
}

impl OwnershipChecked {
    pub fn new(inner: Arc<dyn Stage2Backend>, map: Arc<Stage2Map>) -> Self {
        Self { inner, map }
    }

    fn require(&self, call: &str, range: GfnRange, state: FrameState) {
        for g in range.iter() {
            let found = self.map.state(g);
            assert_eq!(
                found,
                Ok(state),
                "{call} of {range:?} would touch frame {g:#x}, which is {found:?}, not {state:?}"
            );
        }
    }
}

impl Stage2Backend for OwnershipChecked {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn zap(&self, span: &ZapSpan) -> Result<(), BackendError> {
        for &r in &span.ranges {
            assert!(
                r.start >= span.span.start && r.end() <= span.span.end(),
                "range {r:?} outside its span {:?}",
                span.span
            );
            self.require("zap", r, FrameState::Batched);
        }
        for g in span.span.iter() {
            if span.ranges.iter().any(|r| r.contains(g)) {
                continue;
            }
            let found = self.map.state(g);
            assert!(
                self.inner.capabilities().zap_keeps_contents,
                "a zap that destroys contents got span {:?}, bridging frame {g:#x} ({found:?})",
                span.span
            );
            assert!(
                found.is_ok() && found != Ok(FrameState::Batched),
                "span {:?} bridges frame {g:#x}, which is {found:?}",
                span.span
            );
        }
        self.inner.zap(span)
    }

    fn release(&self, range: GfnRange) -> Result<(), BackendError> {
        self.require("release", range, FrameState::Zapped);
        if let Granule::Block { can_split: false } = self.inner.capabilities().granule {
            assert!(
                range.start.is_multiple_of(BLOCK_FRAMES)
                    && range.count.is_multiple_of(BLOCK_FRAMES),
                "release of {range:?}, part of a 2 MiB block a backend cannot split"
            );
        }
        self.inner.release(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn span(start: u64, count: u64) -> ZapSpan {
        let r = GfnRange::new(start, count);
        ZapSpan {
            span: r,
            ranges: vec![r],
            bridged: 0,
        }
    }

    #[test]
    fn a_span_zap_keeps_the_bridged_frames_contents_and_release_frees_only_its_ranges() {
        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        for p in 0..16u64 {
            ram.memory()
                .write_obj(p as u8 + 1, GuestAddress(p * PAGE_SIZE))
                .unwrap();
        }
        let b = KvmMemfd::new(ram.clone());
        let ranges = vec![GfnRange::new(2, 3), GfnRange::new(8, 2)];
        b.zap(&ZapSpan {
            span: GfnRange::new(2, 8),
            ranges: ranges.clone(),
            bridged: 3,
        })
        .unwrap();
        for r in &ranges {
            b.release(*r).unwrap();
        }
        assert_eq!(ram.host_bytes_held().unwrap(), 11 * PAGE_SIZE);
        for p in 0..16u64 {
            let got = ram
                .memory()
                .read_obj::<u8>(GuestAddress(p * PAGE_SIZE))
                .unwrap();
            let reclaimed = ranges.iter().any(|r| r.contains(p));
            assert_eq!(got, if reclaimed { 0 } else { p as u8 + 1 }, "frame {p}");
        }
    }

    #[test]
    fn zap_then_release_frees_memfd_blocks_and_reads_zero() {
        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        for p in 0..16u64 {
            ram.memory()
                .write_obj(0xabu8, GuestAddress(p * PAGE_SIZE))
                .unwrap();
        }
        assert_eq!(ram.host_bytes_held().unwrap(), 16 * PAGE_SIZE);
        let b = KvmMemfd::new(ram.clone());
        b.zap(&span(4, 8)).unwrap();
        assert_eq!(
            ram.host_bytes_held().unwrap(),
            16 * PAGE_SIZE,
            "zap alone keeps the pages"
        );
        b.release(GfnRange::new(4, 8)).unwrap();
        assert_eq!(ram.host_bytes_held().unwrap(), 8 * PAGE_SIZE);
        assert_eq!(
            ram.memory()
                .read_obj::<u8>(GuestAddress(5 * PAGE_SIZE))
                .unwrap(),
            0
        );
        assert_eq!(
            ram.memory()
                .read_obj::<u8>(GuestAddress(3 * PAGE_SIZE))
                .unwrap(),
            0xab
        );
    }

    #[test]
    fn refuses_ranges_outside_ram() {
        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        let b = KvmMemfd::new(ram);
        let last = (8 << 20) / PAGE_SIZE - 1;
        assert!(matches!(
            b.zap(&span(last, 2)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.release(GfnRange::new(1 << 40, 1)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.zap(&span(u64::MAX, 1)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.zap(&span(0, 0)),
            Err(BackendError::OutsideRam { .. })
        ));
    }
}
