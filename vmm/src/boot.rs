//! Boot state: the guest ELF in RAM, the PVH start info with memory map and command line,
//! identity page tables, a GDT, and each vCPU's registers at the 64-bit entry.
//!
//! Low memory used by the VMM (the test guests never allocate below 1 MiB):
//! 0x500 GDT · 0x6000 hvm_start_info · 0x6040 memory map · 0x7000 command line ·
//! 0x10000 PML4 · 0x11000 PDPT · 0x12000.. page directories (2 MiB pages).
//!
//! vCPU i starts at the ELF entry in 64-bit mode, ring 0, paging on, with RDI = start info,
//! RSI = i, RDX = vCPU count (the contract of guest-kernels/rt `_start64`).

use crate::config::format_size;
use crate::error::VmmError;
use crate::kvm::err;
use guest_mm::layout::{Layout, MMIO_HOLE_END, MMIO_HOLE_START};
use guest_mm::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

const GDT_ADDR: u64 = 0x500;
pub const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x6040;
const CMDLINE_ADDR: u64 = 0x7000;
pub const CMDLINE_MAX: usize = 4095;
const PML4_ADDR: u64 = 0x10000;
const PDPT_ADDR: u64 = 0x11000;
const PD_ADDR: u64 = 0x12000;
/// Page directories fit below 0x9f000 (the end of conventional low memory): each maps 1 GiB.
const MAX_PDS: u64 = (0x9f000 - PD_ADDR) / 0x1000;
/// The guest image must not overlap the VMM's boot area.
const IMAGE_MIN_ADDR: u64 = 0x10_0000;
/// RAM the guest needs beyond its image (stacks are in the image; this is for its allocator).
const MIN_FREE_AFTER_IMAGE: u64 = 2 << 20;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const EM_X86_64: u16 = 62;

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;

/// The loaded guest.
#[derive(Clone, Copy, Debug)]
pub struct BootImage {
    /// The 64-bit entry (ELF e_entry).
    pub entry: u64,
    /// One past the highest byte of any loadable segment.
    pub image_end: u64,
    /// Whether the image also carries a PVH entry note (what QEMU boots).
    pub has_pvh_note: bool,
}

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
fn inspect(path: &Path, layout: &Layout) -> Result<u64, VmmError> {
    let bytes = std::fs::read(path).map_err(|err| VmmError::GuestRead {
        path: path.into(),
        err,
    })?;
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
    let u64_at = |o: usize| -> Result<u64, VmmError> {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| load_err("truncated program header".into()))
    };
    let phoff = u64_at(32)? as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    let mut image_end = 0u64;
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        let p_type = bytes
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        if p_type != Some(1) {
            continue; // not PT_LOAD
        }
        let paddr = u64_at(ph + 24)?;
        let memsz = u64_at(ph + 40)?;
        if memsz == 0 {
            continue;
        }
        if paddr < IMAGE_MIN_ADDR {
            return Err(load_err(format!(
                "segment at {paddr:#x} overlaps the VMM's boot area below {IMAGE_MIN_ADDR:#x}"
            )));
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| load_err("segment size overflows".into()))?;
        image_end = image_end.max(end);
    }
    if image_end == 0 {
        return Err(load_err("no loadable segments".into()));
    }
    let low_ram_end = layout.ranges()[0].end();
    let needed = image_end + MIN_FREE_AFTER_IMAGE;
    if needed > low_ram_end {
        return Err(VmmError::MemoryTooSmall {
            memory: format_size(layout.total_bytes()),
            guest: path.into(),
            needed: format_size(needed.div_ceil(1 << 20) << 20),
            image_end,
        });
    }
    Ok(image_end)
}

/// Loads the guest ELF into RAM at its physical addresses.
pub fn load_guest(ram: &GuestRam, path: &Path) -> Result<BootImage, VmmError> {
    let image_end = inspect(path, ram.layout())?;
    let mut file = File::open(path).map_err(|err| VmmError::GuestRead {
        path: path.into(),
        err,
    })?;
    let result =
        Elf::load(ram.memory(), None, &mut file, None).map_err(|e| VmmError::GuestLoad {
            path: path.into(),
            err: e.to_string(),
        })?;
    let has_pvh_note = matches!(
        result.pvh_boot_cap,
        linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(_)
    );
    Ok(BootImage {
        entry: result.kernel_load.0,
        image_end,
        has_pvh_note,
    })
}

/// Writes the PVH start info, memory map and command line. Returns the start info address.
pub fn write_start_info(ram: &GuestRam, cmdline: &str) -> Result<u64, VmmError> {
    let mem = ram.memory();
    let write_err = |e: vm_memory::GuestMemoryError| VmmError::GuestLoad {
        path: "<boot info>".into(),
        err: e.to_string(),
    };
    let entries: Vec<hvm_memmap_table_entry> = ram
        .layout()
        .ranges()
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.gpa,
            size: r.size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(
            *e,
            GuestAddress(MEMMAP_ADDR + (i * std::mem::size_of_val(e)) as u64),
        )
        .map_err(write_err)?;
    }
    let bytes = cmdline.as_bytes();
    let len = bytes.len().min(CMDLINE_MAX);
    mem.write_slice(&bytes[..len], GuestAddress(CMDLINE_ADDR))
        .map_err(write_err)?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + len as u64))
        .map_err(write_err)?;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: entries.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))
        .map_err(write_err)?;
    Ok(START_INFO_ADDR)
}

/// Largest guest-physical end address the boot page tables can identity-map.
pub fn max_mapped_address() -> u64 {
    MAX_PDS << 30
}

/// Identity-maps [0, max(RAM end, 4 GiB)) with 2 MiB user-accessible pages. Returns CR3.
/// Pages are user-accessible because the test guests run their workloads in ring 3.
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
            .map_err(|e| VmmError::GuestLoad {
                path: "<page tables>".into(),
                err: e.to_string(),
            })
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

/// A GDT matching the guest runtime's selectors: 0x08 kernel code (64-bit), 0x10 kernel data.
pub fn write_gdt(ram: &GuestRam) -> Result<(), VmmError> {
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    ram.memory()
        .write_obj(gdt, GuestAddress(GDT_ADDR))
        .map_err(|e| VmmError::GuestLoad {
            path: "<gdt>".into(),
            err: e.to_string(),
        })
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Puts vCPU `index` of `count` at the 64-bit entry with the boot contract in RDI/RSI/RDX.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    cpuid: &CpuId,
    index: u32,
    count: u32,
    entry: u64,
    start_info: u64,
    cr3: u64,
) -> Result<(), VmmError> {
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC ID in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            // x2APIC ID.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs.cs = segment(KERNEL_CS, true);
    let data = segment(KERNEL_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0xffff,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rflags: 0x2,
        rdi: start_info,
        rsi: u64::from(index),
        rdx: u64::from(count),
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    Ok(())
}
