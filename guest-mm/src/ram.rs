//! Guest RAM backed by one file (a memfd, a file on a huge-page tmpfs, or a hugetlb memfd:
//! `backing`), mapped MAP_SHARED through vm-memory.
//!
//! The file is the host's record of what the guest holds: its allocated blocks are exactly
//! the host memory the guest uses, and punching a hole in it gives pages back to the host.
//! The shared mapping is what KVM's memslots point at, so a host call on it (madvise) makes
//! KVM zap the stage-2 entries for that range.

use crate::backing::{Backing, BackingError};
use crate::layout::{Layout, LayoutError, RamRange};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

#[derive(Debug, Error)]
pub enum RamError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("cannot duplicate the guest memory file's descriptor: {0}")]
    Dup(io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Truncate { size: u64, err: io::Error },
    #[error("cannot map guest RAM at {gpa:#x} ({size} bytes): {err}")]
    Mmap { gpa: u64, size: u64, err: String },
    #[error("cannot read the memory file's allocation: {0}")]
    Stat(io::Error),
}

/// The guest's RAM: its layout, the memfd behind it, and the vm-memory view of it.
#[derive(Debug)]
pub struct GuestRam {
    layout: Layout,
    memfd: File,
    mem: GuestMemoryMmap,
    backing: Backing,
    /// Keeps the host's fault-around off on the mappings (`fault_around`), if it could be.
    fault_around_off: Option<std::os::fd::OwnedFd>,
}

impl GuestRam {
    /// Creates a memfd of `size` bytes and maps it MAP_SHARED, read-write, per the layout,
    /// with the host's fault-around off where the kernel allows it (`fault_around`; a
    /// warning says so where it does not).
    pub fn new(size: u64) -> Result<Self, RamError> {
        Self::with_backing(size, &Backing::Memfd, false)
    }

    /// Guest RAM of `size` bytes on `backing`, with the host's fault-around off unless
    /// `keep_fault_around`.
    pub fn with_backing(
        size: u64,
        backing: &Backing,
        keep_fault_around: bool,
    ) -> Result<Self, RamError> {
        let mut ram = Self::map(size, backing)?;
        if keep_fault_around {
            return Ok(ram);
        }
        let mappings: Vec<(*mut u8, usize)> = ram
            .layout
            .ranges()
            .iter()
            .map(|r| (ram.host_addr(r), r.size as usize))
            .collect();
        match crate::fault_around::disable(&mappings) {
            Ok(fd) => ram.fault_around_off = Some(fd),
            Err(e) => tracing::warn!(
                "cannot turn the host's fault-around off on guest RAM (userfaultfd write-protect registration: {e}); zap spans may cost extra KVM flushes when the guest touches bridged frames"
            ),
        }
        Ok(ram)
    }

    /// Whether the host's fault-around is off on guest RAM.
    pub fn fault_around_off(&self) -> bool {
        self.fault_around_off.is_some()
    }

    /// As `new`, but leaves the host's fault-around on (for comparison).
    pub fn new_keeping_fault_around(size: u64) -> Result<Self, RamError> {
        Self::with_backing(size, &Backing::Memfd, true)
    }

    /// What backs this RAM.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    fn map(size: u64, backing: &Backing) -> Result<Self, RamError> {
        let layout = Layout::new(size)?;
        let memfd = crate::backing::create(backing, layout.total_bytes())?;
        // Hugetlb pages are reserved at mmap time (a fault without one would be SIGBUS);
        // the others are allocated as the guest touches them.
        let flags = if backing.reserves() {
            libc::MAP_SHARED
        } else {
            libc::MAP_SHARED | libc::MAP_NORESERVE
        };
        memfd
            .set_len(layout.total_bytes())
            .map_err(|err| RamError::Truncate {
                size: layout.total_bytes(),
                err,
            })?;
        let mut regions = Vec::new();
        for r in layout.ranges() {
            let file = memfd.try_clone().map_err(RamError::Dup)?;
            let mmap = MmapRegion::build(
                Some(FileOffset::new(file, r.file_offset)),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
            .map_err(|e| RamError::Mmap {
                gpa: r.gpa,
                size: r.size,
                err: e.to_string(),
            })?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.gpa)).ok_or(RamError::Mmap {
                gpa: r.gpa,
                size: r.size,
                err: "region overflows the address space".into(),
            })?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| RamError::Mmap {
            gpa: 0,
            size,
            err: e.to_string(),
        })?;
        Ok(Self {
            layout,
            memfd,
            mem,
            backing: backing.clone(),
            fault_around_off: None,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Host virtual address of the start of a RAM range.
    pub fn host_addr(&self, range: &RamRange) -> *mut u8 {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .get_host_address(GuestAddress(range.gpa))
            .expect("every layout range is mapped")
    }

    /// Host memory the guest holds now: the memfd's allocated blocks, in bytes.
    pub fn host_bytes_held(&self) -> Result<u64, RamError> {
        // SAFETY: fstat writes only into `st`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid for the lifetime of self; st is a valid out pointer.
        if unsafe { libc::fstat(self.memfd.as_raw_fd(), &mut st) } != 0 {
            return Err(RamError::Stat(io::Error::last_os_error()));
        }
        Ok(st.st_blocks as u64 * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn writes_allocate_memfd_blocks() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert_eq!(ram.host_bytes_held().unwrap(), 0);
        ram.memory()
            .write_obj(0xdead_beefu64, GuestAddress(8 << 20))
            .unwrap();
        assert_eq!(ram.host_bytes_held().unwrap(), 4096);
    }
}
