//! virtio over MMIO (virtio 1.2 §4.2, modern only): the transport's registers, the queues
//! (rust-vmm virtio-queue), and the interrupt a device raises through an irqfd.

pub mod mmio;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{Effect, MmioTransport, MMIO_SIZE};

use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_mmio as mmio_regs;

pub const VIRTIO_F_VERSION_1: u64 = 1 << cfg::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use super::cfg;
    pub const ACKNOWLEDGE: u32 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = cfg::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = cfg::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = cfg::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = cfg::VIRTIO_CONFIG_S_FAILED;
}

/// The transport's register offsets (virtio 1.2 §4.2.2), as MMIO offsets.
pub mod reg {
    use super::mmio_regs as m;
    pub const MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The device's interrupt: InterruptStatus bits plus an irqfd into the in-kernel irqchip, and
/// how many times each kind was signalled (the guest sees them in its /proc/interrupts).
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    used_ring_signals: AtomicU64,
    config_signals: AtomicU64,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            used_ring_signals: AtomicU64::new(0),
            config_signals: AtomicU64::new(0),
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if bits & INT_USED_RING != 0 {
            self.used_ring_signals.fetch_add(1, Ordering::Relaxed);
        }
        if bits & INT_CONFIG != 0 {
            self.config_signals.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot signal virtio interrupt: {e}");
        }
    }

    /// Signals written to the irqfd so far: (used ring, configuration change).
    pub fn signals(&self) -> (u64, u64) {
        (
            self.used_ring_signals.load(Ordering::Relaxed),
            self.config_signals.load(Ordering::Relaxed),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use abi::virtio as guest;

    /// The guests' copies (no_std, so they cannot use `virtio-bindings`) are rust-vmm's values.
    #[test]
    fn the_guests_virtio_values_are_rust_vmms() {
        // Asserts that each named constant of `module` has rust-vmm's value in the guests' copy.
        macro_rules! same_in_guests {
            ($module:ident: $($name:ident),+ $(,)?) => {
                $(assert_eq!(guest::$module::$name, $module::$name, stringify!($name));)+
            };
        }
        same_in_guests!(reg:
            MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
            DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM,
            QUEUE_READY, QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS, QUEUE_DESC_LOW,
            QUEUE_DESC_HIGH, QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH, QUEUE_USED_LOW, QUEUE_USED_HIGH,
            CONFIG_GENERATION, CONFIG,
        );
        same_in_guests!(status: ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, FAILED);
        assert_eq!(guest::status::NEEDS_RESET, status::DEVICE_NEEDS_RESET);
        assert_eq!(guest::INT_VRING, INT_USED_RING);
        assert_eq!(guest::INT_CONFIG, INT_CONFIG);
        assert_eq!(guest::F_VERSION_1, VIRTIO_F_VERSION_1);
        assert_eq!(
            guest::balloon::DEVICE_ID,
            virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON
        );
        assert_eq!(
            u32::from(guest::DESC_F_NEXT),
            virtio_bindings::virtio_ring::VRING_DESC_F_NEXT
        );
        assert_eq!(
            u32::from(guest::DESC_F_WRITE),
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE
        );
    }
}
