//! What the integration tests share beyond `vmm-harness` (which starts, watches and reads
//! every VM): the `vmm` binary under test, the one skip idiom bound to this package's
//! markers directory, and the host set-ups several test files need.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;
#[allow(unused_imports)]
pub use vmm_harness::{Finished, Need, RunningVm, VmmRun};

/// The `vmm` binary under test.
pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// How long a test's VM may run unless the test says otherwise.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// `vmm run --guest NAME` of the binary under test.
pub fn vmm_guest(name: &str) -> VmmRun {
    VmmRun::guest(Path::new(VMM), name)
}

/// `vmm run --kernel KERNEL [--initrd INITRD]` of the binary under test.
pub fn vmm_kernel(kernel: &Path, initrd: Option<&Path>) -> VmmRun {
    VmmRun::kernel(Path::new(VMM), kernel, initrd)
}

/// `vmm run` with nothing to boot (for `--help`, and what the VMM refuses).
pub fn vmm_nothing() -> VmmRun {
    VmmRun::nothing(Path::new(VMM))
}

/// A path in this package's scratch directory (sockets, reports, files a test writes).
pub fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The one skip idiom: `require!(test, Need::Kvm, ...)` returns from the test, after a loud
/// `SKIPPED: reason (test)`, when a need is not met; the markers under
/// `CARGO_TARGET_TMPDIR/kvm-tests/{ran,skipped}` are what ./test.sh counts. A later
/// `require!` in the same test that fails turns its "ran" into "skipped".
#[macro_export]
macro_rules! require {
    ($test:expr $(, $need:expr)* $(,)?) => {
        if !::vmm_harness::require(
            ::std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            $test,
            &[$($need),*],
        ) {
            return;
        }
    };
}

/// Path of a built test guest (for what takes a path rather than a name: QEMU, an
/// in-process `Vm`, a VMM run as another user).
pub fn guest(name: &str) -> PathBuf {
    let p = vmm::guests::guest_dir().join(name);
    assert!(
        p.is_file(),
        "test guest {} was not built at {}",
        name,
        p.display()
    );
    p
}

/// A tmpfs mounted for one test in a scratch directory, unmounted when dropped.
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs with `options` (e.g. "huge=always,size=600m") at a fresh directory.
    pub fn new(name: &str, options: &str) -> Result<Self, String> {
        let dir = scratch(&format!("tmpfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, target, fstype, opts) =
            (c("tmpfs"), c(dir.to_str().unwrap()), c("tmpfs"), c(options));
        // SAFETY: valid C strings; mounting a fresh tmpfs on our own scratch directory.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mount -t tmpfs -o {options}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self { dir })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: unmounting the tmpfs this guard mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
    }
}

const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// 2 MiB hugetlb pages reserved for one test on top of what the host had, given back when
/// dropped.
pub struct HugetlbPages {
    before: u64,
}

impl HugetlbPages {
    pub fn reserve(pages: u64) -> Result<Self, String> {
        let read = |f: &str| -> u64 {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let before = read(NR_HUGEPAGES);
        std::fs::write(NR_HUGEPAGES, (before + pages).to_string())
            .map_err(|e| format!("write {NR_HUGEPAGES}: {e}"))?;
        let guard = Self { before };
        let free = read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
        if free < pages {
            return Err(format!(
                "the host found only {free} of {pages} free 2 MiB pages"
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugetlbPages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// Held by every VM-running test of a binary with a test that counts KVM's flushes while its
/// VM runs, so that no other VM of the same test binary runs beside that one: on a 2-core
/// host a second VM's vCPUs make KVM reschedule in the middle of long zaps, and it flushes
/// before each break (seen: 31 flush requests for one 54 MiB zap). Counts then follow the
/// VMM's calls, not the neighbours' load.
pub fn counting_kvm_flushes() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The QEMU binary, after QEMU has booted a tiny guest here once (per test binary). QEMU is
/// installed by ./setup.sh, so a QEMU that is missing or cannot start fails the test with
/// QEMU's own message and what to do; it is not a skip.
pub fn qemu_that_starts() -> PathBuf {
    static CHECK: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    CHECK
        .get_or_init(|| {
            let qemu = std::env::var_os("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join("qemu-system-x86_64"))
                        .find(|p| p.is_file())
                })
                .ok_or("qemu-system-x86_64 is not installed: run ./setup.sh (it installs Debian's qemu-system-x86)")?;
            vmm_harness::qemu::check_starts(&qemu, &guest("memtouch"))
                .map_err(|e| e.to_string())?;
            Ok(qemu)
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The stock Debian kernel and its test initramfs, fetched and built by ./setup.sh
/// (guest-kernels/linux/build.sh) into a cache that `target/linux-guest` links to.
/// VMM_LINUX_DIR points elsewhere (a directory with vmlinux, vmlinuz, initramfs.cpio).
pub fn linux_guest() -> PathBuf {
    let dir = std::env::var_os("VMM_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest"));
    for f in ["vmlinux", "vmlinuz", "initramfs.cpio"] {
        assert!(
            dir.join(f).is_file(),
            "no {f} in {}: run ./setup.sh (it runs guest-kernels/linux/build.sh, which fetches \
             Debian's kernel with apt-get download and builds the initramfs)",
            dir.display()
        );
    }
    dir
}

/// The test kernel (Linux 6.1 built for this host from Debian's linux-source-6.1) and its
/// initramfs, built by ./setup.sh (guest-kernels/linux/build-test-kernel.sh) into a cache that
/// `target/linux-test-kernel` links to: (vmlinux, initramfs.cpio).
pub fn linux_test_kernel() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux-test-kernel");
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    for f in [&kernel, &initrd] {
        assert!(
            f.is_file(),
            "no {}: run ./setup.sh (it runs guest-kernels/linux/build-test-kernel.sh, which builds \
             the test kernel from Debian's linux-source-6.1)",
            f.display()
        );
    }
    (kernel, initrd)
}
