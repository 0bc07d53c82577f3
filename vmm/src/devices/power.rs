//! How a guest powers the machine off or resets it: the hardware-reduced ACPI sleep control,
//! sleep status and reset registers the FADT names (ACPI 6.5 §4.8.3.7, §4.8.3.6), and the
//! i8042 keyboard controller's reset command (what Linux's `reboot=k` uses).

use super::IoAction;
use crate::acpi::{PowerPorts, S5_SLEEP_TYPE};

pub const PORTS: PowerPorts = PowerPorts {
    sleep_control: 0x600,
    sleep_status: 0x601,
    reset: 0x602,
    reset_value: 1,
};
/// The i8042 command port and its "pulse reset line" command.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const SLP_EN: u8 = 1 << 5;

/// The action for a write of `value` to `port`, or None if the port is not a power port.
pub fn decode_write(port: u16, value: u8) -> Option<IoAction> {
    match port {
        p if p == PORTS.sleep_control => {
            let sleep_type = (value >> 2) & 0x7;
            if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                Some(IoAction::PowerOff)
            } else {
                if value & SLP_EN != 0 {
                    tracing::warn!(
                        "guest asked for sleep type {sleep_type}; only S5 (power off) is supported, ignored"
                    );
                }
                Some(IoAction::Continue)
            }
        }
        p if p == PORTS.reset && value == PORTS.reset_value => Some(IoAction::Reset),
        p if p == PORTS.reset || p == PORTS.sleep_status => Some(IoAction::Continue),
        I8042_COMMAND if value == I8042_RESET => Some(IoAction::Reset),
        _ => None,
    }
}

/// The value a read of `port` returns, or None if the port is not a power port. The sleep
/// status register never reports a wake (the VM does not sleep).
pub fn decode_read(port: u16) -> Option<u8> {
    (port == PORTS.sleep_status).then_some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_sleep_states_are_ignored() {
        assert_eq!(
            decode_write(0x600, (5 << 2) | SLP_EN),
            Some(IoAction::PowerOff)
        );
        assert_eq!(
            decode_write(0x600, (3 << 2) | SLP_EN),
            Some(IoAction::Continue)
        );
        assert_eq!(decode_write(0x600, 5 << 2), Some(IoAction::Continue));
    }

    #[test]
    fn reset_register_and_i8042_reset() {
        assert_eq!(decode_write(0x602, 1), Some(IoAction::Reset));
        assert_eq!(decode_write(0x602, 7), Some(IoAction::Continue));
        assert_eq!(decode_write(0x64, 0xfe), Some(IoAction::Reset));
        assert_eq!(decode_write(0x64, 0xad), None);
        assert_eq!(decode_read(0x601), Some(0));
        assert_eq!(decode_read(0x600), None);
    }
}
