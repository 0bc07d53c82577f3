//! A correctly initialised balloon whose rings and buffers hold arbitrary guest-controlled
//! bytes: inflate, deflate, stats and reporting queues processed over and over, with every
//! strategy; invariants checked after each step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::Target;

const RINGS: u64 = 0x10000;
const QSIZE: u32 = 16;

fn reg(t: &mut Target, off: u64, v: u32) {
    let _ = t.t.write(off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let strategy = [
        guest_mm::Strategy::PerPage,
        guest_mm::Strategy::PerBuffer,
        guest_mm::Strategy::Gather,
    ][data[0] as usize % 3];
    let mut t = Target::new(strategy);
    // Driver initialisation with all features and four queues at fixed rings.
    reg(&mut t, 0x70, 3);
    reg(&mut t, 0x24, 0);
    reg(&mut t, 0x20, 0x26);
    reg(&mut t, 0x24, 1);
    reg(&mut t, 0x20, 1);
    reg(&mut t, 0x70, 11);
    for q in 0..4u64 {
        let base = RINGS + q * 0x3000;
        reg(&mut t, 0x30, q as u32);
        reg(&mut t, 0x38, QSIZE);
        for (o, a) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            reg(&mut t, o, a as u32);
            reg(&mut t, o + 4, 0);
        }
        reg(&mut t, 0x44, 1);
    }
    reg(&mut t, 0x70, 15);
    assert!(t.t.is_active());
    // The rest of the input: chunks of guest memory for the rings and the buffer area, each
    // followed by processing one queue.
    for chunk in data[1..].chunks(64) {
        let q = chunk[0] as u64 % 4;
        let where_ =
            [RINGS + q * 0x3000, RINGS + q * 0x3000 + 0x1000, 0x40000][chunk[0] as usize / 4 % 3];
        let off = (chunk.get(1).copied().unwrap_or(0) as u64) * 8;
        let _ =
            t.mm.ram
                .memory()
                .write_slice(&chunk[chunk.len().min(2)..], GuestAddress(where_ + off));
        t.t.process_queue(q as usize);
        let _ = t.mm.gather.lock().unwrap().poll();
        t.check();
    }
    t.mm.gather.lock().unwrap().flush();
    t.check();
});
