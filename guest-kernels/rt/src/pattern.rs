//! Page patterns for verifiers: each word's value derives from its address and a salt, so a
//! page that moved, was lost, or was reused by someone else is caught.

use crate::frames::PAGE_SIZE;

const WORDS: usize = (PAGE_SIZE / 8) as usize;

fn value(addr: u64, salt: u64) -> u64 {
    (addr ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The pattern's value for the word at `addr` (never zero).
pub fn word(addr: u64, salt: u64) -> u64 {
    value(addr, salt)
}

fn page(gfn: u64) -> *mut u64 {
    (gfn * PAGE_SIZE) as *mut u64
}

/// Writes the pattern for `salt` over frame `gfn`.
pub fn fill(gfn: u64, salt: u64) {
    let p = page(gfn);
    for w in 0..WORDS {
        // SAFETY: callers pass frames they own; RAM is identity mapped.
        unsafe { p.add(w).write_volatile(value(p.add(w) as u64, salt)) };
    }
}

/// Number of words of frame `gfn` that differ from the pattern (or from zero if `zero`).
pub fn check(gfn: u64, salt: u64, zero: bool) -> u64 {
    let p = page(gfn);
    let mut bad = 0;
    for w in 0..WORDS {
        // SAFETY: as in `fill`.
        let got = unsafe { p.add(w).read_volatile() };
        let want = if zero {
            0
        } else {
            value(p.wrapping_add(w) as u64, salt)
        };
        bad += u64::from(got != want);
    }
    bad
}

/// Fills `[base, base + n)` with the pattern for `salt`, then keeps checking and rewriting it
/// until `stop` is set. Returns (rounds, words that did not match).
pub fn rewrite_until(
    base: u64,
    n: u64,
    salt: u64,
    stop: &core::sync::atomic::AtomicBool,
) -> (u64, u64) {
    for g in base..base + n {
        fill(g, salt);
    }
    let (mut rounds, mut errors) = (0, 0);
    while !stop.load(core::sync::atomic::Ordering::Acquire) {
        for g in base..base + n {
            errors += check(g, salt, false);
            fill(g, salt);
        }
        rounds += 1;
    }
    (rounds, errors)
}
