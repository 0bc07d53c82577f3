//! The identity page tables and the GDT a vCPU starts with. Each boot path has its own GDT
//! layout, because each entry protocol names its own selectors.

use crate::config::format_size;
use crate::error::VmmError;
use guest_mm::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use guest_mm::GuestRam;
use vm_memory::{Bytes, GuestAddress};

pub const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x10000;
const PDPT_ADDR: u64 = 0x11000;
const PD_ADDR: u64 = 0x12000;
/// Page directories fit below 0x9f000 (the end of conventional low memory): each maps 1 GiB.
const MAX_PDS: u64 = (0x9f000 - PD_ADDR) / 0x1000;

/// Flat descriptors: base 0, limit 4 GiB, present, ring 0.
const CODE64: u64 = 0x00af_9b00_0000_ffff;
const CODE32: u64 = 0x00cf_9b00_0000_ffff;
const DATA: u64 = 0x00cf_9300_0000_ffff;

/// A GDT and the selectors a vCPU's segment registers start with.
#[derive(Clone, Copy, Debug)]
pub struct Gdt {
    pub entries: [u64; 4],
    pub code: u16,
    pub data: u16,
}

impl Gdt {
    /// The descriptor `selector` names.
    pub fn descriptor(&self, selector: u16) -> u64 {
        self.entries[usize::from(selector >> 3)]
    }
}

/// The test guests' runtime: 0x08 kernel code (64-bit), 0x10 kernel data.
pub const TEST_GUEST_GDT: Gdt = Gdt {
    entries: [0, CODE64, DATA, 0],
    code: 0x08,
    data: 0x10,
};

/// The Linux 64-bit boot protocol: __BOOT_CS 0x10, __BOOT_DS 0x18
/// (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
pub const LINUX_64_GDT: Gdt = Gdt {
    entries: [0, 0, CODE64, DATA],
    code: 0x10,
    data: 0x18,
};

/// The PVH entry: flat 32-bit code and data (xen/include/public/arch-x86/hvm/start_info.h).
pub const PVH_32_GDT: Gdt = Gdt {
    entries: [0, CODE32, DATA, 0],
    code: 0x08,
    data: 0x10,
};

fn write_err(what: &str) -> impl Fn(vm_memory::GuestMemoryError) -> VmmError + '_ {
    move |e| VmmError::GuestLoad {
        path: what.into(),
        err: e.to_string(),
    }
}

pub fn write_gdt(ram: &GuestRam, gdt: &Gdt) -> Result<(), VmmError> {
    ram.memory()
        .write_obj(gdt.entries, GuestAddress(GDT_ADDR))
        .map_err(write_err("<gdt>"))
}

/// Largest guest-physical end address the boot page tables can identity-map.
pub fn max_mapped_address() -> u64 {
    MAX_PDS << 30
}

/// Identity-maps [0, max(RAM end, 4 GiB)) with 2 MiB user-accessible pages. Returns CR3.
/// Pages are user-accessible because the test guests run their workloads in ring 3; Linux
/// replaces these tables with its own at once.
pub fn write_page_tables(ram: &GuestRam) -> Result<u64, VmmError> {
    let layout = ram.layout();
    let end = layout.end().max(MMIO_HOLE_END);
    if end > max_mapped_address() {
        return Err(VmmError::MemoryTooLarge {
            memory: format_size(layout.total_bytes()),
            max: format_size(max_mapped_address() - (MMIO_HOLE_END - MMIO_HOLE_START)),
        });
    }
    let mem = ram.memory();
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(write_err("<page tables>"))
    };
    const PRESENT_RW_USER: u64 = 0x7;
    const LARGE: u64 = 0x80;
    const CACHE_DISABLE: u64 = 0x18;
    w(PDPT_ADDR | PRESENT_RW_USER, PML4_ADDR)?;
    let pds = end.div_ceil(1 << 30);
    for pd in 0..pds {
        let pd_addr = PD_ADDR + pd * 0x1000;
        w(pd_addr | PRESENT_RW_USER, PDPT_ADDR + pd * 8)?;
        for i in 0..512u64 {
            let gpa = (pd << 30) | (i << 21);
            let mmio = (MMIO_HOLE_START..MMIO_HOLE_END).contains(&gpa);
            let flags = PRESENT_RW_USER | LARGE | if mmio { CACHE_DISABLE } else { 0 };
            w(gpa | flags, pd_addr + i * 8)?;
        }
    }
    Ok(PML4_ADDR)
}
