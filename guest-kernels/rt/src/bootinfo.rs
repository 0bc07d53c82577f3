//! The boot information every guest receives: a PVH `hvm_start_info` (version 1, with memory
//! map). QEMU passes it in EBX at the PVH entry; the project's VMM writes the same structure
//! and passes its address in RDI at the 64-bit entry, so there is one parser for both.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

pub const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
pub const MAX_RAM_RANGES: usize = 16;
const MAX_CMDLINE: usize = 4096;

#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// A guest-physical range `[start, end)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug)]
pub struct BootInfo {
    ram: [Range; MAX_RAM_RANGES],
    nr_ram: usize,
    pub cmdline: &'static str,
    pub ncpus: usize,
}

impl BootInfo {
    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.nr_ram]
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram().iter().map(|r| r.end - r.start).sum()
    }
}

/// Why the boot information could not be used.
#[derive(Debug)]
pub enum BootInfoError {
    BadMagic(u32),
    NoMemoryMap,
}

/// # Safety
/// `start_info` must point to a readable `hvm_start_info` whose memory map and command line
/// addresses are readable (identity mapped).
pub unsafe fn parse(start_info: u64, ncpus: usize) -> Result<BootInfo, BootInfoError> {
    let si = &*(start_info as *const HvmStartInfo);
    if si.magic != HVM_START_MAGIC {
        return Err(BootInfoError::BadMagic(si.magic));
    }
    if si.version < 1 || si.memmap_paddr == 0 {
        return Err(BootInfoError::NoMemoryMap);
    }
    let mut info = BootInfo {
        ram: [Range::default(); MAX_RAM_RANGES],
        nr_ram: 0,
        cmdline: "",
        ncpus,
    };
    let entries = si.memmap_paddr as *const MemmapEntry;
    for i in 0..si.memmap_entries as usize {
        let e = &*entries.add(i);
        if e.kind == E820_RAM && e.size > 0 && info.nr_ram < MAX_RAM_RANGES {
            info.ram[info.nr_ram] = Range {
                start: e.addr,
                end: e.addr + e.size,
            };
            info.nr_ram += 1;
        }
    }
    if si.cmdline_paddr != 0 {
        let p = si.cmdline_paddr as *const u8;
        let mut len = 0;
        while len < MAX_CMDLINE && *p.add(len) != 0 {
            len += 1;
        }
        let bytes = core::slice::from_raw_parts(p, len);
        info.cmdline = core::str::from_utf8(bytes).unwrap_or("");
    }
    Ok(info)
}

/// Set once by the boot vCPU before any vCPU runs guest code; read-only afterwards.
struct Slot(UnsafeCell<Option<BootInfo>>);
// SAFETY: written once before READY is released, read-only after.
unsafe impl Sync for Slot {}
static SLOT: Slot = Slot(UnsafeCell::new(None));
static READY: AtomicBool = AtomicBool::new(false);

pub(crate) fn publish(info: BootInfo) {
    // SAFETY: called once by the boot vCPU before READY is set; nobody reads before READY.
    unsafe { *SLOT.0.get() = Some(info) };
    READY.store(true, Ordering::Release);
}

/// The boot information. Available to guest code on every vCPU.
pub fn get() -> &'static BootInfo {
    assert!(
        READY.load(Ordering::Acquire),
        "boot info read before it was published"
    );
    // SAFETY: published and never written again.
    unsafe { (*SLOT.0.get()).as_ref().unwrap() }
}
