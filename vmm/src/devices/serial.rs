//! COM1: a 16550 UART (vm-superio) at 0x3f8 whose output goes to the VMM's stdout.
//! The test guests poll; the UART's interrupt line is not wired.

use std::io::Write;
use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
const COM1_PORTS: u16 = 8;

/// The UART's interrupt, unconnected.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

pub struct SerialPort {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(NoIrq, out),
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
        if offset == 0 && value == b'\n' {
            let _ = self.uart.writer_mut().flush();
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
}
