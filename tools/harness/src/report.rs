//! Reading what the VMM wrote, through its own types: the run's report (`--report-json`).

use std::path::Path;
use vmm::report::BalloonReport;

/// The report a `vmm run --report-json PATH` wrote; panics, naming the file, if it is not one.
pub fn read(path: &Path) -> BalloonReport {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a vmm report: {e}", path.display()))
}
