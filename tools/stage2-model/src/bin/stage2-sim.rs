//! stage2-sim: explore the gather's order on the software stage-2, or simulate reclaim at
//! scale. See docs/ARCHITECTURE.md ("The software stage-2 model") and docs/BENCHMARKS.md.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use guest_mm::Strategy;
use stage2_model::explore::{explore, Scenario, Search};
use stage2_model::machine::Order;
use stage2_model::scale::{self, CostModel, Pattern};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    version,
    about = "Software stage-2 model: order checking and reclaim simulation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Config {
    /// 2 vCPUs, 3 frames, a fixed workload (for the exhaustive search).
    Small,
    /// 2 vCPUs, 4 frames, one zap span bridging an in-use frame the vCPUs write and read
    /// (for the exhaustive search).
    SmallSpan,
    /// 4 vCPUs (or --vcpus), 1024 frames, random inflate/deflate/writes/writeback.
    Random,
}

#[derive(Clone, Copy, ValueEnum)]
enum SearchKind {
    /// Every schedule with at most --preemptions preemptions (small config only).
    Exhaustive,
    /// Uniformly random schedules.
    Random,
    /// Probabilistic concurrency testing, depth --depth.
    Pct,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the unchanged Stage2Gather on the model under shuttle and check every schedule.
    /// Exits 1 with the violation (vCPU, frames, owner, interleaving, replayable schedule)
    /// if one is found.
    Explore {
        #[arg(long, value_enum, default_value = "random")]
        config: Config,
        #[arg(long, value_enum, default_value = "random")]
        search: SearchKind,
        /// correct, free-before-flush, early-rmap-drop, release-whole-span or
        /// early-bridged-rmap-drop (all but the first are wrong on purpose).
        #[arg(long, default_value = "correct")]
        order: Order,
        /// per-page, per-buffer or gather.
        #[arg(long, default_value = "gather")]
        strategy: Strategy,
        /// Schedules for the random and PCT searches.
        #[arg(long, default_value_t = 100_000)]
        schedules: usize,
        /// Preemption bound of the exhaustive search.
        #[arg(long, default_value_t = 3)]
        preemptions: usize,
        /// PCT depth.
        #[arg(long, default_value_t = 3)]
        depth: usize,
        /// vCPUs of the random configuration (2 to 8).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(2..=8))]
        vcpus: u8,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Simulate a balloon taking a quarter of the guest's memory through the unchanged
    /// gather, for every vCPU count, memory size and strategy; print a markdown table of
    /// invalidations, IPIs and modeled time per GiB (cost constants measured on KVM).
    Scale {
        /// vCPU counts.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
        vcpus: Vec<u64>,
        /// Guest memory sizes in GiB.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
        memory_gib: Vec<u64>,
        /// Fraction of the vCPUs in guest mode during the reclaim (they get IPIs).
        #[arg(long, default_value_t = 1.0)]
        busy: f64,
        /// Fraction of the in-use frames a zap span bridges that the guest touches again
        /// (each refaults; 1 = the working set is interleaved with what it balloons).
        #[arg(long, default_value_t = 1.0)]
        touched: f64,
        /// The zap span bound of the "zap spans" plan.
        #[arg(long, default_value_t = guest_mm::reclaim::config::DEFAULT_ZAP_SPAN_GAP)]
        zap_span_gap: u64,
        /// contiguous or scattered free memory.
        #[arg(long, value_enum, default_value = "scattered")]
        pattern: PatternArg,
        /// Also write every row as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PatternArg {
    Contiguous,
    Scattered,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Explore {
            config,
            search,
            order,
            strategy,
            schedules,
            preemptions,
            depth,
            vcpus,
            seed,
        } => {
            let mut s = match config {
                Config::Small => Scenario::small(order),
                Config::SmallSpan => Scenario::small_span(order),
                Config::Random => Scenario::random(order),
            };
            s.strategy = strategy;
            if matches!(config, Config::Random) {
                s.vcpus = vcpus.into();
            }
            let search = match search {
                SearchKind::Exhaustive => {
                    anyhow::ensure!(
                        matches!(config, Config::Small | Config::SmallSpan),
                        "the exhaustive search needs --config small or small-span (fixed workloads)"
                    );
                    Search::Exhaustive { preemptions }
                }
                SearchKind::Random => Search::Random { schedules, seed },
                SearchKind::Pct => Search::Pct {
                    schedules,
                    depth,
                    seed,
                },
            };
            let t = Instant::now();
            let r = std::panic::catch_unwind(|| explore(s, search));
            match r {
                Ok(r) => {
                    println!(
                        "{} schedules in {:.1}s: no violation",
                        r.executions,
                        t.elapsed().as_secs_f64()
                    );
                    println!("scenario: {}", serde_json::to_string(&s)?);
                    println!("counters: {}", serde_json::to_string(&r.counters)?);
                    Ok(())
                }
                Err(_) => {
                    // The report and the schedule were printed by the panic hook and shuttle.
                    std::process::exit(1);
                }
            }
        }
        Cmd::Scale {
            vcpus,
            memory_gib,
            busy,
            touched,
            zap_span_gap,
            pattern,
            json,
        } => {
            anyhow::ensure!((0.0..=1.0).contains(&busy), "--busy must be within 0..=1");
            anyhow::ensure!(
                (0.0..=1.0).contains(&touched),
                "--touched must be within 0..=1"
            );
            anyhow::ensure!(
                zap_span_gap > 0,
                "--zap-span-gap must be at least 1 (0 is the by-range plan, always shown)"
            );
            anyhow::ensure!(
                memory_gib.iter().all(|&m| (1..=65536).contains(&m)),
                "--memory-gib must be 1 to 65536"
            );
            let pattern = match pattern {
                PatternArg::Contiguous => Pattern::Contiguous,
                PatternArg::Scattered => Pattern::Scattered,
            };
            let cost = CostModel::MEASURED_PVM;
            // The plans compared: the peers' two, the gather by range, the gather with spans.
            let plans = [
                (Strategy::PerPage, 0),
                (Strategy::PerBuffer, 0),
                (Strategy::Gather, 0),
                (Strategy::Gather, zap_span_gap),
            ];
            let mut rows = Vec::new();
            println!(
                "pattern {pattern:?}, {busy} of the vCPUs in guest mode, {touched} of bridged frames refault, cost model {}",
                serde_json::to_string(&cost)?
            );
            println!();
            println!("| vCPUs | memory | reclaimed | invalidations per GiB (per-page / per-buffer / by range / spans) | IPIs per GiB (same order) | modeled ms per GiB (same order) | of which refaults, spans | modeled total s, spans |");
            println!("|---:|---:|---:|---|---|---|---:|---:|");
            for &m in &memory_gib {
                let t = Instant::now();
                let gathered: Vec<_> = plans
                    .iter()
                    .map(|&(s, gap)| scale::gather(m << 30, s, gap, pattern))
                    .collect();
                eprintln!(
                    "memory {m} GiB gathered in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
                for &v in &vcpus {
                    let r: Vec<_> = gathered
                        .iter()
                        .map(|&g| scale::row(g, v, busy, touched, &cost))
                        .collect();
                    let col = |f: &dyn Fn(&scale::Row) -> f64| {
                        r.iter()
                            .map(|x| human(f(x)))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    };
                    println!(
                        "| {v} | {m} GiB | {:.0} GiB | {} | {} | {} | {} | {:.2} |",
                        r[3].reclaimed_gib,
                        col(&|x| x.invalidations_per_gib),
                        col(&|x| x.ipis_per_gib),
                        col(&|x| x.modeled_ms_per_gib),
                        human(r[3].refault_ms_per_gib),
                        r[3].modeled_seconds,
                    );
                    rows.extend(r);
                }
            }
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&rows)?)?;
                eprintln!("rows: {}", p.display());
            }
            Ok(())
        }
    }
}

/// 3 significant digits, with k/M/G for large counts.
fn human(x: f64) -> String {
    let (v, unit) = match x {
        x if x >= 1e9 => (x / 1e9, "G"),
        x if x >= 1e6 => (x / 1e6, "M"),
        x if x >= 1e4 => (x / 1e3, "k"),
        x => (x, ""),
    };
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v >= 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.2}{unit}")
    }
}
