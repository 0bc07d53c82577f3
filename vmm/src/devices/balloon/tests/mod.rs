//! The balloon device driven through its virtio-mmio registers and real split rings in a
//! memfd-backed guest RAM, as a guest driver would: normal inflate/deflate/report/stats, and
//! hostile buffers. Host calls go to the real KvmMemfd backend (madvise/fallocate on the
//! memfd); no KVM is needed below the device. Canary pages check that nothing outside the
//! named frames is touched.

mod hinting;
mod partial_blocks;
mod sequences;
mod split;

use super::*;
use crate::devices::virtio::{reg as r, status, MmioTransport};
use crate::memory::Protocol;
use guest_mm::{FrameState, GuestRam, KvmMemfd, OwnershipChecked, ReclaimConfig, Strategy};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 64 << 20;
const QSIZE: u16 = 16;
/// Rings of queue q live at RING_BASE + q * 0x3000 (desc, avail, used pages).
const RING_BASE: u64 = 0x10000;
const BUF: u64 = 0x40000;
const CANARY: std::ops::Range<u64> = 0x2000..0x2010;

/// The memfd backend presented as a 2 MiB block backend: the host calls are real, the
/// gather's block logic is what a huge-page backend gets.
struct AsBlocks {
    inner: KvmMemfd,
    can_split: bool,
}

impl guest_mm::Stage2Backend for AsBlocks {
    fn capabilities(&self) -> guest_mm::Capabilities {
        guest_mm::Capabilities {
            name: "memfd-as-blocks",
            granule: guest_mm::Granule::Block {
                can_split: self.can_split,
            },
            ..self.inner.capabilities()
        }
    }
    fn zap(&self, s: &guest_mm::ZapSpan) -> Result<(), guest_mm::BackendError> {
        self.inner.zap(s)
    }
    fn release(&self, r: guest_mm::GfnRange) -> Result<(), guest_mm::BackendError> {
        self.inner.release(r)
    }
}

struct Harness {
    t: MmioTransport<Balloon>,
    mm: Arc<MemoryManager>,
    avail_idx: [u16; 5],
    /// What the reclaim probe did, for the ownership invariants.
    outside: ownership::Outside,
}

/// A register write as a vCPU thread makes it (`BalloonDevice::mmio_write`): notifications
/// and DRIVER_OK served at once, free page reports as the event loop serves them.
fn reg(t: &mut MmioTransport<Balloon>, off: u64, v: u32) {
    let effect = t.write(off, &v.to_le_bytes());
    serve_exclusive(t, effect);
}

fn read_reg(t: &MmioTransport<Balloon>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Harness {
    fn new(strategy: Strategy) -> Self {
        Self::with_blocks(strategy, None)
    }

    /// A device whose driver accepted all of `ALL` and set DRIVER_OK, rings at their usual place.
    fn active(strategy: Strategy) -> Self {
        let mut h = Self::new(strategy);
        h.init(ALL, None);
        h
    }

    /// With `blocks`, the memfd backend is driven as a 2 MiB block backend (that can split,
    /// or not), so the gather holds frames in their blocks as it does on huge pages.
    fn with_blocks(strategy: Strategy, blocks: Option<bool>) -> Self {
        let ram = Arc::new(GuestRam::new(MEM).unwrap());
        // Every host call is checked against the frames' owners.
        let config = ReclaimConfig::with_strategy(strategy);
        let mm = Arc::new(match blocks {
            None => MemoryManager::checked(ram.clone(), config).unwrap(),
            Some(can_split) => MemoryManager::with_backend(
                ram.clone(),
                config,
                |ram, map| {
                    let blocks = AsBlocks {
                        inner: KvmMemfd::new(ram.clone()),
                        can_split,
                    };
                    Arc::new(OwnershipChecked::new(Arc::new(blocks), map.clone()))
                },
                Protocol::Inline,
                None,
            )
            .unwrap(),
        });
        Self::on(mm)
    }

    /// The device on `mm`'s RAM and gather.
    fn on(mm: Arc<MemoryManager>) -> Self {
        Self::on_with(mm, false)
    }

    /// The device on `mm`'s RAM and gather, offering free page hinting or not.
    fn on_with(mm: Arc<MemoryManager>, hinting: bool) -> Self {
        let ram = mm.ram.clone();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Balloon::new(
                mm.clone(),
                interrupt.clone(),
                BalloonFeatures {
                    free_page_hinting: hinting,
                    ..BalloonFeatures::default()
                },
            ),
            ram.memory().clone(),
            interrupt,
        );
        let h = Self {
            t,
            mm,
            avail_idx: [0; 5],
            outside: ownership::Outside::default(),
        };
        h.fill_frames(CANARY, 0xcc);
        // Populate the rings and the buffer page now, so that later host-byte counts only
        // move with reclaim.
        h.fill_frames((RING_BASE / 4096)..(RING_BASE / 4096 + 15), 0);
        h.fill(BUF / 4096, 0);
        h
    }

    fn mem(&self) -> &vm_memory::GuestMemoryMmap {
        self.mm.ram.memory()
    }

    fn fill(&self, gfn: u64, byte: u8) {
        self.mem()
            .write_slice(&[byte; 4096], GuestAddress(gfn * 4096))
            .unwrap();
    }

    fn fill_frames(&self, frames: impl IntoIterator<Item = u64>, byte: u8) {
        for gfn in frames {
            self.fill(gfn, byte);
        }
    }

    fn page_is(&self, gfn: u64, byte: u8) -> bool {
        let mut b = [0u8; 4096];
        self.mem()
            .read_slice(&mut b, GuestAddress(gfn * 4096))
            .unwrap();
        b.iter().all(|&x| x == byte)
    }

    fn canary_intact(&self) -> bool {
        CANARY.into_iter().all(|g| self.page_is(g, 0xcc))
    }

    /// Drives the driver side of initialisation; `rings` overrides queue 0's ring address.
    fn init(&mut self, features: u64, ring0: Option<u64>) {
        self.init_queues_at(features, ring0);
        reg(
            &mut self.t,
            r::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Initialisation up to DRIVER_OK: features and the device's queues.
    fn init_queues(&mut self, features: u64) {
        self.init_queues_at(features, None);
    }

    fn init_queues_at(&mut self, features: u64, ring0: Option<u64>) {
        let t = &mut self.t;
        reg(t, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        reg(t, r::DRIVER_FEATURES_SEL, 0);
        reg(t, r::DRIVER_FEATURES, features as u32);
        reg(t, r::DRIVER_FEATURES_SEL, 1);
        reg(t, r::DRIVER_FEATURES, (features >> 32) as u32);
        reg(
            t,
            r::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for q in 0..t.num_queues() as u64 {
            let base = if q == 0 {
                ring0.unwrap_or(RING_BASE)
            } else {
                RING_BASE + q * 0x3000
            };
            reg(t, r::QUEUE_SEL, q as u32);
            reg(t, r::QUEUE_NUM, QSIZE as u32);
            for (lo, addr) in [
                (r::QUEUE_DESC_LOW, base),
                (r::QUEUE_AVAIL_LOW, base + 0x1000),
                (r::QUEUE_USED_LOW, base + 0x2000),
            ] {
                reg(t, lo, addr as u32);
                reg(t, lo + 4, (addr >> 32) as u32);
            }
            reg(t, r::QUEUE_READY, 1);
        }
    }

    /// Puts a chain of (addr, len, flags) descriptors on queue q and notifies the device, as
    /// a driver does. Returns the used index afterwards.
    fn submit(&mut self, q: usize, chain: &[(u64, u32, u16)]) -> u16 {
        self.make_available(q, chain);
        reg(&mut self.t, r::QUEUE_NOTIFY, q as u32);
        self.check();
        let base = RING_BASE + q as u64 * 0x3000;
        self.mem()
            .read_obj::<u16>(GuestAddress(base + 0x2002))
            .unwrap()
    }

    /// Puts a chain of (addr, len, flags) descriptors on queue q's available ring.
    fn make_available(&mut self, q: usize, chain: &[(u64, u32, u16)]) {
        let base = RING_BASE + q as u64 * 0x3000;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = if i + 1 < chain.len() { 1 } else { 0 };
            let d = base + (i as u64 % QSIZE as u64) * 16;
            let mem = self.mem();
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags | next, GuestAddress(d + 12)).unwrap();
            mem.write_obj(((i + 1) % QSIZE as usize) as u16, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = self.avail_idx[q] % QSIZE;
        self.mem()
            .write_obj(0u16, GuestAddress(base + 0x1000 + 4 + slot as u64 * 2))
            .unwrap();
        self.avail_idx[q] += 1;
        self.mem()
            .write_obj(self.avail_idx[q], GuestAddress(base + 0x1002))
            .unwrap();
    }

    /// Parses `chain` as a free page report, as the device does (without processing it).
    fn parse_report(&self, chain: &[(u64, u32, u16)]) -> Result<Vec<u64>, BufferError> {
        let base = RING_BASE + 0x30000;
        let mem = self.mem();
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let d = base + i as u64 * 16;
            let next = if i + 1 < chain.len() { 1 } else { 0 };
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags | next, GuestAddress(d + 12)).unwrap();
            mem.write_obj((i + 1) as u16, GuestAddress(d + 14)).unwrap();
        }
        let mut q = virtio_queue::Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        mem.write_obj(0u16, GuestAddress(base + 0x1004)).unwrap();
        mem.write_obj(1u16, GuestAddress(base + 0x1002)).unwrap();
        let chain = q.pop_descriptor_chain(mem).unwrap();
        queues::reported_frames(chain, self.mm.ram.layout())
    }

    /// The ownership invariants hold (`ownership::check`).
    fn check(&self) {
        if let Err(e) =
            ownership::check(self.t.device(), self.t.is_active(), &self.mm, self.outside)
        {
            panic!("ownership invariant broken: {e}");
        }
    }

    /// A driver's reset: the device's, then fresh rings (as a driver sets them up again), so
    /// that DRIVER_OK finds nothing left from before.
    fn reset(&mut self) {
        reg(&mut self.t, r::STATUS, 0);
        self.avail_idx = [0; 5];
        for q in 0..self.t.num_queues() as u64 {
            let base = RING_BASE + q * 0x3000;
            for idx in [base + 0x1002, base + 0x2002] {
                self.mem().write_obj(0u16, GuestAddress(idx)).unwrap();
            }
        }
        self.check();
    }

    fn pfn_buffer(&self, pfns: &[u32]) -> (u64, u32, u16) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem().write_slice(&bytes, GuestAddress(BUF)).unwrap();
        (BUF, bytes.len() as u32, 0)
    }

    fn counters(&self) -> BalloonCounters {
        self.t.device().counters.clone()
    }

    /// Writes a reclaim probe's mailbox at `gpa` as a guest does (status pending).
    fn write_mailbox(&self, mb: &abi::probe::Mailbox, gpa: u64) {
        let bytes: Vec<u8> = [
            mb.magic,
            mb.region_gfn,
            mb.region_pages,
            mb.list_gfn,
            mb.list_capacity,
            mb.pattern,
            0,
            abi::probe::STATUS_PENDING,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
        self.mem().write_slice(&bytes, GuestAddress(gpa)).unwrap();
    }

    fn state(&self, gfn: u64) -> FrameState {
        self.mm.map.state(gfn).unwrap()
    }
}

const ALL: u64 = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_REPORTING;

#[test]
fn inflate_reclaims_frames_and_deflate_returns_them() {
    let mut h = Harness::active(Strategy::PerBuffer);
    assert!(h.t.is_active());
    h.fill_frames(0x1000..0x1010, 0xab);
    let held = h.mm.ram.host_bytes_held().unwrap();
    let pfns: Vec<u32> = (0x1000..0x1010).rev().collect();
    let buf = h.pfn_buffer(&pfns);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 1, "buffer acknowledged");
    assert_eq!(held - h.mm.ram.host_bytes_held().unwrap(), 16 * 4096);
    assert_eq!(h.state(0x1005), FrameState::Released);
    assert!(h.page_is(0x1005, 0), "a reclaimed frame reads as zeros");
    let buf = h.pfn_buffer(&pfns);
    assert_eq!(h.submit(DEFLATE_Q, &[buf]), 1);
    assert_eq!(h.state(0x1005), FrameState::Mapped);
    let c = h.counters();
    assert_eq!(
        (c.pages_inflated, c.pages_deflated, c.invalid_frames),
        (16, 16, 0)
    );
    assert!(h.canary_intact());
}

#[test]
fn deflate_while_still_gathered_never_frees_the_frames() {
    let mut h = Harness::active(Strategy::Gather);
    h.fill_frames(0x1000..0x1004, 0x5a);
    let held = h.mm.ram.host_bytes_held().unwrap();
    let buf = h.pfn_buffer(&[0x1000, 0x1001, 0x1002, 0x1003]);
    h.submit(INFLATE_Q, &[buf]);
    assert_eq!(
        h.state(0x1001),
        FrameState::Gathered,
        "acked before the batch is flushed"
    );
    let buf = h.pfn_buffer(&[0x1001, 0x1002]);
    h.submit(DEFLATE_Q, &[buf]);
    h.mm.gather.flush();
    assert_eq!(h.state(0x1001), FrameState::Mapped);
    assert_eq!(h.state(0x1000), FrameState::Released);
    assert!(
        h.page_is(0x1001, 0x5a) && h.page_is(0x1002, 0x5a),
        "handed-back frames keep their data"
    );
    assert_eq!(held - h.mm.ram.host_bytes_held().unwrap(), 2 * 4096);
}

#[test]
fn hostile_pfns_are_refused_one_by_one() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let beyond = (MEM / 4096) as u32;
    let hole = (0xC000_0000u64 / 4096) as u32;
    h.fill(0x1000, 1);
    let buf = h.pfn_buffer(&[beyond, u32::MAX, hole, 0x1000, 0x1000]);
    assert_eq!(
        h.submit(INFLATE_Q, &[buf]),
        1,
        "the buffer still comes back"
    );
    let c = h.counters();
    assert_eq!(c.pages_inflated, 1);
    assert_eq!(
        c.invalid_frames, 4,
        "beyond RAM, u32::MAX, MMIO hole, duplicate"
    );
    assert!(h.canary_intact());
    // The device keeps working afterwards.
    let buf = h.pfn_buffer(&[0x1001]);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 2);
    assert_eq!(h.state(0x1001), FrameState::Released);
}

#[test]
fn malformed_buffers_are_returned_unprocessed() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let (addr, _, _) = h.pfn_buffer(&[0x1000, 0x1001]);
    // Length not a multiple of 4.
    assert_eq!(h.submit(INFLATE_Q, &[(addr, 6, 0)]), 1);
    // Device-writable descriptor on the inflate queue.
    assert_eq!(h.submit(INFLATE_Q, &[(addr, 8, 2)]), 2);
    // Buffer outside guest RAM.
    assert_eq!(h.submit(INFLATE_Q, &[(0xC000_0000, 8, 0)]), 3);
    assert_eq!(h.submit(INFLATE_Q, &[(u64::MAX - 3, 4, 0)]), 4);
    // Read-only descriptor on the reporting queue, and an unaligned report.
    assert_eq!(h.submit(REPORTING_Q, &[(0x200000, 0x200000, 0)]), 1);
    assert_eq!(h.submit(REPORTING_Q, &[(0x200800, 0x1000, 2)]), 2);
    let c = h.counters();
    assert_eq!(c.malformed_buffers, 6);
    assert_eq!(c.pages_inflated + c.pages_reported, 0);
    assert_eq!(h.state(0x1000), FrameState::Mapped);
    assert!(h.canary_intact());
}

#[test]
fn a_descriptor_loop_is_cut_at_the_queue_size() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let (addr, len, _) = h.pfn_buffer(&[0x1000]);
    // One descriptor whose `next` points at itself, forever.
    let d = RING_BASE;
    let mem = h.mem();
    mem.write_obj(addr, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(d + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
    mem.write_obj(0u16, GuestAddress(d + 0x1004)).unwrap();
    mem.write_obj(1u16, GuestAddress(d + 0x1002)).unwrap();
    h.t.process_queue(INFLATE_Q);
    let c = h.counters();
    assert_eq!(c.pages_inflated, 1);
    assert_eq!(
        c.invalid_frames,
        QSIZE as u64 - 1,
        "the repeats are duplicates"
    );
    assert_eq!(
        h.mem().read_obj::<u16>(GuestAddress(d + 0x2002)).unwrap(),
        1
    );
}

#[test]
fn rings_outside_guest_ram_make_the_device_need_a_reset() {
    let mut h = Harness::new(Strategy::PerBuffer);
    h.init(ALL, Some(0xC000_0000));
    assert_ne!(read_reg(&h.t, r::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!h.t.is_active());
    h.t.process_queue(INFLATE_Q); // ignored, no panic
    reg(&mut h.t, r::STATUS, 0);
    assert_eq!(read_reg(&h.t, r::STATUS), 0, "a reset clears it");
    h.init(ALL, None);
    assert!(h.t.is_active());
}

#[test]
fn only_a_reset_clears_needs_reset_or_other_status_bits() {
    let mut h = Harness::new(Strategy::PerBuffer);
    h.init(ALL, Some(0xC000_0000));
    let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    // Writing DRIVER_OK again does not activate the refused rings.
    reg(&mut h.t, r::STATUS, all);
    assert_ne!(read_reg(&h.t, r::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!h.t.is_active());
    reg(&mut h.t, r::STATUS, all | status::FAILED);
    assert_ne!(
        read_reg(&h.t, r::STATUS) & status::FAILED,
        0,
        "FAILED may be added"
    );
    reg(&mut h.t, r::STATUS, 0);
    h.init(ALL, None);
    assert!(h.t.is_active());
    // Dropping DRIVER_OK / FEATURES_OK without a reset is refused; the device stays active
    // with the features it was activated with, and the queue registers stay frozen.
    reg(&mut h.t, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(read_reg(&h.t, r::STATUS), all);
    reg(&mut h.t, r::DRIVER_FEATURES_SEL, 0);
    reg(&mut h.t, r::DRIVER_FEATURES, u32::MAX);
    reg(&mut h.t, r::STATUS, all);
    assert!(h.t.is_active());
    let buf = h.pfn_buffer(&[0x1000]);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 1);
    assert_eq!(h.counters().pages_inflated, 1);
}

#[test]
fn overlapping_rings_make_the_device_need_a_reset() {
    let mut h = Harness::new(Strategy::PerBuffer);
    // Queue 0's rings placed exactly over queue 1's.
    h.init(ALL, Some(RING_BASE + 0x3000));
    assert_ne!(read_reg(&h.t, r::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!h.t.is_active());
    reg(&mut h.t, r::STATUS, 0);
    // A few bytes are enough: queue 0's used ring (134 bytes) ends 6 bytes into queue 1's
    // descriptor table; every ring stays aligned, so only the overlap is wrong.
    h.init(ALL, Some(RING_BASE + 0x1000 - 0x80));
    assert_eq!(h.t.queue_rings_for_test(0)[2].end, RING_BASE + 0x3000 + 6);
    assert_ne!(read_reg(&h.t, r::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    reg(&mut h.t, r::STATUS, 0);
    h.init(ALL, None);
    assert!(h.t.is_active(), "a reset and a clean layout recover");
}

#[test]
fn ring_frames_are_refused_while_the_device_uses_them() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let ring = |q: u64, page: u64| (RING_BASE / 4096 + q * 3 + page) as u32;
    // Queue 1's descriptor table, queue 0's used ring, and one ordinary frame.
    let buf = h.pfn_buffer(&[ring(1, 0), ring(0, 2), 0x1000]);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 1);
    let c = h.counters();
    assert_eq!(c.pages_inflated, 1);
    assert_eq!(c.invalid_frames, 2);
    assert_eq!(h.state(ring(1, 0) as u64), FrameState::DeviceMapped);
    assert_eq!(h.state(ring(0, 2) as u64), FrameState::DeviceMapped);
    // The queue still works: its used ring was not reclaimed under it.
    let buf = h.pfn_buffer(&[0x1001]);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 2);
    // After a reset the frames are ordinary guest memory again.
    h.reset();
    assert_eq!(h.state(ring(1, 0) as u64), FrameState::Mapped);
}

#[test]
fn features_not_offered_are_refused() {
    let mut h = Harness::new(Strategy::PerBuffer);
    h.init(ALL | 1 << 3, None);
    assert_eq!(read_reg(&h.t, r::STATUS) & status::FEATURES_OK, 0);
    assert!(!h.t.is_active());
    let mut h = Harness::new(Strategy::PerBuffer);
    h.init(F_STATS_VQ, None); // no VERSION_1: legacy drivers are not supported
    assert!(!h.t.is_active());
}

#[test]
fn free_page_reports_are_reclaimed_and_given_back() {
    let mut h = Harness::active(Strategy::Gather);
    h.fill_frames(0x400..0x600, 7);
    let held = h.mm.ram.host_bytes_held().unwrap();
    assert_eq!(h.submit(REPORTING_Q, &[(0x400000, 0x200000, 2)]), 1);
    assert_eq!(held - h.mm.ram.host_bytes_held().unwrap(), 0x200000);
    assert_eq!(
        h.state(0x500),
        FrameState::Mapped,
        "reported frames are the guest's again"
    );
    assert_eq!(h.counters().pages_reported, 512);
}

/// The memfd backend with a gate: while closed, a zap waits (tests of who waits for whom).
#[derive(Default)]
struct Gate {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

struct Gated {
    inner: KvmMemfd,
    gate: Arc<Gate>,
}

impl guest_mm::Stage2Backend for Gated {
    fn capabilities(&self) -> guest_mm::Capabilities {
        self.inner.capabilities()
    }
    fn zap(&self, s: &guest_mm::ZapSpan) -> Result<(), guest_mm::BackendError> {
        let mut closed = self.gate.closed.lock().unwrap();
        while *closed {
            closed = self.gate.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.zap(s)
    }
    fn release(&self, r: guest_mm::GfnRange) -> Result<(), guest_mm::BackendError> {
        self.inner.release(r)
    }
}

/// The design the device path relies on: an inflate notification, served on the notifying
/// (vCPU) thread, records the frames, returns the buffer and comes back while the batch it
/// fed is still waiting to be zapped; every zap and release runs on the `reclaim` worker.
/// The zap is held by a gate: a notification that waited for it would never return.
#[test]
fn an_inflate_notification_returns_before_its_batch_is_zapped() {
    let ram = Arc::new(GuestRam::new(MEM).unwrap());
    let gate = Arc::new(Gate::default());
    let backend_gate = gate.clone();
    let mm = Arc::new(
        MemoryManager::with_backend(
            ram,
            ReclaimConfig {
                batch_pages: 16,
                ..ReclaimConfig::default()
            },
            |ram, map| {
                let gated = Gated {
                    inner: KvmMemfd::new(ram.clone()),
                    gate: backend_gate,
                };
                Arc::new(OwnershipChecked::new(Arc::new(gated), map.clone()))
            },
            Protocol::Worker,
            None,
        )
        .unwrap(),
    );
    let log = Arc::new(guest_mm::reclaim::EventLog::default());
    mm.gather.set_event_log(log.clone());
    let mut h = Harness::on(mm);
    h.init(ALL, None);
    *gate.closed.lock().unwrap() = true;
    let pfns: Vec<u32> = (0x1000..0x1010).rev().collect();
    let buf = h.pfn_buffer(&pfns);
    h.make_available(INFLATE_Q, &[buf]);
    reg(&mut h.t, r::QUEUE_NOTIFY, INFLATE_Q as u32);
    log.note("notification returned");
    let used = h
        .mem()
        .read_obj::<u16>(GuestAddress(RING_BASE + 0x2002))
        .unwrap();
    assert_eq!(used, 1, "the buffer is back on the used ring");
    // The batch is full, so the worker has it (or is about to): nothing is zapped yet.
    assert_eq!(h.mm.map.count(FrameState::Released), 0);
    assert!(pfns.iter().all(|&g| matches!(
        h.state(g as u64),
        FrameState::Gathered | FrameState::Batched
    )));
    *gate.closed.lock().unwrap() = false;
    gate.opened.notify_all();
    h.mm.gather.flush();
    assert!(pfns
        .iter()
        .all(|&g| h.state(g as u64) == FrameState::Released));
    h.check();
    let events = log.events();
    let returned = events
        .iter()
        .position(|e| e.phase == guest_mm::reclaim::Phase::External("notification returned"))
        .unwrap();
    let first_zap = events
        .iter()
        .position(|e| matches!(e.phase, guest_mm::reclaim::Phase::Zap(_)))
        .expect("the batch was zapped");
    assert!(returned < first_zap, "{events:?}");
    for e in events.iter().filter(|e| e.batch != u64::MAX) {
        assert_eq!(e.thread, "reclaim", "{e:?} ran off the worker");
    }
}

/// Linux primes the stats queue and notifies it in `init_vqs()`, before DRIVER_OK; the
/// notification finds the device inactive. DRIVER_OK must serve every ready queue once, or the
/// driver's statistics never arrive (they did not, with Linux 6.1's driver).
#[test]
fn a_notification_before_driver_ok_is_served_at_driver_ok() {
    let mut h = Harness::new(Strategy::Gather);
    h.init_queues(ALL);
    let b: Vec<u8> = [(4u16, 100u64), (5, 200)]
        .into_iter()
        .flat_map(|(tag, val)| tag.to_le_bytes().into_iter().chain(val.to_le_bytes()))
        .collect();
    h.mem().write_slice(&b, GuestAddress(BUF)).unwrap();
    h.make_available(STATS_Q, &[(BUF, 20, 0)]);
    reg(&mut h.t, r::QUEUE_NOTIFY, STATS_Q as u32);
    assert_eq!(
        h.t.device().guest_stats.updates,
        0,
        "the device is not active yet"
    );
    let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    reg(&mut h.t, r::STATUS, all);
    assert_eq!(h.t.device().guest_stats.updates, 1);
    assert_eq!(h.t.device().guest_stats.values.total_memory, Some(200));
    h.check();
}

#[test]
fn stats_are_parsed_and_refreshed_on_request() {
    let mut h = Harness::active(Strategy::Gather);
    let mut b = Vec::new();
    // Tags 0-9 as every Linux sends them, 10-15 as Linux 6.12+ adds them, and one unknown.
    let entries = [(4u16, 100u64), (5, 200), (6, 150), (2, 7), (9, 1), (10, 3)];
    let newer = [(11u16, 4u64), (12, 5), (13, 6), (14, 7), (15, 8), (77, 5)];
    for (tag, val) in entries.into_iter().chain(newer) {
        b.extend(tag.to_le_bytes());
        b.extend(val.to_le_bytes());
    }
    h.mem().write_slice(&b, GuestAddress(BUF)).unwrap();
    assert_eq!(
        h.submit(STATS_Q, &[(BUF, 120, 0)]),
        0,
        "the device keeps the stats buffer"
    );
    let g = &h.t.device().guest_stats;
    let s = &g.values;
    assert_eq!(
        (s.free_memory, s.total_memory, s.available_memory),
        (Some(100), Some(200), Some(150))
    );
    assert_eq!(
        (
            s.major_faults,
            s.hugetlb_failures,
            s.swap_in,
            g.unknown_tags
        ),
        (Some(7), Some(1), None, 1),
        "every virtio tag kept by name, unknown ones counted"
    );
    assert_eq!(
        [
            s.oom_kill,
            s.alloc_stall,
            s.async_scan,
            s.direct_scan,
            s.async_reclaim,
            s.direct_reclaim
        ],
        [Some(3), Some(4), Some(5), Some(6), Some(7), Some(8)]
    );
    // The JSON names are Firecracker's, exactly (its swagger's BalloonStats).
    let json = serde_json::to_value(s).unwrap();
    let mut names: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "alloc_stall",
            "async_reclaim",
            "async_scan",
            "available_memory",
            "direct_reclaim",
            "direct_scan",
            "free_memory",
            "hugetlb_failures",
            "major_faults",
            "oom_kill",
            "total_memory"
        ]
    );
    h.t.with_device_and_queue(STATS_Q, |d, q, m| d.request_stats(q, m));
    assert_eq!(
        h.mem()
            .read_obj::<u16>(GuestAddress(RING_BASE + 2 * 0x3000 + 0x2002))
            .unwrap(),
        1
    );
}

/// A new target raises the config-change interrupt; under memory pressure a driver that
/// negotiated DEFLATE_ON_OOM (Linux does) deflates below the target on its own and reports
/// the smaller `actual`. The device takes those frames back and does not re-raise the target.
#[test]
fn deflate_on_oom_gives_frames_back_below_the_target() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let _ = read_reg(&h.t, r::INTERRUPT_STATUS);
    reg(&mut h.t, r::INTERRUPT_ACK, 3); // acknowledge anything pending
    assert!(h.t.device_mut().set_num_pages(16));
    h.t.config_changed();
    assert_eq!(
        read_reg(&h.t, r::INTERRUPT_STATUS) & 2,
        2,
        "config-change interrupt"
    );
    reg(&mut h.t, r::INTERRUPT_ACK, 2);
    let pfns: Vec<u32> = (0x1000..0x1010).collect();
    let buf = h.pfn_buffer(&pfns);
    h.submit(INFLATE_Q, &[buf]);
    h.t.write(r::CONFIG + CONFIG_ACTUAL, &16u32.to_le_bytes());
    let held = h.mm.ram.host_bytes_held().unwrap();
    // The OOM notifier deflates 8 pages with the target unchanged.
    let buf = h.pfn_buffer(&pfns[..8]);
    assert_eq!(h.submit(DEFLATE_Q, &[buf]), 1);
    h.t.write(r::CONFIG + CONFIG_ACTUAL, &8u32.to_le_bytes());
    assert_eq!((h.t.device().actual(), h.t.device().num_pages()), (8, 16));
    assert_eq!(h.state(0x1007), FrameState::Mapped);
    assert_eq!(h.state(0x1008), FrameState::Released);
    h.fill(0x1007, 0xcd);
    assert!(h.page_is(0x1007, 0xcd), "a deflated frame is usable RAM");
    assert!(h.mm.ram.host_bytes_held().unwrap() >= held);
    assert_eq!(
        read_reg(&h.t, r::INTERRUPT_STATUS) & 2,
        0,
        "no new config change"
    );
    assert_eq!(h.counters().pages_deflated, 8);
    assert!(h.canary_intact());
}

#[test]
fn config_reports_target_and_validates_actual() {
    let mut h = Harness::active(Strategy::Gather);
    h.t.device_mut().set_num_pages(1234);
    assert_eq!(read_reg(&h.t, r::CONFIG + CONFIG_NUM_PAGES), 1234);
    h.t.write(r::CONFIG + CONFIG_ACTUAL, &500u32.to_le_bytes());
    assert_eq!(h.t.device().actual(), 500);
    h.t.write(r::CONFIG + CONFIG_ACTUAL, &u32::MAX.to_le_bytes());
    assert_eq!(
        h.t.device().actual(),
        500,
        "actual larger than RAM is ignored"
    );
}

#[test]
fn oversized_buffers_are_refused_whole() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let pfns: Vec<u32> = (0x1000..0x1000 + MAX_BUFFER_PFNS as u32 + 1).collect();
    let buf = h.pfn_buffer(&pfns);
    assert_eq!(h.submit(INFLATE_Q, &[buf]), 1);
    let c = h.counters();
    assert_eq!((c.malformed_buffers, c.pages_inflated), (1, 0));
    assert!(h.canary_intact());
}

/// The report hand-back: a free page report whose range includes a frame that is in the
/// balloon refuses that frame and reclaims the rest, and must not hand it back.
#[test]
fn a_report_over_ballooned_frames_leaves_them_in_the_balloon() {
    let mut h = Harness::active(Strategy::Gather);
    let held_frame = 0x480u32;
    let buf = h.pfn_buffer(&[held_frame]);
    h.submit(INFLATE_Q, &[buf]);
    h.mm.gather.flush();
    assert_eq!(h.state(held_frame as u64), FrameState::Released);
    // 2 MiB of free frames 0x400..0x600, one of which is in the balloon.
    assert_eq!(h.submit(REPORTING_Q, &[(0x400000, 0x200000, 2)]), 1);
    let c = h.counters();
    assert_eq!((c.pages_reported, c.invalid_frames), (511, 1));
    assert_eq!(
        h.state(held_frame as u64),
        FrameState::Released,
        "the ballooned frame stays in the balloon"
    );
    assert_eq!(
        h.state(0x481),
        FrameState::Mapped,
        "the others are the guest's again"
    );
    // Inflating it again is refused (no second madvise/fallocate on punched memory)...
    let buf = h.pfn_buffer(&[held_frame]);
    h.submit(INFLATE_Q, &[buf]);
    assert_eq!(h.counters().invalid_frames, 2);
    // ...and a deflate gives it back, so inflated/deflated stay right.
    let buf = h.pfn_buffer(&[held_frame]);
    h.submit(DEFLATE_Q, &[buf]);
    let c = h.counters();
    assert_eq!((c.pages_inflated, c.pages_deflated), (1, 1));
    assert_eq!(h.state(held_frame as u64), FrameState::Mapped);
}

/// For one report over ring frames the gather counted 24 invalid frames and the device 12:
/// each refused frame is counted once, by both.
#[test]
fn a_report_over_ring_frames_counts_each_refused_frame_once() {
    let mut h = Harness::active(Strategy::PerBuffer);
    // The 12 ring frames of the four queues, reported as free.
    assert_eq!(h.submit(REPORTING_Q, &[(RING_BASE, 12 * 4096, 2)]), 1);
    let c = h.counters();
    assert_eq!((c.invalid_frames, c.pages_reported), (12, 0));
    assert_eq!(h.mm.gather.stats().invalid_frames, 12);
    assert_eq!(h.state(RING_BASE / 4096), FrameState::DeviceMapped);
}

#[test]
fn zero_length_inflate_descriptors_are_malformed_even_outside_ram() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let (addr, len, _) = h.pfn_buffer(&[0x1000]);
    for bad in [0xC000_0000u64, u64::MAX, addr] {
        h.submit(INFLATE_Q, &[(bad, 0, 0)]);
    }
    // A zero-length descriptor inside an otherwise good chain spoils the whole buffer.
    h.submit(INFLATE_Q, &[(addr, len, 0), (0xC000_0000, 0, 0)]);
    let c = h.counters();
    assert_eq!(
        (c.malformed_buffers, c.inflate_buffers, c.pages_inflated),
        (4, 0, 0)
    );
    assert_eq!(h.state(0x1000), FrameState::Mapped);
}

#[test]
fn zero_length_report_descriptors_are_refused_as_zero_length() {
    let mut h = Harness::active(Strategy::PerBuffer);
    let chain = [(0x400000u64, 0u32, 2u16)];
    assert_eq!(
        h.parse_report(&chain),
        Err(BufferError::ZeroLength {
            index: 0,
            addr: 0x400000
        }),
        "not 'not in guest RAM'"
    );
    // Through the device: malformed, nothing reclaimed.
    h.submit(REPORTING_Q, &chain);
    let c = h.counters();
    assert_eq!((c.malformed_buffers, c.pages_reported), (1, 0));
}

#[test]
fn a_reset_gives_every_ballooned_frame_back() {
    let mut h = Harness::active(Strategy::Gather);
    let buf = h.pfn_buffer(&[0x1000, 0x1001, 0x1002]);
    h.submit(INFLATE_Q, &[buf]);
    h.mm.gather.flush();
    h.fill(0x1003, 0x77);
    let buf = h.pfn_buffer(&[0x1003]);
    h.submit(INFLATE_Q, &[buf]); // still pending in the batch
    assert_eq!(h.mm.map.in_balloon(), 4);
    h.reset();
    assert_eq!(h.mm.map.in_balloon(), 0);
    assert_eq!(h.counters().pages_returned_by_reset, 4);
    assert_eq!(h.state(0x1000), FrameState::Mapped);
    assert!(h.page_is(0x1003, 0x77), "a pending frame was never zapped");
    h.mm.gather.flush();
    assert_eq!(h.state(0x1003), FrameState::Mapped, "nor is it later");
    h.check();
}

#[test]
fn a_ring_in_a_ballooned_frame_makes_driver_ok_fail() {
    let mut h = Harness::new(Strategy::PerBuffer);
    let spot = 0x2000u64; // queue 0's rings go to frames spot..spot+3
                          // A reset empties the balloon and an inactive device processes no queue, so a guest
                          // cannot get here; the check at DRIVER_OK is the last line. Put a frame there directly.
    h.mm.gather.add_buffer(&[spot + 1]);
    h.mm.gather.flush();
    h.init(ALL, Some(spot * 4096));
    assert_ne!(read_reg(&h.t, r::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!h.t.is_active());
    assert_eq!(
        h.state(spot + 1),
        FrameState::Released,
        "still the balloon's"
    );
    assert_eq!(
        h.state(spot),
        FrameState::Mapped,
        "the partial mapping was undone"
    );
    assert_eq!(h.mm.map.count(FrameState::DeviceMapped), 0);
}
