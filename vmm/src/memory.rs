//! The VMM's side of guest-memory reclaim: one Stage2Gather per VM over the KVM memfd
//! backend, the stage-2 map, the readers registry that vCPU threads and device workers join,
//! and KVM's flush counters.

use guest_mm::gather::{FlushCounter, GatherConfig};
use guest_mm::kvm_stats::{KvmStats, VmCounters};
use guest_mm::{
    GuestRam, KvmMemfd, OwnershipChecked, Readers, Stage2Backend, Stage2Gather, Stage2Map,
};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};

pub struct MemoryManager {
    pub ram: Arc<GuestRam>,
    pub map: Arc<Stage2Map>,
    pub readers: Arc<Readers>,
    pub gather: Mutex<Stage2Gather>,
    /// VM-wide KVM statistics (None where KVM_GET_STATS_FD is unsupported).
    pub kvm_stats: Option<KvmStats>,
}

impl MemoryManager {
    /// For a VM: flush counts come from the VM's KVM statistics.
    pub fn for_vm(ram: Arc<GuestRam>, vm_fd: &VmFd, config: GatherConfig) -> Self {
        let open = || match KvmStats::open(vm_fd) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("KVM statistics unavailable (KVM_GET_STATS_FD: {e}); flush counts will be missing");
                None
            }
        };
        Self::new(ram, config, open(), open())
    }

    /// `gather_stats` counts flushes for the gather; `kvm_stats` serves reports.
    pub fn new(
        ram: Arc<GuestRam>,
        config: GatherConfig,
        gather_stats: Option<KvmStats>,
        kvm_stats: Option<KvmStats>,
    ) -> Self {
        Self::with_backend(
            ram,
            config,
            |ram, _| Arc::new(KvmMemfd::new(ram.clone())),
            gather_stats,
            kvm_stats,
        )
    }

    /// The KVM memfd backend wrapped so that every host call is checked against the frames'
    /// owners (`OwnershipChecked`, which panics on a violation): for tests and fuzzing.
    pub fn checked(ram: Arc<GuestRam>, config: GatherConfig) -> Self {
        Self::with_backend(
            ram,
            config,
            |ram, map| {
                Arc::new(OwnershipChecked::new(
                    Arc::new(KvmMemfd::new(ram.clone())),
                    map.clone(),
                ))
            },
            None,
            None,
        )
    }

    /// With another stage-2 backend, made from the RAM and the stage-2 map (tests and
    /// fuzzing wrap the KVM one to check every call against the frames' owners).
    pub fn with_backend(
        ram: Arc<GuestRam>,
        config: GatherConfig,
        make_backend: impl FnOnce(&Arc<GuestRam>, &Arc<Stage2Map>) -> Arc<dyn Stage2Backend>,
        gather_stats: Option<KvmStats>,
        kvm_stats: Option<KvmStats>,
    ) -> Self {
        let map = Arc::new(Stage2Map::new(ram.layout().clone()));
        let backend = make_backend(&ram, &map);
        let readers = Readers::new();
        let mut gather = Stage2Gather::new(config, map.clone(), backend, readers.clone());
        if let Some(s) = gather_stats {
            gather = gather.with_flush_counter(Box::new(s));
        }
        Self {
            ram,
            map,
            readers,
            gather: Mutex::new(gather),
            kvm_stats,
        }
    }

    /// Gives the gather the VM's and every vCPU's KVM statistics, so that each batch reports
    /// the flush requests it caused, each vCPU's TLB flushes and the refaults after it.
    /// Where KVM_GET_STATS_FD is missing the counts stay unavailable (warned once).
    pub fn attach_vcpu_stats(&self, vm_fd: &VmFd, vcpus: &[kvm_ioctls::VcpuFd]) {
        let opened = KvmStats::open(vm_fd).and_then(|vm| {
            let vcpus = vcpus
                .iter()
                .map(KvmStats::open)
                .collect::<std::io::Result<_>>()?;
            Ok(VmCounters { vm, vcpus })
        });
        match opened {
            Ok(c) => self.gather.lock().unwrap().set_flush_counter(Box::new(c)),
            Err(e) => tracing::warn!(
                "KVM vCPU statistics unavailable (KVM_GET_STATS_FD: {e}); per-vCPU TLB flush and refault counts will be missing"
            ),
        }
    }

    /// KVM's `remote_tlb_flush_requests` now.
    pub fn flush_requests(&self) -> Option<u64> {
        self.kvm_stats.as_ref().and_then(|s| s.flush_requests())
    }

    pub fn kvm_stat(&self, name: &str) -> Option<u64> {
        self.kvm_stats
            .as_ref()
            .and_then(|s| s.get(name).ok().flatten())
    }
}
