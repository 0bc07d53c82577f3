//! Boot state for the two kinds of guest this VMM starts:
//! - the project's test guests (`test_guest`): every vCPU enters the ELF's 64-bit entry with
//!   the contract of guest-kernels/rt `_start64`;
//! - Linux kernels (`linux`): an ELF vmlinux through its PVH entry, or a bzImage through the
//!   64-bit boot protocol; only the boot processor starts, Linux wakes the others.
//!
//! Shared by both: the memory map Linux sees (`memmap`), the PVH start info (`pvh`), the
//! identity page tables and GDTs (`tables`), each vCPU's entry registers (`cpu`), and the
//! ELF segment check before loading (`elf`).
//!
//! Low memory used by the VMM (guests never allocate below 1 MiB):
//! 0x500 GDT · 0x6000 hvm_start_info · 0x6040 its memory map · 0x6800 its module list ·
//! 0x7000 boot_params (bzImage) · 0xa000 command line · 0x10000 PML4 · 0x11000 PDPT ·
//! 0x12000.. page directories (2 MiB pages) · 0x9fc00 MP floating pointer · 0xe0000.. ACPI
//! tables (see `crate::acpi`) · 0xf0000 MP configuration table (`mptable`; Linux only).

pub mod cpu;
pub mod elf;
pub mod linux;
pub mod memmap;
pub mod mptable;
pub mod pvh;
pub mod tables;
pub mod test_guest;

pub use cpu::CpuEntry;

/// Where the guest's command line is written (a NUL-terminated string).
pub const CMDLINE_ADDR: u64 = 0xa000;
/// Longest command line the VMM writes (its slot is one page, with the NUL).
pub const CMDLINE_MAX: usize = 4095;

/// How each vCPU starts: `entries[i]` for vCPU i, or `None` for one that waits for
/// INIT/SIPI from the guest (a Linux application processor).
pub struct BootPlan {
    pub entries: Vec<Option<CpuEntry>>,
}

/// The error for a guest, kernel or initrd file that cannot be opened or read.
fn read_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> crate::VmmError + '_ {
    move |err| crate::VmmError::GuestRead {
        path: path.into(),
        err,
    }
}

/// Writes `cmdline` with its NUL at `CMDLINE_ADDR`, refusing one longer than `max` bytes.
pub fn write_cmdline(
    ram: &guest_mm::GuestRam,
    cmdline: &str,
    max: usize,
) -> Result<(), crate::VmmError> {
    use vm_memory::{Bytes, GuestAddress};
    let max = max.min(CMDLINE_MAX);
    if cmdline.len() > max {
        return Err(crate::VmmError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.memory()
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| crate::VmmError::GuestLoad {
            path: "<command line>".into(),
            err: e.to_string(),
        })
}
