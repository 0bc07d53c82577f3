//! Guest memory for the VMM: the guest-physical layout, memfd-backed RAM, the stage-2 map
//! (per-frame reclaim state and reverse-map bits), grace periods over the VMM's own
//! references, and the Stage2Gather that reclaims memory in the order
//! gather → zap → invalidate → release, through a small backend trait.
//!
//! This crate knows nothing about virtio or devices; the VMM hands it guest frame numbers.

pub mod backend;
pub mod backing;
pub mod blocks;
pub mod coalesce;
pub mod fault_around;
pub mod gather;
pub mod gfn;
pub mod grace;
pub mod kvm_stats;
pub mod layout;
pub mod ram;
pub mod span;
pub mod stage2_map;
pub mod stats;

pub use backend::{BackendError, Granule, KvmMemfd, OwnershipChecked, Stage2Backend};
pub use backing::MemoryBackend;
pub use gather::{BatchReport, GatherConfig, Stage2Gather, Strategy};
pub use gfn::{FrameError, Gfn, GfnRange};
pub use grace::{Reader, Readers};
pub use layout::{Layout, LayoutError, RamRange, PAGE_SIZE};
pub use ram::{GuestRam, RamError};
pub use span::ZapSpan;
pub use stage2_map::{FrameState, Owner, Stage2Map};
pub use stats::{GatherStats, Histogram};
