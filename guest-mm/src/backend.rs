//! The stage-2 backend: the seam between the gather and how a range of guest frames is
//! zapped from stage 2 and returned to the host. The gather never knows which backend it has.
//!
//! `KvmMemfd` is the KVM backend on the memfd-backed RAM of `GuestRam`:
//! - zap: `madvise(MADV_DONTNEED)` on the MAP_SHARED mapping of the range. The mmu-notifier
//!   makes KVM zap the stage-2 (EPT or shadow) entries and flush every vCPU's TLB before the
//!   call returns: one KVM flush per call, so the number of ranges is the cost. The pages stay
//!   in the memfd, so a VMM thread still writing through an old pointer writes into the same
//!   page, not into a new one (nothing is lost yet).
//! - release: `fallocate(PUNCH_HOLE)` on the memfd frees the pages; the memfd's allocated
//!   blocks fall by exactly the range. A later guest access faults in a zero page.
//!
//! Every call is checked to lie inside one RAM range before it is made: no host call ever
//! covers memory outside guest RAM.

use crate::gfn::GfnRange;
use crate::layout::PAGE_SIZE;
use crate::ram::GuestRam;
use crate::stage2_map::{FrameState, Stage2Map};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
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

pub trait Stage2Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Removes the stage-2 mappings of `range`; returns once the hypervisor has invalidated
    /// them on every vCPU.
    fn zap(&self, range: GfnRange) -> Result<(), BackendError>;
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

impl Stage2Backend for KvmMemfd {
    fn name(&self) -> &'static str {
        "kvm-memfd"
    }

    fn zap(&self, range: GfnRange) -> Result<(), BackendError> {
        let (host, _, len) = self.locate(range)?;
        // SAFETY: [host, host+len) is inside guest RAM's shared mapping (checked by locate);
        // MADV_DONTNEED on it only drops page table entries, never the mapping itself.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        host_call_result(rc, "madvise(MADV_DONTNEED)", range)
    }

    fn release(&self, range: GfnRange) -> Result<(), BackendError> {
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

/// Wraps a backend and asserts, at every host call, that it touches only frames the balloon
/// owns: a zap only Gathered frames, a release only Zapped ones, and nothing outside RAM.
/// For tests and fuzzing: a violation panics, naming the frame and its state.
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
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn zap(&self, range: GfnRange) -> Result<(), BackendError> {
        self.require("zap", range, FrameState::Gathered);
        self.inner.zap(range)
    }

    fn release(&self, range: GfnRange) -> Result<(), BackendError> {
        self.require("release", range, FrameState::Zapped);
        self.inner.release(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

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
        b.zap(GfnRange::new(4, 8)).unwrap();
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
            b.zap(GfnRange::new(last, 2)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.release(GfnRange::new(1 << 40, 1)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.zap(GfnRange::new(u64::MAX, 1)),
            Err(BackendError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.zap(GfnRange::new(0, 0)),
            Err(BackendError::OutsideRam { .. })
        ));
    }
}
