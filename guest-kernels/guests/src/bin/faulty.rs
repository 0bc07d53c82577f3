//! faulty: misbehaves on purpose so that tests can check how the VMM reports it.
//!
//! Command line `mode=`:
//! - `fail`: reports FAIL on the exit port.
//! - `exception`: executes `ud2`; the runtime's handler reports it and FAILs.
//! - `panic`: panics; the runtime's panic handler FAILs.
//! - `triple-fault`: clears the IDT, then executes `ud2` (#UD → #NP → #DF → shutdown).
//! - `stop`: stops every vCPU without a verdict.
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

rt::guest_main!(main);
