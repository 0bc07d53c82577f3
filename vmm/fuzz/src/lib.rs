//! Shared set-up and invariants for the fuzz targets: a balloon behind its virtio-mmio
//! transport on a memfd-backed guest RAM, with the KVM memfd backend wrapped so that every
//! host call is checked against the frames' owners (`OwnershipChecked`: a zap only of frames
//! the balloon gathered, a release only of zapped ones, nothing outside RAM), and the
//! ownership invariants of `vmm::devices::balloon::ownership` checked between steps.

use guest_mm::layout::PAGE_SIZE;
use guest_mm::{GuestRam, ReclaimConfig, Strategy};
use std::sync::Arc;
use vmm::devices::balloon::{self, ownership, Balloon};
use vmm::devices::virtio::{reg, status, Interrupt, MmioTransport};
use vmm::memory::MemoryManager;
use vmm_sys_util::eventfd::EventFd;

pub const RAM: u64 = 8 << 20;
/// Where `activate` puts the rings: queue q at RINGS + q * 0x3000 (descriptor table,
/// available ring, used ring, a page each).
pub const RINGS: u64 = 0x10000;
/// The queues' size after `activate`.
pub const QSIZE: u32 = 16;

/// The strategy a fuzz input's first byte picks.
pub fn strategy_of(byte: u8) -> Strategy {
    [Strategy::PerPage, Strategy::PerBuffer, Strategy::Gather][byte as usize % 3]
}

pub struct Target {
    pub t: MmioTransport<Balloon>,
    pub mm: Arc<MemoryManager>,
    /// What the reclaim probe did (for the targets that drive it).
    pub outside: ownership::Outside,
}

impl Target {
    pub fn new(strategy: Strategy) -> Self {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let mm = Arc::new(
            MemoryManager::checked(ram.clone(), ReclaimConfig::with_strategy(strategy))
                .expect("a valid configuration"),
        );
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Balloon::new(
                mm.clone(),
                irq.clone(),
                balloon::BalloonFeatures {
                    free_page_hinting: true,
                    free_page_reporting: true,
                },
            ),
            ram.memory().clone(),
            irq,
        );
        Self {
            t,
            mm,
            outside: ownership::Outside::default(),
        }
    }

    fn reg(&mut self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    /// A register write as the VMM handles it on a vCPU thread: notifications served at
    /// once, free page reports as the event loop serves them.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let effect = self.t.write(off, data);
        balloon::serve_exclusive(&mut self.t, effect);
    }

    /// Processes queue `q` as a notification of it would.
    pub fn process(&mut self, q: usize) {
        self.write(reg::QUEUE_NOTIFY, &(q as u32).to_le_bytes());
    }

    /// Drives a correct driver initialisation: every feature the device offers and four
    /// queues at RINGS, then DRIVER_OK.
    pub fn activate(&mut self) {
        use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        let features = vmm::devices::virtio::VIRTIO_F_VERSION_1
            | balloon::F_STATS_VQ
            | balloon::F_DEFLATE_ON_OOM
            | balloon::F_FREE_PAGE_REPORTING
            | balloon::F_FREE_PAGE_HINT;
        self.reg(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.reg(reg::DRIVER_FEATURES_SEL, 0);
        self.reg(reg::DRIVER_FEATURES, features as u32);
        self.reg(reg::DRIVER_FEATURES_SEL, 1);
        self.reg(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.reg(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for q in 0..self.t.num_queues() as u64 {
            let base = RINGS + q * 0x3000;
            self.reg(reg::QUEUE_SEL, q as u32);
            self.reg(reg::QUEUE_NUM, QSIZE);
            for (o, a) in [
                (reg::QUEUE_DESC_LOW, base),
                (reg::QUEUE_AVAIL_LOW, base + 0x1000),
                (reg::QUEUE_USED_LOW, base + 0x2000),
            ] {
                self.reg(o, a as u32);
                self.reg(o + 4, 0);
            }
            self.reg(reg::QUEUE_READY, 1);
        }
        self.reg(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(self.t.is_active());
        // A hinting run in progress, so that hinted ranges under its id are reclaimed.
        self.t.device_mut().hinting.start(true);
    }

    /// Runs the reclaim probe on the mailbox at `gpa` and accounts for what it did.
    pub fn probe(&mut self, gpa: u64) {
        if let Some(Ok(out)) = vmm::devices::reclaim_probe::handle(&self.mm, gpa) {
            self.outside.reclaimed += out.reclaimed.len() as u64;
            self.outside.not_freed += out.not_freed;
            self.outside.invalid += out.invalid;
        }
    }

    /// Invariants that must hold between guest actions.
    pub fn check(&self) {
        if let Err(e) =
            ownership::check(self.t.device(), self.t.is_active(), &self.mm, self.outside)
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
