//! The virtio-mmio transport, modern (version 2) register layout. Every register write from
//! the guest is validated: queue addresses must describe rings inside guest RAM before the
//! device is activated (else DEVICE_NEEDS_RESET), queue sizes must be powers of two within the
//! maximum, features the device did not offer are refused (FEATURES_OK is not set), and
//! queue configuration is frozen once DRIVER_OK is set. Rings that overlap each other (within a
//! queue or across queues) also make the device need a reset; the rings of an activated device
//! are handed to it (`VirtioDevice::set_rings`) so that it can protect them.

use super::{reg, status, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use std::ops::Range;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub const MMIO_SIZE: u64 = 0x1000;
const MAGIC: u32 = abi::virtio::MAGIC;
/// The modern (virtio 1.x) register layout.
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // same vendor id as QEMU's devices use ("QEMU")
const CONFIG_OFFSET: u64 = reg::CONFIG;

/// What a register write asks of the transport's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// QueueNotify: process this queue.
    Notify(usize),
    /// DRIVER_OK was accepted: process every ready queue once, since a driver may make
    /// buffers available and notify before DRIVER_OK (Linux primes the stats queue in
    /// `init_vqs`), and those notifications were not processed (`process_queue` ignores an
    /// inactive device).
    Activated,
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| Queue::new(max).expect("queue maximum sizes are valid powers of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// The device changed its configuration: bump the generation and tell the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.raise(INT_CONFIG);
    }

    /// Processes queue `index` if the device is active and the queue is ready.
    pub fn process_queue(&mut self, index: usize) {
        if !self.is_active() {
            return;
        }
        if let Some(q) = self.queues.get_mut(index) {
            if q.ready() {
                self.device.process_queue(index, q, &self.mem);
            }
        }
    }

    /// Processes every ready queue (after `Effect::Activated`).
    pub fn process_all(&mut self) {
        for i in 0..self.queues.len() {
            self.process_queue(i);
        }
    }

    /// Runs `f` on the device with queue `index` (for device-initiated queue work).
    pub fn with_device_and_queue(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut D, &mut Queue, &GuestMemoryMmap),
    ) {
        if let Some(q) = self.queues.get_mut(index) {
            if q.ready() {
                f(&mut self.device, q, &self.mem);
            }
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `index`'s ring byte ranges as the transport checks them (tests).
    #[cfg(test)]
    pub fn queue_rings_for_test(&self, index: usize) -> [Range<u64>; 3] {
        ring_ranges(&self.queues[index])
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        write_le(data, v);
    }

    /// Handles a register write; returns what the owner must do next, if anything.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<Effect> {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return None;
        }
        if data.len() != 4 {
            tracing::warn!(
                "virtio-mmio: {}-byte write to register {offset:#x} ignored (registers are 32-bit)",
                data.len()
            );
            return None;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        let queue_config_open =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if !queue_config_open =>
            {
                tracing::warn!("virtio-mmio: queue register {offset:#x} written outside feature negotiation; ignored");
            }
            reg::QUEUE_NUM => {
                let max = self.selected().map_or(0, |q| q.max_size() as u32);
                if v == 0 || v > max || !v.is_power_of_two() {
                    tracing::warn!(
                        "virtio-mmio: invalid queue size {v} (max {max}); queue stays unusable"
                    );
                    // An invalid size leaves the queue invalid, so activation fails loudly.
                    if let Some(q) = self.selected() {
                        q.set_size(0);
                    }
                } else if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => return Some(Effect::Notify(v as usize)),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => return self.write_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!(
                "virtio-mmio: write of {v:#x} to unknown register {offset:#x} ignored"
            ),
        }
        None
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) -> Option<Effect> {
        if v == 0 {
            self.reset();
            return None;
        }
        // DEVICE_NEEDS_RESET is cleared only by a reset: otherwise a driver whose activation
        // was refused could write DRIVER_OK again and be accepted with the rings that were
        // refused. Only FAILED may still be added.
        if self.status & status::DEVICE_NEEDS_RESET != 0 {
            tracing::warn!(
                "virtio-mmio: status {v:#x} written while the device needs a reset; only FAILED is taken"
            );
            self.status |= v & status::FAILED;
            return None;
        }
        // A driver never clears a status bit except by a reset (virtio 1.2 §2.1.2); dropping
        // DRIVER_OK or FEATURES_OK would reopen feature and queue registers under a live
        // device, so such a write is refused and the status stays.
        let cleared = self.status & !v;
        if cleared != 0 {
            tracing::warn!(
                "virtio-mmio: status write {v:#x} would clear bits {cleared:#x} without a reset; ignored"
            );
            return None;
        }
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::error!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x}, VERSION_1 required); FEATURES_OK refused",
                    self.driver_features
                );
                self.status = v & !(status::FEATURES_OK | status::DRIVER_OK);
                return None;
            }
        }
        if v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            if v & status::FEATURES_OK == 0 {
                tracing::error!("virtio-mmio: DRIVER_OK without FEATURES_OK refused");
                self.status = v & !status::DRIVER_OK;
                return None;
            }
            let bad: Vec<usize> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready() && !q.is_valid(&self.mem))
                .map(|(i, _)| i)
                .collect();
            if !bad.is_empty() {
                tracing::error!("virtio-mmio: queues {bad:?} have rings outside guest RAM or a bad size; device needs reset");
                self.status = v | status::DEVICE_NEEDS_RESET;
                self.config_changed();
                return None;
            }
            let rings: Vec<(usize, Range<u64>)> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready())
                .flat_map(|(i, q)| ring_ranges(q).map(|r| (i, r)))
                .collect();
            if let Some((a, b)) = first_overlap(&rings) {
                tracing::error!(
                    "virtio-mmio: rings of queues {a} and {b} overlap; device needs reset"
                );
                self.status = v | status::DEVICE_NEEDS_RESET;
                self.config_changed();
                return None;
            }
            let ranges: Vec<Range<u64>> = rings.into_iter().map(|(_, r)| r).collect();
            if let Err(e) = self.device.set_rings(&ranges) {
                tracing::error!(
                    "virtio-mmio: the device cannot use these rings ({e}); device needs reset"
                );
                self.status = v | status::DEVICE_NEEDS_RESET;
                self.config_changed();
                return None;
            }
            self.status = v;
            self.device.activate(self.driver_features);
            return Some(Effect::Activated);
        }
        self.status = v;
        None
    }

    fn reset(&mut self) {
        // Releasing rings cannot fail.
        let _ = self.device.set_rings(&[]);
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }
}

/// The guest-physical bytes of a queue's descriptor table, available ring and used ring
/// (the sizes virtio-queue validates; no event-index fields beyond them are negotiated).
fn ring_ranges(q: &Queue) -> [Range<u64>; 3] {
    let n = q.size() as u64;
    let span = |start: u64, len: u64| start..start.saturating_add(len);
    [
        span(q.desc_table(), 16 * n),
        span(q.avail_ring(), 6 + 2 * n),
        span(q.used_ring(), 6 + 8 * n),
    ]
}

/// The queues of the first two rings (of the same queue or of two) that share a byte, if any.
/// A driver that places one ring over another would have the device read its own writes as
/// descriptors or ring entries; such a layout is refused at DRIVER_OK.
fn first_overlap(rings: &[(usize, Range<u64>)]) -> Option<(usize, usize)> {
    rings.iter().enumerate().find_map(|(i, (qa, a))| {
        rings[i + 1..]
            .iter()
            .find(|(_, b)| a.start < b.end && b.start < a.end)
            .map(|(qb, _)| (*qa, *qb))
    })
}

fn write_le(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
    for x in data.iter_mut().skip(n) {
        *x = 0;
    }
}
