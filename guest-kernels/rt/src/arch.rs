//! x86 instructions the guests need: port I/O, the TSC, pause, control registers.
//! Port I/O is legal in ring 3 because the runtime enters ring 3 with IOPL=3.

use core::arch::asm;

#[inline]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    };
}

#[inline]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    };
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// The time-stamp counter (allowed in ring 3: CR4.TSD is clear).
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads CR2 (ring 0 only; used by the exception handler).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects; only called in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}
