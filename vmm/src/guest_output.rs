//! The lines the project's test guests print on their console that tools read back
//! (balloon-stress, peer-compare, the tests): their shapes, parsed in one place. The guest
//! side of each format is in guest-kernels/guests (the `balloon` guest).

use serde::Serialize;

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

/// The verifiers' memory throughput around one inflate, in pages per million TSC ticks:
/// "balloon: throughput inflate to N pages: before B during D after A pages/Mtick; ...".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Throughput {
    pub target_pages: u64,
    pub before: u64,
    pub during: u64,
    pub after: u64,
}

impl Throughput {
    /// The rate kept during the inflate, as a fraction of the rate before (None without one).
    pub fn retained_during(&self) -> Option<f64> {
        (self.before > 0).then(|| self.during as f64 / self.before as f64)
    }
}

/// Every throughput line in `log`, in order.
pub fn throughputs(log: &str) -> Vec<Throughput> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("balloon: throughput inflate to ").nth(1)?;
            let w: Vec<&str> = rest.split_whitespace().collect();
            let after = |key: &str| -> Option<u64> {
                let i = w.iter().position(|x| *x == key)?;
                w.get(i + 1)?.parse().ok()
            };
            Some(Throughput {
                target_pages: w.first()?.parse().ok()?,
                before: after("before")?,
                during: after("during")?,
                after: after("after")?,
            })
        })
        .collect()
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
    fn throughput_lines_parse() {
        let log = "balloon: throughput inflate to 98304 pages: before 400 during 200 after 389 pages/Mtick; retained during 50% after 97%\nother\n";
        let t = throughputs(log);
        assert_eq!(
            t,
            vec![Throughput {
                target_pages: 98304,
                before: 400,
                during: 200,
                after: 389
            }]
        );
        assert_eq!(t[0].retained_during(), Some(0.5));
        assert!(throughputs("balloon: throughput inflate to x").is_empty());
    }
}
