//! Entry points, descriptor tables and the drop to ring 3.
//!
//! Two ways in, one path after:
//! - `_start64` (the ELF entry): the project's VMM starts every vCPU here in 64-bit mode with
//!   paging on, RDI = hvm_start_info address, RSI = vCPU index, RDX = vCPU count.
//! - `pvh_start32` (ELF note XEN_ELFNOTE_PHYS32_ENTRY): QEMU starts the boot vCPU here in
//!   32-bit protected mode, paging off, EBX = hvm_start_info. It builds an identity map of the
//!   low 4 GiB with 2 MiB pages, enters long mode and joins `_start64` as vCPU 0 of 1. The
//!   application processors wait for INIT/SIPI there, as on a PC: with `cpus=N` on the command
//!   line the boot vCPU starts them itself (`start_aps`), through a real-mode trampoline at
//!   `AP_TRAMPOLINE` that enters long mode on the boot vCPU's page tables and joins
//!   `_start64` with the vCPU's local APIC ID as its index, as Linux brings up its CPUs.
//!
//! In ring 0 each vCPU loads the GDT (with its own TSS), the IDT, and `iretq`s to ring 3 with
//! IOPL=3. The boot vCPU then parses the boot info and builds the frame allocator in ring 3
//! (fast there), releases the others, and every vCPU runs the guest's main.

use crate::bootinfo;
use crate::exit::{self, Verdict};
use crate::sync::Barrier;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub const MAX_CPUS: usize = 64;
const KSTACK_SIZE: usize = 16 * 1024;
const USTACK_SIZE: usize = 64 * 1024;

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_BASE_INDEX: usize = 6;
/// RFLAGS for ring 3: IOPL=3, interrupts off, reserved bit 1. IOPL=3 alone is not enough on
/// every host: nested PVM KVM ignores IOPL for guest ring 3 (measured: `out` raised #GP) but
/// honours the TSS I/O permission bitmap, so each TSS also carries a bitmap allowing the low
/// ports.
const USER_RFLAGS: u64 = 0x3002;

#[repr(C, align(4096))]
struct Stacks<const N: usize>([[u8; N]; MAX_CPUS]);

#[no_mangle]
static mut RT_KSTACKS: Stacks<KSTACK_SIZE> = Stacks([[0; KSTACK_SIZE]; MAX_CPUS]);
static mut USTACKS: Stacks<USTACK_SIZE> = Stacks([[0; USTACK_SIZE]; MAX_CPUS]);

/// Page tables for the PVH path only (the VMM supplies its own on the 64-bit path).
#[repr(C, align(4096))]
struct PvhTables([u64; 512 * 6]);
#[no_mangle]
static mut RT_PVH_TABLES: PvhTables = PvhTables([0; 512 * 6]);
/// Set by `pvh_start32`: the boot vCPU came in through PVH, and the hvm_start_info address
/// the application processors pass on.
#[no_mangle]
static mut RT_PVH_START_INFO: u64 = 0;
/// The vCPU count the application processors pass on (PVH path).
#[no_mangle]
static mut RT_PVH_NCPUS: u64 = 1;
/// Where the real-mode AP trampoline is copied: below 1 MiB (the frame allocator never hands
/// that out), page aligned (the SIPI vector is its page number).
const AP_TRAMPOLINE: u64 = 0x8000;
/// The xAPIC's interrupt command register (identity mapped and user accessible).
const LAPIC_ICR_LOW: u64 = 0xFEE0_0300;
const LAPIC_ICR_HIGH: u64 = 0xFEE0_0310;

global_asm!(
    r#"
    /* 32-bit protected mode to long mode on the page tables at EDI: CR3, CR4.PAE, EFER.LME,
       then paging. The caller far-jumps to 64-bit code next. */
    .macro enter_long_mode
    mov %edi, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    .endm

    /* DS, ES and SS to the kernel data segment, after the far jump into a new mode. */
    .macro load_kernel_data_segments
    mov ${kernel_ds}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    .endm

    .section .text.boot, "ax"
    .code64
    .global _start64
_start64:
    cli
    cld
    cmp ${max_cpus}, %rsi
    jae 9f
    mov %rsi, %rax
    inc %rax
    imul ${kstack}, %rax
    lea RT_KSTACKS(%rip), %rsp
    add %rax, %rsp
    xor %ebp, %ebp
    call rt_entry64
9:  mov $0x11, %al
    out %al, $0xf4
    hlt
    jmp 9b

    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi
    mov %ebx, RT_PVH_START_INFO
    /* PML4[0] -> PDPT (page 1); PDPT[0..4] -> PD pages 2..5; PDs map 4 GiB with 2 MiB pages.
       Flags: present, writable, user (0x7); large page adds 0x80. */
    mov $RT_PVH_TABLES, %edi
    lea 0x1007(%edi), %eax
    mov %eax, (%edi)
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    lea 0x2007(%edi,%eax), %eax
    mov %eax, 0x1000(%edi,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x87, %eax
    mov %eax, 0x2000(%edi,%ecx,8)
    movl $0, 0x2004(%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b
    enter_long_mode
    lgdt rt_pvh_gdt_ptr
    ljmp ${kernel_cs}, $3f
    .code64
3:  load_kernel_data_segments
    mov %esi, %edi
    xor %esi, %esi
    mov $1, %edx
    jmp _start64

    /* An application processor after INIT/SIPI, copied to AP_TRAMPOLINE: real mode,
       CS = AP_TRAMPOLINE >> 4, IP = 0. Offsets are relative to the copy. */
    .code16
    .global rt_ap_trampoline
rt_ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (rt_ap_gdt_ptr - rt_ap_trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $rt_ap_start32
    .p2align 2
rt_ap_gdt_ptr:
    .word 31
    .long rt_pvh_gdt
    .global rt_ap_trampoline_end
rt_ap_trampoline_end:

    .code32
rt_ap_start32:
    load_kernel_data_segments
    mov $RT_PVH_TABLES, %edi
    enter_long_mode
    ljmp ${kernel_cs}, $4f
    .code64
4:  load_kernel_data_segments
    /* The vCPU index is the local APIC ID (CPUID.1:EBX[31:24]). */
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %ebx, %esi
    mov RT_PVH_START_INFO(%rip), %rdi
    mov RT_PVH_NCPUS(%rip), %rdx
    jmp _start64

    .section .rodata
    .p2align 3
    .global rt_pvh_gdt
rt_pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    /* 32-bit code, for the AP trampoline's step out of real mode. */
    .quad 0x00cf9a000000ffff
rt_pvh_gdt_ptr:
    .word 31
    .quad rt_pvh_gdt

    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32

    .section .text
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
rt_exc_\v:
    push $0
    push $\v
    jmp rt_exc_common
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
rt_exc_\v:
    push $\v
    jmp rt_exc_common
    .endr
rt_exc_common:
    mov %rsp, %rdi
    and $-16, %rsp
    call rt_exception
    ud2

    .section .rodata
    .p2align 3
    .global rt_exc_table
rt_exc_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad rt_exc_\v
    .endr
    "#,
    max_cpus = const MAX_CPUS,
    kstack = const KSTACK_SIZE,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    options(att_syntax)
);

extern "C" {
    static rt_exc_table: [u64; 32];
    static rt_ap_trampoline: u8;
    static rt_ap_trampoline_end: u8;
}

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    /// I/O permission bitmap (0 = allowed) for ports below IOMAP_PORTS, then the 0xff
    /// terminator the CPU requires.
    iomap: [u8; IOMAP_PORTS / 8 + 1],
}
const IOMAP_PORTS: usize = 0x1000;

#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

const GDT_LEN: usize = TSS_BASE_INDEX + 2 * MAX_CPUS;
static mut GDT: [u64; GDT_LEN] = {
    let mut g = [0u64; GDT_LEN];
    g[1] = 0x00af_9a00_0000_ffff; // kernel code, 64-bit
    g[2] = 0x00cf_9200_0000_ffff; // kernel data
    g[3] = 0x00cf_f200_0000_ffff; // user data
    g[4] = 0x00af_fa00_0000_ffff; // user code, 64-bit
    g
};
static mut TSS: [Tss; MAX_CPUS] = {
    const T: Tss = Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 104,
        iomap: {
            let mut m = [0u8; IOMAP_PORTS / 8 + 1];
            m[IOMAP_PORTS / 8] = 0xff;
            m
        },
    };
    [T; MAX_CPUS]
};
static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];

/// 0: not started, 1: IDT built (ring 0), 2: boot info and frames ready (ring 3).
static STAGE: AtomicU32 = AtomicU32::new(0);
static START_INFO: AtomicU64 = AtomicU64::new(0);
static NCPUS: AtomicUsize = AtomicUsize::new(1);
/// Application processors that reached ring 3 after `start_aps`.
static APS_ONLINE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static JOIN: Barrier = Barrier::new();

/// The vCPU a guest's main runs on.
#[derive(Debug)]
pub struct Cpu {
    pub id: usize,
    pub count: usize,
}

impl Cpu {
    pub fn is_boot(&self) -> bool {
        self.id == 0
    }
}

/// Ring 0, on this vCPU's kernel stack.
#[no_mangle]
extern "C" fn rt_entry64(start_info: u64, cpu: usize, ncpus: usize) -> ! {
    if cpu == 0 {
        START_INFO.store(start_info, Ordering::Relaxed);
        NCPUS.store(ncpus.clamp(1, MAX_CPUS), Ordering::Relaxed);
        build_idt();
        STAGE.store(1, Ordering::Release);
    } else {
        while STAGE.load(Ordering::Acquire) < 1 {
            core::hint::spin_loop();
        }
    }
    // SAFETY: each vCPU writes only its own TSS and TSS descriptor; the rest of the GDT and the
    // IDT are read-only from here on. The stacks are this vCPU's own.
    unsafe {
        let kstack_top = (&raw const RT_KSTACKS.0[cpu]) as u64 + KSTACK_SIZE as u64;
        TSS[cpu].rsp[0] = kstack_top;
        let tss = (&raw const TSS[cpu]) as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        GDT[TSS_BASE_INDEX + 2 * cpu] = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((tss >> 24) & 0xff) << 56);
        GDT[TSS_BASE_INDEX + 2 * cpu + 1] = tss >> 32;
        load_tables(cpu);
        let ustack_top = (&raw const USTACKS.0[cpu]) as u64 + USTACK_SIZE as u64;
        enter_user(cpu, ustack_top)
    }
}

/// Clears every IDT entry, so the next exception escalates to a triple fault. Only for the
/// `faulty` guest, which checks that the VMM reports a triple fault with registers.
///
/// # Safety
/// Any exception after this call resets the VM.
pub unsafe fn clobber_idt() {
    // SAFETY: the caller accepts that exceptions become fatal; the IDT is plain memory that
    // ring 3 can write because every page is user-accessible.
    core::ptr::write_bytes(
        (&raw mut IDT) as *mut u8,
        0,
        core::mem::size_of::<[[u64; 2]; 32]>(),
    );
}

fn build_idt() {
    for v in 0..32 {
        // SAFETY: the stub table is static; the IDT is written before STAGE 1 only.
        unsafe {
            let h = rt_exc_table[v];
            IDT[v][0] = (h & 0xffff)
                | ((KERNEL_CS as u64) << 16)
                | (0x8e << 40)
                | (((h >> 16) & 0xffff) << 48);
            IDT[v][1] = h >> 32;
        }
    }
}

/// # Safety
/// GDT, this vCPU's TSS descriptor and the IDT must be built.
unsafe fn load_tables(cpu: usize) {
    let gdt = DescriptorPtr {
        limit: (GDT_LEN * 8 - 1) as u16,
        base: (&raw const GDT) as u64,
    };
    let idt = DescriptorPtr {
        limit: (32 * 16 - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    let tr = (TSS_BASE_INDEX * 8 + cpu * 16) as u16;
    asm!(
        "lgdt [{gdt}]",
        "push {cs}",
        "lea {tmp}, [rip + 2f]",
        "push {tmp}",
        "retfq",
        "2:",
        "mov ds, {ds:x}",
        "mov es, {ds:x}",
        "mov ss, {ds:x}",
        "ltr {tr:x}",
        "lidt [{idt}]",
        gdt = in(reg) &gdt,
        idt = in(reg) &idt,
        cs = in(reg) KERNEL_CS as u64,
        ds = in(reg) KERNEL_DS as u64,
        tr = in(reg) tr as u64,
        tmp = out(reg) _,
    );
}

/// # Safety
/// Descriptor tables must be loaded; `stack_top` must be this vCPU's user stack.
unsafe fn enter_user(cpu: usize, stack_top: u64) -> ! {
    asm!(
        "push {ss}",
        "push {rsp}",
        "push {rflags}",
        "push {cs}",
        "push {rip}",
        "iretq",
        ss = in(reg) USER_DS as u64,
        rsp = in(reg) stack_top - 8,
        rflags = in(reg) USER_RFLAGS,
        cs = in(reg) USER_CS as u64,
        rip = in(reg) rt_user_main as *const () as u64,
        in("rdi") cpu,
        options(noreturn)
    );
}

extern "Rust" {
    fn rt_guest_main(cpu: &Cpu) -> Verdict;
}

/// Ring 3 from here on.
extern "C" fn rt_user_main(id: usize) -> ! {
    let count = NCPUS.load(Ordering::Relaxed);
    if id == 0 {
        // SAFETY: the address came from the boot protocol and is identity mapped.
        match unsafe { bootinfo::parse(START_INFO.load(Ordering::Relaxed), count) } {
            Ok(info) => {
                crate::frames::init(&info);
                bootinfo::publish(info);
            }
            Err(e) => {
                crate::println!("rt: unusable boot info: {:?}", e);
                exit::exit(Verdict::Fail);
            }
        }
        STAGE.store(2, Ordering::Release);
        start_aps();
    } else {
        APS_ONLINE.fetch_add(1, Ordering::AcqRel);
        while STAGE.load(Ordering::Acquire) < 2 {
            core::hint::spin_loop();
        }
    }
    let count = count.max(NCPUS.load(Ordering::Acquire));
    let cpu = Cpu { id, count };
    // SAFETY: the guest binary defines rt_guest_main through `guest_main!`.
    let verdict = unsafe { rt_guest_main(&cpu) };
    if verdict != Verdict::Pass {
        FAILED.fetch_add(1, Ordering::Relaxed);
    }
    JOIN.wait(count);
    if id == 0 {
        exit::exit(Verdict::pass_if(FAILED.load(Ordering::Relaxed) == 0));
    }
    exit::cpu_stop()
}

/// PVH path with `cpus=N`: starts the application processors, as a PC's do, with INIT and
/// two SIPIs to all but this vCPU, and waits until N - 1 of them reached ring 3. A VMM that
/// starts every vCPU itself (the project's) enters through `_start64` and skips this.
fn start_aps() {
    // SAFETY: written once by pvh_start32 before any other vCPU runs.
    let pvh = unsafe { (&raw const RT_PVH_START_INFO).read() } != 0;
    let want = crate::cmdline::get_u64(bootinfo::get().cmdline, "cpus").unwrap_or(1) as usize;
    if !pvh || want <= 1 {
        return;
    }
    let want = want.min(MAX_CPUS);
    // SAFETY: the trampoline's bytes are in the image; AP_TRAMPOLINE is reserved low RAM,
    // identity mapped and user writable; the APs read RT_PVH_NCPUS only after the SIPI.
    unsafe {
        let from = &rt_ap_trampoline as *const u8;
        let len = (&rt_ap_trampoline_end as *const u8).offset_from(from) as usize;
        core::ptr::copy_nonoverlapping(from, AP_TRAMPOLINE as *mut u8, len);
        (&raw mut RT_PVH_NCPUS).write_volatile(want as u64);
    }
    NCPUS.store(want, Ordering::Release);
    let icr = |v: u32| {
        // SAFETY: the local APIC's MMIO page, identity mapped.
        unsafe {
            (LAPIC_ICR_HIGH as *mut u32).write_volatile(0);
            (LAPIC_ICR_LOW as *mut u32).write_volatile(v);
        }
    };
    let spin = |ticks: u64| {
        let t = crate::arch::rdtsc();
        while crate::arch::rdtsc().wrapping_sub(t) < ticks {
            core::hint::spin_loop();
        }
    };
    // All excluding self (shorthand 11), level assert; INIT (101) then STARTUP (110).
    const ALL_BUT_SELF: u32 = 0b11 << 18 | 1 << 14;
    icr(ALL_BUT_SELF | 0b101 << 8);
    spin(10_000_000);
    for _ in 0..2 {
        icr(ALL_BUT_SELF | 0b110 << 8 | (AP_TRAMPOLINE >> 12) as u32);
        spin(1_000_000);
    }
    // Ring 0 of the way up is emulated on some hosts: give them time (about a minute even
    // at 3 GHz of TSC).
    let t = crate::arch::rdtsc();
    while APS_ONLINE.load(Ordering::Acquire) < want - 1 {
        if crate::arch::rdtsc().wrapping_sub(t) > 200_000_000_000 {
            crate::println!(
                "rt: only {} of {} application processors came up after INIT/SIPI",
                APS_ONLINE.load(Ordering::Acquire),
                want - 1
            );
            exit::exit(Verdict::Fail);
        }
        core::hint::spin_loop();
    }
}

/// Exception frame as laid out by the stubs: vector, error code, then the CPU's frame.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// The `hlt` a ring-3 vCPU executes to stop where no VMM answers the stop port
/// (`exit::cpu_stop`): it raises #GP, and this vCPU halts here in ring 0, interrupts off.
/// (`int n` would be simpler, but nested PVM answers a software interrupt from ring 3 with
/// #UD; an exception reaches ring 0 on every host.)
fn is_stop_request(f: &ExceptionFrame) -> bool {
    const GP: u64 = 13;
    const HLT: u8 = 0xf4;
    // SAFETY: RIP points at the faulting instruction, in identity-mapped guest memory.
    f.vector == GP && f.cs & 3 == 3 && unsafe { (f.rip as *const u8).read_volatile() } == HLT
}

#[no_mangle]
extern "C" fn rt_exception(f: &ExceptionFrame) -> ! {
    if is_stop_request(f) {
        loop {
            // SAFETY: ring 0; halting with interrupts off stops this vCPU for good.
            unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
        }
    }
    crate::serial::_print_unlocked(format_args!(
        "\nrt: EXCEPTION vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}\n",
        f.vector,
        f.error,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        crate::arch::read_cr2()
    ));
    exit::exit(Verdict::Fail)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::_print_unlocked(format_args!("\nrt: PANIC: {}\n", info));
    exit::exit(Verdict::Fail)
}
