//! Shared set-up and invariants for the fuzz targets: a balloon behind its virtio-mmio
//! transport on a memfd-backed guest RAM, with the KVM memfd backend wrapped so that every
//! host call is checked against the frames' owners (`OwnershipChecked`: a zap only of frames
//! the balloon gathered, a release only of zapped ones, nothing outside RAM), and the
//! ownership invariants of `vmm::devices::balloon::ownership` checked between steps.

use guest_mm::layout::PAGE_SIZE;
use guest_mm::{GatherConfig, GuestRam, KvmMemfd, OwnershipChecked, Strategy};
use std::sync::Arc;
use vmm::devices::balloon::{ownership, Balloon};
use vmm::devices::virtio::{Interrupt, MmioTransport};
use vmm::memory::MemoryManager;
use vmm_sys_util::eventfd::EventFd;

pub const RAM: u64 = 8 << 20;

pub struct Target {
    pub t: MmioTransport<Balloon>,
    pub mm: Arc<MemoryManager>,
    /// What the reclaim probe did (for the targets that drive it).
    pub outside: ownership::Outside,
}

impl Target {
    pub fn new(strategy: Strategy) -> Self {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let mm = Arc::new(MemoryManager::with_backend(
            ram.clone(),
            GatherConfig::new(strategy),
            |ram, map| {
                Arc::new(OwnershipChecked::new(
                    Arc::new(KvmMemfd::new(ram.clone())),
                    map.clone(),
                ))
            },
            None,
            None,
        ));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Balloon::new(mm.clone(), irq.clone()),
            ram.memory().clone(),
            irq,
        );
        Self {
            t,
            mm,
            outside: ownership::Outside::default(),
        }
    }

    /// Runs the reclaim probe on the mailbox at `gpa` and accounts for what it did.
    pub fn probe(&mut self, gpa: u64) {
        if let Some(Ok(out)) = vmm::devices::reclaim_probe::handle(&self.mm, gpa) {
            self.outside.reclaimed += out.reclaimed.len() as u64;
            self.outside.invalid += out.invalid;
        }
    }

    /// Invariants that must hold between guest actions.
    pub fn check(&self) {
        if let Err(e) = ownership::check(self.t.device(), self.t.is_active(), &self.mm, self.outside)
        {
            panic!("ownership invariant broken: {e}");
        }
        let held = self.mm.ram.host_bytes_held().unwrap();
        assert!(held <= RAM, "the memfd holds more than guest RAM: {held}");
        assert!(
            self.t.device().actual() as u64 <= RAM / PAGE_SIZE,
            "actual above RAM"
        );
    }
}
