//! Arbitrary register accesses to the balloon's virtio-mmio transport, interleaved with
//! guest-memory writes and queue notifications; invariants checked after each step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{Target, RAM};

fuzz_target!(|data: &[u8]| {
    let mut t = Target::new(guest_mm::Strategy::Gather);
    for op in data.chunks_exact(8) {
        let off = u16::from_le_bytes([op[1], op[2]]) as u64 & 0x1ff;
        let val = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        let width = [1usize, 2, 4, 8][(op[7] & 3) as usize];
        match op[0] % 5 {
            0 | 1 => {
                let bytes = (val as u64).to_le_bytes();
                t.write(off, &bytes[..width]);
            }
            2 => {
                let mut b = [0u8; 8];
                t.t.read(off, &mut b[..width]);
            }
            3 => t.process((val % 6) as usize),
            _ => {
                // Guest memory write anywhere in RAM (rings, buffers, PFN lists).
                let gpa = (val as u64 * 4) % RAM;
                let _ = t.mm.ram.memory().write_obj(
                    u32::from_le_bytes([op[1], op[2], op[7], op[0]]),
                    GuestAddress(gpa & !3),
                );
            }
        }
        let _ = t.mm.gather.poll();
        t.check();
    }
    t.mm.gather.flush();
    t.check();
});
