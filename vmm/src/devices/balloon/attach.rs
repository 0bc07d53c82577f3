//! The balloon as the VM sees it: a virtio-mmio transport at a fixed address, its queue
//! notifications as ioeventfds (so a notify does not stop the vCPU in userspace), its
//! interrupt as an irqfd into the in-kernel IOAPIC, and the event-loop subscriber that
//! processes queues when notified.

use super::{Balloon, STATS_Q};
use crate::devices::virtio::{Interrupt, MmioTransport, MMIO_SIZE};
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
const QUEUE_NOTIFY: u64 = 0x50;

pub struct BalloonDevice {
    pub transport: Mutex<MmioTransport<Balloon>>,
    queue_evts: Vec<EventFd>,
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
        let transport = MmioTransport::new(Balloon::new(memory, interrupt.clone()), mem, interrupt);
        let mut queue_evts = Vec::new();
        for i in 0..transport.num_queues() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            vm_fd
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(BALLOON_MMIO_BASE + QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(|e| format!("KVM_IOEVENTFD: {e}"))?;
            queue_evts.push(evt);
        }
        Ok(Arc::new(Self {
            transport: Mutex::new(transport),
            queue_evts,
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

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let notify = self
            .transport
            .lock()
            .unwrap()
            .write(addr - BALLOON_MMIO_BASE, data);
        // A notify the ioeventfd did not catch (e.g. an unknown queue index) lands here.
        if let Some(q) = notify {
            match self.queue_evts.get(q) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => tracing::warn!("balloon: notify for nonexistent queue {q} ignored"),
            }
        }
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

/// Processes queues on the event loop when their ioeventfds fire.
pub struct BalloonHandler {
    pub device: Arc<BalloonDevice>,
}

impl MutEventSubscriber for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.device.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("balloon: cannot watch queue {i} notifications: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let i = events.data() as usize;
        if let Some(evt) = self.device.queue_evts.get(i) {
            debug_assert_eq!(evt.as_raw_fd(), events.fd());
            let _ = evt.read();
            self.device.transport.lock().unwrap().process_queue(i);
        }
    }
}
