//! Shared set-up and invariants for the fuzz targets: a balloon behind its virtio-mmio
//! transport on a memfd-backed guest RAM, with the KVM memfd backend wrapped so that every
//! host call is checked to lie inside guest RAM.

use guest_mm::gfn::GfnRange;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::{
    BackendError, FrameState, GatherConfig, GuestRam, KvmMemfd, Stage2Backend, Strategy,
};
use std::sync::Arc;
use vmm::devices::balloon::Balloon;
use vmm::devices::virtio::{Interrupt, MmioTransport};
use vmm::memory::MemoryManager;
use vmm_sys_util::eventfd::EventFd;

pub const RAM: u64 = 8 << 20;

/// The KVM memfd backend, asserting that no call leaves guest RAM.
struct Checked {
    inner: KvmMemfd,
    ram: Arc<GuestRam>,
}

impl Checked {
    fn check(&self, r: GfnRange) {
        let inside = self
            .ram
            .layout()
            .range_of_frames(r.start, r.count)
            .is_some();
        assert!(inside, "host call outside guest RAM: {r:?}");
    }
}

impl Stage2Backend for Checked {
    fn name(&self) -> &'static str {
        "checked"
    }
    fn zap(&self, r: GfnRange) -> Result<(), BackendError> {
        self.check(r);
        self.inner.zap(r)
    }
    fn release(&self, r: GfnRange) -> Result<(), BackendError> {
        self.check(r);
        self.inner.release(r)
    }
}

pub struct Target {
    pub t: MmioTransport<Balloon>,
    pub mm: Arc<MemoryManager>,
}

impl Target {
    pub fn new(strategy: Strategy) -> Self {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let backend = Arc::new(Checked {
            inner: KvmMemfd::new(ram.clone()),
            ram: ram.clone(),
        });
        let mm = Arc::new(MemoryManager::with_backend(
            ram.clone(),
            GatherConfig::new(strategy),
            backend,
            None,
            None,
        ));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Balloon::new(mm.clone(), irq.clone()),
            ram.memory().clone(),
            irq,
        );
        Self { t, mm }
    }

    /// Invariants that must hold between guest actions.
    pub fn check(&self) {
        let ram_pages = RAM / PAGE_SIZE;
        let map = &self.mm.map;
        let total: u64 = [
            FrameState::Mapped,
            FrameState::Gathered,
            FrameState::Zapped,
            FrameState::Released,
        ]
        .iter()
        .map(|&s| map.count(s))
        .sum();
        assert_eq!(total, ram_pages, "every RAM frame is in exactly one state");
        assert_eq!(
            map.count(FrameState::Zapped),
            0,
            "no frame is left between zap and release"
        );
        let g = self.mm.gather.lock().unwrap();
        let s = g.stats();
        assert_eq!(
            map.count(FrameState::Gathered),
            g.pending_pages(),
            "gathered frames are the pending batch"
        );
        assert!(
            s.pages_reclaimed >= map.count(FrameState::Released),
            "released frames were all reclaimed"
        );
        drop(g);
        let held = self.mm.ram.host_bytes_held().unwrap();
        assert!(held <= RAM, "the memfd holds more than guest RAM: {held}");
        assert!(
            self.t.device().actual() as u64 <= ram_pages,
            "actual above RAM"
        );
    }
}
