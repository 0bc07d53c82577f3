//! COM1: a 16550 UART (vm-superio) at 0x3f8 whose output goes to the VMM's stdout. Its
//! interrupt (IRQ 4, as on a PC) is an irqfd into the in-kernel IOAPIC: Linux's 8250 driver
//! needs the transmitter-empty interrupt once userspace writes to the console. The test
//! guests poll and never enable it.

use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
/// COM1's GSI (an IOAPIC pin, edge-triggered, routed identically by KVM's default routing).
pub const COM1_GSI: u32 = 4;
const COM1_PORTS: u16 = 8;

/// The UART's interrupt line: each trigger is one edge on the irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Passes output on a whole line at a time. vm-superio flushes after every byte; without
/// this, the VMM's own stderr lines would land in the middle of the guest's lines.
struct LineBuffered {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

const MAX_LINE: usize = 4096;

impl Write for LineBuffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        if self.line.contains(&b'\n') || self.line.len() >= MAX_LINE {
            self.out.write_all(&self.line)?;
            self.out.flush()?;
            self.line.clear();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuffered {
    fn drop(&mut self) {
        let _ = self.out.write_all(&self.line);
        let _ = self.out.flush();
    }
}

pub struct SerialPort {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, LineBuffered>,
}

impl SerialPort {
    pub fn new(out: Box<dyn Write + Send>, irq: EventFd) -> Self {
        Self {
            uart: Serial::new(
                IrqLine(irq),
                LineBuffered {
                    out,
                    line: Vec::new(),
                },
            ),
        }
    }

    /// The register offset if `port` belongs to COM1.
    pub fn offset(port: u16) -> Option<u8> {
        (COM1_BASE..COM1_BASE + COM1_PORTS)
            .contains(&port)
            .then(|| (port - COM1_BASE) as u8)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::warn!("serial write failed: {e:?}");
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
}
