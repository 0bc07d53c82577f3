//! What to boot: guest image, vCPUs, memory, command line; and human size parsing.

use crate::boot::linux::LinuxBoot;
use guest_mm::ReclaimConfig;
use std::path::PathBuf;

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// One of the project's test guests, or another ELF with their entry contract
    /// (`guests::resolve` finds them by name).
    TestGuest(PathBuf),
    /// A Linux kernel: PVH vmlinux or bzImage, with an optional initrd.
    Linux(LinuxBoot),
}

impl BootSource {
    /// The image's path, for messages.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::TestGuest(p) => p,
            Self::Linux(l) => &l.kernel,
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub boot: BootSource,
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Guest command line, passed through the PVH start info or boot_params. The VMM appends
    /// its virtio-mmio device entry.
    pub cmdline: String,
    /// The KVM device node (normally /dev/kvm).
    pub kvm_device: PathBuf,
    /// How reclaimed guest memory is batched and returned to the host.
    pub reclaim: ReclaimConfig,
    /// Balloon sizes to set one after another, each once the previous one is reached.
    pub balloon_steps: Vec<u64>,
    /// How long to wait for the driver to reach one step.
    pub balloon_step_timeout: std::time::Duration,
    /// The balloon's optional features (free page hinting, free page reporting).
    pub balloon_features: crate::devices::balloon::BalloonFeatures,
    /// Where to serve the control API, if anywhere.
    pub api_sock: Option<PathBuf>,
    /// Whether the reclaim probe (a test device on port 0xf6) answers.
    pub reclaim_probe: bool,
    /// Leave the host's fault-around on for guest RAM (`guest_mm::fault_around`).
    pub keep_host_fault_around: bool,
    /// What backs guest RAM (4 KiB memfd, shmem huge pages, hugetlb).
    pub backing: guest_mm::Backing,
}

/// Parses sizes such as `512M`, `2G`, `64KiB`, `4096` (bytes). Suffixes are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a number with an optional K/M/G/T suffix, e.g. 512M"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: number too large"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "'{s}' has an unknown size suffix '{other}': use K, M, G or T"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Formats a byte count with the largest binary unit that divides it, e.g. `256 MiB`.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
    }

    #[test]
    fn rejects_garbage_sizes() {
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("unknown size suffix"));
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("100000000T").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(4097), "4097 B");
    }
}
