//! Opening KVM, with errors that say what the user can do about them.

use crate::error::VmmError;
use kvm_ioctls::Kvm;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn open(path: &Path) -> Result<Kvm, VmmError> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmmError::KvmMissing(path.to_path_buf()))?;
    Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmmError::KvmMissing(path.to_path_buf()),
        libc::EACCES | libc::EPERM => VmmError::KvmPermission(path.to_path_buf()),
        _ => VmmError::KvmOpen {
            path: path.to_path_buf(),
            err: std::io::Error::from_raw_os_error(e.errno()),
        },
    })
}

/// The most vCPUs this host's KVM allows in one VM.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

/// Wraps a kvm-ioctls error with the name of the call that failed.
pub fn err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |err| VmmError::Kvm { op, err }
}
