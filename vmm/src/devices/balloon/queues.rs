//! Parsing balloon buffers out of descriptor chains. Everything here reads guest-controlled
//! data and returns a typed error instead of trusting it.

use super::hinting::HintEntry;
use guest_mm::layout::{Layout, PAGE_SIZE};
use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BufferError {
    #[error("descriptor {index} is device-writable, expected device-readable")]
    WrongDirection { index: usize },
    #[error("descriptor {index} is device-readable, expected device-writable")]
    ExpectedWritable { index: usize },
    #[error("descriptor {index} length {len} is not a multiple of {unit}")]
    BadLength { index: usize, len: u32, unit: u32 },
    #[error("buffer holds more than {max} frames")]
    TooLarge { max: usize },
    #[error("descriptor {index} at {addr:#x}+{len} is not in guest RAM")]
    OutsideRam { index: usize, addr: u64, len: u32 },
    #[error("reported range {addr:#x}+{len} is not page aligned")]
    Unaligned { addr: u64, len: u32 },
    #[error("descriptor {index} has length 0 (at {addr:#x})")]
    ZeroLength { index: usize, addr: u64 },
    #[error("empty buffer")]
    Empty,
}

/// Reads a chain of device-readable descriptors whose lengths are multiples of `unit` bytes,
/// `max` entries of `unit` bytes in all, into one byte vector.
fn read_entries(
    chain: Chain,
    mem: &GuestMemoryMmap,
    unit: u32,
    max: usize,
) -> Result<Vec<u8>, BufferError> {
    let mut bytes = Vec::new();
    let mut any = false;
    for (index, d) in chain.enumerate() {
        any = true;
        if d.len() == 0 {
            return Err(BufferError::ZeroLength {
                index,
                addr: d.addr().0,
            });
        }
        if d.is_write_only() {
            return Err(BufferError::WrongDirection { index });
        }
        if !d.len().is_multiple_of(unit) {
            return Err(BufferError::BadLength {
                index,
                len: d.len(),
                unit,
            });
        }
        if (bytes.len() + d.len() as usize) / unit as usize > max {
            return Err(BufferError::TooLarge { max });
        }
        let start = bytes.len();
        bytes.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut bytes[start..], d.addr())
            .map_err(|_| BufferError::OutsideRam {
                index,
                addr: d.addr().0,
                len: d.len(),
            })?;
    }
    if !any {
        return Err(BufferError::Empty);
    }
    Ok(bytes)
}

/// Reads an inflate/deflate buffer: device-readable descriptors of little-endian u32 PFNs.
pub fn pfn_buffer(
    chain: Chain,
    mem: &GuestMemoryMmap,
    max: usize,
) -> Result<Vec<u64>, BufferError> {
    let bytes = read_entries(chain, mem, 4, max)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
        .collect())
}

/// Validates one device-writable descriptor naming a free, page-aligned range inside RAM;
/// returns its first frame and frame count.
fn free_range(
    index: usize,
    addr: u64,
    len: u32,
    layout: &Layout,
) -> Result<(u64, u64), BufferError> {
    if len == 0 {
        return Err(BufferError::ZeroLength { index, addr });
    }
    if !addr.is_multiple_of(PAGE_SIZE) || !(len as u64).is_multiple_of(PAGE_SIZE) {
        return Err(BufferError::Unaligned { addr, len });
    }
    let pages = len as u64 / PAGE_SIZE;
    if layout.range_of_frames(addr / PAGE_SIZE, pages).is_none() {
        return Err(BufferError::OutsideRam { index, addr, len });
    }
    Ok((addr / PAGE_SIZE, pages))
}

/// The most frames one buffer may name: all of RAM (a larger sum repeats frames, and would
/// make the device allocate for the guest's sake).
fn max_frames(layout: &Layout) -> usize {
    (layout.total_bytes() / PAGE_SIZE) as usize
}

/// Reads a free-page-report buffer: device-writable descriptors, each naming a free,
/// page-aligned guest range (the memory itself is not read).
pub fn reported_frames(chain: Chain, layout: &Layout) -> Result<Vec<u64>, BufferError> {
    let mut frames = Vec::new();
    let mut any = false;
    for (index, d) in chain.enumerate() {
        any = true;
        if !d.is_write_only() {
            return Err(BufferError::ExpectedWritable { index });
        }
        let (first, pages) = free_range(index, d.addr().0, d.len(), layout)?;
        if frames.len() as u64 + pages > max_frames(layout) as u64 {
            return Err(BufferError::TooLarge {
                max: max_frames(layout),
            });
        }
        frames.extend(first..first + pages);
    }
    if !any {
        return Err(BufferError::Empty);
    }
    Ok(frames)
}

/// Reads a free page hint buffer: 4-byte device-readable command ids and device-writable
/// free ranges, in the order the driver chained them (Linux sends each alone; a chain may
/// mix them).
pub fn hint_buffer(
    chain: Chain,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<Vec<HintEntry>, BufferError> {
    let mut entries = Vec::new();
    let mut pages_in_all = 0u64;
    for (index, d) in chain.enumerate() {
        let (addr, len) = (d.addr().0, d.len());
        if !d.is_write_only() {
            if len != 4 {
                return Err(BufferError::BadLength {
                    index,
                    len,
                    unit: 4,
                });
            }
            let cmd: u32 = mem
                .read_obj(d.addr())
                .map_err(|_| BufferError::OutsideRam { index, addr, len })?;
            entries.push(HintEntry::Cmd(u32::from_le(cmd)));
            continue;
        }
        let (first, pages) = free_range(index, addr, len, layout)?;
        pages_in_all += pages;
        if pages_in_all > max_frames(layout) as u64 {
            return Err(BufferError::TooLarge {
                max: max_frames(layout),
            });
        }
        entries.push(HintEntry::Range { first, pages });
    }
    if entries.is_empty() {
        return Err(BufferError::Empty);
    }
    Ok(entries)
}

/// Reads a stats buffer: device-readable, 10-byte entries of (le16 tag, le64 value).
pub fn stats_buffer(chain: Chain, mem: &GuestMemoryMmap) -> Result<Vec<(u16, u64)>, BufferError> {
    let bytes = read_entries(chain, mem, 10, MAX_STATS)?;
    Ok(bytes
        .chunks_exact(10)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u64::from_le_bytes(c[2..10].try_into().unwrap()),
            )
        })
        .collect())
}

/// More statistics than any driver sends (virtio 1.2 defines 10 tags).
const MAX_STATS: usize = 64;
