//! A vCPU's state at its entry point: CPUID (with its APIC ID), segments from the GDT the
//! boot path wrote, control registers for the entry's mode, and the general registers.

use super::tables::{Gdt, GDT_ADDR};
use crate::error::VmmError;
use crate::kvm::err;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;

/// The processor mode at the entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit mode, paging on, with the identity map at `cr3`.
    Long { cr3: u64 },
    /// 32-bit protected mode, paging off (the PVH entry).
    Protected,
}

/// Where and how one vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct CpuEntry {
    pub mode: EntryMode,
    pub gdt: Gdt,
    /// RIP and the registers the entry protocol passes (RFLAGS is set to 0x2).
    pub regs: kvm_regs,
}

/// The hidden part of a segment register, as loading `selector` from `gdt` would set it.
pub fn segment(gdt: &Gdt, selector: u16) -> kvm_segment {
    let d = gdt.descriptor(selector);
    let bit = |n: u32| ((d >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((d >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        ..Default::default()
    }
}

/// CPUID.1:ECX bits the VMM sets.
const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

/// KVM's paravirt feature leaf (KVM_CPUID_FEATURES).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Its features used through hypercalls: KVM_FEATURE_PV_UNHALT (7, KVM_HC_KICK_CPU),
/// KVM_FEATURE_PV_SEND_IPI (11, KVM_HC_SEND_IPI), KVM_FEATURE_PV_SCHED_YIELD (13,
/// KVM_HC_SCHED_YIELD).
const KVM_HYPERCALL_FEATURES: u32 = 1 << 7 | 1 << 11 | 1 << 13;

/// Gives vCPU `index` KVM's supported CPUID with its APIC ID, the hypervisor bit, and the
/// TSC-deadline timer when KVM_CAP_TSC_DEADLINE_TIMER says the in-kernel LAPIC has it (KVM's
/// api.rst: that bit is reported through the capability, not in the CPUID it returns); on
/// hosts where hypercalls do not work (nested PVM), without KVM's hypercall features.
pub fn set_cpuid(
    vcpu: &VcpuFd,
    cpuid: &CpuId,
    index: u32,
    tsc_deadline: bool,
) -> Result<(), VmmError> {
    let mut cpuid = cpuid.clone();
    let hypercalls_work = crate::emulation::host_has_hardware_virtualization();
    adjust_cpuid(cpuid.as_mut_slice(), index, tsc_deadline, hypercalls_work);
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))
}

/// `set_cpuid`'s changes to KVM's supported CPUID, for vCPU `index`.
fn adjust_cpuid(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    index: u32,
    tsc_deadline: bool,
    hypercalls_work: bool,
) {
    for e in entries {
        match e.function {
            // KVM's paravirt features that a guest uses through hypercalls. On nested PVM
            // hosts a VMCALL in guest ring 0 never completes (the vCPU stays in KVM_RUN and
            // no exit reaches the VMM; found with Linux's first PV IPI, which hung every SMP
            // boot at "Booting SMP configuration"). There Linux must not be told of them: it
            // then sends IPIs through the local APIC and spins without PV unhalt.
            KVM_CPUID_FEATURES if !hypercalls_work => e.eax &= !KVM_HYPERCALL_FEATURES,
            // Initial APIC ID in EBX[31:24]; ECX bit 31 says "running under a hypervisor",
            // so Linux finds KVM's paravirt clock and features instead of calibrating
            // against the PIT. Set whatever KVM_GET_SUPPORTED_CPUID says (this host's PVM
            // already reports it; a KVM that does not would leave Linux without kvm-clock).
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                e.ecx |= CPUID_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= CPUID_TSC_DEADLINE;
                }
            }
            // x2APIC ID.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
}

/// Puts the vCPU at `entry` and marks it runnable.
pub fn enter(vcpu: &VcpuFd, entry: &CpuEntry) -> Result<(), VmmError> {
    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs.cs = segment(&entry.gdt, entry.gdt.code);
    let data = segment(&entry.gdt, entry.gdt.data);
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
    sregs.gdt.limit = (std::mem::size_of_val(&entry.gdt.entries) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    match entry.mode {
        EntryMode::Long { cr3 } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        ..entry.regs
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    // With the in-kernel irqchip, application processors wait for INIT/SIPI; a vCPU with an
    // entry starts there directly.
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(err("KVM_SET_MP_STATE"))
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn hypercall_features_are_hidden_only_where_hypercalls_hang() {
        let leaf = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        // PV_UNHALT, PV_TLB_FLUSH, PV_SEND_IPI, PV_SCHED_YIELD, and the clock (bit 3).
        let offered = 1 << 7 | 1 << 9 | 1 << 11 | 1 << 13 | 1 << 3;
        let mut e = [leaf(KVM_CPUID_FEATURES, offered), leaf(1, 0)];
        adjust_cpuid(&mut e, 2, false, true);
        assert_eq!(e[0].eax, offered, "kept where hypercalls work");
        adjust_cpuid(&mut e, 2, false, false);
        assert_eq!(e[0].eax, 1 << 9 | 1 << 3, "only the hypercall features go");
        assert_eq!(e[1].ebx >> 24, 2, "the APIC ID");
        assert_ne!(e[1].ecx & CPUID_HYPERVISOR, 0);
    }

    use super::super::tables::{LINUX_64_GDT, PVH_32_GDT, TEST_GUEST_GDT};
    use super::*;

    #[test]
    fn segments_decode_the_flat_descriptors() {
        let cs = segment(&TEST_GUEST_GDT, 0x08);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db),
            (0, 0xffff_ffff, 0xb, 1, 0)
        );
        let ds = segment(&TEST_GUEST_GDT, 0x10);
        assert_eq!((ds.type_, ds.l, ds.db, ds.s, ds.present), (0x3, 0, 1, 1, 1));
        let cs32 = segment(&PVH_32_GDT, 0x08);
        assert_eq!((cs32.l, cs32.db, cs32.g), (0, 1, 1));
        let boot_cs = segment(&LINUX_64_GDT, 0x10);
        assert_eq!((boot_cs.l, boot_cs.selector), (1, 0x10));
        assert_eq!(segment(&LINUX_64_GDT, 0x18).type_, 0x3);
    }
}
