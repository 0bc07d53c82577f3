//! reclaimcheck: checks the VMM's Stage2Gather from inside the guest.
//!
//! The boot vCPU fills a region with a pattern derived from each word's address, hands the
//! VMM a mailbox through the reclaim probe port (0xf6), and, once the VMM has reclaimed a
//! scattered set of the region's frames and listed them in the mailbox, checks every frame:
//! reclaimed ones must read as zeros, all others must keep their pattern. It then writes and
//! verifies the reclaimed frames again (re-population). Meanwhile the other vCPUs keep
//! rewriting and verifying their own memory, so the host's stage-2 flushes reach running
//! vCPUs.
//!
//! With `writers=1` the other vCPUs instead keep rewriting (and verifying) the region's frames
//! that stay in use, interleaved with the ones being reclaimed, while the VMM reclaims: the
//! VMM's zap spans cover those frames, so this checks that a span loses nothing of frames
//! written during its zap. The scattered set is `abi::probe::scattered_frames`, which the
//! guest computes as the VMM does.
//!
//! Command line: `bytes=SIZE` (region size, default 32M), `others=SIZE` (per other vCPU,
//! default 4M), `above4g=1` (place the region above 4 GiB), `pattern=contiguous` (ask the
//! VMM to reclaim the whole region instead of a scattered subset), `writers=1`,
//! `align=SIZE` (start the region on a multiple of SIZE: 2M on a 2 MiB backing, where the VMM
//! holds a partly covered block and its frames keep their contents).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::pattern::{check, fill};
use rt::sync::Barrier;
use rt::{arch, bootinfo, cmdline, frames, println, Cpu, Verdict};

use abi::probe::{self, MailboxPage};

static mut MAILBOX: MailboxPage = MailboxPage(probe::Mailbox::EMPTY);

static READY: Barrier = Barrier::new();
static DONE: AtomicBool = AtomicBool::new(false);
static OTHER_ERRORS: AtomicU64 = AtomicU64::new(0);
/// The region (first frame, pages), published before READY for `writers=1`.
static REGION: AtomicU64 = AtomicU64::new(0);
static REGION_PAGES: AtomicU64 = AtomicU64::new(0);
const SALT: u64 = 0x5a5a;

/// Calls `f` for every frame of the region that the scattered pattern leaves in use.
fn for_each_in_use(region: u64, pages: u64, mut f: impl FnMut(u64)) {
    let mut reclaimed = probe::scattered_frames(region, pages, pages).peekable();
    for g in region..region + pages {
        if reclaimed.peek() == Some(&g) {
            reclaimed.next();
        } else {
            f(g);
        }
    }
}

/// `writers=1`: rewrites this vCPU's stripe of the region's in-use frames with a new pattern
/// every round, checking each frame still holds the previous round's, until DONE; then
/// checks the last round's once more.
fn writer_vcpu(cpu: &Cpu) -> Verdict {
    READY.wait(cpu.count);
    let (region, pages) = (
        REGION.load(Ordering::Acquire),
        REGION_PAGES.load(Ordering::Acquire),
    );
    let (me, writers) = (cpu.id as u64 - 1, cpu.count as u64 - 1);
    let salt = |round: u64| SALT ^ (cpu.id as u64) << 32 ^ round;
    let (mut round, mut errors, mut frames) = (0u64, 0u64, 0u64);
    let mut previous = SALT;
    loop {
        let stop = DONE.load(Ordering::Acquire);
        let mut k = 0u64;
        for_each_in_use(region, pages, |g| {
            if k % writers == me {
                errors += check(g, previous, false);
                if !stop {
                    fill(g, salt(round));
                }
                frames += u64::from(round == 0);
            }
            k += 1;
        });
        if stop {
            break;
        }
        previous = salt(round);
        round += 1;
    }
    println!(
        "reclaimcheck: cpu {} rewrote its {} in-use frames of the region {} times, {} errors",
        cpu.id, frames, round, errors
    );
    OTHER_ERRORS.fetch_add(errors, Ordering::Relaxed);
    Verdict::pass_if(errors == 0)
}

fn page(gfn: u64) -> *mut u64 {
    (gfn * frames::PAGE_SIZE) as *mut u64
}

fn take_run(pages: u64) -> Option<u64> {
    match frames::alloc_run(pages) {
        Some((gfn, n)) if n == pages => Some(gfn),
        _ => None,
    }
}

/// A run of `pages` frames whose first frame is a multiple of `align` (the frames before it
/// are taken and left unused).
fn take_aligned_run(pages: u64, align: u64) -> Option<u64> {
    let gfn = take_run(pages.checked_add(align - 1)?)?;
    Some(gfn.div_ceil(align) * align)
}

/// Takes runs (and leaves them unused) until one of `pages` frames starts above 4 GiB.
fn take_run_above_4g(pages: u64) -> Option<u64> {
    const GFN_4G: u64 = (1 << 32) / frames::PAGE_SIZE;
    loop {
        let (gfn, n) = frames::alloc_run(pages)?;
        if gfn >= GFN_4G && n == pages {
            return Some(gfn);
        }
    }
}

fn other_vcpu(cpu: &Cpu, bytes: u64) -> Verdict {
    let pages = bytes / frames::PAGE_SIZE;
    let Some(base) = take_run(pages) else {
        println!(
            "reclaimcheck: cpu {} cannot allocate {} pages",
            cpu.id, pages
        );
        READY.wait(cpu.count);
        return Verdict::Fail;
    };
    let salt = cpu.id as u64;
    for g in base..base + pages {
        fill(g, salt);
    }
    READY.wait(cpu.count);
    let (rounds, errors) = rt::pattern::rewrite_until(base, pages, salt, &DONE);
    println!(
        "reclaimcheck: cpu {} rewrote its {} pages {} times, {} errors",
        cpu.id, pages, rounds, errors
    );
    OTHER_ERRORS.fetch_add(errors, Ordering::Relaxed);
    Verdict::pass_if(errors == 0)
}

fn main(cpu: &Cpu) -> Verdict {
    let line = bootinfo::get().cmdline;
    let writers = cmdline::get_u64(line, "writers") == Some(1) && cpu.count > 1;
    if !cpu.is_boot() {
        if writers {
            return writer_vcpu(cpu);
        }
        return other_vcpu(cpu, cmdline::get_size(line, "others").unwrap_or(4 << 20));
    }
    let pages = cmdline::get_size(line, "bytes").unwrap_or(32 << 20) / frames::PAGE_SIZE;
    let list_pages = (pages * 8).div_ceil(frames::PAGE_SIZE);
    let align = (cmdline::get_size(line, "align").unwrap_or(0) / frames::PAGE_SIZE).max(1);
    let region = if cmdline::get_u64(line, "above4g") == Some(1) {
        take_run_above_4g(pages)
    } else {
        take_aligned_run(pages, align)
    };
    let (Some(region), Some(list)) = (region, take_run(list_pages)) else {
        println!("reclaimcheck: cannot allocate the region");
        READY.wait(cpu.count);
        DONE.store(true, Ordering::Release);
        return Verdict::Fail;
    };
    for g in region..region + pages {
        fill(g, SALT);
    }
    REGION.store(region, Ordering::Release);
    REGION_PAGES.store(pages, Ordering::Release);
    for g in list..list + list_pages {
        // Touch the list pages so the host's accounting around the reclaim sees no new pages.
        // SAFETY: our frames.
        unsafe { page(g).write_volatile(0) };
    }
    READY.wait(cpu.count);

    // SAFETY: only this vCPU touches the mailbox; the VMM writes it while we are in the
    // port access, which the volatile reads below observe.
    #[allow(clippy::deref_addrof)] // a raw pointer avoids a reference to a `static mut`
    let mb = unsafe { &mut (*(&raw mut MAILBOX)).0 };
    mb.magic = probe::MAGIC;
    mb.region_gfn = region;
    mb.region_pages = pages;
    mb.list_gfn = list;
    mb.list_capacity = pages;
    mb.pattern = if cmdline::get(line, "pattern") == Some("contiguous") {
        probe::PATTERN_CONTIGUOUS
    } else {
        probe::PATTERN_SCATTERED
    };
    mb.reclaimed = 0;
    mb.status = probe::STATUS_PENDING;
    arch::outl(abi::PROBE_PORT, (&raw const mb.magic) as u64 as u32);
    // SAFETY: as above.
    let (status, reclaimed) = unsafe {
        (
            (&raw const mb.status).read_volatile(),
            (&raw const mb.reclaimed).read_volatile(),
        )
    };
    if status == probe::STATUS_PENDING {
        println!("reclaimcheck: probe failed: no reclaim probe answered on port 0xf6 (run the VMM with --reclaim-probe)");
        DONE.store(true, Ordering::Release);
        return Verdict::Fail;
    }
    if status != probe::STATUS_OK || reclaimed == 0 || reclaimed > pages {
        println!(
            "reclaimcheck: probe failed: status={} reclaimed={}",
            status, reclaimed
        );
        DONE.store(true, Ordering::Release);
        return Verdict::Fail;
    }

    let listed = |i: u64| -> u64 {
        // SAFETY: the VMM wrote `reclaimed` entries into our list frames.
        unsafe { (page(list) as *const u64).add(i as usize).read_volatile() }
    };
    let (mut zero_ok, mut intact, mut bad_zero, mut bad_intact) = (0u64, 0u64, 0u64, 0u64);
    let mut next = 0u64;
    for g in region..region + pages {
        let reclaimed_here = next < reclaimed && listed(next) == g;
        if reclaimed_here {
            next += 1;
            if check(g, SALT, true) == 0 {
                zero_ok += 1
            } else {
                bad_zero += 1
            }
        } else if writers {
            // The writer vCPUs own these frames now and verify them.
        } else if check(g, SALT, false) == 0 {
            intact += 1
        } else {
            bad_intact += 1
        }
    }
    // Re-population: reclaimed frames are usable again.
    let mut bad_reuse = 0;
    for i in 0..reclaimed {
        let g = listed(i);
        fill(g, SALT + 1);
        if check(g, SALT + 1, false) != 0 {
            bad_reuse += 1;
        }
    }
    DONE.store(true, Ordering::Release);
    let ok = next == reclaimed && bad_zero == 0 && bad_intact == 0 && bad_reuse == 0;
    println!(
        "reclaimcheck: {} region_pages={} reclaimed={} zero_ok={} intact={} not_zero={} corrupted={} reuse_errors={} unlisted={}",
        if ok { "PASS" } else { "FAIL" },
        pages,
        reclaimed,
        zero_ok,
        intact,
        bad_zero,
        bad_intact,
        bad_reuse,
        reclaimed - next
    );
    Verdict::pass_if(ok)
}

rt::guest_main!(main);
