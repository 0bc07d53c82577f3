//! The one way a test says it cannot run here: `require` checks its needs in order; the first
//! that is not met prints a loud `SKIPPED: <reason> (<test>)` line and records the skip with
//! its reason under the markers directory, where `./test.sh` counts skips by reason. A test
//! whose needs are met is recorded as ran.

use std::path::{Path, PathBuf};

/// Something a test needs from the host.
pub enum Need {
    /// /dev/kvm that this process can open.
    Kvm,
    /// Root (mounting a private tmpfs, reserving hugetlb pages): the reason it is needed.
    Root(&'static str),
    /// Anything else: whether it holds, and the reason to give when it does not.
    That(bool, String),
}

impl Need {
    /// Why the test cannot run, if this is not met.
    fn unmet(&self) -> Option<String> {
        match self {
            Need::Kvm => {
                let ok = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                (!ok).then(|| "/dev/kvm not available".to_string())
            }
            Need::Root(why) => (!is_root()).then(|| why.to_string()),
            Need::That(ok, why) => (!ok).then(|| why.clone()),
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn marker(markers: &Path, kind: &str, test: &str) -> PathBuf {
    let d = markers.join("kvm-tests").join(kind);
    std::fs::create_dir_all(&d).expect("the markers directory");
    d.join(test)
}

/// True when every need is met (the test is recorded as ran); otherwise the first unmet one
/// is announced and recorded as the reason for the skip.
pub fn require(markers: &Path, test: &str, needs: &[Need]) -> bool {
    for n in needs {
        if let Some(reason) = n.unmet() {
            println!("SKIPPED: {reason} ({test})");
            eprintln!("SKIPPED: {reason} ({test})");
            let _ = std::fs::remove_file(marker(markers, "ran", test));
            std::fs::write(marker(markers, "skipped", test), reason.as_bytes())
                .expect("a skip marker");
            return false;
        }
    }
    let _ = std::fs::remove_file(marker(markers, "skipped", test));
    std::fs::write(marker(markers, "ran", test), b"").expect("a ran marker");
    true
}
