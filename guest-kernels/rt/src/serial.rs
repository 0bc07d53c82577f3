//! COM1 output (a 16550 at 0x3f8), serialised by a spinlock so lines do not interleave.

use crate::arch;
use crate::sync::SpinLock;
use core::fmt;

const COM1: u16 = 0x3f8;

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                arch::outb(COM1, b'\r');
            }
            arch::outb(COM1, b);
        }
        Ok(())
    }
}

static LOCK: SpinLock<()> = SpinLock::new(());

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _g = LOCK.lock();
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints without taking the lock: for the exception and panic paths, where the lock may be
/// held by the code that faulted.
#[doc(hidden)]
pub fn _print_unlocked(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
