//! Runtime for the project's test guests.
//!
//! Owns everything a guest needs before and around its workload: the two entry points (the
//! VMM's direct 64-bit entry and the PVH 32-bit entry that QEMU uses), descriptor tables, the
//! drop to ring 3, serial output, the exit port, per-vCPU start-up, spinlocks and barriers, and
//! a frame allocator over the RAM the boot protocol reports.
//!
//! Ring-0 work is kept to the minimum: on the project's development hosts KVM emulates guest
//! ring 0 instruction by instruction, while ring 3 runs natively. Workloads therefore run in
//! ring 3 with IOPL=3 so that port I/O stays legal there. A guest must never enable SSE.
#![no_std]

pub mod arch;
pub mod bootinfo;
pub mod cmdline;
pub mod exit;
pub mod frames;
pub mod pattern;
pub mod serial;
pub mod sync;
pub mod virtio;

mod entry;

pub use entry::{clobber_idt, Cpu, MAX_CPUS};
pub use exit::{exit, Verdict};

/// Declares the guest program's main function, run in ring 3 on every vCPU.
///
/// The function receives the vCPU it runs on and returns that vCPU's verdict. The runtime then
/// joins all vCPUs: the boot vCPU exits the VM with `Fail` if any vCPU failed, else `Pass`.
#[macro_export]
macro_rules! guest_main {
    ($f:path) => {
        #[no_mangle]
        pub extern "Rust" fn rt_guest_main(cpu: &$crate::Cpu) -> $crate::Verdict {
            $f(cpu)
        }
    };
}
