//! stage2-sim: explore the gather's order on the software stage-2, or simulate reclaim at
//! scale. See docs/ARCHITECTURE.md ("The software stage-2 model") and docs/BENCHMARKS.md.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use guest_mm::Strategy;
use stage2_model::explore::{explore, Scenario, Search};
use stage2_model::machine::Order;
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
        /// correct, free-before-flush or early-rmap-drop (the last two are wrong on purpose).
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
                Config::Random => Scenario::random(order),
            };
            s.strategy = strategy;
            if matches!(config, Config::Random) {
                s.vcpus = vcpus.into();
            }
            let search = match search {
                SearchKind::Exhaustive => {
                    anyhow::ensure!(
                        matches!(config, Config::Small),
                        "the exhaustive search needs --config small (fixed workload)"
                    );
                    Search::Exhaustive {
                        preemptions: Some(preemptions),
                        limit: None,
                    }
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
    }
}
