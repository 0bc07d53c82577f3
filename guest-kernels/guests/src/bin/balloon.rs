//! balloon: a virtio-balloon driver that behaves like Linux's, with memtouch verifiers.
//!
//! vCPU 0 drives the balloon: it finds the device from `virtio_mmio.device=` on the command
//! line, negotiates VERSION_1, STATS_VQ, DEFLATE_ON_OOM and FREE_PAGE_REPORTING, follows the
//! config's `num_pages` by polling, inflates with frames from its own allocator in buffers of
//! at most 256 PFNs with one buffer in flight, deflates, writes `actual`, keeps the stats
//! queue filled, and (with `report=1`) reports free memory in 2 MiB blocks. Deflated frames
//! are written and verified before going back to the allocator (re-use). Every other vCPU
//! rewrites and verifies its own share the whole time.
//!
//! With `hint=1` it also negotiates FREE_PAGE_HINT and, before following targets, waits for
//! the host to start a hinting run: it sends the run's command id, hints all its free memory
//! in 2 MiB blocks (63 to a buffer, one notification each), sends STOP, waits for DONE, then
//! writes and verifies the first frame of every hinted block (reuse) before freeing them.
//!
//! Command line: `changes=N` (finish after the balloon reached N new targets; default 2),
//! `touch=SIZE` (per verifier vCPU, default 16M), `report=1` (report free memory once, at
//! start), `report=each` (also after every target reached, as Linux reports periodically),
//! `prefault=0` (skip touching all
//! free memory once at start), `fragment=1` (keep every other frame of the lower half of
//! free memory, so inflates get scattered frames), `hot=1` (with `fragment=1`: the verifiers
//! rewrite and verify the kept frames instead of memory of their own, so the guest's working
//! set is interleaved with the frames it balloons, as in a long-running guest).
//!
//! Guest memory throughput: the verifiers count the pages they check and rewrite, and the
//! driver measures their rate (pages per million TSC ticks, so no clock calibration is
//! needed) before, during and after each inflate: from the previous target reached to the
//! inflate's start, from its start until its target is reached, and from then until the next
//! target. It prints `balloon: throughput inflate to N pages: before B during D pages/Mtick;
//! retained during P%` as soon as the target is reached, and `balloon: throughput after
//! inflate to N pages: after A pages/Mtick; retained after Q%` once the phase after ends.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::sync::Barrier;
use rt::virtio::{self, Desc, Device, Queue, DESC_F_WRITE};
use rt::{bootinfo, cmdline, frames, pattern, println, Cpu, Verdict};

use abi::virtio::balloon::{
    CONFIG_ACTUAL, CONFIG_FREE_PAGE_HINT_CMD_ID, CONFIG_NUM_PAGES, DEVICE_ID as VIRTIO_ID_BALLOON,
    F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_FREE_PAGE_REPORTING as F_REPORTING, F_STATS_VQ,
    HINT_CMD_ID_DONE, HINT_CMD_ID_STOP, PFNS_PER_BUFFER,
};
const REPORT_BLOCK_PAGES: u64 = 512;
const REPORT_BLOCKS_PER_BUFFER: usize = 16;
/// Hinted 2 MiB blocks per buffer (the hint queue has 64 entries).
const HINT_BLOCKS_PER_BUFFER: usize = 63;

static STARTED: Barrier = Barrier::new();
static DONE: AtomicBool = AtomicBool::new(false);
static VERIFY_ERRORS: AtomicU64 = AtomicU64::new(0);

/// A counter on a cache line of its own (the verifiers bump theirs for every page).
#[repr(align(64))]
struct Counter(AtomicU64);
/// Pages each verifier vCPU has checked and rewritten.
static VERIFIED: [Counter; rt::MAX_CPUS] = [const { Counter(AtomicU64::new(0)) }; rt::MAX_CPUS];
/// `hot=1`: the frames `fragment` kept, as a list of u32 PFNs, published for the verifiers.
static KEPT_LIST: AtomicU64 = AtomicU64::new(0);
static KEPT_COUNT: AtomicU64 = AtomicU64::new(0);
static KEPT_READY: AtomicBool = AtomicBool::new(false);

fn verified_total() -> u64 {
    VERIFIED.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
}

/// Checks and rewrites the frames `frame(0..n)` round after round until DONE, counting pages.
fn verify_until_done(cpu: &Cpu, n: u64, frame: impl Fn(u64) -> u64) -> (u64, u64) {
    let salt = 0x1000 + cpu.id as u64;
    for k in 0..n {
        pattern::fill(frame(k), salt);
    }
    let (mut rounds, mut errors) = (0, 0);
    while !DONE.load(Ordering::Acquire) {
        for k in 0..n {
            errors += pattern::check(frame(k), salt, false);
            pattern::fill(frame(k), salt);
            VERIFIED[cpu.id].0.fetch_add(1, Ordering::Relaxed);
        }
        rounds += 1;
    }
    (rounds, errors)
}

fn verifier(cpu: &Cpu, bytes: u64, hot: bool) -> Verdict {
    let pages = bytes / frames::PAGE_SIZE;
    let run = if hot { None } else { frames::alloc_run(pages) };
    STARTED.wait(cpu.count);
    let (n, rounds, errors) = if hot {
        while !KEPT_READY.load(Ordering::Acquire) && !DONE.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        let (list, count) = (
            KEPT_LIST.load(Ordering::Acquire) as *const u32,
            KEPT_COUNT.load(Ordering::Acquire),
        );
        // This vCPU's stripe of the kept frames.
        let (me, verifiers) = (cpu.id as u64 - 1, cpu.count as u64 - 1);
        let n = count.saturating_sub(me).div_ceil(verifiers);
        // SAFETY: the driver wrote `count` PFNs into the list and never changes them again.
        let frame = |k: u64| unsafe { list.add((me + k * verifiers) as usize).read() } as u64;
        let (r, e) = verify_until_done(cpu, n, frame);
        (n, r, e)
    } else {
        let Some((base, n)) = run.filter(|r| r.1 == pages) else {
            println!("balloon: cpu {} cannot allocate {} pages", cpu.id, pages);
            return Verdict::Fail;
        };
        let (r, e) = verify_until_done(cpu, n, |k| base + k);
        (n, r, e)
    };
    println!(
        "balloon: cpu {} verified its {} pages {} times, {} errors",
        cpu.id, n, rounds, errors
    );
    VERIFY_ERRORS.fetch_add(errors, Ordering::Relaxed);
    Verdict::pass_if(errors == 0)
}

/// Runs of frames held while touching or reporting them (kept off the 64 KiB stack).
struct Runs([(u64, u64); 4096]);
static mut RUNS: Runs = Runs([(0, 0); 4096]);

/// Takes runs of up to `max` frames until memory or the run table is exhausted, calls `f`
/// on each, then returns them all to the allocator.
fn with_all_free_runs(max: u64, mut f: impl FnMut(&[(u64, u64)])) {
    // SAFETY: only the driver vCPU uses RUNS.
    #[allow(clippy::deref_addrof)] // a raw pointer avoids a reference to a `static mut`
    let runs = unsafe { &mut (*(&raw mut RUNS)).0 };
    let mut n = 0;
    while n < runs.len() {
        let Some(run) = frames::alloc_run(max) else {
            break;
        };
        runs[n] = run;
        n += 1;
    }
    f(&runs[..n]);
    for &(gfn, count) in &runs[..n] {
        for g in gfn..gfn + count {
            frames::free(g);
        }
    }
}

/// Fragments the allocator: keeps every other frame of the lower half of free memory, so that
/// later allocations (and so inflates) get scattered frames. Returns the frames kept; with a
/// `list` (room for a quarter of free memory's PFNs) also lists them there.
fn fragment(list: Option<*mut u32>) -> u64 {
    let half = frames::free_count() / 2;
    // SAFETY: only the driver vCPU uses RUNS.
    #[allow(clippy::deref_addrof)] // a raw pointer avoids a reference to a `static mut`
    let runs = unsafe { &mut (*(&raw mut RUNS)).0 };
    let mut n = 0;
    while n < runs.len() {
        let Some(run) = frames::alloc_run(u64::MAX) else {
            break;
        };
        runs[n] = run;
        n += 1;
    }
    let (mut seen, mut kept) = (0u64, 0u64);
    for &(gfn, count) in &runs[..n] {
        for g in gfn..gfn + count {
            if seen < half && seen % 2 == 1 {
                if let Some(l) = list {
                    // SAFETY: at most half / 2 entries, the room the caller made.
                    unsafe { l.add(kept as usize).write(g as u32) };
                }
                kept += 1;
            } else {
                frames::free(g);
            }
            seen += 1;
        }
    }
    kept
}

/// Touches every free frame once so that the host really holds the guest's memory.
fn prefault() {
    with_all_free_runs(u64::MAX, |runs| {
        for &(gfn, n) in runs {
            for g in gfn..gfn + n {
                // SAFETY: frames we hold.
                unsafe { ((g * frames::PAGE_SIZE) as *mut u64).write_volatile(g) };
            }
        }
    });
}

struct Driver {
    dev: Device,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    hinting: Option<Queue>,
    reporting: Option<Queue>,
    buffer: *mut u32,
    stats_buf: *mut u8,
    /// PFNs in the balloon, as a stack in frames of our own.
    list: *mut u32,
    list_cap: u64,
    held: u64,
    inflated: u64,
    deflated: u64,
    reuse_errors: u64,
    stats_sent: u64,
}

impl Driver {
    fn new(dev: Device, features: u64) -> Result<Self, virtio::VirtioError> {
        let inflate = Queue::new(dev, 0, 64)?;
        let deflate = Queue::new(dev, 1, 64)?;
        let mut next = 2;
        let stats = if features & F_STATS_VQ != 0 {
            next += 1;
            Some(Queue::new(dev, 2, 8)?)
        } else {
            None
        };
        let hinting = if features & F_FREE_PAGE_HINT != 0 {
            next += 1;
            Some(Queue::new(dev, next - 1, 64)?)
        } else {
            None
        };
        let reporting = if features & F_REPORTING != 0 {
            Some(Queue::new(dev, next, 32)?)
        } else {
            None
        };
        let page = || {
            frames::alloc()
                .map(|f| f * frames::PAGE_SIZE)
                .ok_or(virtio::VirtioError::OutOfMemory)
        };
        let buffer = page()? as *mut u32;
        let stats_buf = page()? as *mut u8;
        // One u32 per frame the balloon may hold: all of RAM.
        let ram_pages = bootinfo::get().ram_bytes() / frames::PAGE_SIZE;
        let list_pages = (ram_pages * 4).div_ceil(frames::PAGE_SIZE);
        let (list, got) = frames::alloc_run(list_pages).ok_or(virtio::VirtioError::OutOfMemory)?;
        if got != list_pages {
            return Err(virtio::VirtioError::OutOfMemory);
        }
        Ok(Self {
            dev,
            inflate,
            deflate,
            stats,
            hinting,
            reporting,
            buffer,
            stats_buf,
            list: (list * frames::PAGE_SIZE) as *mut u32,
            list_cap: ram_pages,
            held: 0,
            inflated: 0,
            deflated: 0,
            reuse_errors: 0,
            stats_sent: 0,
        })
    }

    fn target(&self) -> u64 {
        self.dev.config_read(CONFIG_NUM_PAGES) as u64
    }

    fn set_actual(&self) {
        self.dev.config_write(CONFIG_ACTUAL, self.held as u32);
    }

    /// The descriptor for the first `n` PFNs of our buffer page.
    fn pfn_desc(&self, n: usize) -> Desc {
        Desc {
            addr: self.buffer as u64,
            len: (n * 4) as u32,
            flags: 0,
            next: 0,
        }
    }

    fn inflate_some(&mut self, want: u64) -> Result<bool, virtio::VirtioError> {
        let mut n = 0;
        while (n as u64) < want && n < PFNS_PER_BUFFER && self.held + (n as u64) < self.list_cap {
            let Some(pfn) = frames::alloc() else { break };
            // SAFETY: n < 256 entries in our buffer page.
            unsafe { self.buffer.add(n).write_volatile(pfn as u32) };
            n += 1;
        }
        if n == 0 {
            return Ok(false);
        }
        self.inflate.call(&[self.pfn_desc(n)])?;
        for i in 0..n {
            // SAFETY: held + i < list_cap.
            unsafe {
                let pfn = self.buffer.add(i).read_volatile();
                self.list
                    .add((self.held + i as u64) as usize)
                    .write_volatile(pfn);
            }
        }
        self.held += n as u64;
        self.inflated += n as u64;
        self.set_actual();
        Ok(true)
    }

    fn deflate_some(&mut self, want: u64) -> Result<(), virtio::VirtioError> {
        let n = want.min(PFNS_PER_BUFFER as u64).min(self.held) as usize;
        for i in 0..n {
            // SAFETY: indices below held.
            unsafe {
                let pfn = self.list.add(self.held as usize - 1 - i).read_volatile();
                self.buffer.add(i).write_volatile(pfn);
            }
        }
        self.deflate.call(&[self.pfn_desc(n)])?;
        for i in 0..n {
            // SAFETY: our buffer page.
            let pfn = unsafe { self.buffer.add(i).read_volatile() } as u64;
            pattern::fill(pfn, 0x77);
            if pattern::check(pfn, 0x77, false) != 0 {
                self.reuse_errors += 1;
            }
            frames::free(pfn);
        }
        self.held -= n as u64;
        self.deflated += n as u64;
        self.set_actual();
        Ok(())
    }

    fn send_stats(&mut self) {
        let Some(q) = self.stats.as_mut() else { return };
        if q.in_flight() && !q.poll() {
            return;
        }
        let total = bootinfo::get().ram_bytes();
        let free = frames::free_count() * frames::PAGE_SIZE;
        let entries: [(u16, u64); 3] = [(4, free), (5, total), (6, free)];
        for (i, (tag, val)) in entries.iter().enumerate() {
            // SAFETY: 30 bytes in our stats page.
            unsafe {
                let p = self.stats_buf.add(i * 10);
                (p as *mut [u8; 2]).write_unaligned(tag.to_le_bytes());
                (p.add(2) as *mut [u8; 8]).write_unaligned(val.to_le_bytes());
            }
        }
        q.submit(&[Desc {
            addr: self.stats_buf as u64,
            len: 30,
            flags: 0,
            next: 0,
        }]);
        self.stats_sent += 1;
    }

    /// Reports free memory in 2 MiB blocks, then gives the blocks back to the allocator.
    fn report_free(&mut self) -> Result<u64, virtio::VirtioError> {
        let Some(q) = self.reporting.as_mut() else {
            return Ok(0);
        };
        let mut result = Ok(0);
        with_all_free_runs(REPORT_BLOCK_PAGES, |runs| {
            result = send_blocks(q, runs, REPORT_BLOCKS_PER_BUFFER);
        });
        result
    }

    /// One free page hinting run under command `id`: all free memory hinted in 2 MiB
    /// blocks, STOP, then DONE awaited; the hinted blocks are reused (their first frame
    /// written and verified) and freed. Returns (pages hinted, reuse errors).
    fn hint_free(&mut self, id: u32) -> Result<(u64, u64), virtio::VirtioError> {
        let (dev, cmd) = (self.dev, self.buffer);
        let Some(q) = self.hinting.as_mut() else {
            return Ok((0, 0));
        };
        let cmd_desc = Desc {
            addr: cmd as u64,
            len: 4,
            flags: 0,
            next: 0,
        };
        let send_cmd = |q: &mut Queue, v: u32| {
            // SAFETY: our buffer page; the device reads the id from it.
            unsafe { cmd.write_volatile(v.to_le()) };
            q.call(&[cmd_desc])
        };
        send_cmd(q, id)?;
        let mut errors = 0u64;
        let mut result = Ok(0);
        with_all_free_runs(REPORT_BLOCK_PAGES, |runs| {
            result = send_blocks(q, runs, HINT_BLOCKS_PER_BUFFER)
                .and_then(|hinted| send_cmd(q, HINT_CMD_ID_STOP).map(|()| hinted));
            if result.is_err() {
                return;
            }
            // The blocks stay ours until the host says DONE.
            while dev.config_read(CONFIG_FREE_PAGE_HINT_CMD_ID) != HINT_CMD_ID_DONE {
                core::hint::spin_loop();
            }
            for &(gfn, _) in runs.iter().filter(|r| r.1 == REPORT_BLOCK_PAGES) {
                pattern::fill(gfn, 0x5a);
                errors += pattern::check(gfn, 0x5a, false);
            }
        });
        result.map(|hinted| (hinted, errors))
    }
}

/// Hands the whole 2 MiB blocks among `runs` to the device as device-writable ranges,
/// `per_buffer` of them to a buffer (at most HINT_BLOCKS_PER_BUFFER), one call per buffer:
/// free page reports and hints alike. Returns the pages handed over.
fn send_blocks(
    q: &mut Queue,
    runs: &[(u64, u64)],
    per_buffer: usize,
) -> Result<u64, virtio::VirtioError> {
    let mut chain = [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; HINT_BLOCKS_PER_BUFFER];
    let per_buffer = per_buffer.min(chain.len());
    let (mut sent, mut n) = (0, 0);
    for &(gfn, count) in runs.iter().filter(|r| r.1 == REPORT_BLOCK_PAGES) {
        chain[n] = Desc {
            addr: gfn * frames::PAGE_SIZE,
            len: (count * frames::PAGE_SIZE) as u32,
            flags: DESC_F_WRITE,
            next: 0,
        };
        n += 1;
        if n == per_buffer {
            q.call(&chain[..n])?;
            sent += n as u64 * REPORT_BLOCK_PAGES;
            n = 0;
        }
    }
    if n > 0 {
        q.call(&chain[..n])?;
        sent += n as u64 * REPORT_BLOCK_PAGES;
    }
    Ok(sent)
}

/// The verifiers' throughput around one inflate: samples of (TSC, pages verified).
struct Throughput {
    target: u64,
    idle_from: (u64, u64),
    started: (u64, u64),
    reached: Option<(u64, u64)>,
}

fn sample() -> (u64, u64) {
    (rt::arch::rdtsc(), verified_total())
}

/// Pages per million ticks between two samples.
fn rate(a: (u64, u64), b: (u64, u64)) -> u64 {
    let ticks = b.0.saturating_sub(a.0).max(1);
    ((b.1 - a.1) as u128 * 1_000_000 / ticks as u128) as u64
}

impl Throughput {
    /// Prints the line for an inflate whose target was just reached.
    fn print_during(&self) {
        let Some(reached) = self.reached else { return };
        let (before, during) = (
            rate(self.idle_from, self.started),
            rate(self.started, reached),
        );
        if before == 0 {
            // No verifier work before the inflate began (it began at once): no ratio.
            println!(
                "balloon: throughput inflate to {} pages: before {} during {} pages/Mtick; retained during n/a",
                self.target, before, during
            );
            return;
        }
        println!(
            "balloon: throughput inflate to {} pages: before {} during {} pages/Mtick; retained during {}%",
            self.target,
            before,
            during,
            during * 100 / before
        );
    }

    /// Prints the line for the phase after an inflate, which ended at `end`.
    fn print_after(&self, end: (u64, u64)) {
        let Some(reached) = self.reached else { return };
        let (before, after) = (rate(self.idle_from, self.started), rate(reached, end));
        if before == 0 {
            println!(
                "balloon: throughput after inflate to {} pages: after {} pages/Mtick; retained after n/a",
                self.target, after
            );
            return;
        }
        println!(
            "balloon: throughput after inflate to {} pages: after {} pages/Mtick; retained after {}%",
            self.target,
            after,
            after * 100 / before
        );
    }
}

fn drive(cpu: &Cpu) -> Result<Verdict, virtio::VirtioError> {
    let line = bootinfo::get().cmdline;
    let changes = cmdline::get_u64(line, "changes").unwrap_or(2);
    let hot = cmdline::get_u64(line, "hot") == Some(1);
    STARTED.wait(cpu.count);
    if cmdline::get_u64(line, "prefault") != Some(0) {
        prefault();
    }
    let dev = virtio::find(line, VIRTIO_ID_BALLOON)?;
    let report_each = cmdline::get(line, "report") == Some("each");
    let wanted = F_STATS_VQ
        | F_DEFLATE_ON_OOM
        | if report_each || cmdline::get_u64(line, "report") == Some(1) {
            F_REPORTING
        } else {
            0
        };
    let wanted = wanted
        | if cmdline::get_u64(line, "hint") == Some(1) {
            F_FREE_PAGE_HINT
        } else {
            0
        };
    let features = dev.negotiate(wanted)?;
    let mut d = Driver::new(dev, features)?;
    // Fragment only now: the driver's own structures need contiguous frames.
    if cmdline::get_u64(line, "fragment") == Some(1) {
        let list = if hot {
            let pages = (frames::free_count() / 4 * 4).div_ceil(frames::PAGE_SIZE) + 1;
            match frames::alloc_run(pages) {
                Some((gfn, n)) if n == pages => Some((gfn * frames::PAGE_SIZE) as *mut u32),
                _ => return Err(virtio::VirtioError::OutOfMemory),
            }
        } else {
            None
        };
        let kept = fragment(list);
        if let Some(l) = list {
            KEPT_LIST.store(l as u64, Ordering::Release);
            KEPT_COUNT.store(kept, Ordering::Release);
            KEPT_READY.store(true, Ordering::Release);
        }
        println!(
            "balloon: fragmented the allocator, keeping {} scattered frames{}",
            kept,
            if hot {
                " (the verifiers' working set)"
            } else {
                ""
            }
        );
    }
    dev.driver_ok()?;
    println!(
        "balloon: driver ready at {:#x}, features {:#x}",
        dev.base, features
    );
    d.send_stats();
    if features & F_REPORTING != 0 {
        let pages = d.report_free()?;
        println!(
            "balloon: reported {} free pages ({} MiB) in 2 MiB blocks",
            pages,
            pages >> 8
        );
    }
    if features & F_FREE_PAGE_HINT != 0 {
        println!("balloon: waiting for a free page hinting run");
        let id = loop {
            let id = dev.config_read(CONFIG_FREE_PAGE_HINT_CMD_ID);
            if id > HINT_CMD_ID_DONE {
                break id;
            }
            d.send_stats();
            core::hint::spin_loop();
        };
        let (pages, errors) = d.hint_free(id)?;
        d.reuse_errors += errors;
        println!(
            "balloon: hinted {} free pages ({} MiB) in run {}; DONE received; reuse errors {}",
            pages,
            pages >> 8,
            id,
            errors
        );
    }
    let mut reached = 0u64;
    let mut last_reached = 0u64;
    let mut reported_total = 0u64;
    let mut stuck_reported = false;
    // Verifiers exist only with more than one vCPU.
    let measure = cpu.count > 1;
    let mut idle_from = sample();
    let mut inflate: Option<Throughput> = None;
    let mut seen_target = d.held;
    while reached < changes {
        d.send_stats();
        let target = d.target();
        if measure && target != seen_target {
            // A new target: the phase after the last inflate, and this idle phase, end here.
            let now = sample();
            if let Some(t) = inflate.take() {
                t.print_after(now);
            }
            if target > d.held {
                inflate = Some(Throughput {
                    target,
                    idle_from,
                    started: now,
                    reached: None,
                });
            }
            seen_target = target;
        }
        if target > d.held {
            if !d.inflate_some(target - d.held)? && !stuck_reported {
                println!(
                    "balloon: cannot inflate further at {} pages (no free frames)",
                    d.held
                );
                stuck_reported = true;
            }
        } else if target < d.held {
            d.deflate_some(d.held - target)?;
        } else if target == last_reached {
            core::hint::spin_loop();
        }
        // Count a target as soon as `held` meets it: once `actual` says so the host may set
        // the next target at once, and a target seen only on the next poll would be missed
        // (the guest would then wait for one change too many).
        if d.held == target && target != last_reached {
            reached += 1;
            last_reached = target;
            if measure {
                idle_from = sample();
                if let Some(t) = inflate.as_mut().filter(|t| t.target == target) {
                    t.reached = Some(idle_from);
                    t.print_during();
                }
            }
            stuck_reported = false;
            println!(
                "balloon: reached {} pages ({} MiB), free frames {}",
                target,
                target >> 8,
                frames::free_count()
            );
            if report_each && features & F_REPORTING != 0 {
                reported_total += d.report_free()?;
            }
        }
    }
    if let Some(t) = inflate.take() {
        t.print_after(sample());
    }
    DONE.store(true, Ordering::Release);
    let ok = d.reuse_errors == 0;
    println!(
        "balloon: {} targets reached; inflated {} deflated {} pages; reuse errors {}; stats buffers {}; pages reported after targets {}",
        reached, d.inflated, d.deflated, d.reuse_errors, d.stats_sent, reported_total
    );
    Ok(Verdict::pass_if(ok))
}

fn main(cpu: &Cpu) -> Verdict {
    let line = bootinfo::get().cmdline;
    if !cpu.is_boot() {
        let hot = cmdline::get_u64(line, "hot") == Some(1);
        return verifier(
            cpu,
            cmdline::get_size(line, "touch").unwrap_or(16 << 20),
            hot,
        );
    }
    let verdict = drive(cpu).unwrap_or_else(|e| {
        println!("balloon: driver error: {:?} (command line: {})", e, line);
        DONE.store(true, Ordering::Release);
        Verdict::Fail
    });
    verdict
}

rt::guest_main!(main);
