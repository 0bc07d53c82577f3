//! The ABI between the project's test guests and the VMM, in one place: the I/O ports the
//! guests write, the values they write there, and the reclaim probe's mailbox.
//!
//! Built for both sides: the guests (no_std, x86_64-unknown-none) and the VMM (host).
//! Everything here is plain data; nothing in it may depend on either side.
#![no_std]

/// The exit port, compatible with QEMU's isa-debug-exit (iobase 0xf4, iosize 1): a write
/// ends the VM with that verdict. QEMU exits with status `(value << 1) | 1`.
pub const EXIT_PORT: u16 = 0xf4;
/// A write stops only the vCPU that makes it.
pub const CPU_STOP_PORT: u16 = 0xf5;
/// The reclaim probe (a test device, off unless the VMM runs with `--reclaim-probe`): a
/// 32-bit write of the guest-physical address of a [`probe::Mailbox`].
pub const PROBE_PORT: u16 = 0xf6;

/// Verdict written to [`EXIT_PORT`] when the guest passed (QEMU: exit status 33).
pub const VERDICT_PASS: u8 = 0x10;
/// Verdict written to [`EXIT_PORT`] when the guest failed (QEMU: exit status 35).
pub const VERDICT_FAIL: u8 = 0x11;

pub mod probe {
    //! The reclaim probe's mailbox. The guest fills the request fields, sets `status` to
    //! [`STATUS_PENDING`] and writes the mailbox's address to the probe port; the VMM, during
    //! that port write, reclaims frames of the region through the gather, lists those whose
    //! host pages it freed (sorted, one u64 GFN per entry) at `list_gfn`, and writes
    //! `reclaimed` and `status`. Frames it took but could not free (on a 2 MiB backing, those
    //! of a block the region does not cover whole) keep their contents and are not listed.

    /// `magic`: "RECLAIM1".
    pub const MAGIC: u64 = u64::from_le_bytes(*b"RECLAIM1");

    /// `pattern`: a scattered, deterministic set of runs of the region.
    pub const PATTERN_SCATTERED: u64 = 0;
    /// `pattern`: every frame of the region (one contiguous run).
    pub const PATTERN_CONTIGUOUS: u64 = 1;

    /// `status`: the frames listed were reclaimed and given back (they read as zeros).
    pub const STATUS_OK: u64 = 0;
    /// `status`: the magic is wrong.
    pub const STATUS_BAD_MAILBOX: u64 = 1;
    /// `status`: the region or the list is not in RAM, or they overlap.
    pub const STATUS_BAD_REGION: u64 = 2;
    /// `status` as the guest leaves it: still this after the port write means no probe
    /// answered (the VMM runs without `--reclaim-probe`, or it is not this project's VMM).
    pub const STATUS_PENDING: u64 = u64::MAX;

    /// Bytes per entry of the reclaimed-frame list.
    pub const LIST_ENTRY_BYTES: u64 = 8;

    /// The frames [`PATTERN_SCATTERED`] reclaims from `[start, start + pages)`, at most
    /// `limit`, ascending: runs of 1..=16 frames with gaps of 1..=16, from a fixed seed, so
    /// that both ranges and holes are scattered. Both sides compute it: the VMM to reclaim,
    /// the guest to know which frames stay in use.
    pub fn scattered_frames(start: u64, pages: u64, limit: u64) -> ScatteredFrames {
        let mut s = ScatteredFrames {
            x: 0x9e37_79b9_7f4a_7c15,
            next: 0,
            run_end: 0,
            end: start.saturating_add(pages),
            left: limit,
        };
        let first = start.saturating_add(s.step(16));
        s.start_run(first);
        s
    }

    pub struct ScatteredFrames {
        x: u64,
        next: u64,
        run_end: u64,
        end: u64,
        left: u64,
    }

    impl ScatteredFrames {
        /// 1..=n from the generator (xorshift64).
        fn step(&mut self, n: u64) -> u64 {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            1 + self.x % n
        }

        fn start_run(&mut self, at: u64) {
            self.next = at;
            self.run_end = at.saturating_add(self.step(16));
        }
    }

    impl Iterator for ScatteredFrames {
        type Item = u64;

        fn next(&mut self) -> Option<u64> {
            if self.left == 0 {
                return None;
            }
            if self.next >= self.run_end {
                let gap = self.step(16);
                let at = self.run_end.saturating_add(gap);
                self.start_run(at);
            }
            if self.next >= self.end {
                return None;
            }
            let g = self.next;
            self.next += 1;
            self.left -= 1;
            Some(g)
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Mailbox {
        pub magic: u64,
        /// First frame of the region to reclaim from.
        pub region_gfn: u64,
        pub region_pages: u64,
        /// First frame of the list the VMM writes.
        pub list_gfn: u64,
        /// Entries the list can hold (at most this many frames are reclaimed).
        pub list_capacity: u64,
        /// [`PATTERN_SCATTERED`] or [`PATTERN_CONTIGUOUS`].
        pub pattern: u64,
        // Written by the VMM:
        /// Frames reclaimed (freed on the host, reading as zeros) and listed.
        pub reclaimed: u64,
        /// One of the `STATUS_` values.
        pub status: u64,
    }

    impl Mailbox {
        pub const EMPTY: Mailbox = Mailbox {
            magic: 0,
            region_gfn: 0,
            region_pages: 0,
            list_gfn: 0,
            list_capacity: 0,
            pattern: 0,
            reclaimed: 0,
            status: 0,
        };
    }

    /// A mailbox on a page of its own (the guest's static), so that no list shares its frame.
    #[repr(C, align(4096))]
    pub struct MailboxPage(pub Mailbox);
}

pub mod virtio {
    //! virtio over MMIO as the guests drive it and the VMM serves it (virtio 1.2 §4.2.2,
    //! §5.5). The VMM takes the generic values from rust-vmm's `virtio-bindings` and checks in a
    //! test that these copies, which the no_std guests need, are the same; the balloon's own
    //! values (features, queues, config layout) are not in `virtio-bindings` and live only here.

    /// "virt", the MagicValue register.
    pub const MAGIC: u32 = 0x7472_6976;

    /// Register offsets in the device's MMIO window.
    pub mod reg {
        pub const MAGIC_VALUE: u64 = 0x000;
        pub const VERSION: u64 = 0x004;
        pub const DEVICE_ID: u64 = 0x008;
        pub const VENDOR_ID: u64 = 0x00c;
        pub const DEVICE_FEATURES: u64 = 0x010;
        pub const DEVICE_FEATURES_SEL: u64 = 0x014;
        pub const DRIVER_FEATURES: u64 = 0x020;
        pub const DRIVER_FEATURES_SEL: u64 = 0x024;
        pub const QUEUE_SEL: u64 = 0x030;
        pub const QUEUE_NUM_MAX: u64 = 0x034;
        pub const QUEUE_NUM: u64 = 0x038;
        pub const QUEUE_READY: u64 = 0x044;
        pub const QUEUE_NOTIFY: u64 = 0x050;
        pub const INTERRUPT_STATUS: u64 = 0x060;
        pub const INTERRUPT_ACK: u64 = 0x064;
        pub const STATUS: u64 = 0x070;
        pub const QUEUE_DESC_LOW: u64 = 0x080;
        pub const QUEUE_DESC_HIGH: u64 = 0x084;
        pub const QUEUE_AVAIL_LOW: u64 = 0x090;
        pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
        pub const QUEUE_USED_LOW: u64 = 0x0a0;
        pub const QUEUE_USED_HIGH: u64 = 0x0a4;
        pub const CONFIG_GENERATION: u64 = 0x0fc;
        /// Where the device-specific configuration starts.
        pub const CONFIG: u64 = 0x100;
    }

    /// Device status bits.
    pub mod status {
        pub const ACKNOWLEDGE: u32 = 1;
        pub const DRIVER: u32 = 2;
        pub const DRIVER_OK: u32 = 4;
        pub const FEATURES_OK: u32 = 8;
        pub const NEEDS_RESET: u32 = 64;
        pub const FAILED: u32 = 128;
    }

    /// VIRTIO_F_VERSION_1 (feature bit 32): a modern device.
    pub const F_VERSION_1: u64 = 1 << 32;
    /// InterruptStatus bits: a used buffer, a configuration change.
    pub const INT_VRING: u32 = 1;
    pub const INT_CONFIG: u32 = 2;
    /// Descriptor flags.
    pub const DESC_F_NEXT: u16 = 1;
    pub const DESC_F_WRITE: u16 = 2;

    pub mod balloon {
        //! The virtio balloon (virtio 1.2 §5.5; not in `virtio-bindings`).

        pub const DEVICE_ID: u32 = 5;
        pub const F_STATS_VQ: u64 = 1 << 1;
        pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
        pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
        pub const F_FREE_PAGE_REPORTING: u64 = 1 << 5;
        /// Queue indices, compact as Linux and QEMU number them: a queue exists only when
        /// its feature is negotiated, in this order. With STATS_VQ and FREE_PAGE_REPORTING:
        pub const INFLATE_Q: usize = 0;
        pub const DEFLATE_Q: usize = 1;
        pub const STATS_Q: usize = 2;
        pub const REPORTING_Q: usize = 3;
        /// With FREE_PAGE_HINT negotiated too, hinting takes index 3 and reporting moves to 4.
        pub const HINTING_Q: usize = 3;
        pub const REPORTING_Q_AFTER_HINTING: usize = 4;
        /// Configuration layout: `num_pages` (the device's target), `actual` (the driver's)
        /// and `free_page_hint_cmd_id` (the host's hinting command).
        pub const CONFIG_NUM_PAGES: u64 = 0;
        pub const CONFIG_ACTUAL: u64 = 4;
        pub const CONFIG_FREE_PAGE_HINT_CMD_ID: u64 = 8;
        /// Hinting command ids: STOP (no run; also what the driver sends at a run's end),
        /// DONE (the host is done: the driver may reuse the hinted pages); runs use 2 and up.
        pub const HINT_CMD_ID_STOP: u32 = 0;
        pub const HINT_CMD_ID_DONE: u32 = 1;
        /// Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX: PFNs per inflate or deflate buffer.
        pub const PFNS_PER_BUFFER: usize = 256;
    }
}
