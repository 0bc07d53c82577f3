//! Helpers shared by the integration tests: running the `vmm` binary with a timeout, KVM
//! availability (with the loud SKIPPED line and the markers .ci/run counts), QEMU lookup.
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

/// The QEMU binary, if installed.
pub fn qemu() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

pub fn to_output(o: Output) -> Run {
    Run {
        status: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// A minimal QMP client (QEMU's JSON control protocol) for the peer tests.
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU starts), reads the greeting, enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        let start = Instant::now();
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect to QMP at {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.line();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        let r = q.execute(serde_json::json!({ "execute": "qmp_capabilities" }));
        assert!(r.get("return").is_some(), "{r}");
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Sends a command and returns its response, skipping asynchronous events.
    pub fn execute(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let mut s = cmd.to_string();
        s.push('\n');
        self.writer.write_all(s.as_bytes()).expect("QMP write");
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}
