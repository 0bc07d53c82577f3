//! Signals: SIGRTMIN kicks a vCPU thread out of KVM_RUN; SIGINT and SIGTERM ask the VMM to
//! shut down (through an eventfd the event loop watches).
//!
//! A kick sets `immediate_exit` in the kicked thread's kvm_run, so a kick that lands just
//! before KVM_RUN is entered is not lost: KVM_RUN then returns EINTR at once.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

static SHUTDOWN_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: p is this thread's kvm_run mapping, valid while the vCPU fd lives; the
            // vCPU thread clears it before dropping the fd.
            unsafe { (*p).immediate_exit = 1 };
        }
    });
}

extern "C" fn on_shutdown(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(sig, Ordering::Relaxed);
    let fd = SHUTDOWN_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is an eventfd owned by the event loop.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Registers the vCPU kick handler (once per process is enough; repeated calls are harmless).
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Routes SIGINT/SIGTERM to `fd`.
pub fn install_shutdown_handlers(fd: &EventFd) -> std::io::Result<()> {
    SHUTDOWN_FD.store(fd.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_shutdown)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// The last shutdown signal received, if any.
pub fn last_shutdown_signal() -> Option<i32> {
    Some(LAST_SIGNAL.load(Ordering::Relaxed)).filter(|&s| s != 0)
}

/// Makes kicks of the calling thread set immediate_exit in `run` (null: forget it).
pub fn set_thread_kvm_run(run: *mut kvm_bindings::kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}
