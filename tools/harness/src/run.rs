//! `vmm run` command lines: the one place the tests and tools build them. Each setter is one
//! option of `vmm run --help`; the reclaim settings are written from a `ReclaimConfig` through
//! the same clap definition the VMM parses them with, so a new reclaim option needs nothing
//! here.

use crate::vm::{Finished, RunningVm};
use clap::Args;
use guest_mm::{Backing, ReclaimConfig};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What the VM boots.
#[derive(Clone, Debug)]
enum Boot {
    /// A test guest by name or path (`--guest`).
    Guest(String),
    /// A Linux kernel (`--kernel`, `--initrd`, `--no-acpi`).
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        acpi: bool,
    },
    /// Neither (to test that the VMM asks for one).
    Nothing,
}

/// A fresh directory for one run of the tool `tool` (TMPDIR/TOOL-PID) and the path of a
/// control socket in it, for `VmmRun::api_sock`; the caller removes the directory.
pub fn temp_api_sock(tool: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("{tool}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("api.sock");
    Ok((dir, sock))
}

/// A `vmm run` to start.
#[derive(Clone, Debug)]
pub struct VmmRun {
    bin: PathBuf,
    boot: Boot,
    vcpus: Option<u32>,
    memory: Option<String>,
    cmdline: Option<String>,
    kvm_device: Option<PathBuf>,
    reclaim: Option<ReclaimConfig>,
    balloon_steps: Vec<String>,
    step_timeout_s: Option<u64>,
    report_json: Option<PathBuf>,
    api_sock: Option<PathBuf>,
    reclaim_probe: bool,
    keep_host_fault_around: bool,
    free_page_hinting: bool,
    no_free_page_reporting: bool,
    backing: Option<Backing>,
    extra: Vec<OsString>,
}

/// The `--flag value` pairs that set every field of `c`, from the clap definition `vmm run`
/// flattens (field name → long flag) and the configuration's JSON (value).
pub fn reclaim_args(c: &ReclaimConfig) -> Vec<OsString> {
    let cmd = ReclaimConfig::augment_args(clap::Command::new("vmm"));
    let values = serde_json::to_value(c).expect("ReclaimConfig serialises");
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(long), Some(v)) = (arg.get_long(), values.get(arg.get_id().as_str())) else {
            continue;
        };
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push(format!("--{long}").into());
        out.push(value.into());
    }
    out
}

impl VmmRun {
    fn new(bin: &Path, boot: Boot) -> Self {
        Self {
            bin: bin.to_path_buf(),
            boot,
            vcpus: None,
            memory: None,
            cmdline: None,
            kvm_device: None,
            reclaim: None,
            balloon_steps: Vec::new(),
            step_timeout_s: None,
            report_json: None,
            api_sock: None,
            reclaim_probe: false,
            keep_host_fault_around: false,
            free_page_hinting: false,
            no_free_page_reporting: false,
            backing: None,
            extra: Vec::new(),
        }
    }

    /// `bin run --guest NAME` (a built test guest's name, or a path).
    pub fn guest(bin: &Path, name: &str) -> Self {
        Self::new(bin, Boot::Guest(name.to_string()))
    }

    /// `bin run --kernel KERNEL [--initrd INITRD]`.
    pub fn kernel(bin: &Path, kernel: &Path, initrd: Option<&Path>) -> Self {
        Self::new(
            bin,
            Boot::Linux {
                kernel: kernel.to_path_buf(),
                initrd: initrd.map(Path::to_path_buf),
                acpi: true,
            },
        )
    }

    /// `bin run` with nothing to boot (the VMM must refuse it).
    pub fn nothing(bin: &Path) -> Self {
        Self::new(bin, Boot::Nothing)
    }

    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// Guest RAM as `vmm run` takes it: "1G", "512M", or bytes.
    pub fn memory(mut self, size: impl Into<String>) -> Self {
        self.memory = Some(size.into());
        self
    }

    pub fn cmdline(mut self, line: impl Into<String>) -> Self {
        self.cmdline = Some(line.into());
        self
    }

    /// `--no-acpi` (Linux only).
    pub fn no_acpi(mut self) -> Self {
        if let Boot::Linux { acpi, .. } = &mut self.boot {
            *acpi = false;
        }
        self
    }

    pub fn kvm_device(mut self, path: &Path) -> Self {
        self.kvm_device = Some(path.to_path_buf());
        self
    }

    /// Every reclaim setting, as `c` has it.
    pub fn reclaim(mut self, c: ReclaimConfig) -> Self {
        self.reclaim = Some(c);
        self
    }

    /// The balloon targets to set one after another, e.g. ["768M", "0"].
    pub fn balloon_steps(mut self, steps: &[&str]) -> Self {
        self.balloon_steps = steps.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn step_timeout_s(mut self, s: u64) -> Self {
        self.step_timeout_s = Some(s);
        self
    }

    pub fn report_json(mut self, path: &Path) -> Self {
        self.report_json = Some(path.to_path_buf());
        self
    }

    pub fn api_sock(mut self, path: &Path) -> Self {
        self.api_sock = Some(path.to_path_buf());
        self
    }

    pub fn reclaim_probe(mut self) -> Self {
        self.reclaim_probe = true;
        self
    }

    pub fn keep_host_fault_around(mut self) -> Self {
        self.keep_host_fault_around = true;
        self
    }

    /// Offer free page hinting (`--balloon-free-page-hinting`).
    pub fn free_page_hinting(mut self) -> Self {
        self.free_page_hinting = true;
        self
    }

    /// Leave free page reporting out (`--balloon-free-page-reporting false`).
    pub fn no_free_page_reporting(mut self) -> Self {
        self.no_free_page_reporting = true;
        self
    }

    /// What backs guest RAM (`--memory-backend`, `--memory-path`).
    pub fn backing(mut self, b: Backing) -> Self {
        self.backing = Some(b);
        self
    }

    /// An argument passed as it is (for tests of what the VMM refuses).
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.extra.push(a.into());
        self
    }

    pub fn report_path(&self) -> Option<&Path> {
        self.report_json.as_deref()
    }

    pub fn api_sock_path(&self) -> Option<&Path> {
        self.api_sock.as_deref()
    }

    /// The command line, as a `Command` to run.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("run");
        match &self.boot {
            Boot::Guest(g) => {
                c.args(["--guest", g]);
            }
            Boot::Linux {
                kernel,
                initrd,
                acpi,
            } => {
                c.arg("--kernel").arg(kernel);
                if let Some(i) = initrd {
                    c.arg("--initrd").arg(i);
                }
                if !acpi {
                    c.arg("--no-acpi");
                }
            }
            Boot::Nothing => {}
        }
        if let Some(n) = self.vcpus {
            c.args(["--vcpus", &n.to_string()]);
        }
        if let Some(m) = &self.memory {
            c.args(["--memory", m]);
        }
        if let Some(l) = &self.cmdline {
            c.args(["--cmdline", l]);
        }
        if let Some(k) = &self.kvm_device {
            c.arg("--kvm-device").arg(k);
        }
        if let Some(r) = &self.reclaim {
            c.args(reclaim_args(r));
        }
        if !self.balloon_steps.is_empty() {
            c.args(["--balloon-steps", &self.balloon_steps.join(",")]);
        }
        if let Some(s) = self.step_timeout_s {
            c.args(["--balloon-step-timeout", &s.to_string()]);
        }
        if let Some(p) = &self.report_json {
            c.arg("--report-json").arg(p);
        }
        if let Some(p) = &self.api_sock {
            c.arg("--api-sock").arg(p);
        }
        if self.reclaim_probe {
            c.arg("--reclaim-probe");
        }
        if self.keep_host_fault_around {
            c.arg("--keep-host-fault-around");
        }
        if self.free_page_hinting {
            c.arg("--balloon-free-page-hinting");
        }
        if self.no_free_page_reporting {
            c.args(["--balloon-free-page-reporting", "false"]);
        }
        match &self.backing {
            None | Some(Backing::Memfd) => {}
            Some(Backing::Hugetlb) => {
                c.args(["--memory-backend", "hugetlb"]);
            }
            Some(Backing::ShmemThp { dir }) => {
                c.args(["--memory-backend", "shmem-thp", "--memory-path"])
                    .arg(dir);
            }
        }
        c.args(&self.extra);
        c
    }

    /// Starts the VM; its console and stderr are collected as they come.
    pub fn spawn(&self) -> RunningVm {
        RunningVm::spawn(self)
    }

    /// Runs to its end with its report written to `report` (`--report-json`), and asserts
    /// that it passed (exit status 0) and wrote the report, showing everything seen if not.
    pub fn passes_with_report(self, report: &Path, timeout: Duration) -> Finished {
        let r = self.report_json(report).run(timeout);
        assert_eq!(r.status, Some(0), "{}", r.all());
        r.report();
        r
    }

    /// Runs the VM to its end (killed, and the caller told so, after `timeout`).
    pub fn run(&self, timeout: Duration) -> Finished {
        self.spawn().finish(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mm::reclaim::{PartialBlocks, Strategy};

    #[test]
    fn reclaim_settings_become_the_flags_vmm_run_parses() {
        let c = ReclaimConfig {
            zap_span_gap: 3,
            partial_blocks: PartialBlocks::Split,
            ..ReclaimConfig::with_strategy(Strategy::PerBuffer)
        };
        let args: Vec<String> = reclaim_args(&c)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        for pair in [
            ["--reclaim-strategy", "per-buffer"],
            ["--zap-span-gap", "3"],
            ["--partial-blocks", "split"],
            ["--batch-pages", "16384"],
        ] {
            assert!(
                args.windows(2).any(|w| w == pair),
                "{pair:?} not in {args:?}"
            );
        }
        // And they parse back into the same configuration.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            r: ReclaimConfig,
        }
        let parsed =
            <Cli as clap::Parser>::try_parse_from(std::iter::once("vmm".to_string()).chain(args))
                .unwrap();
        assert_eq!(parsed.r, c);
    }
}
