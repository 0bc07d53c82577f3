//! A minimal KVM VMM whose guest memory is reclaimed through a stage-2 gather.
//!
//! Layout of this crate: `config` (what to boot), `kvm` (opening KVM with useful errors),
//! `boot` (loading a test guest or a Linux kernel and the boot state of each vCPU), `acpi`
//! (the tables Linux guests find), `devices` (serial, exit and power ports, the virtio
//! balloon), `vcpu` (vCPU threads and exit handling), `emulation` (readable reports of
//! instructions KVM cannot emulate), `vm` (putting it together and running until the guest's
//! verdict), `guests` (finding the project's test guests), `api` (the control socket).

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod emulation;
pub mod error;
pub mod guests;
pub mod kvm;
pub mod memory;
pub mod report;
pub mod signals;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use error::VmmError;
pub use vm::{Outcome, RunReport, Vm};
