//! QEMU as a peer VMM: the one microvm command line our guests boot under, a child process
//! whose failures carry QEMU's own words (exit status and the tail of its stderr), and a
//! start-up check that boots a tiny guest before anything relies on QEMU. Development only:
//! the tests and the benchmarks compare against QEMU; the VMM never runs it.
//!
//! Callers (tests, peer-compare) never see a bare "connection refused": when QEMU exits or
//! never opens its QMP socket, they get a [`QemuError`] that says how it ended and what it
//! printed.

use crate::qmp::Qmp;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// QEMU's exit status when a guest writes the pass code 0x10 to isa-debug-exit at 0xf4
/// (`(0x10 << 1) | 1`).
pub const PASS_STATUS: i32 = 33;

/// How much of QEMU's stderr an error quotes.
const STDERR_TAIL_BYTES: usize = 2000;

/// How long a QMP failure waits for QEMU's exit status (QEMU may close the socket a little
/// before it exits).
const QMP_ERROR_EXIT_WAIT: Duration = Duration::from_secs(2);

/// The CPU model: the host's, minus the features this host's KVM refuses to take back.
///
/// `arch-capabilities`: on kernel 6.18.44 with kvm_pvm, QEMU 7.2 copies the host's
/// IA32_ARCH_CAPABILITIES into the guest and dies at start-up with
///   "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
///   "kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."
/// (`-cpu max` fails the same way). Our guests never read that MSR, and masking it is
/// harmless on hosts where plain `-cpu host` works, so one command line serves both.
const CPU_MODEL: &str = "host,-arch-capabilities";

/// A virtio-balloon device with the features this VMM offers too (deflate-on-OOM, free page
/// reporting), and a QMP socket at `qmp` to drive it.
pub fn balloon_and_qmp_args(qmp: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]
}

/// QEMU arguments for booting the project's guests: microvm with KVM, `vcpus` vCPUs,
/// serial on stdio, the exit port as isa-debug-exit, and modern virtio-mmio. Add devices,
/// then `-kernel` and `-append` with [`guest_cmdline`].
pub fn microvm_args(memory: &str, vcpus: u32) -> Vec<String> {
    let smp = vcpus.to_string();
    [
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        CPU_MODEL,
        "-m",
        memory,
        "-smp",
        &smp,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-global",
        "virtio-mmio.force-legacy=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub use crate::console::guest_cmdline;

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot start {path}: {err} (install Debian's qemu-system-x86; ./setup.sh does)")]
    Spawn { path: PathBuf, err: std::io::Error },
    #[error("QEMU exited with {status} {while_}; QEMU said:\n{stderr}")]
    Exited {
        status: String,
        while_: String,
        stderr: String,
    },
    #[error("QEMU did not {what} within {timeout:?} (still running); QEMU said:\n{stderr}")]
    Timeout {
        what: String,
        timeout: Duration,
        stderr: String,
    },
    #[error("QMP with QEMU failed: {err}; QEMU said:\n{stderr}")]
    Qmp { err: std::io::Error, stderr: String },
    #[error("QEMU cannot boot a tiny test guest on this host, so nothing that compares against QEMU can run: {cause}\nWhat to do: check that /dev/kvm is usable and that qemu-system-x86_64 is Debian's qemu-system-x86 (./setup.sh installs it); if QEMU refuses a CPU feature of this host, mask it in vmm_harness::qemu's CPU_MODEL")]
    StartupCheck { cause: Box<QemuError> },
}

/// Text a child writes to one of its pipes, collected by a thread as it arrives.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<String>>);

impl Collected {
    fn start(mut pipe: impl Read + Send + 'static) -> Self {
        let c = Collected::default();
        let sink = c.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.0
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        c
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn tail(&self) -> String {
        let s = self.0.lock().unwrap();
        let mut start = s.len().saturating_sub(STDERR_TAIL_BYTES);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        let t = s[start..].trim_end();
        if t.is_empty() {
            "(nothing on stderr)".into()
        } else {
            t.to_string()
        }
    }
}

/// A running QEMU whose stdout (the guest's serial console) and stderr are collected.
/// Dropping it kills QEMU.
pub struct QemuProcess {
    child: Child,
    stdout: Collected,
    stderr: Collected,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts `cmd` (a QEMU command line) with piped stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Result<Self, QemuError> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| QemuError::Spawn {
                path: PathBuf::from(cmd.get_program()),
                err,
            })?;
        let stdout = Collected::start(child.stdout.take().expect("piped stdout"));
        let stderr = Collected::start(child.stderr.take().expect("piped stderr"));
        Ok(Self {
            child,
            stdout,
            stderr,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest printed on its serial console so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Everything QEMU printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// The exit status, if QEMU has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// The error for a QEMU that ended `while_` doing something: its status and stderr.
    fn exited_error(&mut self, status: ExitStatus, while_: &str) -> QemuError {
        // Give the collector a moment to read QEMU's last words after the exit.
        std::thread::sleep(Duration::from_millis(50));
        QemuError::Exited {
            status: status.to_string(),
            while_: while_.to_string(),
            stderr: self.stderr.tail(),
        }
    }

    /// Calls `ready` until it says yes, failing with QEMU's message if QEMU exits first or
    /// `timeout` passes.
    fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, QemuError> {
        let start = Instant::now();
        loop {
            if let Some(v) = ready(self) {
                return Ok(v);
            }
            if let Some(status) = self.exited() {
                return Err(self.exited_error(status, &format!("before it would {what}")));
            }
            if start.elapsed() > timeout {
                return Err(QemuError::Timeout {
                    what: what.to_string(),
                    timeout,
                    stderr: self.stderr.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects to QEMU's QMP socket at `path` (given to QEMU as `-qmp unix:PATH,server=on,
    /// wait=off`), waiting while QEMU starts.
    pub fn connect_qmp(&mut self, path: &Path, timeout: Duration) -> Result<Qmp, QemuError> {
        let stream = self.poll("open its QMP socket", timeout, |_| {
            std::os::unix::net::UnixStream::connect(path).ok()
        })?;
        Qmp::handshake(stream).map_err(|err| self.qmp_error(err))
    }

    /// Wraps a QMP failure with what QEMU said. A broken QMP connection usually means QEMU
    /// is exiting, so wait a moment for its exit status before reporting.
    pub fn qmp_error(&mut self, err: std::io::Error) -> QemuError {
        let start = Instant::now();
        while start.elapsed() < QMP_ERROR_EXIT_WAIT {
            if let Some(status) = self.exited() {
                return self.exited_error(status, &format!("during QMP ({err})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuError::Qmp {
            err,
            stderr: self.stderr.tail(),
        }
    }

    /// Waits until the guest's console shows `needle`.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> Result<(), QemuError> {
        self.poll(&format!("print {needle:?}"), timeout, |q| {
            q.stdout.text().contains(needle).then_some(())
        })
    }

    /// Waits for QEMU to exit; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let status = self.poll("exit", timeout, |q| q.exited()).inspect_err(|_| {
            let _ = self.child.kill();
        });
        // Let the collectors drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        status
    }

    /// Waits for the guest's pass code; anything else is an error with QEMU's message.
    pub fn wait_pass(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let status = self.wait(timeout)?;
        if status.code() == Some(PASS_STATUS) {
            return Ok(());
        }
        Err(self.exited_error(status, "instead of the guest's pass code (33)"))
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots `guest` (the memtouch test guest) on QEMU with 64 MiB and a tiny workload and
/// requires the pass code: a QEMU that cannot start on this host fails here, once, with its
/// own message, instead of somewhere inside a test or a benchmark.
pub fn check_starts(qemu: &Path, memtouch: &Path) -> Result<(), QemuError> {
    let mut cmd = Command::new(qemu);
    cmd.args(microvm_args("64M", 1))
        .arg("-kernel")
        .arg(memtouch)
        .args(["-append", "rounds=1 bytes=1M"]);
    QemuProcess::spawn(cmd)
        .and_then(|mut q| q.wait_pass(Duration::from_secs(60)))
        .map_err(|cause| QemuError::StartupCheck {
            cause: Box::new(cause),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_binary() -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    }

    #[test]
    fn an_option_qemu_rejects_gives_an_error_with_qemus_own_message() {
        let qemu = qemu_binary().expect(
            "qemu-system-x86_64 is not installed: run ./setup.sh (it installs qemu-system-x86)",
        );
        let qmp = std::env::temp_dir().join(format!("qemu-reject-{}.qmp", std::process::id()));
        let mut cmd = Command::new(qemu);
        cmd.args(microvm_args("64M", 1)).args([
            "-device",
            "no-such-device-model",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        let mut q = QemuProcess::spawn(cmd).unwrap();
        let err = match q.connect_qmp(&qmp, Duration::from_secs(30)) {
            Ok(_) => panic!("QEMU accepted a device model that does not exist"),
            Err(e) => e.to_string(),
        };
        let _ = std::fs::remove_file(&qmp);
        assert!(err.contains("QEMU exited with exit status: 1"), "{err}");
        // QEMU's own words for an unknown -device.
        assert!(
            err.contains("'no-such-device-model' is not a valid device model name"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_qemu_binary_says_what_to_install() {
        let err = QemuProcess::spawn(Command::new("/nonexistent/qemu-system-x86_64"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/qemu-system-x86_64"), "{err}");
        assert!(err.contains("qemu-system-x86"), "{err}");
    }
}
