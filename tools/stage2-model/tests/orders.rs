//! The gather's order under the model: no violation in any explored schedule; each wrong
//! order is caught, with a report that names the vCPU, the frames, the owner and the steps.
//!
//! Sizes come from the environment, for longer runs than the suite's:
//! `STAGE2_MODEL_SCHEDULES` (randomized schedules per search, default 50,000: 100,000 over the
//! random and PCT searches) and `STAGE2_MODEL_PREEMPTIONS` (bound of the exhaustive search,
//! default 3).

use guest_mm::Strategy;
use stage2_model::explore::{explore, Scenario, Search, Summary};
use stage2_model::machine::Order;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn schedules() -> usize {
    env("STAGE2_MODEL_SCHEDULES", 50_000)
}

fn run(name: &str, s: Scenario, search: Search) -> Summary {
    let t = Instant::now();
    let r = explore(s, search);
    println!(
        "{name}: {} schedules in {:.1}s, no violation; {}",
        r.executions,
        t.elapsed().as_secs_f64(),
        serde_json::to_string(&r.counters).unwrap()
    );
    r
}

/// Runs an exploration expected to fail; returns the violation report.
fn violation_of(s: Scenario, search: Search) -> String {
    let err = catch_unwind(AssertUnwindSafe(|| explore(s, search)))
        .expect_err("the checker found no violation in a wrong order");
    let v = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    println!("{v}");
    v
}

fn exhaustive(preemptions: usize) -> Search {
    Search::Exhaustive { preemptions }
}

fn random(schedules: usize, seed: u64) -> Search {
    Search::Random { schedules, seed }
}

/// The violation report of a wrong order on 20,000 random schedules.
fn violation_on_random_schedules(s: Scenario) -> String {
    violation_of(s, random(20_000, 1))
}

/// Asserts that the violation report `v` says every one of `needles`.
fn assert_says(v: &str, needles: &[&str]) {
    for n in needles {
        assert!(v.contains(n), "missing '{n}' in:\n{v}");
    }
}

/// Asserts that the violation report `v` says at least one of `needles`.
fn assert_says_one_of(v: &str, needles: &[&str]) {
    assert!(
        needles.iter().any(|n| v.contains(n)),
        "none of {needles:?} in:\n{v}"
    );
}

#[test]
fn correct_order_survives_every_schedule_of_the_small_configuration() {
    let k = env("STAGE2_MODEL_PREEMPTIONS", 3);
    let r = run(
        &format!("exhaustive (2 vCPUs, 3 frames, <= {k} preemptions)"),
        Scenario::small(Order::Correct),
        exhaustive(k),
    );
    assert!(r.executions > 100_000, "only {} schedules", r.executions);
    assert!(
        r.counters.stale_hits > 0,
        "no schedule ran an instruction on a stale TLB entry: the search missed the race window"
    );
}

#[test]
fn correct_order_survives_random_schedules_of_4_vcpus_and_1024_frames() {
    let r = run(
        "random (4 vCPUs, 1024 frames)",
        Scenario::random(Order::Correct),
        random(schedules(), 1),
    );
    assert_eq!(r.executions, schedules());
    assert!(r.counters.stale_hits > 0 && r.counters.refaults > 0 && r.counters.writebacks > 0);
    assert!(
        r.counters.bridged_zaps > 0 && r.counters.bridged_refaults > 0,
        "the random workload's batches must make spans over in-use frames: {:?}",
        r.counters
    );
}

#[test]
fn correct_order_survives_pct_schedules_of_4_vcpus_and_1024_frames() {
    let r = run(
        "pct depth 3 (4 vCPUs, 1024 frames)",
        Scenario::random(Order::Correct),
        Search::Pct {
            schedules: schedules(),
            depth: 3,
            seed: 2,
        },
    );
    assert_eq!(r.executions, schedules());
    assert!(r.counters.stale_hits > 0);
}

#[test]
fn every_strategy_of_the_unchanged_gather_keeps_the_order() {
    for strategy in [Strategy::PerPage, Strategy::PerBuffer] {
        let s = Scenario {
            strategy,
            ..Scenario::random(Order::Correct)
        };
        let r = run(
            &format!("random, {strategy}"),
            s,
            random(schedules() / 10, 3),
        );
        assert!(r.counters.flush_rounds > 0);
    }
}

#[test]
fn free_before_flush_is_caught_as_use_after_free() {
    let v = violation_of(Scenario::small(Order::FreeBeforeFlush), exhaustive(2));
    assert_says(
        &v,
        &[
            "use-after-free: vcpu0 wrote gfn 0x1 through a stale TLB entry into host frame 0x1, which now belongs to tenant #",
            "gather (free before flush): frees host frame 0x1",
        ],
    );
    let v = violation_on_random_schedules(Scenario::random(Order::FreeBeforeFlush));
    assert_says(&v, &["use-after-free: vcpu"]);
}

#[test]
fn early_rmap_drop_is_caught_as_lost_write() {
    let v = violation_of(Scenario::small(Order::EarlyRmapDrop), exhaustive(2));
    assert_says(
        &v,
        &[
            "lost write: host frame 0x1 of gfn 0x1 is freed as clean, but holds 0x10002 (written by vcpu0)",
            // The steps that led there.
            "gather: drops the rmap of gfns 0x1+2 before the flush",
            "writeback: rmap of host frame 0x1 (gfn 0x1) is empty: nothing to clean or flush",
            "vcpu0: write 0x10002 to gfn 0x1 through a stale TLB entry",
        ],
    );
    let v = violation_on_random_schedules(Scenario::random(Order::EarlyRmapDrop));
    assert_says(&v, &["lost write"]);
}

#[test]
fn zap_spans_survive_every_schedule_of_the_small_span_configuration() {
    let k = env("STAGE2_MODEL_PREEMPTIONS", 3);
    let r = run(
        &format!("exhaustive, zap span (2 vCPUs, 4 frames, <= {k} preemptions)"),
        Scenario::small_span(Order::Correct),
        exhaustive(k),
    );
    assert!(r.executions > 10_000, "only {} schedules", r.executions);
    assert!(r.counters.bridged_zaps > 0, "{:?}", r.counters);
    assert!(
        r.counters.stale_hits > 0 && r.counters.bridged_refaults > 0,
        "no schedule wrote the bridged frame through a stale TLB entry and refaulted it: {:?}",
        r.counters
    );
}

#[test]
fn releasing_a_whole_span_is_caught() {
    let v = violation_of(Scenario::small_span(Order::ReleaseWholeSpan), exhaustive(2));
    assert_says(
        &v,
        &["frees host frame 0x2 of in-use gfn 0x2, discarding its contents"],
    );
    assert_says_one_of(&v, &["use-after-free", "lost write"]);
    let v = violation_on_random_schedules(Scenario::random(Order::ReleaseWholeSpan));
    assert_says_one_of(&v, &["use-after-free", "lost write"]);
}

#[test]
fn dropping_the_rmap_of_bridged_frames_before_the_flush_is_caught_as_lost_write() {
    let v = violation_of(
        Scenario::small_span(Order::EarlyBridgedRmapDrop),
        exhaustive(2),
    );
    assert_says(
        &v,
        &[
            "lost write: host frame 0x2 of gfn 0x2 is clean",
            // The steps that led there.
            "gather: drops the rmap of bridged in-use gfn 0x2 before the flush",
            "writeback: rmap of host frame 0x2 (gfn 0x2) is empty: nothing to clean or flush",
            // Through the TLB entry it filled before the flush (not yet taken).
            "vcpu0: write 0x20002 to gfn 0x2 through",
        ],
    );
    let v = violation_on_random_schedules(Scenario::random(Order::EarlyBridgedRmapDrop));
    assert_says(&v, &["lost write"]);
}

/// On 2 MiB blocks that cannot be split (hugetlb): frames wait in their blocks, a block goes
/// whole once complete, and the order holds; a release of part of a block is a violation.
#[test]
fn correct_order_survives_random_schedules_on_2mib_blocks() {
    let r = run(
        "random, 2 MiB blocks (4 vCPUs, 1024 frames)",
        Scenario::random_blocks(Order::Correct),
        random(schedules() / 10, 4),
    );
    assert!(
        r.counters.frames_freed >= 512,
        "no block was released whole: {:?}",
        r.counters
    );
    assert!(r.counters.stale_hits > 0, "{:?}", r.counters);
}

#[test]
fn free_before_flush_is_caught_on_2mib_blocks_too() {
    let v = violation_on_random_schedules(Scenario::random_blocks(Order::FreeBeforeFlush));
    assert_says(&v, &["use-after-free"]);
}
