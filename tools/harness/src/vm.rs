//! A running `vmm run`: its console (the guest's serial output, stdout) and the VMM's stderr
//! collected line by line with their arrival times, waiting for lines, its control API, and
//! its end. Dropping the handle kills the VM, so a test that panics leaves no VM behind.

use crate::run::VmmRun;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::api::ApiClient;
use vmm::report::BalloonReport;

/// Lines a pipe delivered, each with the seconds since the VM started.
#[derive(Clone, Default)]
pub(crate) struct Lines(Arc<Mutex<Vec<(f64, String)>>>);

impl Lines {
    pub(crate) fn collect(
        pipe: impl Read + Send + 'static,
        start: Instant,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let lines = Lines::default();
        let sink = lines.clone();
        let t = std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                sink.0
                    .lock()
                    .unwrap()
                    .push((start.elapsed().as_secs_f64(), text));
            }
        });
        (lines, t)
    }

    pub(crate) fn snapshot(&self) -> Vec<(f64, String)> {
        self.0.lock().unwrap().clone()
    }
}

pub(crate) fn text(lines: &[(f64, String)]) -> String {
    let mut s = String::new();
    for (_, l) in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

pub struct RunningVm {
    child: Child,
    started: Instant,
    console: Lines,
    stderr: Lines,
    readers: Vec<std::thread::JoinHandle<()>>,
    api_sock: Option<PathBuf>,
    report_json: Option<PathBuf>,
    what: String,
}

/// How a VM ended.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Exit status; None if it was killed by a signal.
    pub status: Option<i32>,
    /// Console lines with the seconds since start at which each arrived.
    pub console: Vec<(f64, String)>,
    pub stderr: String,
    /// The `--report-json` report, when the run was given one and wrote it.
    pub report: Option<BalloonReport>,
    /// Whether the harness had to kill it: it ran past its time.
    pub timed_out: bool,
}

impl Finished {
    /// The console as one text.
    pub fn stdout(&self) -> String {
        text(&self.console)
    }

    /// The first console line containing `needle`, with its arrival time.
    pub fn find(&self, needle: &str) -> Option<&(f64, String)> {
        self.console.iter().find(|(_, l)| l.contains(needle))
    }

    /// Like `find`, but panics with everything seen when no line contains `needle`.
    pub fn expect_line(&self, needle: &str) -> &str {
        match self.find(needle) {
            Some((_, l)) => l,
            None => panic!("no console line contains '{needle}'\n{}", self.all()),
        }
    }

    /// Asserts that the console holds every one of `needles`, showing all output if not.
    pub fn assert_stdout_has(&self, needles: &[&str]) {
        let out = self.stdout();
        for n in needles {
            assert!(out.contains(n), "no '{n}' in stdout\n{}", self.all());
        }
    }

    /// Asserts that stderr holds every one of `needles`, showing all output if not.
    pub fn assert_stderr_has(&self, needles: &[&str]) {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "no '{n}' in stderr\n{}",
                self.all()
            );
        }
    }

    /// The report, or a panic that shows why there is none.
    pub fn report(&self) -> &BalloonReport {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("the run wrote no report\n{}", self.all()))
    }

    /// Everything, for assertion messages.
    pub fn all(&self) -> String {
        let console: Vec<String> = self
            .console
            .iter()
            .map(|(t, l)| format!("[{t:6.1} s] {l}"))
            .collect();
        format!(
            "status {:?}{}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            if self.timed_out {
                " (killed: timed out)"
            } else {
                ""
            },
            console.join("\n"),
            self.stderr
        )
    }
}

impl RunningVm {
    pub(crate) fn spawn(run: &VmmRun) -> Self {
        if let Some(p) = run.report_path().filter(|p| p.is_file()) {
            // A report left from an earlier run must not pass for this run's (only a regular
            // file: a test may point the report at /dev/full).
            let _ = std::fs::remove_file(p);
        }
        if let Some(p) = run.api_sock_path() {
            // Nor may a socket a killed run left behind pass for this run's (`api` waits
            // for the socket to appear): a stale one (refusing connections) is removed.
            // A live one, or anything else there, is the VMM's to refuse.
            use std::os::unix::fs::FileTypeExt;
            let stale = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
                && std::os::unix::net::UnixStream::connect(p)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if stale {
                let _ = std::fs::remove_file(p);
            }
        }
        let mut vm = Self::spawn_command(run.command());
        vm.api_sock = run.api_sock_path().map(Path::to_path_buf);
        vm.report_json = run.report_path().map(Path::to_path_buf);
        vm
    }

    /// Starts `cmd`, a command line built elsewhere: another `vmm` subcommand (`vmm balloon`)
    /// or a `VmmRun::command()` under a wrapper (`runuser -u nobody -- ...`). Its output is
    /// collected and it ends (`finish`, kill on drop) as a `VmmRun`'s does; it has no API
    /// socket and no report.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        let started = Instant::now();
        let (console, t1) = Lines::collect(child.stdout.take().expect("piped"), started);
        let (stderr, t2) = Lines::collect(child.stderr.take().expect("piped"), started);
        Self {
            child,
            started,
            console,
            stderr,
            readers: vec![t1, t2],
            api_sock: None,
            report_json: None,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Seconds since the VM was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The console so far.
    pub fn console(&self) -> Vec<(f64, String)> {
        self.console.snapshot()
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr.snapshot())
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits until `done` holds for the console lines so far; an error saying what was seen
    /// if the VM ends first or `timeout` passes.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[(f64, String)]) -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if done(&self.console.snapshot()) {
                return Ok(());
            }
            let why = if self.exited() {
                "the VM ended"
            } else if start.elapsed() > timeout {
                "timed out"
            } else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            // Let the readers take the last lines.
            std::thread::sleep(Duration::from_millis(50));
            return Err(format!(
                "{why} waiting for {what} ({timeout:?}) in {}\n--- console ---\n{}\n--- stderr ---\n{}",
                self.what,
                text(&self.console.snapshot()),
                self.stderr()
            ));
        }
    }

    /// Waits for a console line containing `needle`; the line and when it came.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(f64, String), String> {
        self.wait_until(timeout, &format!("{needle:?}"), |lines| {
            lines.iter().any(|(_, l)| l.contains(needle))
        })?;
        Ok(self
            .console
            .snapshot()
            .into_iter()
            .find(|(_, l)| l.contains(needle))
            .expect("seen"))
    }

    /// A client of the VM's control socket, once the socket exists.
    pub fn api(&mut self) -> ApiClient {
        let sock = self
            .api_sock
            .clone()
            .expect("the run was given no --api-sock");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                !self.exited() && start.elapsed() < Duration::from_secs(60),
                "no control socket at {}\n{}",
                sock.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ApiClient::new(&sock).expect("an API client")
    }

    /// Asks the VMM to stop (SIGTERM) and waits for its end.
    pub fn stop(mut self, timeout: Duration) -> Finished {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.finish_mut(timeout)
    }

    /// Waits for the VM to end; after `timeout` it is killed and `timed_out` says so.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        self.finish_mut(timeout)
    }

    fn finish_mut(&mut self, timeout: Duration) -> Finished {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                timed_out = true;
                break self.child.wait().expect("wait for a killed child");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let report = self
            .report_json
            .as_deref()
            .filter(|p| p.is_file())
            .map(crate::report::read);
        Finished {
            status: status.code(),
            console: self.console.snapshot(),
            stderr: self.stderr(),
            report,
            timed_out,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
