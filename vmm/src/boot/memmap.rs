//! The physical memory map a Linux guest is given (e820 in boot_params, the same entries in
//! the PVH memory map), built from the RAM layout: one place, so that both boot paths and the
//! tests that read the kernel's `BIOS-e820` lines agree.
//!
//! Low memory follows the PC convention: RAM up to the EBDA at 0x9fc00, then a reserved range
//! up to 1 MiB (the EBDA, the legacy VGA window, the BIOS area; the VMM's ACPI tables live at
//! 0xe0000 in it, where Linux also scans for the RSDP). The MMIO hole below 4 GiB is left out
//! of the map entirely (a gap, as on real machines): the devices, the IOAPIC and the local
//! APICs live there.

use guest_mm::layout::Layout;

/// Where conventional low RAM ends (the EBDA begins).
pub const EBDA_START: u64 = 0x9fc00;
/// The start of RAM above the legacy area.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// e820 entry types (ACPI 6.5 §15, Table 15.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the map: [start, start + size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub size: u64,
    pub kind: RegionKind,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The map for `layout`: RAM below the EBDA, the reserved legacy area, RAM from 1 MiB to the
/// MMIO hole (or the end of a small guest), and RAM above 4 GiB. A guest whose RAM ends below
/// 1 MiB has no usable Linux map; `linux` refuses such sizes before asking for one.
pub fn linux_e820(layout: &Layout) -> Vec<Region> {
    let mut out = Vec::new();
    for r in layout.ranges() {
        if r.gpa == 0 {
            out.push(Region {
                start: 0,
                size: EBDA_START.min(r.size),
                kind: RegionKind::Ram,
            });
            if r.size > EBDA_START {
                out.push(Region {
                    start: EBDA_START,
                    size: HIGH_MEMORY_START.min(r.end()) - EBDA_START,
                    kind: RegionKind::Reserved,
                });
            }
            if r.end() > HIGH_MEMORY_START {
                out.push(Region {
                    start: HIGH_MEMORY_START,
                    size: r.end() - HIGH_MEMORY_START,
                    kind: RegionKind::Ram,
                });
            }
        } else {
            out.push(Region {
                start: r.gpa,
                size: r.size,
                kind: RegionKind::Ram,
            });
        }
    }
    out
}

/// The line Linux prints for `region` at boot (arch/x86/kernel/e820.c, e820__print_table).
pub fn linux_log_line(region: &Region) -> String {
    let kind = match region.kind {
        RegionKind::Ram => "usable",
        RegionKind::Reserved => "reserved",
    };
    format!(
        "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
        region.start,
        region.end() - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mm::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

    #[test]
    fn small_guest_has_low_ram_the_legacy_area_and_ram_from_1_mib() {
        let map = linux_e820(&Layout::new(512 << 20).unwrap());
        assert_eq!(
            map,
            vec![
                Region {
                    start: 0,
                    size: 0x9fc00,
                    kind: RegionKind::Ram
                },
                Region {
                    start: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: RegionKind::Reserved
                },
                Region {
                    start: 0x100000,
                    size: (512 << 20) - 0x100000,
                    kind: RegionKind::Ram
                },
            ]
        );
    }

    #[test]
    fn large_guest_has_the_hole_as_a_gap_and_ram_above_4_gib() {
        let map = linux_e820(&Layout::new(5 << 30).unwrap());
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].end(), MMIO_HOLE_START);
        assert_eq!(map[3].start, MMIO_HOLE_END);
        assert_eq!(map[3].size, (5 << 30) - MMIO_HOLE_START);
        let ram: u64 = map
            .iter()
            .filter(|r| r.kind == RegionKind::Ram)
            .map(|r| r.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (0x100000 - 0x9fc00));
    }

    #[test]
    fn log_lines_match_linux() {
        let map = linux_e820(&Layout::new(256 << 20).unwrap());
        assert_eq!(
            linux_log_line(&map[0]),
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"
        );
        assert_eq!(
            linux_log_line(&map[1]),
            "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved"
        );
        assert_eq!(
            linux_log_line(&map[2]),
            "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"
        );
    }
}
