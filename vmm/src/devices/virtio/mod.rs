//! virtio over MMIO (virtio 1.2 §4.2, modern only): the transport's registers, the queues
//! (rust-vmm virtio-queue), and the interrupt a device raises through an irqfd.

pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioTransport, MMIO_SIZE};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt: InterruptStatus bits plus an irqfd into the in-kernel irqchip.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot signal virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn device_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with these features; all ready queues are valid.
    fn activate(&mut self, acked_features: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// The guest-physical byte ranges of the rings the device uses from now on: those of the
    /// ready queues at activation, none after a reset. A device that can hand guest memory
    /// back to the host must never reclaim these frames under itself; it refuses rings it
    /// cannot protect (the transport then sets DEVICE_NEEDS_RESET).
    fn set_rings(&mut self, _rings: &[std::ops::Range<u64>]) -> Result<(), String> {
        Ok(())
    }
    /// Processes the available buffers of queue `index`.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    );
}
