//! Guest memory for the VMM: the guest-physical layout, memfd-backed RAM regions, and (in
//! later modules) the stage-2 map, the reverse map and the Stage2Gather that reclaims memory
//! in the order zap → invalidate → release.
//!
//! This crate knows nothing about virtio or devices; the VMM hands it guest frame numbers.

pub mod layout;
pub mod ram;

pub use layout::{Layout, LayoutError, RamRange, PAGE_SIZE};
pub use ram::{GuestRam, RamError};
