//! `key=value` parameters from the guest command line, with human sizes (`64M`, `1G`).

/// The value of `key` in a space-separated `key=value` command line.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Parses a size with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

pub fn get_u64(cmdline: &str, key: &str) -> Option<u64> {
    get(cmdline, key)?.parse().ok()
}

pub fn get_size(cmdline: &str, key: &str) -> Option<u64> {
    parse_size(get(cmdline, key)?)
}
