//! Planning a batch: frames → ranges → zap spans.
//!
//! The frames are sorted, de-duplicated and merged into maximal ranges that never cross a RAM
//! range (memslot) boundary (`coalesce`). The per-page strategy then splits the ranges back
//! into host pages (as QEMU makes one call per page). Consecutive ranges are joined into zap
//! spans where the backend's zap keeps contents and the gather strategy allows it (`span`):
//! one zap, so one KVM invalidation, over several ranges and the in-use frames between them.

use super::coalesce::coalesce;
use super::config::{ReclaimConfig, Strategy};
use super::span::{self, ZapSpan};
use crate::backend::Capabilities;
use crate::gfn::{Gfn, GfnRange};
use crate::stage2_map::Stage2Map;

/// A planned batch: its ranges (what will be released) and the spans that zap them.
pub struct Plan {
    pub ranges: Vec<GfnRange>,
    pub spans: Vec<ZapSpan>,
}

/// In-use frames a span may bridge per gap: the configured bound for the gather strategy on
/// a backend whose zap keeps contents, else 0 (one zap per range).
pub fn span_gap(config: &ReclaimConfig, caps: &Capabilities) -> u64 {
    if config.strategy == Strategy::Gather && caps.zap_keeps_contents {
        config.zap_span_gap
    } else {
        0
    }
}

/// Plans `frames` (valid RAM frames; sorted in place). `unit` is the host page in frames.
pub fn plan(
    frames: &mut [Gfn],
    config: &ReclaimConfig,
    caps: &Capabilities,
    unit: u64,
    map: &Stage2Map,
) -> Plan {
    let mut ranges = coalesce(frames, map.layout()).ranges;
    if config.strategy == Strategy::PerPage {
        ranges = split(&ranges, unit);
    }
    let spans = span::plan(&ranges, map.layout(), map, span_gap(config, caps));
    Plan { ranges, spans }
}

/// `ranges` cut into pieces of at most `unit` frames (ranges of a block backing are whole,
/// aligned blocks, so each piece is one host page).
fn split(ranges: &[GfnRange], unit: u64) -> Vec<GfnRange> {
    ranges
        .iter()
        .flat_map(|r| {
            (r.start..r.end())
                .step_by(unit as usize)
                .map(move |s| GfnRange::new(s, unit.min(r.end() - s)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Granule;
    use crate::layout::Layout;

    const CAPS: Capabilities = Capabilities {
        name: "test",
        granule: Granule::Page,
        zap_keeps_contents: true,
    };

    #[test]
    fn each_strategy_plans_the_calls_its_peers_make() {
        let map = Stage2Map::new(Layout::new(64 << 20).unwrap());
        let mut frames: Vec<Gfn> = vec![12, 10, 11, 20, 11];
        let plan_for = |s, frames: &mut Vec<Gfn>, unit| {
            plan(frames, &ReclaimConfig::with_strategy(s), &CAPS, unit, &map)
        };
        let p = plan_for(Strategy::PerPage, &mut frames, 1);
        assert_eq!(p.ranges.len(), 4, "one call per page, duplicates merged");
        assert_eq!(p.spans.len(), 4);
        let p = plan_for(Strategy::PerBuffer, &mut frames, 1);
        assert_eq!(p.ranges, vec![GfnRange::new(10, 3), GfnRange::new(20, 1)]);
        assert_eq!(p.spans.len(), 2, "no spans outside the gather strategy");
        let p = plan_for(Strategy::Gather, &mut frames, 1);
        assert_eq!(p.spans.len(), 1, "one span bridging 7 in-use frames");
        assert_eq!(p.spans[0].span, GfnRange::new(10, 11));
        let destroys = Capabilities {
            zap_keeps_contents: false,
            ..CAPS
        };
        let p = plan(&mut frames, &ReclaimConfig::default(), &destroys, 1, &map);
        assert_eq!(
            p.spans.len(),
            2,
            "a zap that destroys contents gets no span"
        );
    }

    #[test]
    fn per_page_on_blocks_makes_one_call_per_2_mib_page() {
        assert_eq!(
            split(&[GfnRange::new(512, 1024)], 512),
            vec![GfnRange::new(512, 512), GfnRange::new(1024, 512)]
        );
        assert_eq!(split(&[GfnRange::new(5, 3)], 1).len(), 3);
    }
}
