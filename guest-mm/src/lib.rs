//! Guest memory for the VMM: the guest-physical layout, the RAM and what backs it, the
//! stage-2 map (per-frame ownership and reverse-map bits), grace periods over the VMM's own
//! references, and reclaim through the stage-2 gather (gather → zap → invalidate → release)
//! over a small backend trait.
//!
//! This crate knows nothing about virtio or devices; the VMM hands it guest frame numbers.

pub mod backend;
pub mod backing;
pub mod fault_around;
pub mod gfn;
pub mod grace;
pub mod kvm_stats;
pub mod layout;
pub mod ram;
pub mod reclaim;
pub mod stage2_map;

pub use backend::{BackendError, Capabilities, Granule, KvmMemfd, OwnershipChecked, Stage2Backend};
pub use backing::Backing;
pub use gfn::{FrameError, Gfn, GfnRange};
pub use grace::{Reader, Readers};
pub use layout::{Layout, LayoutError, RamRange, PAGE_SIZE};
pub use ram::{GuestRam, RamError};
pub use reclaim::{
    BatchReport, Histogram, ReclaimConfig, ReclaimStats, Stage2Gather, Strategy, ZapSpan,
};
pub use stage2_map::{FrameState, Owner, Stage2Map};
