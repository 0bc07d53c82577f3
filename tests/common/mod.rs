//! Helpers shared by the integration tests: running the `vmm` binary with a timeout, KVM
//! availability (with the loud SKIPPED line and the markers .ci/run counts), QEMU that starts.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Where KVM tests record that they ran or skipped (counted by .ci/run).
fn marker_dir(kind: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("kvm-tests")
        .join(kind);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mark(kind: &str, test: &str) {
    std::fs::write(marker_dir(kind).join(test), b"").unwrap();
}

/// Says loudly that `test` cannot run on this host and why, and records the skip with its
/// reason (test.sh's summary counts skips by reason). A test that ran past `kvm_or_skip`
/// and then skips for another reason is counted as skipped, not as run.
pub fn skip(test: &str, reason: &str) {
    println!("SKIPPED: {reason} ({test})");
    eprintln!("SKIPPED: {reason} ({test})");
    let _ = std::fs::remove_file(marker_dir("ran").join(test));
    std::fs::write(marker_dir("skipped").join(test), reason.as_bytes()).unwrap();
}

/// True if /dev/kvm can be opened. Otherwise prints the SKIPPED line and records the skip.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if ok {
        mark("ran", test);
    } else {
        skip(test, "/dev/kvm not available");
    }
    ok
}

/// True if /dev/kvm can be opened and this process is root; otherwise the test is recorded
/// as skipped, with `why` root is needed when it is KVM that is there.
pub fn kvm_as_root_or_skip(test: &str, why: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if !is_root() {
        skip(test, why);
        return false;
    }
    true
}

/// Whether this process runs as root (mounting a private tmpfs, reserving hugetlb pages).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted for one test in a scratch directory, unmounted when dropped.
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs with `options` (e.g. "huge=always,size=600m") at a fresh directory.
    pub fn new(name: &str, options: &str) -> Result<Self, String> {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tmpfs-{name}-{}", std::process::id()));
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
/// VM runs, so that no other VM of the same test binary runs beside that one: on a 2-core host a second VM's vCPUs make KVM reschedule
/// in the middle of long zaps, and it flushes before each break (seen: 31 flush requests for
/// one 54 MiB zap). Counts then follow the VMM's calls, not the neighbours' load.
pub fn counting_kvm_flushes() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Returns early from a test when KVM is missing, after saying so loudly.
#[macro_export]
macro_rules! require_kvm {
    ($name:expr) => {
        if !common::kvm_or_skip($name) {
            return;
        }
    };
}

/// Output of a process, with stdout and stderr as text.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts that stdout holds every one of `needles`, showing all output if not.
    pub fn assert_stdout_has(&self, needles: &[&str]) {
        for n in needles {
            assert!(
                self.stdout.contains(n),
                "no '{n}' in stdout\n{}",
                self.all()
            );
        }
    }

    pub fn all(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs a command, killing it after `timeout`. Panics with its output if it times out.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let run = Run {
                status: None,
                stdout: t_out.join().unwrap(),
                stderr: t_err.join().unwrap(),
            };
            panic!("{cmd:?} timed out after {timeout:?}\n{}", run.all());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Runs `vmm` with `args` (2 minute limit).
pub fn vmm(args: &[&str]) -> Run {
    let mut cmd = Command::new(VMM);
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(120))
}

/// Path of a built test guest.
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
            vmm::qemu::check_starts(&qemu, &guest("memtouch")).map_err(|e| e.to_string())?;
            Ok(qemu)
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn to_output(o: Output) -> Run {
    Run {
        status: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// QEMU's microvm with the project's conventions (`vmm::qemu::microvm_args`) and `vcpus`
/// vCPUs; `extra` arguments go before `-kernel`.
pub fn qemu_microvm(
    qemu: &Path,
    memory: &str,
    vcpus: u32,
    extra: &[&str],
    guest: &str,
    append: &str,
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(vmm::qemu::microvm_args(memory, vcpus))
        .args(extra)
        .args(["-kernel", guest_path_str(guest).as_str()])
        .args(["-append", &vmm::qemu::guest_cmdline(append, vcpus)]);
    cmd
}

fn guest_path_str(name: &str) -> String {
    guest(name).to_str().unwrap().to_string()
}

/// A JSON file the VMM or a tool wrote (`--report-json`, `--json`).
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A `vmm run` whose console (stdout) is read line by line as it comes, so that a test can
/// stop the VM once it has seen what it checks.
pub struct Watched {
    /// Console lines with the seconds since start at which each arrived.
    pub lines: Vec<(f64, String)>,
    pub stderr: String,
    /// Exit status; None if the VMM was killed by a signal.
    pub status: Option<i32>,
    /// Whether the test stopped the VM (SIGTERM) because `done` held.
    pub stopped: bool,
}

impl Watched {
    /// The first console line containing `needle`, with its arrival time.
    pub fn find(&self, needle: &str) -> Option<&(f64, String)> {
        self.lines.iter().find(|(_, l)| l.contains(needle))
    }

    /// Like `find`, but panics with everything seen when no line contains `needle`.
    pub fn expect(&self, needle: &str) -> &str {
        match self.find(needle) {
            Some((_, l)) => l,
            None => panic!("no console line contains '{needle}'\n{}", self.all()),
        }
    }

    pub fn all(&self) -> String {
        let console: Vec<String> = self
            .lines
            .iter()
            .map(|(t, l)| format!("[{t:6.1} s] {l}"))
            .collect();
        format!(
            "status {:?}, stopped by the test: {}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stopped,
            console.join("\n"),
            self.stderr
        )
    }
}

/// Runs `vmm` with `args` until it exits, or until `done(lines so far, time since start)`
/// holds (then the VM is stopped with SIGTERM), or until `timeout` (then it is killed and
/// the test fails, showing what the console printed). `done` may drive the VM meanwhile.
pub fn watch_vmm(
    args: &[&str],
    timeout: Duration,
    mut done: impl FnMut(&[(f64, String)], Duration) -> bool,
) -> Watched {
    use std::io::BufRead;
    /// Kills the VMM if the test panics (in `done`, say) before it has exited.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(
        Command::new(VMM)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {VMM}: {e}")),
    );
    let child = &mut guard.0;
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((start.elapsed().as_secs_f64(), text)).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut lines = Vec::new();
    let mut stopped = false;
    let mut timed_out = false;
    let status = loop {
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if !stopped && done(&lines, start.elapsed()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            stopped = true;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    lines.extend(rx.try_iter());
    let w = Watched {
        lines,
        stderr: err_reader.join().unwrap(),
        status: status.code(),
        stopped,
    };
    assert!(
        !timed_out,
        "vmm {args:?} timed out after {timeout:?}\n{}",
        w.all()
    );
    w
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
