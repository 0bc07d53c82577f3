//! The MultiProcessor Specification 1.4 table for Linux guests: a floating pointer at the
//! start of the EBDA (0x9fc00, the first place Linux looks) and a configuration table with
//! one processor entry per vCPU, an ISA bus, the I/O APIC and ISA IRQs 0-15 on pins 0-15
//! (KVM's default GSI routing).
//!
//! Why: without one, Linux scans the rest of the BIOS area for a floating pointer, 16 bytes
//! at a time; where guest ring 0 is emulated (nested PVM) that took about 7 s of a 59 s
//! early boot (docs/BENCHMARKS.md). With ACPI tables Linux takes CPUs and interrupts from
//! the MADT and ignores this table's entries; with `--no-acpi` they are how it finds its
//! CPUs.

use crate::acpi::{IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS};
use guest_mm::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Where the floating pointer goes: the EBDA, reserved in the e820 map (`memmap`).
pub const FLOATING_POINTER_ADDR: u64 = 0x9_fc00;
/// Where the configuration table goes: the BIOS area, reserved too, clear of the ACPI
/// tables at 0xe0000.
pub const CONFIG_TABLE_ADDR: u64 = 0xf_0000;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_sub(b))
}

/// The floating pointer and the configuration table, each with where it goes.
pub fn build(vcpus: u32) -> Result<[(u64, Vec<u8>); 2], String> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!(
            "{vcpus} vCPUs: the MP table describes 1 to {MAX_VCPUS}"
        ));
    }
    let ioapic_id = vcpus as u8; // the first APIC ID after the processors'
    let mut entries = Vec::new();
    for id in 0..vcpus as u8 {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled; the boot processor
        entries.extend([0, id, APIC_VERSION, flags]);
        entries.extend(0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend(0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend([0; 8]);
    }
    entries.extend([1, 0]); // bus 0
    entries.extend(*b"ISA   ");
    entries.extend([2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    for irq in 0..ISA_IRQS {
        // INT, conforming polarity and trigger, from ISA IRQ n to I/O APIC pin n.
        entries.extend([3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // ExtINT on LINT0 and NMI on LINT1 of every local APIC (0xff).
    entries.extend([4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, 0, 0, 0xff, 1]);
    let count = vcpus as u16 + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend(*b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.extend([SPEC_REV, 0]);
    table.extend(*b"S2GVMM  ");
    table.extend(*b"stage2-vmm  ");
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend([0, 0, 0, 0]); // no extended table
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(*b"_MP_");
    fp.extend((CONFIG_TABLE_ADDR as u32).to_le_bytes());
    fp.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // 16 bytes; a configuration table follows
    fp[10] = checksum(&fp);
    Ok([(FLOATING_POINTER_ADDR, fp), (CONFIG_TABLE_ADDR, table)])
}

/// Writes both parts for `vcpus` vCPUs.
pub fn write(ram: &GuestRam, vcpus: u32) -> Result<(), String> {
    for (addr, bytes) in build(vcpus)? {
        ram.memory()
            .write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| format!("MP table at {addr:#x}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    #[test]
    fn pointer_and_table_checksum_and_describe_every_vcpu() {
        let [(fp_addr, fp), (table_addr, table)] = build(3).unwrap();
        assert_eq!((fp_addr, table_addr), (0x9fc00, 0xf0000));
        assert_eq!((&fp[..4], fp.len(), sum(&fp)), (&b"_MP_"[..], 16, 0));
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0xf0000);
        assert_eq!(
            fp[11], 0,
            "feature byte 1: a configuration table, not a default one"
        );
        assert_eq!((&table[..4], sum(&table)), (&b"PCMP"[..], 0));
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        // Processor entries: IDs 0..3, the first one the boot processor.
        let cpus: Vec<(u8, u8)> = (0..3)
            .map(|i| (table[45 + 20 * i], table[47 + 20 * i]))
            .collect();
        assert_eq!(cpus, [(0, 3), (1, 1), (2, 1)]);
        // With the most vCPUs the table still ends below 1 MiB, and the ACPI tables end
        // before it begins.
        let [_, (_, big)] = build(MAX_VCPUS).unwrap();
        assert!(CONFIG_TABLE_ADDR + big.len() as u64 <= 0x10_0000);
        let acpi = crate::acpi::build(&crate::vm::acpi_platform(MAX_VCPUS)).unwrap();
        let acpi_end = acpi
            .iter()
            .map(|t| t.addr + t.bytes.len() as u64)
            .max()
            .unwrap();
        assert!(
            acpi_end <= CONFIG_TABLE_ADDR,
            "ACPI tables end at {acpi_end:#x}"
        );
    }

    #[test]
    fn vcpu_counts_outside_the_table_are_refused() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
