//! The ACPI tables a Linux guest finds, built with rust-vmm's acpi_tables and written to the
//! reserved legacy area at 0xe0000 (where Linux also scans for the RSDP):
//! - RSDP → XSDT → FADT (hardware-reduced ACPI: no PM blocks, no SCI; the sleep control,
//!   sleep status and reset registers are the VMM's power ports) and MADT;
//! - MADT: one local APIC per vCPU and the in-kernel IOAPIC (GSIs 0-23);
//! - DSDT: COM1 (PNP0501) and each virtio-mmio device (LNRO0005, the only way Debian's
//!   kernel finds virtio-mmio, since it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), and the
//!   `_S5_` package that lets Linux power the VM off through the sleep control register.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use guest_mm::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Where the RSDP goes; the other tables follow it.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The tables must end below 1 MiB (the end of the reserved legacy area).
const TABLES_END: u64 = 0x10_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Local APIC IDs in the MADT are one byte, and 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
const OEM_ID: [u8; 6] = *b"S2GVMM";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flags (ACPI 6.5 §5.2.9.3): no VGA, no MSI, no CMOS RTC.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The sleep type Linux writes for S5 (soft off), from the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

/// A virtio-mmio device: its register window and its GSI (an IOAPIC pin, edge, active high).
#[derive(Clone, Copy, Debug)]
pub struct VirtioMmio {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The VMM's ports for hardware-reduced ACPI power management (`devices::power`).
#[derive(Clone, Copy, Debug)]
pub struct PowerPorts {
    pub sleep_control: u16,
    pub sleep_status: u16,
    pub reset: u16,
    pub reset_value: u8,
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct Platform {
    pub vcpus: u32,
    /// COM1's first I/O port and its GSI.
    pub serial: (u16, u32),
    pub virtio_mmio: Vec<VirtioMmio>,
    pub power: PowerPorts,
}

/// One table, where it goes, and its bytes.
#[derive(Clone, Debug)]
pub struct Table {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"S2G     ";
    id[4..].copy_from_slice(signature);
    id
}

/// AML already serialized (the builders borrow their children, so each device is built and
/// serialized in one statement, then placed in its scope).
struct Serialized(Vec<u8>);

impl Aml for Serialized {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn com1_aml(port: u16, gsi: u32) -> Serialized {
    let mut out = Vec::new();
    aml::Device::new(
        aml::Path::new("COM1"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &aml::EISAName::new("PNP0501")),
            &aml::Name::new(aml::Path::new("_UID"), &aml::ZERO),
            &aml::Name::new(
                aml::Path::new("_CRS"),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(port, port, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    Serialized(out)
}

fn virtio_mmio_aml(index: usize, d: &VirtioMmio) -> Serialized {
    let mut out = Vec::new();
    aml::Device::new(
        aml::Path::new(&format!("V{index:03}")),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &"LNRO0005"),
            &aml::Name::new(aml::Path::new("_UID"), &(index as u8)),
            // Cache-coherent DMA.
            &aml::Name::new(aml::Path::new("_CCA"), &aml::ONE),
            &aml::Name::new(
                aml::Path::new("_CRS"),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
                    &aml::Interrupt::new(true, true, false, false, d.gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    Serialized(out)
}

fn dsdt(platform: &Platform) -> Vec<u8> {
    let (serial_port, serial_gsi) = platform.serial;
    let mut devices = vec![com1_aml(serial_port, serial_gsi)];
    devices.extend(
        platform
            .virtio_mmio
            .iter()
            .enumerate()
            .map(|(i, d)| virtio_mmio_aml(i, d)),
    );
    let mut body = Vec::new();
    aml::Scope::new(
        aml::Path::new("\\_SB_"),
        devices.iter().map(|d| d as &dyn Aml).collect(),
    )
    .to_aml_bytes(&mut body);
    aml::Name::new(
        aml::Path::new("_S5_"),
        &aml::Package::new(vec![&S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64, power: &PowerPorts) -> Vec<u8> {
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            p.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    b.reset_reg = port(power.reset);
    b.reset_value = power.reset_value;
    b.sleep_control_reg = port(power.sleep_control);
    b.sleep_status_reg = port(power.sleep_status);
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"S2GVMM\0\0").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    // KVM's in-kernel IOAPIC: ID 0, GSIs from 0.
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut out = Vec::new();
    m.to_aml_bytes(&mut out);
    out
}

const fn align16(a: u64) -> u64 {
    (a + 15) & !15
}

/// Builds every table for `platform`, placed from `RSDP_ADDR` on.
pub fn build(platform: &Platform) -> Result<Vec<Table>, String> {
    if platform.vcpus == 0 || platform.vcpus > MAX_VCPUS {
        return Err(format!(
            "{} vCPUs: the MADT describes 1 to {MAX_VCPUS}",
            platform.vcpus
        ));
    }
    let mut next = align16(RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |signature: &str, bytes: Vec<u8>| {
        let t = Table {
            signature: signature.into(),
            addr: next,
            bytes,
        };
        next = align16(next + t.bytes.len() as u64);
        t
    };
    let dsdt = place("DSDT", dsdt(platform));
    let fadt = place("FACP", fadt(dsdt.addr, &platform.power));
    let madt = place("APIC", madt(platform.vcpus));
    let mut xsdt_table = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt_table.add_entry(fadt.addr);
    xsdt_table.add_entry(madt.addr);
    let mut xsdt_bytes = Vec::new();
    xsdt_table.to_aml_bytes(&mut xsdt_bytes);
    let xsdt = place("XSDT", xsdt_bytes);
    if next > TABLES_END {
        return Err(format!(
            "the tables need {:#x} bytes, more than the {:#x} between {RSDP_ADDR:#x} and 1 MiB",
            next - RSDP_ADDR,
            TABLES_END - RSDP_ADDR
        ));
    }
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt.addr).to_aml_bytes(&mut rsdp_bytes);
    let rsdp = Table {
        signature: "RSDP".into(),
        addr: RSDP_ADDR,
        bytes: rsdp_bytes,
    };
    Ok(vec![rsdp, xsdt, fadt, madt, dsdt])
}

/// Writes the tables to guest memory. Returns the RSDP's address.
pub fn write(ram: &GuestRam, tables: &[Table]) -> Result<u64, String> {
    for t in tables {
        ram.memory()
            .write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|e| format!("{} at {:#x}: {e}", t.signature, t.addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine the VMM describes (COM1 at 0x3f8 on GSI 4, the balloon at 0xd0000000 on
    /// GSI 5, the power ports from 0x600).
    fn platform(vcpus: u32) -> Platform {
        crate::vm::acpi_platform(vcpus)
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_link_up() {
        let tables = build(&platform(4)).unwrap();
        let by = |s: &str| tables.iter().find(|t| t.signature == s).unwrap();
        for t in &tables {
            assert_eq!(sum(&t.bytes), 0, "{} checksum", t.signature);
            assert!(t.addr + t.bytes.len() as u64 <= TABLES_END);
        }
        let rsdp = by("RSDP");
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(rsdp.bytes[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, by("XSDT").addr);
        let xsdt = &by("XSDT").bytes;
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![by("FACP").addr, by("APIC").addr]);
        let fadt = &by("FACP").bytes;
        // X_DSDT at offset 140.
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, by("DSDT").addr);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
        let tables = build(&platform(3)).unwrap();
        let madt = &tables.iter().find(|t| t.signature == "APIC").unwrap().bytes;
        let mut lapics = Vec::new();
        let mut ioapics = 0;
        let mut at = 44;
        while at < madt.len() {
            let (ty, len) = (madt[at], madt[at + 1] as usize);
            match ty {
                0 => lapics.push(madt[at + 3]),
                1 => {
                    ioapics += 1;
                    let addr = u32::from_le_bytes(madt[at + 4..at + 8].try_into().unwrap());
                    assert_eq!(addr, IOAPIC_ADDR);
                }
                _ => panic!("unexpected MADT entry type {ty}"),
            }
            at += len;
        }
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn dsdt_names_the_virtio_device_and_com1() {
        let tables = build(&platform(1)).unwrap();
        let dsdt = &tables.iter().find(|t| t.signature == "DSDT").unwrap().bytes;
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"LNRO0005"));
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        // The balloon's window: Memory32Fixed base 0xd0000000, length 0x1000.
        assert!(has(&[0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 0x10, 0, 0]));
    }

    #[test]
    fn vcpu_counts_outside_the_madt_are_refused() {
        assert!(build(&platform(0)).is_err());
        assert!(build(&platform(MAX_VCPUS + 1)).is_err());
        assert!(build(&platform(MAX_VCPUS)).is_ok());
    }
}
