//! faulty: misbehaves on purpose so that tests can check how the VMM reports it.
//!
//! Command line `mode=`:
//! - `fail`: reports FAIL on the exit port.
//! - `exception`: executes `ud2`; the runtime's handler reports it and FAILs.
//! - `panic`: panics; the runtime's panic handler FAILs.
//! - `triple-fault`: clears the IDT, then executes `ud2` (#UD → #NP → #DF → shutdown).
//! - `stop`: stops every vCPU without a verdict.
//! - `bad-probe`: hands the reclaim probe (port 0xf6) hostile mailboxes: one outside RAM,
//!   one with a bad magic, one whose region lies in the MMIO hole, one whose list overlaps
//!   the region. Each must be refused with a status and nothing reclaimed; then PASS.
#![no_std]
#![no_main]

use rt::{bootinfo, cmdline, println, Cpu, Verdict};

fn main(cpu: &Cpu) -> Verdict {
    let mode = cmdline::get(bootinfo::get().cmdline, "mode").unwrap_or("fail");
    if mode == "stop" {
        rt::exit::cpu_stop();
    }
    if !cpu.is_boot() {
        return Verdict::Pass;
    }
    println!("faulty: mode={}", mode);
    match mode {
        "fail" => Verdict::Fail,
        "exception" => {
            // SAFETY: deliberately raises #UD.
            unsafe { core::arch::asm!("ud2") };
            Verdict::Pass
        }
        "panic" => panic!("faulty guest panics on purpose"),
        "bad-probe" => bad_probe(),
        "triple-fault" => {
            // SAFETY: the point of this mode is the fatal exception that follows.
            unsafe {
                rt::clobber_idt();
                core::arch::asm!("ud2");
            }
            Verdict::Pass
        }
        other => {
            println!("faulty: unknown mode {}", other);
            Verdict::Fail
        }
    }
}

#[repr(C, align(4096))]
struct Mailbox([u64; 8]);
static mut MAILBOX: Mailbox = Mailbox([0; 8]);
const MAGIC: u64 = u64::from_le_bytes(*b"RECLAIM1");
const STATUS: usize = 7;
const RECLAIMED: usize = 6;

/// Sends `fields` (magic, region, pages, list, capacity, pattern) and returns the status.
fn probe(fields: [u64; 6]) -> (u64, u64) {
    // SAFETY: only this vCPU uses the mailbox; the VMM writes it during the port access.
    unsafe {
        let mb = &raw mut MAILBOX;
        for (i, f) in fields.iter().enumerate() {
            (*mb).0[i] = *f;
        }
        (*mb).0[RECLAIMED] = 0;
        (*mb).0[STATUS] = u64::MAX;
        rt::arch::outl(0xf6, mb as u64 as u32);
        (
            (&raw const (*mb).0[STATUS]).read_volatile(),
            (&raw const (*mb).0[RECLAIMED]).read_volatile(),
        )
    }
}

fn bad_probe() -> Verdict {
    let Some((region, _)) = rt::frames::alloc_run(16) else {
        return Verdict::Fail;
    };
    // Outside RAM: the VMM cannot even read the mailbox, so it must leave it untouched.
    rt::arch::outl(0xf6, 0xF000_0000);
    let hole = 0xC000_0000u64 / 4096;
    let cases: [(&str, [u64; 6], u64); 3] = [
        ("bad magic", [0, region, 16, region + 100, 16, 0], 1),
        (
            "region in the MMIO hole",
            [MAGIC, hole, 16, region, 16, 0],
            2,
        ),
        (
            "list overlapping the region",
            [MAGIC, region, 16, region + 8, 16, 0],
            2,
        ),
    ];
    let mut ok = true;
    for (name, fields, want) in cases {
        let (status, reclaimed) = probe(fields);
        println!(
            "faulty: bad-probe {}: status={} reclaimed={}",
            name, status, reclaimed
        );
        ok &= status == want && reclaimed == 0;
    }
    if ok {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

rt::guest_main!(main);
