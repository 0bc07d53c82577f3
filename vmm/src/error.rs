//! Errors the VMM reports. Each says what went wrong and, where there is one, what to do.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("KVM is not available: {0} missing (load kvm_intel/kvm_amd or run on a host with virtualization)")]
    KvmMissing(PathBuf),
    #[error("no permission to open {0} (run as root or add your user to the 'kvm' group)")]
    KvmPermission(PathBuf),
    #[error("cannot open {path}: {err}")]
    KvmOpen { path: PathBuf, err: std::io::Error },
    #[error("KVM call {op} failed: {err}")]
    Kvm {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} exceeds this host's KVM limit of {max} vCPUs per VM (KVM_CAP_MAX_VCPUS)")]
    TooManyVcpus { requested: u32, max: usize },
    #[error("--vcpus {requested} exceeds the {max} vCPUs the project's test guests support")]
    TooManyGuestVcpus { requested: u32, max: u32 },
    // Errors with a source say only what failed: the source follows in the error's chain
    // (`{:#}`), which would otherwise print it twice.
    #[error("invalid --memory")]
    Memory(#[from] guest_mm::LayoutError),
    #[error("cannot set up guest memory")]
    Ram(#[from] guest_mm::RamError),
    #[error("--memory {memory} is too small for guest {guest}: it needs at least {needed} (image ends at {image_end:#x})")]
    MemoryTooSmall {
        memory: String,
        guest: PathBuf,
        needed: String,
        image_end: u64,
    },
    #[error("--memory {memory} is larger than the {max} the boot page tables can map")]
    MemoryTooLarge { memory: String, max: String },
    #[error("guest '{name}' not found: no such file, and not a built test guest (available: {available}); pass a path or one of those names")]
    GuestNotFound { name: String, available: String },
    #[error("cannot read guest {path}: {err}")]
    GuestRead { path: PathBuf, err: std::io::Error },
    #[error("guest {0} is not an ELF file (expected an x86_64 ELF executable)")]
    GuestNotElf(PathBuf),
    #[error("guest {path} is an ELF for {arch}, not x86_64")]
    GuestWrongArch { path: PathBuf, arch: String },
    #[error("cannot load guest {path}: {err}")]
    GuestLoad { path: PathBuf, err: String },
    #[error("the command line is {len} bytes; this guest accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("{0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' at 0x202)")]
    KernelFormat(PathBuf),
    #[error("vmlinux {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, built with CONFIG_PVH=y): boot the kernel's bzImage instead")]
    KernelNoPvh(PathBuf),
    #[error("bzImage {path} has boot protocol {version:#x} without the 64-bit entry (needs 2.12+ with XLF_KERNEL_64)")]
    KernelNo64BitEntry { path: PathBuf, version: u16 },
    #[error("cannot load kernel {path}: {err}")]
    KernelLoad { path: PathBuf, err: String },
    #[error("--initrd {0} is empty")]
    InitrdEmpty(PathBuf),
    #[error("--memory {memory} is too small for this kernel: {why}")]
    KernelMemory { memory: String, why: String },
    #[error("--vcpus {requested} exceeds the {max} vCPUs the VMM's ACPI tables describe (one xAPIC ID each)")]
    TooManyLinuxVcpus { requested: u32, max: u32 },
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(String),
    #[error("cannot write the MP table: {0}")]
    MpTable(String),
    #[error("vCPU {vcpu}: KVM could not emulate {insn} at RIP {rip:#x} (CPL {cpl}; instruction bytes {bytes}). {why}")]
    EmulationFailure {
        vcpu: u32,
        rip: u64,
        cpl: u8,
        bytes: String,
        insn: String,
        why: String,
    },
    #[error("guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU {vcpu}: {regs}")]
    TripleFault { vcpu: u32, regs: String },
    #[error("vCPU {vcpu}: unhandled KVM exit {reason} at RIP {rip:#x}")]
    UnhandledExit { vcpu: u32, reason: String, rip: u64 },
    #[error("cannot start vCPU thread {vcpu}: {err}")]
    Thread { vcpu: u32, err: std::io::Error },
    #[error("cannot set up device: {0}")]
    Device(String),
    #[error("reclaim")]
    Reclaim(#[from] crate::memory::MemoryError),
    #[error("event loop failed: {0}")]
    EventLoop(String),
}
