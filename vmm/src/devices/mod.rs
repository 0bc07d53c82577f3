//! Port I/O devices: COM1 serial, the exit ports, the power ports (ACPI sleep/reset, i8042
//! reset). Ports no device claims read as all ones and ignore writes, as on a PC; that is
//! logged once per port at debug level.

pub mod balloon;
pub mod exit_port;
pub mod power;
pub mod reclaim_probe;
pub mod serial;
pub mod virtio;

use std::collections::HashSet;
use std::sync::Mutex;

pub use exit_port::{ExitPort, VERDICT_PASS};
pub use serial::SerialPort;

/// What the vCPU thread does after a port access.
#[derive(Debug, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    /// The guest stopped this vCPU (it will not run again).
    StopVcpu,
    /// The guest ended the VM with this exit-port value.
    Exit(u8),
    /// The guest asked for a reclaim probe with the mailbox at this address.
    ReclaimProbe(u64),
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (ACPI reset register, i8042 reset).
    Reset,
}

pub struct PortIo {
    serial: Mutex<SerialPort>,
    /// Whether the reclaim probe (a test device) answers on its port.
    reclaim_probe: bool,
    /// What each probe measured, for the run's report.
    probe_reports: Mutex<Vec<reclaim_probe::ProbeReport>>,
    unclaimed_seen: Mutex<HashSet<u16>>,
}

impl PortIo {
    pub fn new(serial: SerialPort, reclaim_probe: bool) -> Self {
        Self {
            serial: Mutex::new(serial),
            reclaim_probe,
            probe_reports: Mutex::new(Vec::new()),
            unclaimed_seen: Mutex::new(HashSet::new()),
        }
    }

    /// Keeps what a probe measured for the run's report.
    pub fn record_probe(&self, report: reclaim_probe::ProbeReport) {
        self.probe_reports.lock().unwrap().push(report);
    }

    /// What the probes measured, in order.
    pub fn probe_reports(&self) -> Vec<reclaim_probe::ProbeReport> {
        self.probe_reports.lock().unwrap().clone()
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        if let Some(offset) = SerialPort::offset(port) {
            self.serial
                .lock()
                .unwrap()
                .write(offset, data.first().copied().unwrap_or(0));
            return IoAction::Continue;
        }
        if port == reclaim_probe::PROBE_PORT {
            if !self.reclaim_probe {
                if self.unclaimed_seen.lock().unwrap().insert(port) {
                    tracing::warn!("guest wrote the reclaim probe's port {port:#x}, but the probe is off (vmm run --reclaim-probe); ignored");
                }
                return IoAction::Continue;
            }
            if let Ok(gpa) = <[u8; 4]>::try_from(data) {
                return IoAction::ReclaimProbe(u32::from_le_bytes(gpa) as u64);
            }
        }
        let power = data.first().and_then(|v| power::decode_write(port, *v));
        match ExitPort::decode(port, data).or(power) {
            Some(action) => action,
            None => {
                self.note_unclaimed(port);
                IoAction::Continue
            }
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match SerialPort::offset(port) {
            Some(offset) => Some(self.serial.lock().unwrap().read(offset)),
            None => power::decode_read(port),
        };
        match value {
            Some(v) => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            None => {
                self.note_unclaimed(port);
                data.fill(0xff);
            }
        }
    }

    fn note_unclaimed(&self, port: u16) {
        if self.unclaimed_seen.lock().unwrap().insert(port) {
            tracing::debug!(
                port = format_args!("{port:#x}"),
                "guest accessed an unclaimed I/O port"
            );
        }
    }
}
