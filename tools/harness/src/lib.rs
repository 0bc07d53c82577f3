//! Development only: how the tests and the tools start and read VMs. Nothing here is part of
//! the VMM.
//!
//! | module | owns |
//! |---|---|
//! | `run` | `VmmRun`: every `vmm run` command line (one place for its options) |
//! | `vm` | `RunningVm`: a started VM's console and stderr, waiting for lines, its API, its end |
//! | `skip` | `require`: the one way a test says it cannot run here, counted by `./test.sh` |
//! | `report` | the VMM's report (`--report-json`) read through its own types |
//! | `console` | the test guests' console lines, and `cpus=N` for peers that start one vCPU |
//! | `host` | host memory a VMM process holds (memfd blocks, or resident bytes) |
//! | `qemu`, `qmp` | QEMU as a peer VMM and its control protocol |
//! | `firecracker` | Firecracker as a peer VMM (benchmarks only) |

pub mod console;
pub mod firecracker;
pub mod host;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod run;
pub mod skip;
pub mod vm;

pub use run::VmmRun;
pub use skip::{require, Need};
pub use vm::{Finished, RunningVm};

/// Runs `cmd` to its end: its output, and its stdout then its stderr as one text (what the
/// tests search and show).
pub fn output_text(cmd: &mut std::process::Command) -> (std::process::Output, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o, text)
}
