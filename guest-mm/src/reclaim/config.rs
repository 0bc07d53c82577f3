//! The reclaim configuration: one type with one validation. `vmm run` flattens it into its
//! command line (feature `cli`), the control API serves and patches it as JSON
//! (`/vm/reclaim/config`), and `vmm balloon reclaim-config --set KEY=VALUE` sends such a
//! patch. A new option is one field here, with its doc, its default and its check.

use crate::backing::Granule;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// How accepted frames are grouped into host calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// One host call per 4 KiB page, as QEMU and Cloud Hypervisor do; released before the
    /// buffer is acknowledged.
    PerPage,
    /// Merge adjacent frames within one buffer, as Firecracker does; released before the
    /// buffer is acknowledged.
    PerBuffer,
    /// Merge across buffers within a bounded batch and window, with zap spans; the buffer is
    /// acknowledged as soon as its frames are recorded (ours).
    Gather,
}

impl Strategy {
    /// Whether a buffer's frames are released before the buffer is acknowledged (the peers'
    /// behaviour, kept for comparison), rather than in a later batch.
    pub fn releases_before_ack(self) -> bool {
        self != Strategy::Gather
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::PerPage => "per-page",
            Strategy::PerBuffer => "per-buffer",
            Strategy::Gather => "gather",
        })
    }
}

/// What happens to frames waiting in partial 2 MiB blocks once the balloon reaches its
/// target (2 MiB backings only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum PartialBlocks {
    /// Keep them until their blocks complete (the host keeps those blocks).
    Hold,
    /// Release them at 4 KiB (shmem THP only: the kernel splits each huge page it punches part
    /// of; hugetlb pages cannot be freed in part).
    Split,
}

/// Default batch bound: 64 MiB of frames. Large enough that a Linux-style inflate (256 PFNs
/// per buffer, one buffer in flight) coalesces over hundreds of buffers; small enough that a
/// batch's frames are back with the host within one window even at the slow per-4 KiB costs
/// measured here (88–250 µs per call).
pub const DEFAULT_BATCH_PAGES: u64 = 16 * 1024;
/// Default window in milliseconds: a batch is closed this long after its first frame
/// arrived, even if it is not full, so a slow trickle of frames still reaches the host
/// promptly. 40 ms: with 4 vCPUs on 2 cores a 10 ms window closed batches at 4,000-5,000
/// pages, 50-63 flushes per GiB on the fragmented balloon; at 40 ms 18-19
/// (docs/BENCHMARKS.md, "Zap spans", the batch window).
pub const DEFAULT_BATCH_WINDOW_MS: u64 = 40;
/// Default bound on the in-use frames one zap span may bridge per gap between reclaimed
/// ranges (docs/BENCHMARKS.md, "Zap spans").
pub const DEFAULT_ZAP_SPAN_GAP: u64 = 64;
/// Largest batch accepted, in frames (4 GiB).
pub const MAX_BATCH_PAGES: u64 = 1 << 20;
/// Longest window accepted.
pub const MAX_BATCH_WINDOW_MS: u64 = 60_000;
/// Largest zap span gap accepted (a span is at most 1 GiB anyway).
pub const MAX_ZAP_SPAN_GAP: u64 = super::span::MAX_SPAN_FRAMES;

/// How reclaimed guest memory is batched and returned to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ReclaimConfig {
    /// How reclaimed memory is turned into host calls: per-page (one call per 4 KiB page,
    /// like QEMU), per-buffer (merge within one inflate buffer, like Firecracker) or gather
    /// (merge across buffers within a batch; the buffer is acknowledged before the host calls).
    #[cfg_attr(
        feature = "cli",
        arg(long = "reclaim-strategy", value_enum, default_value_t = Strategy::Gather)
    )]
    pub strategy: Strategy,
    /// Gather strategy: close a batch once it holds this many 4 KiB frames (1 to 1048576).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_BATCH_PAGES))]
    pub batch_pages: u64,
    /// Gather strategy: close a batch this many milliseconds after its first frame arrived
    /// (at most 60000).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_BATCH_WINDOW_MS))]
    pub batch_window_ms: u64,
    /// Gather strategy: one stage-2 zap (one KVM invalidation) may span several reclaimed
    /// ranges of a batch, bridging up to this many in-use frames per gap between them; the
    /// bridged frames keep their contents (the memfd backend's zap only drops mappings) and
    /// refault when touched. 0 = one zap per range. Default chosen by measurement
    /// (docs/BENCHMARKS.md, "Zap spans").
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_ZAP_SPAN_GAP))]
    pub zap_span_gap: u64,
    /// With 2 MiB pages: what to do with frames waiting in partial blocks once the balloon
    /// reaches its target. hold: keep them until their blocks complete (the host keeps those
    /// blocks); split: release them at 4 KiB (shmem-thp only: the kernel splits each huge
    /// page it punches part of; hugetlb pages cannot be freed in part).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_enum, default_value_t = PartialBlocks::Hold)
    )]
    pub partial_blocks: PartialBlocks,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Gather,
            batch_pages: DEFAULT_BATCH_PAGES,
            batch_window_ms: DEFAULT_BATCH_WINDOW_MS,
            zap_span_gap: DEFAULT_ZAP_SPAN_GAP,
            partial_blocks: PartialBlocks::Hold,
        }
    }
}

/// Why a configuration was refused; the message names the field and what it accepts.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("batch_pages {0} is not within 1..={MAX_BATCH_PAGES}")]
    BatchPages(u64),
    #[error("batch_window_ms {0} is above {MAX_BATCH_WINDOW_MS}")]
    BatchWindow(u64),
    #[error("zap_span_gap {0} is above {MAX_ZAP_SPAN_GAP} (a span covers at most 1 GiB)")]
    ZapSpanGap(u64),
    #[error("partial_blocks split needs guest RAM on shmem huge pages (--memory-backend shmem-thp): hugetlb pages cannot be freed in part, and 4 KiB pages have no blocks")]
    SplitNeedsShmem,
    #[error("bad reclaim configuration: {0}")]
    Malformed(String),
}

impl ReclaimConfig {
    /// A configuration with `strategy` and every other setting at its default.
    pub fn with_strategy(strategy: Strategy) -> Self {
        Self {
            strategy,
            ..Self::default()
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.batch_window_ms)
    }

    /// The one validation, for guest RAM that gives memory back in `granule`.
    pub fn validate(&self, granule: Granule) -> Result<(), ConfigError> {
        if !(1..=MAX_BATCH_PAGES).contains(&self.batch_pages) {
            return Err(ConfigError::BatchPages(self.batch_pages));
        }
        if self.batch_window_ms > MAX_BATCH_WINDOW_MS {
            return Err(ConfigError::BatchWindow(self.batch_window_ms));
        }
        if self.zap_span_gap > MAX_ZAP_SPAN_GAP {
            return Err(ConfigError::ZapSpanGap(self.zap_span_gap));
        }
        if self.partial_blocks == PartialBlocks::Split
            && granule != (Granule::Block { can_split: true })
        {
            return Err(ConfigError::SplitNeedsShmem);
        }
        Ok(())
    }

    /// This configuration with the fields `changes` names set to its values (a JSON object
    /// with this type's field names; unknown fields and wrong types are refused), validated.
    pub fn patched(
        &self,
        changes: &serde_json::Map<String, serde_json::Value>,
        granule: Granule,
    ) -> Result<Self, ConfigError> {
        let mut merged = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        for (k, v) in changes {
            if !merged.contains_key(k) {
                return Err(ConfigError::Malformed(format!(
                    "unknown field '{k}'; the fields are {}",
                    merged.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            merged.insert(k.clone(), v.clone());
        }
        let c: Self = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| ConfigError::Malformed(e.to_string()))?;
        c.validate(granule)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_patch_changes_only_what_it_names_and_is_validated() {
        let c = ReclaimConfig::default();
        let p = c
            .patched(
                &obj(json!({"zap_span_gap": 0, "strategy": "per-buffer"})),
                Granule::Page,
            )
            .unwrap();
        assert_eq!(p.zap_span_gap, 0);
        assert_eq!(p.strategy, Strategy::PerBuffer);
        assert_eq!(p.batch_pages, c.batch_pages);
        let refused = |v| c.patched(&obj(v), Granule::Page).unwrap_err();
        assert_eq!(
            refused(json!({"batch_pages": 0})),
            ConfigError::BatchPages(0)
        );
        assert_eq!(
            refused(json!({"batch_window_ms": 60_001})),
            ConfigError::BatchWindow(60_001)
        );
        assert!(
            matches!(refused(json!({"nope": 1})), ConfigError::Malformed(m) if m.contains("unknown field 'nope'"))
        );
        assert!(matches!(
            refused(json!({"strategy": "fastest"})),
            ConfigError::Malformed(_)
        ));
        assert!(matches!(
            refused(json!({"batch_pages": -1})),
            ConfigError::Malformed(_)
        ));
        assert_eq!(
            refused(json!({"partial_blocks": "split"})),
            ConfigError::SplitNeedsShmem
        );
        assert!(c
            .patched(
                &obj(json!({"partial_blocks": "split"})),
                Granule::Block { can_split: true }
            )
            .is_ok());
    }

    #[test]
    fn round_trips_through_json() {
        let c = ReclaimConfig {
            zap_span_gap: 3,
            ..ReclaimConfig::with_strategy(Strategy::PerPage)
        };
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(v["strategy"], "per-page");
        assert_eq!(serde_json::from_value::<ReclaimConfig>(v).unwrap(), c);
    }
}
