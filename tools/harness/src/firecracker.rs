//! Firecracker as a peer VMM, for benchmarks only (the suite never needs it): the project's
//! test guests boot on it through their PVH note, and its balloon takes the same API calls as
//! this VMM's (`PATCH /balloon`, `GET /balloon/statistics`).
//!
//! Firecracker starts only the boot vCPU at the PVH entry, so the guest gets `cpus=N` and
//! brings up the others itself (`console::guest_cmdline`); without it a "4 vCPU" Firecracker
//! VM runs one. Firecracker has no exit port: the guest prints its verdict and resets
//! through the i8042, on which Firecracker exits. Guest RAM is anonymous memory (or hugetlb
//! pages with `huge_pages: 2M`), so the host memory it holds is measured as resident bytes
//! (`host::resident_bytes`).
//!
//! Built from its repository: see docs/BENCHMARKS.md ("Firecracker").

use crate::console::guest_cmdline;
use crate::vm::{text, Lines};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::api::ApiClient;

/// What to boot on Firecracker.
pub struct FirecrackerConfig<'a> {
    pub guest: &'a Path,
    /// An initramfs for a Linux guest.
    pub initrd: Option<&'a Path>,
    /// The guest's command line (Firecracker appends its own virtio-mmio entries).
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Guest RAM on 2 MiB hugetlb pages (`machine-config.huge_pages: "2M"`).
    pub hugetlb: bool,
    /// Whether the guest brings up its other vCPUs (`cpus=N`). False only to reproduce a
    /// comparison made without it, in which a "4 vCPU" Firecracker VM ran one.
    pub start_all_vcpus: bool,
    /// The balloon's `free_page_hinting`.
    pub free_page_hinting: bool,
}

pub struct FirecrackerVm {
    child: Child,
    console: Lines,
    sock: PathBuf,
}

impl FirecrackerVm {
    /// Starts `bin` with a config file for `c` in `dir`, its API socket there too.
    pub fn spawn(bin: &Path, c: &FirecrackerConfig, dir: &Path) -> anyhow::Result<Self> {
        let sock = dir.join("firecracker.sock");
        let _ = std::fs::remove_file(&sock);
        let mut config = json!({
            "boot-source": {
                "kernel_image_path": c.guest,
                "boot_args": if c.start_all_vcpus {
                    guest_cmdline(c.cmdline, c.vcpus)
                } else {
                    c.cmdline.to_string()
                },
            },
            "drives": [],
            "machine-config": {
                "vcpu_count": c.vcpus,
                "mem_size_mib": c.memory_mib,
                "smt": false,
                "huge_pages": if c.hugetlb { "2M" } else { "None" },
            },
            "balloon": {
                "amount_mib": 0,
                "deflate_on_oom": true,
                "stats_polling_interval_s": 1,
                "free_page_hinting": c.free_page_hinting,
            },
        });
        if let Some(initrd) = c.initrd {
            config["boot-source"]["initrd_path"] = json!(initrd);
        }
        let config_path = dir.join("firecracker.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        // Seccomp off: a build for the gnu target has no filter of its own anyway (its build
        // says so), and this is a benchmark, not a deployment.
        let mut child = Command::new(bin)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--config-file")
            .arg(&config_path)
            .args(["--no-seccomp", "--level", "Error"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
        let (console, _) = Lines::collect(child.stdout.take().expect("piped"), Instant::now());
        Ok(Self {
            child,
            console,
            sock,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn console(&self) -> String {
        text(&self.console.snapshot())
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                anyhow::bail!(
                    "Firecracker exited ({st}) before the guest printed {needle:?}:\n{}",
                    self.console()
                );
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "no {needle:?} from the guest on Firecracker in {timeout:?}:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A client of Firecracker's API socket (the same HTTP over a Unix socket as ours).
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.sock)?)
    }

    /// Waits for Firecracker to exit (the guest resets at its end); kills it after `timeout`.
    /// Whether the guest printed a PASS verdict.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<bool> {
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                anyhow::bail!(
                    "the guest on Firecracker did not finish in {timeout:?}:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        Ok(self.console().contains("rt: verdict PASS"))
    }
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
