//! A minimal KVM VMM whose guest memory is reclaimed through a stage-2 gather.
//!
//! Layout of this crate: `config` (what to boot), `kvm` (opening KVM with useful errors),
//! `boot` (loading the guest ELF and the boot state of each vCPU), `devices` (port I/O: serial
//! and the exit port), `vcpu` (vCPU threads and exit handling), `vm` (putting it together and
//! running until the guest's verdict), `guests` (finding the project's test guests).

pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod error;
pub mod guest_output;
pub mod guests;
pub mod kvm;
pub mod memory;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod signals;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use error::VmmError;
pub use vm::{Outcome, RunReport, Vm};
