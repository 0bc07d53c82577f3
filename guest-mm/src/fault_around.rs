//! Turning off the host's fault-around on guest RAM, so that zap spans stay one invalidation.
//!
//! Why: on a read fault in a file mapping (our shared memfd) the kernel maps up to 16
//! neighbouring pages that are in the page cache along with the one faulted on
//! (`do_fault_around`, `fault_around_bytes`). After a zap span, a guest access to a bridged
//! in-use frame faults it back in, and fault-around maps the reclaimed frames next to it
//! too, which are still in the memfd until their release punches them. KVM's shadow MMU then
//! prefetches stage-2 entries for them, and each release has to invalidate those again: one
//! flush per range, as without spans. Measured here (reclaimcheck writers=1, 4 vCPUs, 256 MiB
//! scattered): 163-945 flush requests for 2 spans with fault-around, 2-3 without.
//!
//! How: the kernel skips fault-around on a VMA registered with a userfaultfd in write-protect
//! mode (`uffd_disable_fault_around`). Guest RAM is registered that way and no page is ever
//! write-protected, so the userfaultfd never receives a fault; it only carries the flag. The
//! fd stays open for as long as the mapping lives (closing it unregisters). Where the kernel
//! refuses (no userfaultfd, no write-protect for shmem before 5.19, seccomp), fault-around
//! stays on: a warning says so, and nothing else changes.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

// From linux/userfaultfd.h.
const UFFD_API: u64 = 0xAA;
/// Only faults from user mode would be delivered: lets unprivileged users register too
/// (vm.unprivileged_userfaultfd = 0), and we never take a fault anyway.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// Disables fault-around on the mappings `[addr, addr + len)` (each a whole VMA, page
/// aligned). The returned fd must stay open as long as they are mapped.
pub fn disable(mappings: &[(*mut u8, usize)]) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ioctls: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: UFFDIO_API reads and writes a struct uffdio_api.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for &(addr, len) in mappings {
        let mut reg = UffdioRegister {
            start: addr as u64,
            len: len as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a struct uffdio_register; the range is a
        // live mapping of ours. Registering changes no page, only the VMA's flags.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    /// Whether page `addr` is present in this process's page tables (/proc/self/pagemap
    /// bit 63).
    fn present(addr: *const u8) -> bool {
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start(addr as u64 / 4096 * 8)).unwrap();
        let mut e = [0u8; 8];
        f.read_exact(&mut e).unwrap();
        u64::from_le_bytes(e) >> 63 == 1
    }

    /// A 64 KiB shared memfd mapping, populated, then zapped: is the neighbour of a page read
    /// back in mapped too?
    fn neighbour_mapped_after_a_read_fault(disable_fault_around: bool) -> bool {
        let ram = crate::GuestRam::new_keeping_fault_around(64 << 10).unwrap();
        let r = ram.layout().ranges()[0];
        let base = ram.host_addr(&r);
        let _fd = disable_fault_around.then(|| disable(&[(base, r.size as usize)]).unwrap());
        // SAFETY: 16 pages of our own mapping.
        unsafe {
            for p in 0..16 {
                base.add(p * 4096).write_volatile(1);
            }
            assert_eq!(libc::madvise(base.cast(), 64 << 10, libc::MADV_DONTNEED), 0);
            assert!(!present(base.add(4096)));
            base.add(3 * 4096).read_volatile();
            present(base.add(4 * 4096))
        }
    }

    #[test]
    fn a_read_fault_maps_no_neighbours_once_fault_around_is_off() {
        assert!(
            !neighbour_mapped_after_a_read_fault(true),
            "fault-around still mapped a neighbour"
        );
        // The kernel's default: the neighbour came in with the read (fault_around_bytes is
        // 64 KiB unless the host changed it).
        if !neighbour_mapped_after_a_read_fault(false) {
            println!(
                "note: this host maps no neighbours on a read fault even with fault-around on"
            );
        }
    }
}
