//! The balloon as the VM sees it: a virtio-mmio transport at a fixed address, its interrupt
//! as an irqfd into the in-kernel IOAPIC, and where its queues are processed.
//!
//! Inflate, deflate and stats notifications are MMIO exits handled on the notifying vCPU
//! thread (`mmio_write`): the buffer is recorded and acknowledged before the vCPU re-enters
//! the guest, with no other thread to wake. Measured here, handing each buffer to the event
//! loop through an ioeventfd cost the driver vCPU a context switch and 0.8 ms of run-queue
//! delay per buffer with 4 vCPUs on 2 cores (docs/BENCHMARKS.md, "Where the time went").
//! Free page reports wait for their release before they are returned, so their queue's
//! notifications are an ioeventfd that the event loop serves (`BalloonHandler`), with the
//! device lock dropped while the report is reclaimed.

use super::{Balloon, REPORTING_Q, STATS_Q};
use crate::devices::virtio::{reg, Effect, Interrupt, MmioTransport, MMIO_SIZE};
use crate::memory::MemoryManager;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the balloon's registers (in the MMIO hole).
pub const BALLOON_MMIO_BASE: u64 = 0xd000_0000;
/// The IOAPIC pin (GSI) of its interrupt.
pub const BALLOON_GSI: u32 = 5;

pub struct BalloonDevice {
    pub transport: Mutex<MmioTransport<Balloon>>,
    memory: Arc<MemoryManager>,
    /// The free page reporting queue's notifications (KVM_IOEVENTFD on QueueNotify with
    /// datamatch REPORTING_Q).
    reports_evt: EventFd,
    /// How often the event loop asks the driver for fresh statistics (0: never).
    stats_interval_s: AtomicU64,
}

/// The statistics polling interval a VM starts with.
pub const DEFAULT_STATS_INTERVAL_S: u64 = 1;

impl BalloonDevice {
    /// Creates the device and wires its notifications and interrupt into KVM.
    pub fn attach(vm_fd: &VmFd, memory: Arc<MemoryManager>) -> Result<Arc<Self>, String> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        vm_fd
            .register_irqfd(&irqfd, BALLOON_GSI)
            .map_err(|e| format!("KVM_IRQFD: {e}"))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let mem = memory.ram.memory().clone();
        let transport = MmioTransport::new(
            Balloon::new(memory.clone(), interrupt.clone()),
            mem,
            interrupt,
        );
        let reports_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        vm_fd
            .register_ioevent(
                &reports_evt,
                &IoEventAddress::Mmio(BALLOON_MMIO_BASE + reg::QUEUE_NOTIFY),
                REPORTING_Q as u32,
            )
            .map_err(|e| format!("KVM_IOEVENTFD: {e}"))?;
        Ok(Arc::new(Self {
            transport: Mutex::new(transport),
            memory,
            reports_evt,
            stats_interval_s: AtomicU64::new(DEFAULT_STATS_INTERVAL_S),
        }))
    }

    /// Sets the target in 4 KiB pages; a change raises the configuration-change interrupt.
    pub fn set_target_pages(&self, pages: u32) {
        let mut t = self.transport.lock().unwrap();
        if t.device_mut().set_num_pages(pages) {
            t.config_changed();
        }
    }

    /// The kernel command line entry that tells a Linux-style driver where the device is.
    pub fn cmdline_entry() -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_SIZE >> 10,
            BALLOON_MMIO_BASE,
            BALLOON_GSI
        )
    }

    pub fn contains(addr: u64) -> bool {
        (BALLOON_MMIO_BASE..BALLOON_MMIO_BASE + MMIO_SIZE).contains(&addr)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.transport
            .lock()
            .unwrap()
            .read(addr - BALLOON_MMIO_BASE, data);
    }

    /// A register write from a vCPU thread. A queue notification is served here, on that
    /// thread, except for the reporting queue (the event loop's).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut t = self.transport.lock().unwrap();
        let effect = t.write(addr - BALLOON_MMIO_BASE, data);
        if serve_inline(&mut t, effect) {
            let _ = self.reports_evt.write(1);
        }
    }

    /// Serves the free page reports the driver has made available: parsed with the device
    /// lock held, reclaimed without it (the vCPUs' register accesses never wait for a batch),
    /// then returned to the driver.
    pub fn serve_reports(&self) {
        let (mut reports, generation) = {
            let mut t = self.transport.lock().unwrap();
            t.process_queue(REPORTING_Q);
            t.device_mut().drain_reports()
        };
        if reports.is_empty() {
            return;
        }
        for r in &mut reports {
            r.reclaim(&self.memory);
        }
        let mut t = self.transport.lock().unwrap();
        t.with_device_and_queue(REPORTING_Q, |dev, q, mem| {
            dev.complete_reports(reports, generation, q, mem)
        });
    }

    pub fn stats_interval_s(&self) -> u64 {
        self.stats_interval_s.load(Ordering::Relaxed)
    }

    pub fn set_stats_interval_s(&self, s: u64) {
        self.stats_interval_s.store(s, Ordering::Relaxed);
    }

    /// Asks the driver for fresh statistics.
    pub fn request_stats(&self) {
        let mut t = self.transport.lock().unwrap();
        if t.is_active() {
            t.with_device_and_queue(STATS_Q, |dev, q, mem| dev.request_stats(q, mem));
        }
    }
}

/// What a register write's effect asks of the writing vCPU thread: inflate, deflate and stats
/// notifications are served here and now; a reporting notification is left for the event
/// loop (returns true). DRIVER_OK serves every queue once, since a driver may make buffers
/// available and notify before it. (Shared by the VMM and the fuzz targets.)
pub fn serve_inline(t: &mut MmioTransport<Balloon>, effect: Option<Effect>) -> bool {
    match effect {
        None => false,
        Some(Effect::Notify(REPORTING_Q)) => true,
        Some(Effect::Notify(q)) if q < t.num_queues() => {
            t.process_queue(q);
            false
        }
        Some(Effect::Notify(q)) => {
            tracing::warn!("balloon: notify for nonexistent queue {q} ignored");
            false
        }
        Some(Effect::Activated) => {
            for q in (0..t.num_queues()).filter(|&q| q != REPORTING_Q) {
                t.process_queue(q);
            }
            true
        }
    }
}

/// Serves free page reports on the event loop when their ioeventfd fires.
pub struct BalloonHandler {
    pub device: Arc<BalloonDevice>,
}

impl MutEventSubscriber for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.device.reports_evt, EventSet::IN)) {
            tracing::error!("balloon: cannot watch free page report notifications: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        debug_assert_eq!(self.device.reports_evt.as_raw_fd(), events.fd());
        let _ = self.device.reports_evt.read();
        self.device.serve_reports();
    }
}
