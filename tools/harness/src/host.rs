//! What a VMM process holds on the host, measured the same way for every VMM: the allocated
//! bytes of its guest-RAM memfd (this VMM's "memfd:guest-ram", QEMU's "memfd:ram"), or its
//! resident memory where guest RAM is anonymous (Firecracker).

use std::os::unix::fs::MetadataExt;

/// Allocated bytes of the largest memfd process `pid` holds open (0 if it has none): its
/// guest RAM. RSS would count pages a zap span only unmapped, which the host still holds.
pub fn guest_memfd_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .max_by_key(|m| m.size())
        .map_or(0, |m| m.blocks() * 512)
}

/// Bytes process `pid` holds in memory (VmRSS plus its hugetlb pages, HugetlbPages), 0 if it
/// is gone. For Firecracker, whose guest RAM is anonymous memory, or hugetlb pages that RSS
/// does not count. Differences matter, not the value: it includes the VMM's own memory.
pub fn resident_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:") + kib("HugetlbPages:")) * 1024
}
