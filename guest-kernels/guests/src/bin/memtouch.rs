//! memtouch: every vCPU writes a per-page pattern (vCPU, page index, round) over its share of
//! free RAM, verifies it, and repeats. Reports bytes touched, rounds and errors.
//!
//! Command line: `rounds=N` (default 3), `bytes=SIZE` (total over all vCPUs; default: all
//! free frames).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use rt::{bootinfo, cmdline, frames, println, Cpu, Verdict};

const MAX_RUNS: usize = 64;
const WORDS_PER_PAGE: usize = 512;

static TOTAL_BYTES: AtomicU64 = AtomicU64::new(0);
static TOTAL_ERRORS: AtomicU64 = AtomicU64::new(0);

fn pattern(cpu: usize, page: u64, round: u64, word: usize) -> u64 {
    ((cpu as u64) << 56 | round << 44 | page << 9 | word as u64) ^ 0x9e37_79b9_7f4a_7c15
}

fn main(cpu: &Cpu) -> Verdict {
    let boot = bootinfo::get();
    let rounds = cmdline::get_u64(boot.cmdline, "rounds").unwrap_or(3);
    let total_pages = frames::total_count();
    let want =
        cmdline::get_size(boot.cmdline, "bytes").map_or(total_pages, |b| b / frames::PAGE_SIZE);
    let share = want.min(total_pages) / cpu.count as u64;

    // Take this vCPU's share from the frame allocator as a few runs of frames.
    let mut runs = [(0u64, 0u64); MAX_RUNS];
    let mut nruns = 0;
    let mut have = 0;
    while have < share && nruns < MAX_RUNS {
        match frames::alloc_run(share - have) {
            Some(run) => {
                runs[nruns] = run;
                nruns += 1;
                have += run.1;
            }
            None => break,
        }
    }

    let mut errors = 0u64;
    for round in 0..rounds {
        for pass in 0..2 {
            let mut page = 0u64;
            for &(pfn, n) in &runs[..nruns] {
                for i in 0..n {
                    let p = ((pfn + i) * frames::PAGE_SIZE) as *mut u64;
                    for w in 0..WORDS_PER_PAGE {
                        let want = pattern(cpu.id, page, round, w);
                        // SAFETY: the frame is ours (allocated above) and identity mapped.
                        unsafe {
                            if pass == 0 {
                                p.add(w).write_volatile(want);
                            } else {
                                let got = p.add(w).read_volatile();
                                if got != want {
                                    if errors < 8 {
                                        println!("memtouch: cpu {} MISMATCH at {:#x}: want {:#x} got {:#x}",
                                            cpu.id, p.add(w) as u64, want, got);
                                    }
                                    errors += 1;
                                }
                            }
                        }
                    }
                    page += 1;
                }
            }
        }
    }
    let bytes = have * frames::PAGE_SIZE;
    println!(
        "memtouch: cpu {} touched {} KiB x {} rounds, {} errors",
        cpu.id,
        bytes >> 10,
        rounds,
        errors
    );
    TOTAL_BYTES.fetch_add(bytes * rounds, Ordering::Relaxed);
    TOTAL_ERRORS.fetch_add(errors, Ordering::Relaxed);
    if cpu.is_boot() {
        // The runtime joins all vCPUs after main; wait here too so the report sums them all.
        report_when_all_done(cpu, rounds);
    } else {
        DONE.fetch_add(1, Ordering::Release);
    }
    Verdict::pass_if(errors == 0)
}

static DONE: AtomicU64 = AtomicU64::new(0);

fn report_when_all_done(cpu: &Cpu, rounds: u64) {
    while DONE.load(Ordering::Acquire) < cpu.count as u64 - 1 {
        core::hint::spin_loop();
    }
    let errors = TOTAL_ERRORS.load(Ordering::Relaxed);
    println!(
        "memtouch: {} vcpus={} rounds={} bytes_touched={} errors={}",
        if errors == 0 { "PASS" } else { "FAIL" },
        cpu.count,
        rounds,
        TOTAL_BYTES.load(Ordering::Relaxed),
        errors
    );
}

rt::guest_main!(main);
