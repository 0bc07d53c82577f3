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
//!   the region, two whose list capacity overflows a byte count. Each must be refused with a
//!   status and nothing reclaimed; then PASS.
#![no_std]
#![no_main]

use abi::probe::{self, Mailbox, MailboxPage};
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

static mut MAILBOX: MailboxPage = MailboxPage(Mailbox::EMPTY);

/// Sends the request fields of `req` and returns (status, reclaimed).
fn probe(req: Mailbox) -> (u64, u64) {
    // SAFETY: only this vCPU uses the mailbox; the VMM writes it during the port access.
    unsafe {
        let mb = &raw mut MAILBOX.0;
        mb.write_volatile(Mailbox {
            reclaimed: 0,
            status: probe::STATUS_PENDING,
            ..req
        });
        rt::arch::outl(abi::PROBE_PORT, mb as u64 as u32);
        (
            (&raw const (*mb).status).read_volatile(),
            (&raw const (*mb).reclaimed).read_volatile(),
        )
    }
}

fn bad_probe() -> Verdict {
    let Some((region, _)) = rt::frames::alloc_run(16) else {
        return Verdict::Fail;
    };
    // Outside RAM: the VMM cannot even read the mailbox, so it must leave it untouched.
    rt::arch::outl(abi::PROBE_PORT, 0xF000_0000);
    let hole = 0xC000_0000u64 / 4096;
    let req = |magic, region_gfn, list_gfn, list_capacity| Mailbox {
        magic,
        region_gfn,
        region_pages: 16,
        list_gfn,
        list_capacity,
        ..Mailbox::default()
    };
    let m = probe::MAGIC;
    let cases: [(&str, Mailbox, u64); 5] = [
        ("bad magic", req(0, region, region + 100, 16), 1),
        ("region in the MMIO hole", req(m, hole, region, 16), 2),
        (
            "list overlapping the region",
            req(m, region, region + 8, 16),
            2,
        ),
        // capacity * 8 wraps to 8 bytes in unchecked 64-bit arithmetic: one page would be
        // checked while 8 KiB are written.
        (
            "list capacity 2^61+1",
            req(m, region, region + 100, (1 << 61) + 1),
            2,
        ),
        (
            "list capacity u64::MAX",
            req(m, region, region + 100, u64::MAX),
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
    Verdict::pass_if(ok)
}

rt::guest_main!(main);
