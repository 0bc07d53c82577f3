//! The PT_LOAD segments of an ELF64 file, read before loading so that an image that does not
//! fit gets a clear error (linux-loader would fail half-way with "Unable to read kernel
//! image"). Every offset and size comes from the file: all arithmetic is checked.

/// One loadable segment's physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    /// One past its last byte (paddr + memsz).
    pub end: u64,
}

const PT_LOAD: u32 = 1;

/// Bytes of one ELF64 program header that `load_segments` reads.
const PHDR_SIZE: usize = 0x38;

/// Where the program header table is: (offset, entry size, entry count).
fn program_header_table(bytes: &[u8]) -> Result<(usize, usize, usize), String> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or("truncated ELF header")
    };
    let phoff = bytes
        .get(0x20..0x28)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .ok_or("truncated ELF header")?;
    let phoff = usize::try_from(phoff).map_err(|_| "program header offset too large")?;
    Ok((phoff, u16_at(0x36)?, u16_at(0x38)?))
}

/// The PT_LOAD segments of the ELF64 file at `path`, reading only its header and program
/// header table (a vmlinux is tens of MiB; linux-loader reads the rest).
pub fn read_load_segments(path: &std::path::Path) -> Result<Vec<Segment>, String> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    (&mut f)
        .take(64)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let (phoff, phentsize, phnum) = program_header_table(&bytes)?;
    let table_end = phentsize
        .max(PHDR_SIZE)
        .checked_mul(phnum)
        .and_then(|n| n.checked_add(phoff))
        .ok_or("program header table overflows")?;
    bytes.clear();
    f.rewind().map_err(|e| e.to_string())?;
    f.take(table_end as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    load_segments(&bytes)
}

/// The PT_LOAD segments with a non-zero memsz of the ELF64 file `bytes`. The caller has
/// checked the ELF magic and class.
pub fn load_segments(bytes: &[u8]) -> Result<Vec<Segment>, String> {
    let at = |o: usize, n: usize| {
        o.checked_add(n)
            .and_then(|e| bytes.get(o..e))
            .ok_or("truncated program header")
    };
    let u32_at = |o| at(o, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o| at(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let (phoff, phentsize, phnum) = program_header_table(bytes)?;
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = (i * phentsize)
            .checked_add(phoff)
            .ok_or("program header offset overflows")?;
        if u32_at(ph)? != PT_LOAD {
            continue;
        }
        let (paddr, memsz) = (u64_at(ph + 0x18)?, u64_at(ph + 0x28)?);
        if memsz == 0 {
            continue;
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| format!("segment at {paddr:#x} of {memsz:#x} bytes overflows"))?;
        out.push(Segment { paddr, end });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header and one PT_LOAD program header at `paddr` of `memsz` bytes.
    pub fn elf_with_segment(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 0x38];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        f[64..68].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[64 + 0x18..64 + 0x20].copy_from_slice(&paddr.to_le_bytes());
        f[64 + 0x28..64 + 0x30].copy_from_slice(&memsz.to_le_bytes());
        f
    }

    #[test]
    fn segments_are_read_with_checked_arithmetic() {
        let seg = |paddr, end| Segment { paddr, end };
        assert_eq!(
            load_segments(&elf_with_segment(0x100_0000, 0x20_0000)),
            Ok(vec![seg(0x100_0000, 0x120_0000)])
        );
        assert!(
            load_segments(&elf_with_segment(u64::MAX, 2)).is_err(),
            "overflow"
        );
        assert!(
            load_segments(&elf_with_segment(0x100_0000, 1)[..80]).is_err(),
            "truncated"
        );
        assert_eq!(load_segments(&elf_with_segment(0x100_0000, 0)), Ok(vec![]));
        let mut far = elf_with_segment(0x100_0000, 1);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_segments(&far).is_err(), "program headers past the end");
    }

    #[test]
    fn a_file_is_read_only_up_to_its_program_headers() {
        let path = std::env::temp_dir().join(format!("elf-segments-{}", std::process::id()));
        let mut file = elf_with_segment(0x100_0000, 0x20_0000);
        // What follows the headers is never parsed: garbage there changes nothing.
        file.extend(std::iter::repeat_n(0xa5, 1 << 20));
        std::fs::write(&path, &file).unwrap();
        let segs = read_load_segments(&path);
        std::fs::write(&path, &file[..80]).unwrap();
        let truncated = read_load_segments(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            segs,
            Ok(vec![Segment {
                paddr: 0x100_0000,
                end: 0x120_0000
            }])
        );
        assert!(truncated.is_err());
    }
}
