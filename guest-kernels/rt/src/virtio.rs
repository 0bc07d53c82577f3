//! A polling virtio-mmio (modern, version 2) driver core: device discovery from
//! `virtio_mmio.device=SIZE@ADDR:IRQ` command-line entries (the Linux convention, which QEMU's
//! microvm also appends), feature negotiation, and split virtqueues with one buffer in flight.

use crate::frames;
use abi::virtio::{reg, MAGIC};
use core::sync::atomic::{fence, Ordering};

pub use abi::virtio::{status, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1};

#[derive(Debug)]
pub enum VirtioError {
    NotFound,
    Legacy(u32),
    FeaturesRefused,
    NoQueue(u16),
    OutOfMemory,
    NeedsReset,
}

/// One virtio-mmio device's registers.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub base: u64,
}

impl Device {
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: MMIO register of a discovered device; identity mapped.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    pub fn set_status(&self, v: u32) {
        self.write(reg::STATUS, v)
    }

    pub fn config_read(&self, off: u64) -> u32 {
        self.read(reg::CONFIG + off)
    }

    pub fn config_write(&self, off: u64, v: u32) {
        self.write(reg::CONFIG + off, v)
    }

    /// Resets the device and negotiates `wanted & offered` (VERSION_1 required).
    /// Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, VirtioError> {
        let version = self.read(reg::VERSION);
        if version != 2 {
            return Err(VirtioError::Legacy(version));
        }
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES) as u64;
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES) as u64;
        let accepted = (lo | hi << 32) & (wanted | F_VERSION_1);
        if accepted & F_VERSION_1 == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        Ok(accepted)
    }

    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        if self.status() & status::NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset);
        }
        Ok(())
    }
}

fn parse_hex_or_dec(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// QEMU's microvm places its virtio-mmio transports here (512 bytes each) and names them on
/// the command line only for Linux boot, not for PVH, so they are also probed directly.
const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
const MICROVM_MMIO_SLOTS: u64 = 24;
const MICROVM_MMIO_SIZE: u64 = 0x200;

/// Finds the first virtio-mmio device of `device_id`: those named on the command line
/// (`virtio_mmio.device=`), then QEMU microvm's transport slots.
pub fn find(cmdline_str: &str, device_id: u32) -> Result<Device, VirtioError> {
    find_on_cmdline(cmdline_str, device_id).or_else(|_| {
        (0..MICROVM_MMIO_SLOTS)
            .map(|i| Device {
                base: MICROVM_MMIO_BASE + i * MICROVM_MMIO_SIZE,
            })
            .find(|d| d.read(reg::MAGIC_VALUE) == MAGIC && d.read(reg::DEVICE_ID) == device_id)
            .ok_or(VirtioError::NotFound)
    })
}

fn find_on_cmdline(cmdline_str: &str, device_id: u32) -> Result<Device, VirtioError> {
    for entry in cmdline_str.split_ascii_whitespace() {
        let Some(spec) = entry.strip_prefix("virtio_mmio.device=") else {
            continue;
        };
        let Some((_, rest)) = spec.split_once('@') else {
            continue;
        };
        let addr = rest.split(':').next().and_then(parse_hex_or_dec);
        let Some(base) = addr else { continue };
        let dev = Device { base };
        if dev.read(reg::MAGIC_VALUE) == MAGIC && dev.read(reg::DEVICE_ID) == device_id {
            return Ok(dev);
        }
    }
    Err(VirtioError::NotFound)
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A split virtqueue used with one buffer (chain) in flight at a time.
pub struct Queue {
    dev: Device,
    index: u16,
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u16,
    avail_idx: u16,
    last_used: u16,
    in_flight: bool,
}

impl Queue {
    /// Sets up queue `index` with at most `max` entries in three fresh frames.
    pub fn new(dev: Device, index: u16, max: u16) -> Result<Self, VirtioError> {
        dev.write(reg::QUEUE_SEL, index as u32);
        let num_max = dev.read(reg::QUEUE_NUM_MAX);
        if num_max == 0 {
            return Err(VirtioError::NoQueue(index));
        }
        let size = (num_max as u16).min(max);
        let frame = || {
            frames::alloc()
                .ok_or(VirtioError::OutOfMemory)
                .map(|f| f * frames::PAGE_SIZE)
        };
        let (d, a, u) = (frame()?, frame()?, frame()?);
        for p in [d, a, u] {
            // SAFETY: fresh frames we own.
            unsafe { core::ptr::write_bytes(p as *mut u8, 0, frames::PAGE_SIZE as usize) };
        }
        Self::with_rings(dev, index, size, [d, a, u])
    }

    /// Sets up queue `index` with `size` entries and its rings (descriptor table, available
    /// ring, used ring) at the given guest-physical addresses, which the caller provides and
    /// has zeroed; nothing is checked or touched here (hostile tests place rings anywhere).
    pub fn with_rings(
        dev: Device,
        index: u16,
        size: u16,
        rings: [u64; 3],
    ) -> Result<Self, VirtioError> {
        dev.write(reg::QUEUE_SEL, index as u32);
        if dev.read(reg::QUEUE_NUM_MAX) == 0 {
            return Err(VirtioError::NoQueue(index));
        }
        let [d, a, u] = rings;
        dev.write(reg::QUEUE_NUM, size as u32);
        dev.write(reg::QUEUE_DESC_LOW, d as u32);
        dev.write(reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
        dev.write(reg::QUEUE_AVAIL_LOW, a as u32);
        dev.write(reg::QUEUE_AVAIL_HIGH, (a >> 32) as u32);
        dev.write(reg::QUEUE_USED_LOW, u as u32);
        dev.write(reg::QUEUE_USED_HIGH, (u >> 32) as u32);
        dev.write(reg::QUEUE_READY, 1);
        Ok(Self {
            dev,
            index,
            size,
            desc: d as *mut Desc,
            avail: a as *mut u16,
            used: u as *mut u16,
            avail_idx: 0,
            last_used: 0,
            in_flight: false,
        })
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn rings(&self) -> [u64; 3] {
        [self.desc as u64, self.avail as u64, self.used as u64]
    }

    /// The driver's available index (how many buffers it has made available).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// (id, len) of the used element the device returned last.
    pub fn last_used(&self) -> (u32, u32) {
        let slot = self.last_used.wrapping_sub(1) % self.size;
        // SAFETY: used->ring[slot] lies within the used ring (slot < size).
        unsafe {
            let e = (self.used as *mut u32).add(1 + 2 * slot as usize);
            (e.read_volatile(), e.add(1).read_volatile())
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Makes `chain` (at most `size` descriptors) available and notifies the device.
    pub fn submit(&mut self, chain: &[Desc]) {
        let n = chain.len().min(self.size as usize);
        for (i, d) in chain[..n].iter().enumerate() {
            let mut d = *d;
            if i + 1 < n {
                d.flags |= DESC_F_NEXT;
                d.next = (i + 1) as u16;
            }
            // SAFETY: i < size; the descriptor table is ours.
            unsafe { self.desc.add(i).write_volatile(d) };
        }
        self.publish(0);
    }

    /// Writes `descs` verbatim (flags and `next` as given, so they may loop or point
    /// anywhere) at descriptor indices 0.., makes `head` available and notifies the device.
    pub fn submit_raw(&mut self, descs: &[Desc], head: u16) {
        let n = descs.len().min(self.size as usize);
        for (i, d) in descs[..n].iter().enumerate() {
            // SAFETY: i < size; the descriptor table is ours.
            unsafe { self.desc.add(i).write_volatile(*d) };
        }
        self.publish(head);
    }

    fn publish(&mut self, head: u16) {
        // SAFETY: ring slot within the avail ring page.
        unsafe {
            self.avail
                .add(2 + (self.avail_idx % self.size) as usize)
                .write_volatile(head)
        };
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: avail->idx.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
        fence(Ordering::SeqCst);
        self.in_flight = true;
        self.dev.write(reg::QUEUE_NOTIFY, self.index as u32);
    }

    /// True once the device returned the buffer in flight.
    pub fn poll(&mut self) -> bool {
        if !self.in_flight {
            return false;
        }
        // SAFETY: used->idx.
        let idx = unsafe { self.used.add(1).read_volatile() };
        if idx != self.last_used {
            fence(Ordering::SeqCst);
            self.last_used = idx;
            self.in_flight = false;
            return true;
        }
        false
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Submits `chain` and waits for the device to return it.
    pub fn call(&mut self, chain: &[Desc]) -> Result<(), VirtioError> {
        self.submit(chain);
        while !self.poll() {
            if self.dev.status() & status::NEEDS_RESET != 0 {
                return Err(VirtioError::NeedsReset);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }
}
