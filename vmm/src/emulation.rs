//! KVM_EXIT_INTERNAL_ERROR, made readable: which vCPU, where (RIP, CPL), the instruction's
//! bytes (from KVM's exit data when it gives them, else read through the guest's page tables),
//! its name when it is one of those a stock kernel is known to stop on, and why.
//!
//! On hosts without VT-x/AMD-V (nested PVM here) KVM runs guest ring 0 by emulating it one
//! instruction at a time, and its emulator lacks some instructions Linux uses early:
//! cmpxchg16b, xsave/xrstor, and the int3 of Linux's int3_selftest.

use crate::error::VmmError;
use guest_mm::GuestRam;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

/// Longest x86 instruction.
const MAX_INSN: usize = 15;

/// Whether this host's KVM runs guests on VT-x or AMD-V: kvm_intel or kvm_amd is loaded and
/// kvm_pvm (which emulates guest ring 0) is not. Without /sys/module, the CPU's flags.
pub fn host_has_hardware_virtualization() -> bool {
    let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if std::path::Path::new("/sys/module/kvm").exists() {
        return (loaded("kvm_intel") || loaded("kvm_amd")) && !loaded("kvm_pvm");
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// The instruction bytes KVM put in the exit, if it did (Linux 5.14+: `emulation_failure`).
fn bytes_from_exit(suberror: u32, ndata: u32, data: &[u64; 16]) -> Option<Vec<u8>> {
    if suberror != KVM_INTERNAL_ERROR_EMULATION || ndata < 2 {
        return None;
    }
    if data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
        return None;
    }
    // data[1..3] hold insn_size (one byte) then up to 15 instruction bytes.
    let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let size = usize::from(raw[0]).min(MAX_INSN);
    (size > 0).then(|| raw[1..1 + size].to_vec())
}

/// Reads up to 15 bytes at the linear address `rip` through the guest's page tables. Every
/// address comes from the guest: a translation KVM refuses or a frame outside RAM gives
/// fewer (or no) bytes, never a read outside guest memory.
fn bytes_from_memory(vcpu: &VcpuFd, ram: &GuestRam, linear: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..MAX_INSN as u64 {
        let Some(addr) = linear.checked_add(i) else {
            break;
        };
        let gpa = match vcpu.translate_gva(addr) {
            Ok(t) if t.valid != 0 => t.physical_address,
            _ => break,
        };
        let mut b = [0u8; 1];
        if ram.memory().read_slice(&mut b, GuestAddress(gpa)).is_err() {
            break;
        }
        out.push(b[0]);
    }
    out
}

/// A name for the instructions a stock kernel is known to stop on here; None for others.
pub fn name_instruction(bytes: &[u8]) -> Option<&'static str> {
    const LEGACY_PREFIXES: [u8; 11] = [
        0x66, 0x67, 0xf2, 0xf3, 0xf0, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65,
    ];
    let mut i = 0;
    while i < bytes.len() && LEGACY_PREFIXES.contains(&bytes[i]) {
        i += 1;
    }
    let mut rex_w = false;
    if let Some(b) = bytes.get(i) {
        if (0x40..=0x4f).contains(b) {
            rex_w = b & 0x8 != 0;
            i += 1;
        }
    }
    let rest = &bytes[i.min(bytes.len())..];
    let reg = |modrm: u8| (modrm >> 3) & 7;
    match rest {
        [0xcc, ..] => Some("int3"),
        [0x0f, 0xc7, m, ..] if reg(*m) == 1 && rex_w => Some("cmpxchg16b"),
        [0x0f, 0xc7, m, ..] if reg(*m) == 1 => Some("cmpxchg8b"),
        [0x0f, 0x01, 0xd0, ..] => Some("xgetbv"),
        [0x0f, 0x01, 0xd1, ..] => Some("xsetbv"),
        [0x0f, 0xae, m, ..] if m >> 6 != 3 && reg(*m) == 4 => Some("xsave"),
        [0x0f, 0xae, m, ..] if m >> 6 != 3 && reg(*m) == 5 => Some("xrstor"),
        [0x0f, 0xc7, m, ..] if m >> 6 != 3 && reg(*m) == 4 => Some("xsavec"),
        [0x0f, 0xc7, m, ..] if m >> 6 != 3 && reg(*m) == 3 => Some("xrstors"),
        [0x0f, 0xc7, m, ..] if m >> 6 != 3 && reg(*m) == 5 => Some("xsaves"),
        _ => None,
    }
}

/// What to tell the user about an instruction this host's KVM cannot emulate.
pub fn explain(insn: Option<&str>, hardware_virtualization: bool) -> String {
    if hardware_virtualization {
        return "KVM's instruction emulator does not support it (it emulates only some instructions, e.g. for MMIO); \
                the guest may be touching device memory with an unusual instruction"
            .into();
    }
    let hint = match insn {
        Some("cmpxchg16b") => " For a first look here, clearcpuid=cx16 keeps Linux from using it.",
        Some("xsave" | "xrstor" | "xsavec" | "xsaves" | "xrstors" | "xgetbv" | "xsetbv") => {
            " For a first look here, noxsave keeps Linux from using it."
        }
        Some("int3") => {
            " Linux 6.1 runs int3_selftest at every boot; nothing on the command line avoids it."
        }
        _ => "",
    };
    format!(
        "This host's KVM runs guest ring-0 code by emulation (no VT-x/AMD-V here: nested PVM) and its emulator \
         cannot run this instruction; boot on a host with VT-x or AMD-V.{hint}"
    )
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "unavailable".into();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error for vCPU `index`, which just exited with KVM_EXIT_INTERNAL_ERROR.
pub fn report(vcpu: &mut VcpuFd, index: u32, ram: &GuestRam) -> VmmError {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills `internal`;
    // every bit pattern is a valid value of its plain integer fields.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let exit_bytes = bytes_from_exit(internal.suberror, internal.ndata, &internal.data);
    let (rip, cs_base, cpl) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        // SS.DPL is the CPL (what KVM itself reports); CS's RPL is not, in real mode.
        (Ok(r), Ok(s)) => (r.rip, s.cs.base, s.ss.dpl),
        _ => (0, 0, 0),
    };
    let bytes =
        exit_bytes.unwrap_or_else(|| bytes_from_memory(vcpu, ram, cs_base.wrapping_add(rip)));
    let name = name_instruction(&bytes);
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return VmmError::UnhandledExit {
            vcpu: index,
            reason: format!(
                "InternalError(suberror={}, instruction bytes {})",
                internal.suberror,
                hex(&bytes)
            ),
            rip,
        };
    }
    VmmError::EmulationFailure {
        vcpu: index,
        rip,
        cpl,
        bytes: hex(&bytes),
        insn: name.map_or_else(|| "an instruction".into(), |n| n.to_string()),
        why: explain(name, host_has_hardware_virtualization()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_instructions_linux_stops_on_here() {
        assert_eq!(name_instruction(&[0xcc]), Some("int3"));
        assert_eq!(
            name_instruction(&[0x48, 0x0f, 0xc7, 0x0e]),
            Some("cmpxchg16b")
        );
        assert_eq!(
            name_instruction(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
            Some("cmpxchg16b")
        );
        assert_eq!(name_instruction(&[0x0f, 0xc7, 0x0e]), Some("cmpxchg8b"));
        assert_eq!(name_instruction(&[0x48, 0x0f, 0xae, 0x2f]), Some("xrstor"));
        assert_eq!(name_instruction(&[0x0f, 0xae, 0x27]), Some("xsave"));
        assert_eq!(name_instruction(&[0x0f, 0x01, 0xd1]), Some("xsetbv"));
        // lfence (0f ae e8) has a register operand: not xrstor.
        assert_eq!(name_instruction(&[0x0f, 0xae, 0xe8]), None);
        assert_eq!(name_instruction(&[0x90]), None);
        assert_eq!(name_instruction(&[]), None);
        assert_eq!(name_instruction(&[0x66; 20]), None);
    }

    #[test]
    fn exit_bytes_are_taken_only_when_kvm_says_they_are_there() {
        let mut data = [0u64; 16];
        data[0] = 1;
        data[1] = u64::from_le_bytes([4, 0x48, 0x0f, 0xc7, 0x0e, 0, 0, 0]);
        assert_eq!(
            bytes_from_exit(KVM_INTERNAL_ERROR_EMULATION, 4, &data),
            Some(vec![0x48, 0x0f, 0xc7, 0x0e])
        );
        data[0] = 0;
        assert_eq!(
            bytes_from_exit(KVM_INTERNAL_ERROR_EMULATION, 4, &data),
            None
        );
        data[0] = 1;
        assert_eq!(bytes_from_exit(2, 4, &data), None);
        // A size past 15 is clamped, never read beyond the field.
        data[1] = 0xff;
        assert_eq!(
            bytes_from_exit(KVM_INTERNAL_ERROR_EMULATION, 4, &data).map(|b| b.len()),
            Some(15)
        );
    }

    #[test]
    fn explanations_say_what_to_do() {
        let here = explain(Some("cmpxchg16b"), false);
        assert!(here.contains("VT-x or AMD-V") && here.contains("clearcpuid=cx16"));
        assert!(explain(Some("int3"), false).contains("int3_selftest"));
        assert!(explain(Some("xrstor"), false).contains("noxsave"));
        assert!(!explain(None, true).contains("nested"));
    }
}
