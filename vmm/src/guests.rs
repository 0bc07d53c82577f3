//! Finds guest images: a path, or the name of one of the project's test guests
//! (built by vmm/build.rs into guest-kernels/target/x86_64-unknown-none/release).

use crate::error::VmmError;
use std::path::{Path, PathBuf};

/// Where the test guests are: $VMM_GUEST_DIR if set, else the build's output directory.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("GUEST_KERNELS_DIR")))
}

/// The project's test guests that exist in `guest_dir()`.
pub fn available() -> Vec<String> {
    const NAMES: &[&str] = &["memtouch", "balloon", "reclaimcheck", "faulty", "hostile"];
    NAMES
        .iter()
        .filter(|n| guest_dir().join(n).is_file())
        .map(|n| n.to_string())
        .collect()
}

/// Resolves `--guest`: an existing file path wins, then a test guest name.
pub fn resolve(name: &str) -> Result<PathBuf, VmmError> {
    let as_path = Path::new(name);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let built = guest_dir().join(name);
    if !name.contains('/') && built.is_file() {
        return Ok(built);
    }
    let available = available();
    Err(VmmError::GuestNotFound {
        name: name.to_string(),
        available: if available.is_empty() {
            "none built".into()
        } else {
            available.join(", ")
        },
    })
}
