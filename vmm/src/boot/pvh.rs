//! The PVH start info (hvm_start_info version 1, xen/include/public/arch-x86/hvm/start_info.h)
//! with its memory map, module list and command line, written through linux-loader's
//! PvhBootConfigurator. Both the test guests and PVH Linux kernels read it.

use super::memmap::Region;
use super::CMDLINE_ADDR;
use crate::error::VmmError;
use guest_mm::GuestRam;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

pub const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x6040;
const MODLIST_ADDR: u64 = 0x6800;
/// Memory map entries that fit between the map and the module list.
pub const MAX_MEMMAP_ENTRIES: usize =
    (MODLIST_ADDR - MEMMAP_ADDR) as usize / std::mem::size_of::<hvm_memmap_table_entry>();

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// A module (for Linux: the initrd) already in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub addr: u64,
    pub size: u64,
}

/// What the guest will find: the start info and the tables it points to.
#[derive(Clone, Debug)]
pub struct StartInfo {
    pub info: hvm_start_info,
    pub memmap: Vec<hvm_memmap_table_entry>,
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the start info for `memmap`, `modules` and the RSDP at `rsdp` (0: none). The
/// command line is at `CMDLINE_ADDR`.
pub fn build(memmap: &[Region], modules: &[Module], rsdp: Option<u64>) -> StartInfo {
    let memmap: Vec<_> = memmap
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.start,
            size: r.size,
            type_: r.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = modules
        .iter()
        .map(|m| hvm_modlist_entry {
            paddr: m.addr,
            size: m.size,
            ..Default::default()
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_ADDR },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    StartInfo {
        info,
        memmap,
        modules,
    }
}

/// Writes `start` to guest memory. Returns the start info's address.
pub fn write(ram: &GuestRam, start: &StartInfo) -> Result<u64, VmmError> {
    if start.memmap.len() > MAX_MEMMAP_ENTRIES {
        return Err(VmmError::GuestLoad {
            path: "<boot info>".into(),
            err: format!(
                "{} memory map entries do not fit the {MAX_MEMMAP_ENTRIES} the start info has room for",
                start.memmap.len()
            ),
        });
    }
    let mut params = BootParams::new(&start.info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&start.memmap, GuestAddress(MEMMAP_ADDR));
    if !start.modules.is_empty() {
        params.set_modules(&start.modules, GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory()).map_err(|e| {
        VmmError::GuestLoad {
            path: "<boot info>".into(),
            err: e.to_string(),
        }
    })?;
    Ok(START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::super::memmap::linux_e820;
    use super::*;
    use guest_mm::layout::Layout;

    #[test]
    fn start_info_carries_the_linux_map_the_initrd_and_the_rsdp() {
        let layout = Layout::new(5 << 30).unwrap();
        let map = linux_e820(&layout);
        let initrd = Module {
            addr: 0xbf00_0000,
            size: 0x12_3000,
        };
        let s = build(&map, &[initrd], Some(0xe0000));
        assert_eq!(s.info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(s.info.version, 1);
        assert_eq!(s.info.rsdp_paddr, 0xe0000);
        assert_eq!(s.info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(s.info.memmap_entries as usize, map.len());
        assert_eq!(s.info.nr_modules, 1);
        assert_eq!(
            (s.modules[0].paddr, s.modules[0].size),
            (0xbf00_0000, 0x12_3000)
        );
        for (e, r) in s.memmap.iter().zip(&map) {
            assert_eq!((e.addr, e.size, e.type_), (r.start, r.size, r.kind as u32));
        }
        // RAM above 4 GiB, and the hole left out.
        let last = s.memmap.last().unwrap();
        assert_eq!(last.addr, 1 << 32);
        assert_eq!(last.type_, 1);
        assert!(s
            .memmap
            .iter()
            .all(|e| e.addr + e.size <= 0xc000_0000 || e.addr >= 1 << 32));
    }

    #[test]
    fn no_modules_means_no_module_list() {
        let s = build(&linux_e820(&Layout::new(64 << 20).unwrap()), &[], None);
        assert_eq!(
            (s.info.nr_modules, s.info.modlist_paddr, s.info.rsdp_paddr),
            (0, 0, 0)
        );
    }
}
