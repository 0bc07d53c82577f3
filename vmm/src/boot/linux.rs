//! Linux kernels, in either of the two forms distributions ship:
//! - an ELF vmlinux with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, CONFIG_PVH=y) boots
//!   through PVH: 32-bit protected mode, paging off, EBX = hvm_start_info with the memory
//!   map, the command line, the RSDP and the initrd as module 0;
//! - a bzImage boots through the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
//!   the kernel at 1 MiB, boot_params (the zero page) with e820, the command line, the
//!   ramdisk and the RSDP, and the vCPU at load address + 0x200 in 64-bit mode with RSI =
//!   boot_params.
//!
//! Only the boot processor gets an entry; the others wait for Linux's INIT/SIPI.

use super::cpu::{CpuEntry, EntryMode};
use super::memmap::{self, Region, HIGH_MEMORY_START};
use super::{pvh, tables, BootPlan, CMDLINE_ADDR};
use crate::config::format_size;
use crate::error::VmmError;
use guest_mm::GuestRam;
use kvm_bindings::kvm_regs;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

/// The command line a Linux kernel gets when none is given: the console on COM1, and the
/// early console too, so that a kernel that stops in early boot has said how far it got.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 panic=1";

/// Where boot_params (the zero page) goes for a bzImage.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Linux's COMMAND_LINE_SIZE on x86, NUL included: the limit for PVH kernels.
const PVH_CMDLINE_MAX: usize = 2047;
/// setup_header.xloadflags: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// boot_params.hdr.type_of_loader: "undefined" loader (boot.rst, LOADER TYPE).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot protocol 2.14 added boot_params.acpi_rsdp_addr.
const PROTOCOL_ACPI_RSDP: u16 = 0x020e;
const HDRS_OFFSET: usize = 0x202;
/// The 64-bit entry's offset from the bzImage load address.
const STARTUP_64_OFFSET: u64 = 0x200;
const PAGE: u64 = 4096;

/// What `vmm run --kernel` boots.
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Whether the VMM writes ACPI tables (and passes the RSDP).
    pub acpi: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux with a PVH note.
    PvhElf,
    /// bzImage, 64-bit boot protocol.
    BzImage,
}

impl KernelFormat {
    pub fn describe(self) -> &'static str {
        match self {
            Self::PvhElf => "ELF vmlinux, PVH entry",
            Self::BzImage => "bzImage, 64-bit boot protocol",
        }
    }
}

/// What was loaded, for the VMM's start-up line.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    pub initrd: Option<pvh::Module>,
}

fn load_err(path: &Path, err: impl ToString) -> VmmError {
    VmmError::KernelLoad {
        path: path.into(),
        err: err.to_string(),
    }
}

/// Tells the two formats apart from their first bytes.
pub fn detect(path: &Path) -> Result<KernelFormat, VmmError> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(HDRS_OFFSET as u64 + 4).read_to_end(&mut head))
        .map_err(super::read_error(path))?;
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::PvhElf);
    }
    if head.get(HDRS_OFFSET..) == Some(b"HdrS") {
        return Ok(KernelFormat::BzImage);
    }
    Err(VmmError::KernelFormat(path.into()))
}

/// `--memory` is too small for this kernel: `why`.
fn too_small(ram: &GuestRam, why: impl Into<String>) -> VmmError {
    VmmError::KernelMemory {
        memory: format_size(ram.layout().total_bytes()),
        why: why.into(),
    }
}

/// The end of RAM below the MMIO hole: kernels, the initrd and the boot data live there.
fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.layout().ranges()[0].end()
}

/// Loads the kernel and initrd, writes the boot data, and returns the boot processor's entry.
pub fn prepare(
    ram: &GuestRam,
    boot: &LinuxBoot,
    cmdline: &str,
    rsdp: Option<u64>,
    vcpus: u32,
) -> Result<(LoadedKernel, BootPlan), VmmError> {
    if low_ram_end(ram) <= HIGH_MEMORY_START {
        return Err(too_small(ram, "Linux needs RAM above 1 MiB"));
    }
    let map = memmap::linux_e820(ram.layout());
    let format = detect(&boot.kernel)?;
    let load = KernelLoad {
        ram,
        boot,
        map: &map,
        cmdline,
        rsdp,
    };
    let (loaded, entry) = match format {
        KernelFormat::PvhElf => load.pvh()?,
        KernelFormat::BzImage => load.bzimage()?,
    };
    let mut entries = vec![None; vcpus.max(1) as usize];
    entries[0] = Some(entry);
    Ok((loaded, BootPlan { entries }))
}

/// Puts the initrd at the top of low RAM, below `limit`, above `kernel_end`.
fn load_initrd(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<pvh::Module, VmmError> {
    let mut f = File::open(path).map_err(super::read_error(path))?;
    let size = f.metadata().map_err(super::read_error(path))?.len();
    if size == 0 {
        return Err(VmmError::InitrdEmpty(path.into()));
    }
    let top = low_ram_end(ram).min(limit) & !(PAGE - 1);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(too_small(
                ram,
                format!(
                    "the initrd {} ({size} bytes) does not fit between the kernel's end at {kernel_end:#x} and {top:#x}",
                    path.display()
                ),
            ))
        }
    };
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| load_err(path, format!("reading the initrd into guest memory: {e}")))?;
    Ok(pvh::Module { addr, size })
}

/// The end of the highest PT_LOAD segment of the ELF file at `path`; None if its headers
/// cannot be read (linux-loader then says what is wrong).
fn elf_load_end(path: &Path) -> Option<u64> {
    let segments = super::elf::read_load_segments(path).ok()?;
    segments.iter().map(|s| s.end).max()
}

/// The end of the memory a bzImage's decompressor uses: init_size bytes from where the kernel
/// will run (boot.rst, "init_size"), which for a relocatable kernel is the load address or
/// pref_address, whichever is higher, aligned up to kernel_alignment; otherwise pref_address.
/// Debian's 6.1: load 1 MiB, pref_address 16 MiB, init_size 0x3f98000, so RAM up to about
/// 79.6 MiB, not 1 MiB + init_size.
fn decompress_end(load: u64, hdr: &setup_header) -> Option<u64> {
    let start = if hdr.relocatable_kernel != 0 {
        let align = u64::from(hdr.kernel_alignment).max(1);
        load.max(hdr.pref_address).checked_next_multiple_of(align)?
    } else {
        hdr.pref_address
    };
    start.checked_add(u64::from(hdr.init_size))
}

/// Loads the kernel file with linux-loader's `L` (Elf or BzImage), at or above 1 MiB.
fn load_image<L: KernelLoader>(
    ram: &GuestRam,
    path: &Path,
) -> Result<linux_loader::loader::KernelLoaderResult, VmmError> {
    let mut f = File::open(path).map_err(super::read_error(path))?;
    L::load(
        ram.memory(),
        None,
        &mut f,
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(|e| load_err(path, e))
}

/// One kernel to load: into `ram`, what `boot` names, with the e820 `map`, the command line
/// and the RSDP's address.
struct KernelLoad<'a> {
    ram: &'a GuestRam,
    boot: &'a LinuxBoot,
    map: &'a [Region],
    cmdline: &'a str,
    rsdp: Option<u64>,
}

impl KernelLoad<'_> {
    /// An ELF vmlinux, through its PVH entry.
    fn pvh(&self) -> Result<(LoadedKernel, CpuEntry), VmmError> {
        let (ram, path) = (self.ram, &self.boot.kernel);
        if let Some(end) = elf_load_end(path).filter(|&end| end > low_ram_end(ram)) {
            return Err(too_small(
                ram,
                format!("the kernel's ELF segments need RAM up to {end:#x}"),
            ));
        }
        let result = load_image::<Elf>(ram, path)?;
        let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
            return Err(VmmError::KernelNoPvh(path.clone()));
        };
        if result.kernel_end > low_ram_end(ram) {
            return Err(too_small(
                ram,
                format!("the kernel ends at {:#x}", result.kernel_end),
            ));
        }
        let initrd = match &self.boot.initrd {
            Some(p) => Some(load_initrd(ram, p, result.kernel_end, u64::MAX)?),
            None => None,
        };
        super::write_cmdline(ram, self.cmdline, PVH_CMDLINE_MAX)?;
        tables::write_gdt(ram, &tables::PVH_32_GDT)?;
        let modules: Vec<_> = initrd.iter().copied().collect();
        let start_info = pvh::write(ram, &pvh::build(self.map, &modules, self.rsdp))?;
        Ok((
            LoadedKernel {
                format: KernelFormat::PvhElf,
                entry: entry.0,
                initrd,
            },
            CpuEntry {
                mode: EntryMode::Protected,
                gdt: tables::PVH_32_GDT,
                regs: kvm_regs {
                    rip: entry.0,
                    rbx: start_info,
                    ..Default::default()
                },
            },
        ))
    }

    /// A bzImage, through the 64-bit boot protocol.
    fn bzimage(&self) -> Result<(LoadedKernel, CpuEntry), VmmError> {
        let (ram, path) = (self.ram, &self.boot.kernel);
        let result = load_image::<BzImage>(ram, path)?;
        let hdr = result
            .setup_header
            .ok_or_else(|| load_err(path, "no setup header"))?;
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(VmmError::KernelNo64BitEntry {
                path: path.clone(),
                version: hdr.version,
            });
        }
        let kernel_end = decompress_end(result.kernel_load.0, &hdr)
            .map(|e| e.max(result.kernel_end))
            .ok_or_else(|| load_err(path, "pref_address + init_size overflows"))?;
        if kernel_end > low_ram_end(ram) {
            return Err(too_small(
                ram,
                format!("the kernel needs RAM up to {kernel_end:#x} to decompress"),
            ));
        }
        let initrd = match &self.boot.initrd {
            Some(p) => Some(load_initrd(
                ram,
                p,
                kernel_end,
                u64::from(hdr.initrd_addr_max).saturating_add(1),
            )?),
            None => None,
        };
        let max = if hdr.cmdline_size > 0 {
            hdr.cmdline_size as usize
        } else {
            255
        };
        super::write_cmdline(ram, self.cmdline, max)?;
        let params = boot_params_for(hdr, self.map, self.cmdline.len(), initrd, self.rsdp);
        LinuxBootConfigurator::write_bootparams(
            &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
            ram.memory(),
        )
        .map_err(|e| load_err(path, e))?;
        let cr3 = tables::write_page_tables(ram)?;
        tables::write_gdt(ram, &tables::LINUX_64_GDT)?;
        let entry = result.kernel_load.0 + STARTUP_64_OFFSET;
        Ok((
            LoadedKernel {
                format: KernelFormat::BzImage,
                entry,
                initrd,
            },
            CpuEntry {
                mode: EntryMode::Long { cr3 },
                gdt: tables::LINUX_64_GDT,
                regs: kvm_regs {
                    rip: entry,
                    rsi: ZERO_PAGE_ADDR,
                    ..Default::default()
                },
            },
        ))
    }
}

/// The zero page for a bzImage whose setup header is `hdr`.
pub fn boot_params_for(
    hdr: setup_header,
    map: &[Region],
    cmdline_len: usize,
    initrd: Option<pvh::Module>,
    rsdp: Option<u64>,
) -> boot_params {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(m) = initrd {
        params.hdr.ramdisk_image = m.addr as u32;
        params.hdr.ramdisk_size = m.size as u32;
    }
    for (slot, r) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: r.start,
            size: r.size,
            r#type: r.kind as u32,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    if let Some(addr) = rsdp {
        if hdr.version >= PROTOCOL_ACPI_RSDP {
            params.acpi_rsdp_addr = addr;
        }
    }
    params
}

/// Reads boot_params back from guest memory (tests).
pub fn read_boot_params(ram: &GuestRam) -> Option<boot_params> {
    ram.memory().read_obj(GuestAddress(ZERO_PAGE_ADDR)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mm::layout::Layout;

    fn header(version: u16) -> setup_header {
        setup_header {
            version,
            header: 0x5372_6448,
            code32_start: 0x10_0000,
            init_size: 0x200_0000,
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        }
    }

    #[test]
    fn decompression_counts_init_size_from_where_the_kernel_runs() {
        let hdr = setup_header {
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            init_size: 0x3f9_8000,
            ..Default::default()
        };
        assert_eq!(decompress_end(0x10_0000, &hdr), Some(0x4f9_8000));
        // Loaded above pref_address: runs at the load address aligned up.
        assert_eq!(
            decompress_end(0x210_0000, &hdr),
            Some(0x220_0000 + 0x3f9_8000)
        );
        let fixed = setup_header {
            relocatable_kernel: 0,
            ..hdr
        };
        assert_eq!(decompress_end(0x10_0000, &fixed), Some(0x4f9_8000));
        let huge = setup_header {
            pref_address: u64::MAX - 0x1000,
            ..hdr
        };
        assert_eq!(decompress_end(0x10_0000, &huge), None, "overflow");
    }

    #[test]
    fn boot_params_carry_our_e820_the_command_line_the_ramdisk_and_the_rsdp() {
        let map = memmap::linux_e820(&Layout::new(6 << 30).unwrap());
        let initrd = pvh::Module {
            addr: 0xbfe0_0000,
            size: 0x1f_0000,
        };
        let p = boot_params_for(header(0x020f), &map, 42, Some(initrd), Some(0xe0000));
        assert_eq!(usize::from(p.e820_entries), map.len());
        for (e, r) in p.e820_table.iter().zip(&map) {
            let (addr, size, ty) = (e.addr, e.size, e.r#type);
            assert_eq!((addr, size, ty), (r.start, r.size, r.kind as u32));
        }
        let last = p.e820_table[map.len() - 1];
        let (addr, size) = (last.addr, last.size);
        assert_eq!((addr, size), (1 << 32, (6 << 30) - 0xc000_0000));
        let hdr = p.hdr;
        let (ptr, len, img, rsz, loader, flag) = (
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
            hdr.ramdisk_image,
            hdr.ramdisk_size,
            hdr.type_of_loader,
            hdr.boot_flag,
        );
        assert_eq!(ptr as u64, CMDLINE_ADDR);
        assert_eq!(len, 42);
        assert_eq!((img, rsz), (0xbfe0_0000, 0x1f_0000));
        assert_eq!((loader, flag), (0xff, 0xaa55));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
    }

    #[test]
    fn old_protocols_get_no_rsdp_field() {
        let map = memmap::linux_e820(&Layout::new(256 << 20).unwrap());
        let p = boot_params_for(header(0x020d), &map, 0, None, Some(0xe0000));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0);
        let (img, rsz) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((img, rsz), (0, 0));
    }

    #[test]
    fn detect_tells_elf_from_bzimage_from_garbage() {
        let dir = std::env::temp_dir().join(format!("vmm-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert_eq!(detect(&elf).unwrap(), KernelFormat::PvhElf);
        let mut bz = vec![0u8; 0x400];
        bz[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).unwrap();
        assert_eq!(detect(&bzp).unwrap(), KernelFormat::BzImage);
        let junk = dir.join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(matches!(detect(&junk), Err(VmmError::KernelFormat(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
