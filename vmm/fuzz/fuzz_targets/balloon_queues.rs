//! A correctly initialised balloon whose rings and buffers hold arbitrary guest-controlled
//! bytes: inflate, deflate, stats and reporting queues processed over and over, with every
//! strategy; invariants checked after each step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{Target, RINGS};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mut t = Target::new(vmm_fuzz::strategy_of(data[0]));
    t.activate();
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
        t.process(q as usize);
        let _ = t.mm.gather.poll();
        t.check();
    }
    t.mm.gather.flush();
    t.check();
});
