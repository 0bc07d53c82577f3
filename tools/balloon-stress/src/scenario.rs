//! Balloon target sequences. Every sequence starts above zero, never repeats a target twice
//! in a row (the guest counts distinct targets reached), and ends at zero.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// max, 0, max, 0, ...
    Step,
    /// max/4, max/2, 3max/4, max, 0 per cycle
    Sawtooth,
    /// a random target (multiple of 16 MiB) per cycle
    RandomWalk,
    /// each cycle picks step, sawtooth or random-walk at random
    Mixed,
}

const GRAIN: u64 = 16 << 20;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn push(out: &mut Vec<u64>, t: u64) {
    if out.last() != Some(&t) && !(out.is_empty() && t == 0) {
        out.push(t);
    }
}

pub fn targets(pattern: Pattern, cycles: u32, max: u64, seed: u64) -> Vec<u64> {
    let max = (max / GRAIN).max(1) * GRAIN;
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for _ in 0..cycles {
        let p = match pattern {
            Pattern::Mixed => {
                [Pattern::Step, Pattern::Sawtooth, Pattern::RandomWalk][(rng.next() % 3) as usize]
            }
            p => p,
        };
        match p {
            Pattern::Step => {
                push(&mut out, max);
                push(&mut out, 0);
            }
            Pattern::Sawtooth => {
                for q in 1..=4 {
                    push(&mut out, max / 4 * q / GRAIN * GRAIN);
                }
                push(&mut out, 0);
            }
            _ => loop {
                let t = (rng.next() % (max / GRAIN + 1)) * GRAIN;
                if out.last() != Some(&t) && !(out.is_empty() && t == 0) {
                    out.push(t);
                    break;
                }
            },
        }
    }
    push(&mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_start_above_zero_never_repeat_and_end_at_zero() {
        for p in [
            Pattern::Step,
            Pattern::Sawtooth,
            Pattern::RandomWalk,
            Pattern::Mixed,
        ] {
            for seed in 1..50 {
                let t = targets(p, 7, 768 << 20, seed);
                assert!(t[0] > 0, "{p:?}");
                assert_eq!(*t.last().unwrap(), 0);
                assert!(t.windows(2).all(|w| w[0] != w[1]), "{p:?} {t:?}");
                assert!(t.iter().all(|&x| x <= 768 << 20 && x % GRAIN == 0));
            }
        }
        assert_eq!(
            targets(Pattern::Step, 2, 512 << 20, 1),
            vec![512 << 20, 0, 512 << 20, 0]
        );
    }
}
