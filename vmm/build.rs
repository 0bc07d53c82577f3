//! Builds the test guests (guest-kernels/, a separate no_std workspace for
//! x86_64-unknown-none) so that `--guest <name>` and the integration tests always find them.
//! Their directory is exported to the VMM as GUEST_KERNELS_DIR.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guests = manifest.parent().unwrap().join("guest-kernels");
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "abi",
        "rt",
        "guests",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=VMM_SKIP_GUEST_BUILD");
    let out = guests.join("target/x86_64-unknown-none/release");
    println!("cargo:rustc-env=GUEST_KERNELS_DIR={}", out.display());
    if std::env::var_os("VMM_SKIP_GUEST_BUILD").is_some() {
        return;
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--locked"]);
    // The outer build's settings are for the host target; the guests have their own.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guests");
    if !status.success() {
        panic!(
            "building the test guests in {} failed. If the error above says the target \
             x86_64-unknown-none is missing, run ./setup.sh (or: rustup target add \
             x86_64-unknown-none).",
            guests.display()
        );
    }
}
