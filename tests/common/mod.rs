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
        println!("SKIPPED: /dev/kvm not available ({test})");
        eprintln!("SKIPPED: /dev/kvm not available ({test})");
        mark("skipped", test);
    }
    ok
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
