//! The reclaim probe's mailbox with arbitrary guest-controlled fields, on a balloon whose
//! queues are driven with arbitrary PFN buffers in between, so that probes meet frames that
//! are in the balloon, pending in a batch, or device-mapped; invariants checked after each
//! step (the probe may reclaim and list only frames the guest owns, and gives all of them
//! back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{Target, QSIZE, RAM, RINGS};

const BUF: u64 = 0x40000;
const MAILBOX: u64 = 0x50000;

/// Puts one device-readable descriptor of `bytes` at BUF on queue `q` and processes it.
fn submit(t: &mut Target, q: u64, bytes: &[u8], idx: &mut [u16; 2]) {
    let mem = t.mm.ram.memory();
    let base = RINGS + q * 0x3000;
    let _ = mem.write_slice(bytes, GuestAddress(BUF));
    let _ = mem.write_obj(BUF, GuestAddress(base));
    let _ = mem.write_obj(bytes.len() as u32, GuestAddress(base + 8));
    let _ = mem.write_obj(0u32, GuestAddress(base + 12));
    let slot = idx[q as usize] % QSIZE as u16;
    let _ = mem.write_obj(0u16, GuestAddress(base + 0x1004 + slot as u64 * 2));
    idx[q as usize] = idx[q as usize].wrapping_add(1);
    let _ = mem.write_obj(idx[q as usize], GuestAddress(base + 0x1002));
    t.process(q as usize);
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let mut t = Target::new(vmm_fuzz::strategy_of(data[0]));
    t.activate();
    let mut idx = [0u16; 2];
    // Steps of 65 bytes: a kind, then 64 bytes of payload.
    for step in data[1..].chunks(65) {
        let (kind, payload) = (step[0], &step[1..]);
        match kind % 4 {
            // Inflate or deflate a buffer of PFNs: small ones, so they meet the probe's.
            0 | 1 => {
                let pfns: Vec<u8> = payload
                    .chunks_exact(2)
                    .flat_map(|c| (u16::from_le_bytes([c[0], c[1]]) as u32 % 0x800).to_le_bytes())
                    .collect();
                submit(&mut t, (kind % 2) as u64, &pfns, &mut idx);
            }
            // A mailbox of arbitrary fields, most of them near the balloon's frames.
            2 => {
                let mut mb = [0u64; 8];
                for (i, c) in payload.chunks_exact(8).enumerate() {
                    mb[i] = u64::from_le_bytes(c.try_into().unwrap());
                }
                if kind & 0x80 == 0 {
                    mb[0] = abi::probe::MAGIC;
                    mb[1] %= 0x800;
                    mb[2] %= 0x100;
                    mb[3] %= RAM / 4096;
                    mb[4] %= 0x200;
                }
                let bytes: Vec<u8> = mb.iter().flat_map(|v| v.to_le_bytes()).collect();
                let _ = t.mm.ram.memory().write_slice(&bytes, GuestAddress(MAILBOX));
                t.probe(MAILBOX);
            }
            // The probe port written with an arbitrary address.
            _ => {
                let gpa = u32::from_le_bytes(
                    payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 4]),
                );
                t.probe(gpa as u64);
            }
        }
        let _ = t.mm.gather.poll();
        t.check();
    }
    t.mm.gather.flush();
    t.check();
});
