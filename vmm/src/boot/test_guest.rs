//! The project's test guests: the ELF loaded at its physical addresses, the PVH start info
//! with the RAM ranges and the command line, identity page tables, and every vCPU at the
//! 64-bit entry with RDI = start info, RSI = its index, RDX = the vCPU count (the contract of
//! guest-kernels/rt `_start64`).

use super::cpu::{CpuEntry, EntryMode};
use super::memmap::{Region, RegionKind};
use super::{pvh, tables, BootPlan};
use crate::config::format_size;
use crate::error::VmmError;
use guest_mm::layout::Layout;
use guest_mm::GuestRam;
use kvm_bindings::kvm_regs;
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::fs::File;
use std::path::Path;

/// The guest image must not overlap the VMM's boot area.
const IMAGE_MIN_ADDR: u64 = 0x10_0000;
/// RAM the guest needs beyond its image (stacks are in the image; this is for its allocator).
const MIN_FREE_AFTER_IMAGE: u64 = 2 << 20;
const EM_X86_64: u16 = 62;

fn machine_name(m: u16) -> String {
    match m {
        3 => "i386".into(),
        40 => "ARM".into(),
        183 => "AArch64".into(),
        243 => "RISC-V".into(),
        other => format!("e_machine {other}"),
    }
}

/// Reads the ELF header and program headers to validate the image before loading it.
fn inspect(path: &Path, layout: &Layout) -> Result<(), VmmError> {
    let bytes = std::fs::read(path).map_err(super::read_error(path))?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(VmmError::GuestNotElf(path.into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let machine = u16_at(18);
    if bytes[4] != 2 || machine != EM_X86_64 {
        let arch = if bytes[4] != 2 {
            "a 32-bit class".into()
        } else {
            machine_name(machine)
        };
        return Err(VmmError::GuestWrongArch {
            path: path.into(),
            arch,
        });
    }
    let load_err = |err: String| VmmError::GuestLoad {
        path: path.into(),
        err,
    };
    let mut image_end = 0u64;
    for seg in super::elf::load_segments(&bytes).map_err(load_err)? {
        if seg.paddr < IMAGE_MIN_ADDR {
            return Err(load_err(format!(
                "segment at {:#x} overlaps the VMM's boot area below {IMAGE_MIN_ADDR:#x}",
                seg.paddr
            )));
        }
        image_end = image_end.max(seg.end);
    }
    if image_end == 0 {
        return Err(load_err("no loadable segments".into()));
    }
    let low_ram_end = layout.ranges()[0].end();
    let needed = image_end.saturating_add(MIN_FREE_AFTER_IMAGE);
    if needed > low_ram_end {
        return Err(VmmError::MemoryTooSmall {
            memory: format_size(layout.total_bytes()),
            guest: path.into(),
            needed: format_size(needed.div_ceil(1 << 20) << 20),
            image_end,
        });
    }
    Ok(())
}

/// Loads the guest ELF into RAM at its physical addresses; returns its 64-bit entry (e_entry).
pub fn load_guest(ram: &GuestRam, path: &Path) -> Result<u64, VmmError> {
    inspect(path, ram.layout())?;
    let mut file = File::open(path).map_err(super::read_error(path))?;
    let result =
        Elf::load(ram.memory(), None, &mut file, None).map_err(|e| VmmError::GuestLoad {
            path: path.into(),
            err: e.to_string(),
        })?;
    Ok(result.kernel_load.0)
}

/// The test guests' memory map: every RAM range, as RAM (their frame allocator never uses
/// the first MiB, which holds the boot data).
fn ram_map(layout: &Layout) -> Vec<Region> {
    layout
        .ranges()
        .iter()
        .map(|r| Region {
            start: r.gpa,
            size: r.size,
            kind: RegionKind::Ram,
        })
        .collect()
}

/// Loads the test guest at `path` and starts all `vcpus` at its 64-bit entry.
pub fn prepare(
    ram: &GuestRam,
    path: &Path,
    cmdline: &str,
    vcpus: u32,
) -> Result<BootPlan, VmmError> {
    let entry = load_guest(ram, path)?;
    let cr3 = tables::write_page_tables(ram)?;
    tables::write_gdt(ram, &tables::TEST_GUEST_GDT)?;
    super::write_cmdline(ram, cmdline, super::CMDLINE_MAX)?;
    let start_info = pvh::write(ram, &pvh::build(&ram_map(ram.layout()), &[], None))?;
    let entries = (0..vcpus)
        .map(|i| {
            Some(CpuEntry {
                mode: EntryMode::Long { cr3 },
                gdt: tables::TEST_GUEST_GDT,
                regs: kvm_regs {
                    rip: entry,
                    rdi: start_info,
                    rsi: u64::from(i),
                    rdx: u64::from(vcpus),
                    ..Default::default()
                },
            })
        })
        .collect();
    Ok(BootPlan { entries })
}
