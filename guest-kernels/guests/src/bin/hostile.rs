//! hostile: a virtio-balloon driver that attacks the device from inside, then checks that the
//! device answers in its defined way and that the guest's own memory is intact.
//!
//! vCPU 0 runs the attacks in sequence (`attack=NAME`, default `all`): `pfns` (adversarial
//! PFNs), `random` (a pseudo-random stream of valid and garbage PFNs), `descriptors` (loops,
//! out-of-range `next`, buffers outside RAM, overflowing, wrong length or direction, an
//! indirect table that was never negotiated), `rings` (rings outside RAM, in the MMIO hole,
//! over the other queue, a bogus available index), `renegotiate` (feature and status writes
//! after DRIVER_OK), `reset` (reset with an inflate in flight and with frames pending in the
//! host's batch), `written` (frames inflated while the other vCPUs keep writing them),
//! `neighbours` (every other frame inflated while the other vCPUs keep writing and verifying
//! the frames between them, which the host's zap spans cover) and `touch` (frames read and
//! written after they were given away). After each attack it checks
//! that the device is alive (a fresh inflate and deflate work) and that a canary region that
//! is never given away keeps its pattern, and prints one `hostile: NAME: ...` line. At the end
//! it inflates and deflates 4 MiB normally and prints the least number of invalid frames and
//! malformed buffers the VMM must have counted.
//!
//! The other vCPUs are writers for the `written` and `neighbours` attacks: they rewrite a
//! shared region, and verify the pages of it that are not given away.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::virtio::{self, status, Desc, Device, Queue, DESC_F_NEXT, DESC_F_WRITE};
use rt::{bootinfo, cmdline, frames, pattern, println, Cpu, Verdict};

use abi::virtio::balloon::DEVICE_ID as VIRTIO_ID_BALLOON;
use abi::virtio::reg;
const DESC_F_INDIRECT: u16 = 4;
const QSIZE: u16 = 64;
const PAGE: u64 = frames::PAGE_SIZE;
const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const CANARY_PAGES: u64 = 256;
const CANARY_SALT: u64 = 0xca11;
/// The region the writer vCPUs rewrite; every VICTIM_EVERY-th page is inflated under them
/// (`written`), or every other page (`neighbours`).
const REGION_PAGES: u64 = 1024;
const VICTIM_EVERY: u64 = 8;
const WRITER_SALT: u64 = 0x3000;
/// The MMIO hole's first and last frames.
const HOLE_FIRST: u32 = 0xC0000;
const HOLE_LAST: u32 = 0xFFFFF;

static REGION: AtomicU64 = AtomicU64::new(0);
/// The writers' current session (one per attack that uses them): 0 none yet.
static SESSION: AtomicU64 = AtomicU64::new(0);
/// The session's victims: page i of the region is one if i % stride == offset.
static VICTIM_STRIDE: AtomicU64 = AtomicU64::new(VICTIM_EVERY);
static VICTIM_OFFSET: AtomicU64 = AtomicU64::new(3);
/// Whether the writers leave the victims alone (`neighbours`) or write them too (`written`).
static SKIP_VICTIMS: AtomicBool = AtomicBool::new(false);
/// The session that must stop (writers finish the round and report).
static STOPPED: AtomicU64 = AtomicU64::new(0);
/// Set when the driver is done: writers return their verdict.
static STOP: AtomicBool = AtomicBool::new(false);
/// Rounds each writer vCPU completed over its share of the region.
static ROUNDS: [AtomicU64; rt::MAX_CPUS] = [const { AtomicU64::new(0) }; rt::MAX_CPUS];
static WRITERS_DONE: AtomicU64 = AtomicU64::new(0);
static WRITER_ERRORS: AtomicU64 = AtomicU64::new(0);

type Res<T = ()> = Result<T, &'static str>;

use rt::arch::rdtsc;

/// Spins until `f` holds or about `ms` milliseconds passed (at most 3 GHz of TSC assumed,
/// so slower TSCs only wait longer). Returns whether `f` held.
fn wait_for(ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = rdtsc() + ms * 3_000_000;
    loop {
        if f() {
            return true;
        }
        if rdtsc() > end {
            return false;
        }
        for _ in 0..64 {
            core::hint::spin_loop();
        }
    }
}

fn sleep_ms(ms: u64) {
    wait_for(ms, || false);
}

fn page_is_zero(gfn: u64) -> bool {
    pattern::check(gfn, 0, true) == 0
}

fn zero_page(addr: u64) {
    // SAFETY: a frame of ours.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, PAGE as usize) };
}

fn read_u16(addr: u64) -> u16 {
    // SAFETY: ring memory of ours.
    unsafe { (addr as *const u16).read_volatile() }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: ring memory of ours.
    unsafe { (addr as *const u64).read_volatile() }
}

fn alloc() -> Res<u64> {
    frames::alloc().ok_or("out of frames")
}

/// Frames given away: after the host's batch window they read as zeros.
fn wait_reclaimed(gfns: &[u32]) -> Res {
    for &g in gfns {
        if !wait_for(3000, || page_is_zero(g as u64)) {
            return Err("a valid inflated frame never read as zeros (not reclaimed)");
        }
    }
    Ok(())
}

/// Deflated frames are ordinary memory again: write, verify, give back to the allocator.
fn reuse(gfns: &[u32], salt: u64) -> Res {
    for &g in gfns {
        pattern::fill(g as u64, salt);
        if pattern::check(g as u64, salt, false) != 0 {
            return Err("a deflated frame does not keep what is written to it");
        }
        frames::free(g as u64);
    }
    Ok(())
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

enum Got {
    Used(u32),
    NeedsReset,
    Timeout,
}

/// The pages of a region that an attack under the writer vCPUs inflates: page i if
/// i % stride == offset. With `skip` the writers leave them alone, else they rewrite them too.
#[derive(Clone, Copy)]
struct Victims {
    stride: u64,
    offset: u64,
    skip: bool,
}

/// `written`: every VICTIM_EVERY-th page, which the writers rewrite too.
const WRITTEN: Victims = Victims {
    stride: VICTIM_EVERY,
    offset: 3,
    skip: false,
};
/// `neighbours`: every other page, between two that the writers rewrite.
const NEIGHBOURS: Victims = Victims {
    stride: 2,
    offset: 1,
    skip: true,
};

struct Driver {
    dev: Device,
    /// Ring frames of queues 0 (inflate) and 1 (deflate), reused by every setup.
    rings: [[u64; 3]; 2],
    inflate: Option<Queue>,
    deflate: Option<Queue>,
    /// Buffer pages: PFN lists and descriptor targets.
    buf: [u64; 3],
    ram_end_pfn: u64,
    canary: u64,
    /// The least the VMM must count, summed over the attacks.
    min_invalid: u64,
    min_malformed: u64,
}

impl Driver {
    fn new(dev: Device) -> Res<Self> {
        let mut rings = [[0; 3]; 2];
        for q in rings.iter_mut() {
            for r in q.iter_mut() {
                *r = alloc()? * PAGE;
            }
        }
        let buf = [alloc()? * PAGE, alloc()? * PAGE, alloc()? * PAGE];
        let ram_end = bootinfo::get()
            .ram()
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or(0);
        let (canary, n) = frames::alloc_run(CANARY_PAGES).ok_or("no canary")?;
        if n != CANARY_PAGES {
            return Err("no contiguous canary");
        }
        for g in canary..canary + n {
            pattern::fill(g, CANARY_SALT);
        }
        Ok(Self {
            dev,
            rings,
            inflate: None,
            deflate: None,
            buf,
            ram_end_pfn: ram_end / PAGE,
            canary,
            min_invalid: 0,
            min_malformed: 0,
        })
    }

    /// Resets the device and sets it up cleanly (VERSION_1 only, queues 0 and 1).
    fn setup(&mut self) -> Res {
        self.begin()?;
        for q in self.rings {
            for r in q {
                zero_page(r);
            }
        }
        self.inflate =
            Some(Queue::with_rings(self.dev, 0, QSIZE, self.rings[0]).map_err(|_| "queue 0")?);
        self.deflate =
            Some(Queue::with_rings(self.dev, 1, QSIZE, self.rings[1]).map_err(|_| "queue 1")?);
        self.dev
            .driver_ok()
            .map_err(|_| "DRIVER_OK refused for a clean layout")?;
        Ok(())
    }

    /// Reset and feature negotiation, up to FEATURES_OK.
    fn begin(&mut self) -> Res {
        self.inflate = None;
        self.deflate = None;
        self.dev
            .negotiate(0)
            .map_err(|_| "feature negotiation failed")?;
        Ok(())
    }

    fn queue(&mut self, which: usize) -> &mut Queue {
        let q = if which == 0 {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        q.as_mut().expect("queue set up")
    }

    fn wait(&mut self, which: usize) -> Got {
        let dev = self.dev;
        let q = self.queue(which);
        let mut got = Got::Timeout;
        wait_for(3000, || {
            if q.poll() {
                got = Got::Used(q.last_used().1);
                true
            } else if dev.status() & status::NEEDS_RESET != 0 {
                got = Got::NeedsReset;
                true
            } else {
                false
            }
        });
        got
    }

    /// Submits `chain` on queue `which` and expects it back with used length 0.
    fn call(&mut self, which: usize, chain: &[Desc]) -> Res {
        self.queue(which).submit(chain);
        self.expect_returned(which)
    }

    fn call_raw(&mut self, which: usize, descs: &[Desc]) -> Res {
        self.queue(which).submit_raw(descs, 0);
        self.expect_returned(which)
    }

    fn expect_returned(&mut self, which: usize) -> Res {
        match self.wait(which) {
            Got::Used(0) => Ok(()),
            Got::Used(_) => Err("buffer returned with a used length other than 0"),
            Got::NeedsReset => Err("device set NEEDS_RESET"),
            Got::Timeout => Err("buffer never returned"),
        }
    }

    /// Writes `pfns` into buffer page `b` and sends it on queue `which`.
    fn send(&mut self, which: usize, b: usize, pfns: &[u32]) -> Res {
        let p = self.buf[b] as *mut u32;
        for (i, &pfn) in pfns.iter().take(1024).enumerate() {
            // SAFETY: i < 1024 entries in our buffer page.
            unsafe { p.add(i).write_volatile(pfn) };
        }
        let d = Desc {
            addr: self.buf[b],
            len: (pfns.len().min(1024) * 4) as u32,
            flags: 0,
            next: 0,
        };
        self.call(which, &[d])
    }

    fn inflate(&mut self, pfns: &[u32]) -> Res {
        for c in pfns.chunks(256) {
            self.send(0, 0, c)?;
        }
        Ok(())
    }

    fn deflate(&mut self, pfns: &[u32]) -> Res {
        for c in pfns.chunks(256) {
            self.send(1, 0, c)?;
        }
        Ok(())
    }

    fn canary_ok(&self) -> Res {
        for g in self.canary..self.canary + CANARY_PAGES {
            if pattern::check(g, CANARY_SALT, false) != 0 {
                return Err("canary page corrupted");
            }
        }
        Ok(())
    }

    /// The device is active and a fresh frame goes through inflate and deflate.
    fn alive(&mut self) -> Res {
        let s = self.dev.status();
        if s & status::NEEDS_RESET != 0 || s & status::DRIVER_OK == 0 {
            return Err("device not active");
        }
        let g = alloc()? as u32;
        pattern::fill(g as u64, 0xa11e);
        self.inflate(&[g])?;
        self.deflate(&[g])?;
        reuse(&[g], 0xa11f)?;
        self.canary_ok()
    }

    fn fresh(&self, n: usize, salt: u64, out: &mut [u32]) -> Res {
        for slot in out.iter_mut().take(n) {
            let g = alloc()?;
            pattern::fill(g, salt);
            *slot = g as u32;
        }
        Ok(())
    }

    // ---- the attacks ----

    fn pfns(&mut self) -> Res {
        let mut x = [0u32; 1];
        self.fresh(1, 0x51, &mut x)?;
        let x = x[0];
        let desc0 = self.rings[0][0];
        let used1 = self.rings[1][2];
        let deflates = self.queue(1).avail_idx();
        let list = [
            self.ram_end_pfn as u32,
            u32::MAX,
            HOLE_FIRST,
            HOLE_LAST,
            (desc0 / PAGE) as u32,
            (used1 / PAGE) as u32,
            x,
            x,
        ];
        self.inflate(&list)?;
        self.min_invalid += 7;
        wait_reclaimed(&[x])?;
        // The batch that reclaimed x is done: had the ring frames been taken they would read
        // as zeros now.
        if read_u64(desc0) != self.buf[0] || read_u16(used1 + 2) != deflates {
            return Err("the device's ring frames were reclaimed");
        }
        self.deflate(&[x])?;
        reuse(&[x], 0x52)?;
        println!("hostile: pfns: buffer [beyond RAM, u32::MAX, MMIO hole x2, own desc table, own used ring, valid, same again] returned used_len=0; the valid frame was reclaimed (reads zero), the ring frames were not (rings intact); device alive");
        Ok(())
    }

    fn random(&mut self) -> Res {
        // PFNs given away, in a buffer page of our own.
        let valid = alloc()? * PAGE;
        let valid_ptr = valid as *mut u32;
        let mut nvalid = 0usize;
        let (mut garbage, mut dups) = (0u64, 0u64);
        let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
        let mut list = [0u32; 256];
        let span = u32::MAX as u64 - self.ram_end_pfn;
        for _ in 0..4 {
            for slot in list.iter_mut() {
                let r = rng.next();
                *slot = match r % 4 {
                    0 | 1 if nvalid < 1024 => {
                        let g = alloc()?;
                        pattern::fill(g, 0x53);
                        // SAFETY: nvalid < 1024 entries in our page.
                        unsafe { valid_ptr.add(nvalid).write_volatile(g as u32) };
                        nvalid += 1;
                        g as u32
                    }
                    3 if nvalid > 0 => {
                        dups += 1;
                        // SAFETY: index below nvalid.
                        unsafe { valid_ptr.add((r >> 8) as usize % nvalid).read_volatile() }
                    }
                    _ => {
                        // Never a frame of RAM: the guest's own memory stays its own.
                        garbage += 1;
                        (self.ram_end_pfn + (r >> 8) % span) as u32
                    }
                };
            }
            self.inflate(&list)?;
        }
        self.min_invalid += garbage + dups;
        // SAFETY: nvalid entries written above.
        let given = unsafe { core::slice::from_raw_parts(valid_ptr, nvalid) };
        wait_reclaimed(given)?;
        self.deflate(given)?;
        reuse(given, 0x54)?;
        frames::free(valid / PAGE);
        println!(
            "hostile: random: 4 buffers of 256 PFNs: {} valid reclaimed (read zero), {} garbage and {} duplicates refused, all returned used_len=0; valid frames deflated and reused; device alive",
            nvalid, garbage, dups
        );
        Ok(())
    }

    fn descriptors(&mut self) -> Res {
        let mut f = [0u32; 4];
        self.fresh(4, 0x55, &mut f)?;
        let [x, y, z, w] = f;
        let (b0, b1, b2) = (self.buf[0], self.buf[1], self.buf[2]);
        // SAFETY: our buffer pages.
        unsafe {
            (b0 as *mut u32).write_volatile(x);
            (b1 as *mut u32).write_volatile(y);
            (b1 as *mut u32).add(1).write_volatile(z);
            (b2 as *mut u32).write_volatile(w);
        }
        let d = |addr, len, flags, next| Desc {
            addr,
            len,
            flags,
            next,
        };
        // A descriptor whose next is itself: read QSIZE times, then cut.
        self.call_raw(0, &[d(b0, 4, DESC_F_NEXT, 0)])?;
        // A cycle of two.
        self.call_raw(0, &[d(b1, 4, DESC_F_NEXT, 1), d(b1 + 4, 4, DESC_F_NEXT, 0)])?;
        self.min_invalid += (QSIZE as u64 - 1) + (QSIZE as u64 - 2);
        // `next` beyond the queue: the chain ends there.
        self.call_raw(0, &[d(b2, 4, DESC_F_NEXT, 1000)])?;
        // Malformed: outside RAM, overflowing, length not a multiple of 4, device-writable,
        // an indirect table (never negotiated) outside RAM.
        let ram_end = self.ram_end_pfn * PAGE;
        for bad in [
            d(ram_end, 8, 0, 0),
            d(0xC000_0000, 8, 0, 0),
            d(u64::MAX - 3, 8, 0, 0),
            d(b0, 6, 0, 0),
            d(b0, 4, DESC_F_WRITE, 0),
            d(0xC000_0000, 16, DESC_F_INDIRECT, 0),
        ] {
            self.call_raw(0, &[bad])?;
        }
        self.min_malformed += 6;
        wait_reclaimed(&f)?;
        self.deflate(&f)?;
        reuse(&f, 0x56)?;
        println!("hostile: descriptors: self loop and 2-cycle cut at the queue size (repeats refused as duplicates), next beyond the queue ends the chain, 6 malformed buffers (outside RAM, MMIO hole, overflow, length 6, device-writable, indirect) returned used_len=0; device alive");
        Ok(())
    }

    fn expect_needs_reset(&mut self, what: &'static str) -> Res {
        if self.dev.driver_ok().is_ok() {
            return Err(what);
        }
        // Writing DRIVER_OK again does not clear it.
        self.dev.set_status(ALL_OK);
        if self.dev.status() & status::NEEDS_RESET == 0 {
            return Err("a second DRIVER_OK cleared NEEDS_RESET");
        }
        self.dev.set_status(0);
        if self.dev.status() != 0 {
            return Err("reset did not clear the status");
        }
        Ok(())
    }

    fn rings_attack(&mut self) -> Res {
        let ram_end = self.ram_end_pfn * PAGE;
        let r = self.rings;
        let layouts: [([u64; 3], &str); 3] = [
            (
                [ram_end, ram_end + PAGE, ram_end + 2 * PAGE],
                "rings beyond RAM accepted",
            ),
            (
                [0xC000_0000, r[0][1], r[0][2]],
                "descriptor table in the MMIO hole accepted",
            ),
            (
                [r[1][1], r[0][1], r[0][2]],
                "descriptor table over the other queue's avail ring accepted",
            ),
        ];
        for (q0, what) in layouts {
            self.begin()?;
            Queue::with_rings(self.dev, 0, QSIZE, q0).map_err(|_| "queue 0")?;
            Queue::with_rings(self.dev, 1, QSIZE, r[1]).map_err(|_| "queue 1")?;
            self.expect_needs_reset(what)?;
        }
        self.setup()?;
        self.alive()?;
        // An available index more than a queue ahead of the device: nothing is consumed.
        let [_, avail, used] = self.rings[0];
        let before = read_u16(used + 2);
        let bogus = self.queue(0).avail_idx().wrapping_add(QSIZE * 3);
        // SAFETY: avail->idx of our ring.
        unsafe { ((avail + 2) as *mut u16).write_volatile(bogus) };
        self.dev.write(reg::QUEUE_NOTIFY, 0);
        sleep_ms(100);
        if read_u16(used + 2) != before {
            return Err("the device consumed buffers past a bogus available index");
        }
        self.setup()?;
        println!("hostile: rings: rings beyond RAM, in the MMIO hole and over the other queue each set NEEDS_RESET (0x40) at DRIVER_OK, which a second DRIVER_OK does not clear and a reset (status 0) does; a bogus avail index is not consumed; clean renegotiation works; device alive");
        Ok(())
    }

    fn renegotiate(&mut self) -> Res {
        // New driver features after DRIVER_OK, including ones never offered.
        self.dev.write(reg::DRIVER_FEATURES_SEL, 0);
        self.dev.write(reg::DRIVER_FEATURES, u32::MAX);
        self.dev.write(reg::DRIVER_FEATURES_SEL, 1);
        self.dev.write(reg::DRIVER_FEATURES, u32::MAX);
        self.dev.set_status(ALL_OK);
        // Dropping DRIVER_OK / FEATURES_OK without a reset, then setting them again.
        self.dev.set_status(status::ACKNOWLEDGE | status::DRIVER);
        if self.dev.status() != ALL_OK {
            return Err("status bits cleared without a reset");
        }
        self.dev
            .set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        // Moving a live queue's rings outside RAM.
        self.dev.write(reg::QUEUE_SEL, 0);
        self.dev.write(reg::QUEUE_DESC_LOW, 0xC000_0000);
        self.dev.write(reg::QUEUE_READY, 0);
        if self.dev.status() != ALL_OK {
            return Err("status changed");
        }
        self.alive()?;
        println!("hostile: renegotiate: feature writes after DRIVER_OK ignored, status writes clearing DRIVER_OK/FEATURES_OK refused (status stays {:#x}), queue registers frozen; queues keep working; device alive", ALL_OK);
        Ok(())
    }

    fn reset(&mut self) -> Res {
        let mut f = [0u32; 256];
        // Reset with an inflate buffer just made available (consumed or not).
        self.fresh(256, 0x57, &mut f)?;
        let p = self.buf[0] as *mut u32;
        for (i, &g) in f.iter().enumerate() {
            // SAFETY: 256 entries in our buffer page.
            unsafe { p.add(i).write_volatile(g) };
        }
        let d = Desc {
            addr: self.buf[0],
            len: 1024,
            flags: 0,
            next: 0,
        };
        self.queue(0).submit(&[d]);
        self.dev.set_status(0);
        if self.dev.status() != 0 {
            return Err("reset did not clear the status");
        }
        self.setup()?;
        // The reset emptied the balloon: whatever the device took is the guest's again, so
        // this deflate is refused frame by frame as not ballooned, and changes nothing.
        self.deflate(&f)?;
        reuse(&f, 0x58)?;
        // Reset while the frames of an acknowledged inflate wait in the host's batch.
        self.fresh(256, 0x59, &mut f)?;
        self.inflate(&f)?;
        self.dev.set_status(0);
        self.setup()?;
        self.deflate(&f)?;
        reuse(&f, 0x5a)?;
        println!("hostile: reset: status 0 with an inflate in flight and with inflated frames pending in the batch; the reset gave them back, and after renegotiation both sets of 256 frames were reused; device alive");
        Ok(())
    }

    /// The attack `name`, skipped without writer vCPUs: inflates the victims of a fresh
    /// region while the writer vCPUs rewrite it (the victims too, unless `skip`), lets them
    /// run two more rounds over the reclaimed batch, stops them, and checks that every page
    /// that was not given away kept its pattern; then deflates and reuses the victims.
    /// `report` prints the outcome from the victims, the writers' rounds, the pages kept and
    /// the words found wrong (by the writers and vCPU 0); any wrong word fails it with `lost`.
    fn under_writers(
        &mut self,
        name: &str,
        writers: u64,
        Victims {
            stride,
            offset,
            skip,
        }: Victims,
        lost: &'static str,
        report: impl FnOnce(u64, u64, u64, u64),
    ) -> Res {
        if writers == 0 {
            println!("hostile: {}: skipped (no other vCPUs)", name);
            return Ok(());
        }
        let (base, n) = frames::alloc_run(REGION_PAGES).ok_or("no region")?;
        if n != REGION_PAGES {
            return Err("no contiguous region");
        }
        for i in 1..=writers {
            ROUNDS[i as usize].store(0, Ordering::Release);
        }
        WRITERS_DONE.store(0, Ordering::Release);
        WRITER_ERRORS.store(0, Ordering::Release);
        VICTIM_STRIDE.store(stride, Ordering::Release);
        VICTIM_OFFSET.store(offset, Ordering::Release);
        SKIP_VICTIMS.store(skip, Ordering::Release);
        REGION.store(base, Ordering::Release);
        let session = SESSION.fetch_add(1, Ordering::AcqRel) + 1;
        // Every writer has filled its share once (each one: a vCPU thread may be descheduled
        // while another runs many rounds).
        let rounds = |i: u64| ROUNDS[i as usize].load(Ordering::Acquire);
        if !wait_for(10_000, || (1..=writers).all(|i| rounds(i) >= 1)) {
            return Err("writers did not start");
        }
        let mut all = [0u32; REGION_PAGES as usize];
        let mut nv = 0;
        for i in (0..REGION_PAGES).filter(|i| i % stride == offset) {
            all[nv] = (base + i) as u32;
            nv += 1;
        }
        let victims = &all[..nv];
        self.inflate(victims)?;
        if skip {
            // Nobody writes them: once reclaimed they read as zeros.
            wait_reclaimed(victims)?;
        }
        // Let the batch be reclaimed under the writers and them run on over it.
        sleep_ms(50);
        let mut before = [0u64; rt::MAX_CPUS];
        for i in 1..=writers {
            before[i as usize] = rounds(i);
        }
        if !wait_for(10_000, || {
            (1..=writers).all(|i| rounds(i) >= before[i as usize] + 2)
        }) {
            return Err("writers stalled");
        }
        STOPPED.store(session, Ordering::Release);
        if !wait_for(10_000, || WRITERS_DONE.load(Ordering::Acquire) == writers) {
            return Err("writers did not stop");
        }
        let mut bad = WRITER_ERRORS.load(Ordering::Acquire);
        // vCPU 0 checks the pages that were never given away itself too.
        for i in (0..REGION_PAGES).filter(|i| i % stride != offset) {
            bad += pattern::check(base + i, WRITER_SALT + i % writers, false);
        }
        self.deflate(victims)?;
        reuse(victims, 0x5b)?;
        for i in (0..REGION_PAGES).filter(|i| i % stride != offset) {
            frames::free(base + i);
        }
        let victims = nv as u64;
        report(
            victims,
            (1..=writers).map(rounds).sum(),
            REGION_PAGES - victims,
            bad,
        );
        if bad != 0 {
            return Err(lost);
        }
        Ok(())
    }

    fn written(&mut self, writers: u64) -> Res {
        let lost = "pages not given away lost their pattern";
        self.under_writers("written", writers, WRITTEN, lost, |victims, rounds, kept, bad| {
            println!("hostile: written: {victims} frames inflated while {writers} vCPUs rewrote them ({rounds} writer rounds); the other {kept} pages kept their pattern ({bad} bad words); victims deflated and reused; device alive")
        })
    }

    /// Every other page of a region is inflated while the writer vCPUs keep rewriting and
    /// verifying the pages between them: the host's zap spans cover those in-use neighbours,
    /// so this checks that a span over frames written during its zap loses nothing.
    fn neighbours(&mut self, writers: u64) -> Res {
        let lost = "in-use neighbours of inflated frames lost writes";
        self.under_writers("neighbours", writers, NEIGHBOURS, lost, |victims, rounds, kept, bad| {
            println!("hostile: neighbours: {victims} frames inflated, each between two in-use pages that {writers} vCPUs kept rewriting and verifying ({rounds} writer rounds); the victims read zero once reclaimed; the {kept} neighbours kept every write ({bad} bad words); victims deflated and reused; device alive")
        })
    }

    fn touch(&mut self) -> Res {
        let mut f = [0u32; 64];
        self.fresh(64, 0x5c, &mut f)?;
        self.inflate(&f)?;
        // Written right after the acknowledgement, while the batch may still be pending:
        // whatever of the writes lands before the reclaim is discarded, what lands after it
        // stays. Each word is then either zero or what was written, never anything else.
        for &g in &f[..32] {
            pattern::fill(g as u64, 0x5d);
        }
        wait_reclaimed(&f[32..])?;
        for &g in &f[..32] {
            let p = (g as u64 * PAGE) as *const u64;
            for w in 0..(PAGE / 8) as usize {
                // SAFETY: a frame of ours.
                let (addr, v) = unsafe { (p.add(w) as u64, p.add(w).read_volatile()) };
                if v != 0 && v != pattern::word(addr, 0x5d) {
                    return Err("a frame written while given away holds foreign data");
                }
            }
        }
        // Read (zeros, checked above for the untouched half) and written after reclaim: the host backs the frames
        // again and the writes stick; only this guest's own frames are affected.
        for &g in &f {
            pattern::fill(g as u64, 0x5e);
        }
        for &g in &f {
            if pattern::check(g as u64, 0x5e, false) != 0 {
                return Err("a frame written after it was reclaimed lost the write");
            }
        }
        self.deflate(&f)?;
        reuse(&f, 0x5f)?;
        println!("hostile: touch: 64 frames given away; 32 written at once hold only zeros or their own writes; the others read zero after reclaim; all take writes after reclaim (fresh host pages); deflated and reused; device alive");
        Ok(())
    }

    fn finale(&mut self) -> Res {
        self.canary_ok()?;
        let (base, n) = frames::alloc_run(1024).ok_or("no 4 MiB")?;
        if n != 1024 {
            return Err("no contiguous 4 MiB");
        }
        let list = alloc()? * PAGE;
        // SAFETY: a page of ours holds the 1024 PFNs.
        let pfns = unsafe { core::slice::from_raw_parts_mut(list as *mut u32, 1024) };
        for (i, p) in pfns.iter_mut().enumerate() {
            *p = (base + i as u64) as u32;
            pattern::fill(*p as u64, 0x60);
        }
        self.inflate(pfns)?;
        wait_reclaimed(pfns)?;
        self.deflate(pfns)?;
        reuse(pfns, 0x61)?;
        frames::free(list / PAGE);
        self.canary_ok()?;
        println!("hostile: final: canary of {} pages intact; 1024 pages (4 MiB) inflated, reclaimed, deflated and reused normally", CANARY_PAGES);
        Ok(())
    }
}

/// A writer vCPU: for each session the driver starts, rewrites its share of the region
/// (every writers-th page) until the session is stopped, checking from the second round on
/// that every page that is not a victim still holds its pattern.
fn writer(cpu: &Cpu) -> Verdict {
    let writers = cpu.count as u64 - 1;
    let me = cpu.id as u64 - 1;
    let mut errors = 0;
    let mut done = 0;
    loop {
        while SESSION.load(Ordering::Acquire) == done && !STOP.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        if STOP.load(Ordering::Acquire) {
            break;
        }
        let session = SESSION.load(Ordering::Acquire);
        let base = REGION.load(Ordering::Acquire);
        let (stride, offset) = (
            VICTIM_STRIDE.load(Ordering::Acquire),
            VICTIM_OFFSET.load(Ordering::Acquire),
        );
        let skip = SKIP_VICTIMS.load(Ordering::Acquire);
        let salt = WRITER_SALT + me;
        let mut first = true;
        let mut session_errors = 0;
        while STOPPED.load(Ordering::Acquire) < session {
            for i in (me..REGION_PAGES).step_by(writers as usize) {
                let victim = i % stride == offset;
                if victim && skip {
                    continue;
                }
                if !victim && !first {
                    session_errors += pattern::check(base + i, salt, false);
                }
                pattern::fill(base + i, salt);
            }
            first = false;
            ROUNDS[cpu.id].fetch_add(1, Ordering::AcqRel);
        }
        errors += session_errors;
        WRITER_ERRORS.fetch_add(session_errors, Ordering::AcqRel);
        WRITERS_DONE.fetch_add(1, Ordering::AcqRel);
        done = session;
    }
    Verdict::pass_if(errors == 0)
}

fn drive(cpu: &Cpu) -> Res<bool> {
    let line = bootinfo::get().cmdline;
    let which = cmdline::get(line, "attack").unwrap_or("all");
    let dev = virtio::find(line, VIRTIO_ID_BALLOON).map_err(|_| "no virtio-balloon found")?;
    let mut d = Driver::new(dev)?;
    d.setup()?;
    d.alive()?;
    println!(
        "hostile: driver ready at {:#x}, attacks: {}",
        dev.base, which
    );
    let mut ok = true;
    type Attack = fn(&mut Driver, u64) -> Res;
    let attacks: [(&str, Attack); 9] = [
        ("pfns", |d, _| d.pfns()),
        // Early, so that the writer vCPUs stop spinning soon.
        ("written", |d, w| d.written(w)),
        ("neighbours", |d, w| d.neighbours(w)),
        ("random", |d, _| d.random()),
        ("descriptors", |d, _| d.descriptors()),
        ("rings", |d, _| d.rings_attack()),
        ("renegotiate", |d, _| d.renegotiate()),
        ("reset", |d, _| d.reset()),
        ("touch", |d, _| d.touch()),
    ];
    let mut ran = 0;
    for (name, attack) in attacks {
        if which != "all" && which != name {
            continue;
        }
        ran += 1;
        let r = attack(&mut d, cpu.count as u64 - 1).and_then(|()| d.alive());
        if let Err(e) = r {
            println!(
                "hostile: {}: FAILED: {} (status {:#x})",
                name,
                e,
                dev.status()
            );
            ok = false;
            // Recover for the next attack if the device can still be set up.
            if d.setup().is_err() {
                break;
            }
        }
    }
    if ran == 0 {
        return Err("unknown attack= name");
    }
    STOP.store(true, Ordering::Release);
    if let Err(e) = d.finale() {
        println!("hostile: final: FAILED: {}", e);
        ok = false;
    }
    println!(
        "hostile: expected at least {} invalid frames and {} malformed buffers",
        d.min_invalid, d.min_malformed
    );
    Ok(ok)
}

fn main(cpu: &Cpu) -> Verdict {
    if !cpu.is_boot() {
        return writer(cpu);
    }
    let r = drive(cpu);
    STOP.store(true, Ordering::Release);
    match r {
        Ok(true) => Verdict::Pass,
        Ok(false) => Verdict::Fail,
        Err(e) => {
            println!("hostile: driver error: {}", e);
            Verdict::Fail
        }
    }
}

rt::guest_main!(main);
