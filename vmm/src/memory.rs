//! The VMM's side of guest-memory reclaim: one Stage2Gather per VM over the KVM memfd
//! backend (its protocol on the `reclaim` worker thread), the stage-2 map, the readers
//! registry that device code joins while it holds guest addresses, and KVM's statistics.

use guest_mm::kvm_stats::{KvmStats, VmCounters};
use guest_mm::reclaim::ConfigError;
use guest_mm::{
    GuestRam, KvmMemfd, OwnershipChecked, Readers, ReclaimConfig, Stage2Backend, Stage2Gather,
    Stage2Map,
};
use kvm_ioctls::VmFd;
use std::sync::Arc;

pub struct MemoryManager {
    pub ram: Arc<GuestRam>,
    pub map: Arc<Stage2Map>,
    pub readers: Arc<Readers>,
    pub gather: Stage2Gather,
    /// VM-wide KVM statistics (None where KVM_GET_STATS_FD is unsupported).
    pub kvm_stats: Option<KvmStats>,
}

/// Where the gather runs its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// On the `reclaim` worker thread (a VM).
    Worker,
    /// On the thread that closes a batch (deterministic: device tests, fuzzing).
    Inline,
}

impl MemoryManager {
    /// For a VM: the protocol on its worker; flush counts from the VM's KVM statistics.
    pub fn for_vm(
        ram: Arc<GuestRam>,
        vm_fd: &VmFd,
        config: ReclaimConfig,
    ) -> Result<Self, MemoryError> {
        let stats = match KvmStats::open(vm_fd) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("KVM statistics unavailable (KVM_GET_STATS_FD: {e}); flush counts will be missing");
                None
            }
        };
        Self::with_backend(
            ram,
            config,
            |ram, _| Arc::new(KvmMemfd::new(ram.clone())),
            Protocol::Worker,
            stats,
        )
    }

    /// The KVM memfd backend wrapped so that every host call is checked against the frames'
    /// owners (`OwnershipChecked`, which panics on a violation), inline: for tests and
    /// fuzzing.
    pub fn checked(ram: Arc<GuestRam>, config: ReclaimConfig) -> Result<Self, MemoryError> {
        Self::with_backend(
            ram,
            config,
            |ram, map| {
                Arc::new(OwnershipChecked::new(
                    Arc::new(KvmMemfd::new(ram.clone())),
                    map.clone(),
                ))
            },
            Protocol::Inline,
            None,
        )
    }

    /// With another stage-2 backend, made from the RAM and the stage-2 map.
    pub fn with_backend(
        ram: Arc<GuestRam>,
        config: ReclaimConfig,
        make_backend: impl FnOnce(&Arc<GuestRam>, &Arc<Stage2Map>) -> Arc<dyn Stage2Backend>,
        protocol: Protocol,
        kvm_stats: Option<KvmStats>,
    ) -> Result<Self, MemoryError> {
        let map = Arc::new(Stage2Map::new(ram.layout().clone()));
        let backend = make_backend(&ram, &map);
        let readers = Readers::new();
        let mut gather = Stage2Gather::new(config, map.clone(), backend, readers.clone())?;
        if protocol == Protocol::Worker {
            gather = gather.spawn_worker().map_err(MemoryError::Worker)?;
        }
        Ok(Self {
            ram,
            map,
            readers,
            gather,
            kvm_stats,
        })
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
            Ok(c) => self.gather.set_counters(Arc::new(c)),
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

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the reclaim worker thread: {0}")]
    Worker(std::io::Error),
}
