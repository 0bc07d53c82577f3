//! KVM's binary statistics (KVM_GET_STATS_FD) for a VM or vCPU fd. kvm-ioctls has no wrapper,
//! so the ioctl is raw (vmm-sys-util). Names worth knowing: VM `remote_tlb_flush_requests`
//! (every stage-2 flush requested), `remote_tlb_flush` (those that reached a running vCPU),
//! `pages_4k`, `mmu_shadow_zapped`; vCPU `tlb_flush`, `exits`.

use crate::reclaim::metrics::{CounterSnapshot, KvmCounters, VcpuCounters};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// struct kvm_stats_header
const HEADER_SIZE: usize = 24;
/// struct kvm_stats_desc without its name
const DESC_FIXED: usize = 16;

struct Desc {
    name: String,
    offset: u64,
    size: u64,
}

pub struct KvmStats {
    file: File,
    data_offset: u64,
    descs: Vec<Desc>,
}

impl KvmStats {
    /// Opens the statistics of a KVM VM or vCPU fd.
    pub fn open(fd: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let stats_fd = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if stats_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let file = unsafe { File::from_raw_fd(stats_fd) };
        let mut h = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut h, 0)?;
        let word = |i: usize| u32::from_le_bytes(h[i * 4..i * 4 + 4].try_into().unwrap()) as u64;
        let (name_size, num_desc, desc_offset, data_offset) = (word(1), word(2), word(4), word(5));
        let desc_len = DESC_FIXED as u64 + name_size;
        let mut raw = vec![0u8; (desc_len * num_desc) as usize];
        file.read_exact_at(&mut raw, desc_offset)?;
        let descs = raw
            .chunks(desc_len as usize)
            .map(|d| {
                let size = u16::from_le_bytes([d[6], d[7]]) as u64;
                let offset = u32::from_le_bytes(d[8..12].try_into().unwrap()) as u64;
                let name = &d[DESC_FIXED..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                Desc {
                    name: String::from_utf8_lossy(&name[..end]).into_owned(),
                    offset,
                    size,
                }
            })
            .collect();
        Ok(Self {
            file,
            data_offset,
            descs,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.descs.iter().map(|d| d.name.as_str())
    }

    /// The first value of statistic `name`, if KVM has it.
    pub fn get(&self, name: &str) -> io::Result<Option<u64>> {
        let Some(d) = self.descs.iter().find(|d| d.name == name) else {
            return Ok(None);
        };
        if d.size == 0 {
            return Ok(None);
        }
        let mut v = [0u8; 8];
        self.file
            .read_exact_at(&mut v, self.data_offset + d.offset)?;
        Ok(Some(u64::from_le_bytes(v)))
    }

    /// Every single-valued statistic.
    pub fn read_all(&self) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for d in self.descs.iter().filter(|d| d.size == 1) {
            let mut v = [0u8; 8];
            self.file
                .read_exact_at(&mut v, self.data_offset + d.offset)?;
            out.push((d.name.clone(), u64::from_le_bytes(v)));
        }
        Ok(out)
    }
}

impl KvmStats {
    /// KVM's `remote_tlb_flush_requests`: every stage-2 flush the VM asked for.
    pub fn flush_requests(&self) -> Option<u64> {
        self.get("remote_tlb_flush_requests").ok().flatten()
    }
}

impl KvmCounters for KvmStats {
    fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            flush_requests: self.flush_requests(),
            vcpus: Vec::new(),
        }
    }
}

/// A VM's statistics with each of its vCPUs': what the gather reads around a batch.
pub struct VmCounters {
    pub vm: KvmStats,
    pub vcpus: Vec<KvmStats>,
}

impl VmCounters {
    /// One vCPU's counters (0 for any KVM does not have).
    pub fn vcpu(s: &KvmStats) -> VcpuCounters {
        let get = |n: &str| s.get(n).ok().flatten().unwrap_or(0);
        VcpuCounters {
            tlb_flush: get("tlb_flush"),
            pf_fixed: get("pf_fixed"),
            pf_taken: get("pf_taken"),
            exits: get("exits"),
        }
    }
}

impl KvmCounters for VmCounters {
    fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            flush_requests: self.vm.flush_requests(),
            vcpus: self.vcpus.iter().map(Self::vcpu).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_flush_counters_when_kvm_is_present() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIPPED: /dev/kvm not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let stats = KvmStats::open(&vm).expect("KVM_GET_STATS_FD on a VM");
        for name in [
            "remote_tlb_flush_requests",
            "remote_tlb_flush",
            "pages_4k",
            "mmu_shadow_zapped",
        ] {
            assert!(
                stats.get(name).unwrap().is_some(),
                "VM stat {name} missing; have {:?}",
                stats.names().collect::<Vec<_>>()
            );
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        let vs = KvmStats::open(&vcpu).unwrap();
        assert!(vs.get("exits").unwrap().is_some());
        assert!(vs.get("tlb_flush").unwrap().is_some());
    }
}
