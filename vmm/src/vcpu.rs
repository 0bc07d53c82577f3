//! vCPU threads: run KVM_RUN in a loop and handle each exit.
//!
//! A vCPU thread stops when the guest writes the stop port, when the VM is stopping (the
//! shared `stop` flag, with a signal kick to leave KVM_RUN), when the guest powers off or
//! resets the machine, or on a fatal exit (triple fault, an instruction KVM cannot emulate, an
//! exit the VMM does not handle), which ends the VM with an error naming the vCPU, the exit
//! reason and RIP.

use crate::devices::balloon::BalloonDevice;
use crate::devices::{reclaim_probe, IoAction, PortIo};
use crate::emulation;
use crate::error::VmmError;
use crate::memory::MemoryManager;
use crate::signals;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// How a VM run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest wrote this value to the exit port.
    Verdict(u8),
    /// Every vCPU stopped itself without a verdict.
    VcpusStopped,
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest reset the machine; this VMM does not reboot guests.
    Reset,
    Error(VmmError),
}

/// State the vCPU threads and the event loop share.
pub struct VmShared {
    pub stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    /// Written when the VM must end; the event loop watches it.
    pub shutdown: EventFd,
    pub io: PortIo,
    pub memory: Arc<MemoryManager>,
    pub balloon: Option<Arc<BalloonDevice>>,
    running: AtomicU32,
}

impl VmShared {
    pub fn new(
        io: PortIo,
        memory: Arc<MemoryManager>,
        balloon: Option<Arc<BalloonDevice>>,
        vcpus: u32,
    ) -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            shutdown: EventFd::new(libc::EFD_NONBLOCK)?,
            io,
            memory,
            balloon,
            running: AtomicU32::new(vcpus),
        })
    }

    /// The balloon device, if the VM has one and `addr` lies in its MMIO window.
    fn balloon_at(&self, addr: u64) -> Option<&BalloonDevice> {
        self.balloon
            .as_deref()
            .filter(|_| BalloonDevice::contains(addr))
    }

    /// Records how the VM ends (the first outcome wins) and asks everyone to stop.
    pub fn finish(&self, outcome: Outcome) {
        let mut o = self.outcome.lock().unwrap();
        if o.is_none() {
            *o = Some(outcome);
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.shutdown.write(1);
    }

    pub fn take_outcome(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap().take()
    }
}

enum Next {
    Continue,
    StopVcpu,
    Fatal(VmmError),
    TripleFault,
}

fn exit_name(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::FailEntry(reason, cpu) => {
            format!("FailEntry(hardware_entry_failure_reason={reason:#x}, cpu={cpu})")
        }
        VcpuExit::InternalError => "InternalError".into(),
        VcpuExit::Hlt => "Hlt".into(),
        other => format!("{other:?}"),
    }
}

/// Logs an MMIO access that no device claims (`access`: "read of" or "write to"); the caller
/// answers a read with all ones and drops a write.
fn unclaimed_mmio(index: u32, addr: u64, access: &str) {
    tracing::debug!(
        vcpu = index,
        addr = format_args!("{addr:#x}"),
        "MMIO {access} unclaimed address"
    );
}

/// Runs vCPU `index` until it stops. Reports its end through `shared`.
///
/// A vCPU thread is not a reader for the gather's grace periods: it holds no guest address
/// across an exit. The devices it calls into join a grace period themselves while they read
/// guest buffers (the balloon's reader, held with its lock), so a grace period never waits
/// for a vCPU thread that was preempted in the middle of an unrelated exit.
pub fn run(mut vcpu: VcpuFd, index: u32, shared: Arc<VmShared>) {
    signals::set_thread_kvm_run(vcpu.get_kvm_run());
    while !shared.stop.load(Ordering::Acquire) {
        let result = vcpu.run();
        let next = match result {
            Ok(VcpuExit::IoOut(port, data)) => match shared.io.write(port, data) {
                IoAction::Continue => Next::Continue,
                IoAction::ReclaimProbe(gpa) => {
                    if let Some(Ok(out)) = reclaim_probe::handle(&shared.memory, gpa) {
                        shared.io.record_probe(out.report);
                    }
                    Next::Continue
                }
                IoAction::StopVcpu => Next::StopVcpu,
                IoAction::Exit(v) => {
                    shared.finish(Outcome::Verdict(v));
                    Next::StopVcpu
                }
                IoAction::PowerOff => {
                    shared.finish(Outcome::PowerOff);
                    Next::StopVcpu
                }
                IoAction::Reset => {
                    shared.finish(Outcome::Reset);
                    Next::StopVcpu
                }
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.io.read(port, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match shared.balloon_at(addr) {
                    Some(balloon) => balloon.mmio_read(addr, data),
                    None => {
                        unclaimed_mmio(index, addr, "read of");
                        data.fill(0xff);
                    }
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                match shared.balloon_at(addr) {
                    // Queue notifications are served here, on this thread (`BalloonDevice`).
                    Some(balloon) => balloon.mmio_write(addr, data),
                    None => unclaimed_mmio(index, addr, "write to"),
                }
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => Next::TripleFault,
            Ok(VcpuExit::InternalError) => {
                Next::Fatal(emulation::report(&mut vcpu, index, &shared.memory.ram))
            }
            Ok(other) => {
                let reason = exit_name(&other);
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Next::Fatal(VmmError::UnhandledExit {
                    vcpu: index,
                    reason,
                    rip,
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(err) => Next::Fatal(VmmError::Kvm { op: "KVM_RUN", err }),
        };
        match next {
            Next::Continue => {}
            Next::StopVcpu => break,
            Next::Fatal(e) => {
                shared.finish(Outcome::Error(e));
                break;
            }
            Next::TripleFault => {
                shared.finish(Outcome::Error(VmmError::TripleFault {
                    vcpu: index,
                    regs: describe_regs(&vcpu),
                }));
                break;
            }
        }
    }
    signals::set_thread_kvm_run(std::ptr::null_mut());
    if shared.running.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.finish(Outcome::VcpusStopped);
    }
}

/// The registers worth seeing after a crash, on one line.
pub fn describe_regs(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector, s.ss.selector,
        s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
    )
}
