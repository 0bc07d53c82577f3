//! Reclaim: guest frames given up by the guest go back to the host through the stage-2
//! gather, in the order that keeps guests isolated and writes from being lost.
//!
//! | module | owns |
//! |---|---|
//! | `gather` | `Stage2Gather`: the pieces below put together, the protocol on a worker thread or inline |
//! | `batcher` | step 1: frames checked and recorded, the pending batch, giving frames back |
//! | `plan` | a batch's frames → ranges (`coalesce`) → zap spans (`span`) |
//! | `granularity` | 4 KiB pages or 2 MiB blocks (`blocks`), chosen once from the backend |
//! | `protocol` | steps 2-4: zap → invalidate → release, the only caller of each |
//! | `metrics` | batch reports, totals, histograms, KVM counters around batches |
//! | `config` | `ReclaimConfig`: the one configuration and its validation |
//! | `events` | the ordered record of phases that tests check |
//!
//! The path of one ballooned frame: `Stage2Gather::add_buffer` → `Batcher::accept` (the
//! stage-2 map marks it Gathered; the device acknowledges the buffer) → the batch closes
//! (full, or its window passed) → `Batcher::take` (Batched, planned into spans) →
//! `protocol::run` on the worker: `Batch::zap` (Zapped; KVM flushes every vCPU) →
//! `ZappedBatch::invalidate` (grace period) → `InvalidatedBatch::release` (Released; the
//! host page is freed) → `Metrics::record`.

pub mod batcher;
pub mod blocks;
pub mod coalesce;
pub mod config;
pub mod events;
pub mod gather;
pub mod granularity;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod span;

pub use batcher::{BufferOutcome, ReclaimOutcome, ReturnOutcome};
pub use config::{ConfigError, PartialBlocks, ReclaimConfig, Strategy};
pub use events::{Event, EventLog, Phase};
pub use gather::Stage2Gather;
pub use metrics::{
    BatchReport, CounterSnapshot, Histogram, KvmCounters, ReclaimStats, VcpuCounters,
};
pub use span::ZapSpan;

#[cfg(test)]
mod tests;
