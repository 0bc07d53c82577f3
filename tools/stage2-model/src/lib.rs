//! A software stage-2 for the Stage2Gather: what KVM hides, made observable.
//!
//! - [`ept`]: an EPT-format 4-level table with accessed/dirty bits and 4 KiB and 2 MiB leaves;
//! - [`tlb`]: per-vCPU set-associative TLBs that cache the dirty bit;
//! - [`host`]: host frames with owners and an allocator that reuses a freed frame at once;
//! - [`machine`]: the memslot, reverse map, backing store, IPIs with acknowledgements, the
//!   writeback (folio_mkclean) step, and the checker;
//! - [`backend`]: the model behind guest-mm's `Stage2Backend`, so the unchanged gather runs on
//!   it, plus the vCPU and writeback threads;
//! - [`explore`]: scenarios and their exhaustive or randomized exploration under shuttle;
//! - [`scale`]: a deterministic simulation of reclaim on thousands of vCPUs and TiB guests.

pub mod backend;
pub mod bounded;
pub mod ept;
pub mod explore;
pub mod host;
pub mod machine;
pub mod scale;
pub mod tlb;
