//! The project's test guests' console: the lines tools read back (balloon-stress,
//! peer-compare, the tests), parsed in one place, and the command line a guest needs on a VMM
//! that starts only the boot vCPU. The guest side of each format is in guest-kernels (the
//! `balloon` guest, the runtime's `start_aps`).

use serde::{Deserialize, Serialize};

/// A test guest's command line on a VMM that starts only the boot vCPU at the PVH entry
/// (QEMU, Firecracker) with `vcpus` vCPUs: `cpus=N` tells the guest's runtime to bring up the
/// other N - 1 itself with INIT/SIPI, as Linux does. Without it the other vCPUs never run.
pub fn guest_cmdline(cmdline: &str, vcpus: u32) -> String {
    if vcpus > 1 {
        format!("{cmdline} cpus={vcpus}").trim().to_string()
    } else {
        cmdline.to_string()
    }
}

/// The verifier vCPUs' final lines, "cpu C verified its N pages R times, E errors", summed:
/// (page checks N×R, errors E).
pub fn verifier_totals(log: &str) -> (u64, u64) {
    log.lines()
        .filter_map(|l| l.split("verified its ").nth(1))
        .fold((0, 0), |(checks, errors), rest| {
            let w: Vec<&str> = rest.trim_end().split(' ').collect();
            let num = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok());
            let line_checks = num(0).zip(num(2)).map_or(0, |(pages, times)| pages * times);
            let line_errors = rest
                .trim_end()
                .strip_suffix(" errors")
                .and_then(|r| r.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0);
            (checks + line_checks, errors + line_errors)
        })
}

/// The verifiers' memory throughput around one inflate, in pages per million TSC ticks, from
/// the guest's two lines: "balloon: throughput inflate to N pages: before B during D
/// pages/Mtick; ..." when the target is reached, and "balloon: throughput after inflate to N
/// pages: after A pages/Mtick; ..." once the next target is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throughput {
    pub target_pages: u64,
    pub before: u64,
    pub during: u64,
    /// None until the phase after the inflate has ended.
    pub after: Option<u64>,
}

impl Throughput {
    /// The rate kept during the inflate, as a fraction of the rate before (None without one).
    pub fn retained_during(&self) -> Option<f64> {
        (self.before > 0).then(|| self.during as f64 / self.before as f64)
    }
}

/// The numbers after each `key` in `words`.
fn value_after(words: &[&str], key: &str) -> Option<u64> {
    let i = words.iter().position(|x| *x == key)?;
    words.get(i + 1)?.parse().ok()
}

/// Every inflate's throughput in `log`, in order.
pub fn throughputs(log: &str) -> Vec<Throughput> {
    let mut out: Vec<Throughput> = Vec::new();
    for l in log.lines() {
        if let Some(rest) = l.split("balloon: throughput inflate to ").nth(1) {
            let w: Vec<&str> = rest.split_whitespace().collect();
            let parsed = (|| {
                Some(Throughput {
                    target_pages: w.first()?.parse().ok()?,
                    before: value_after(&w, "before")?,
                    during: value_after(&w, "during")?,
                    after: None,
                })
            })();
            out.extend(parsed);
        } else if let Some(rest) = l.split("balloon: throughput after inflate to ").nth(1) {
            let w: Vec<&str> = rest.split_whitespace().collect();
            let target = w.first().and_then(|t| t.parse::<u64>().ok());
            if let Some(t) = out
                .iter_mut()
                .rev()
                .find(|t| Some(t.target_pages) == target && t.after.is_none())
            {
                t.after = value_after(&w, "after");
            }
        }
    }
    out
}

/// The latest value of `key` (e.g. `balloon_inflate`, `virtio_irqs`) in the Linux test
/// inits' `vmm-init:` round lines ("vmm-init: round N ... balloon_inflate:PAGES ..."), if any
/// line has it (guest-kernels/linux/init and vmm-guest.c print them).
pub fn vmm_init_value(log: &str, key: &str) -> Option<u64> {
    let key = format!("{key}:");
    log.lines()
        .rev()
        .filter(|l| l.contains("vmm-init: "))
        .find_map(|l| {
            l.split(&key)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_lines_give_page_checks_and_errors() {
        let log = "balloon: reached 8192 pages (32 MiB), free frames 1\n\
                   balloon: cpu 1 verified its 8192 pages 2510 times, 0 errors\n\
                   balloon: cpu 2 verified its 100 pages 3 times, 7 errors\n";
        assert_eq!(verifier_totals(log), (8192 * 2510 + 300, 7));
        assert_eq!(verifier_totals(""), (0, 0));
    }

    #[test]
    fn vmm_init_values_are_the_latest_round_s() {
        let log = "vmm-init: round 1 MemTotal:100 balloon_inflate:0 virtio_irqs:3\r\n\
                   [ 1.0] something else balloon_inflate:7\n\
                   vmm-init: round 2 MemTotal:100 balloon_inflate:256 virtio_irqs:9\r\n";
        assert_eq!(vmm_init_value(log, "balloon_inflate"), Some(256));
        assert_eq!(vmm_init_value(log, "virtio_irqs"), Some(9));
        assert_eq!(vmm_init_value(log, "balloon_deflate"), None);
    }

    #[test]
    fn throughput_lines_parse() {
        let log = "balloon: throughput inflate to 98304 pages: before 400 during 200 pages/Mtick; retained during 50%\nother\n\
                   balloon: throughput after inflate to 98304 pages: after 389 pages/Mtick; retained after 97%\n";
        let t = throughputs(log);
        assert_eq!(
            t,
            vec![Throughput {
                target_pages: 98304,
                before: 400,
                during: 200,
                after: Some(389)
            }]
        );
        assert_eq!(t[0].retained_during(), Some(0.5));
        assert!(throughputs("balloon: throughput inflate to x").is_empty());
    }
}
