//! The exit ports. 0xf4 is compatible with QEMU's isa-debug-exit (iosize 1): the guest writes
//! its verdict there and the VM ends. 0xf5 stops only the vCPU that writes it.

use super::IoAction;

/// The value the test guests write for a pass (QEMU turns it into exit status 33).
pub use abi::VERDICT_PASS;
pub use abi::{CPU_STOP_PORT, EXIT_PORT};

pub struct ExitPort;

impl ExitPort {
    /// The action for a write to `port`, or None if the port is not an exit port.
    pub fn decode(port: u16, data: &[u8]) -> Option<IoAction> {
        match port {
            EXIT_PORT => Some(IoAction::Exit(data.first().copied().unwrap_or(0))),
            CPU_STOP_PORT => Some(IoAction::StopVcpu),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exit_and_stop() {
        assert_eq!(ExitPort::decode(0xf4, &[0x10]), Some(IoAction::Exit(0x10)));
        assert_eq!(ExitPort::decode(0xf4, &[]), Some(IoAction::Exit(0)));
        assert_eq!(ExitPort::decode(0xf5, &[0]), Some(IoAction::StopVcpu));
        assert_eq!(ExitPort::decode(0x80, &[0]), None);
    }
}
