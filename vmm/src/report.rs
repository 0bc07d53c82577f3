//! What the VMM reports about memory reclaim: balloon target and actual, device counters,
//! guest statistics, gather statistics, KVM flush counters and host bytes held. Printed at
//! the end of `vmm run` and returned by the control API's `stats`.

use crate::devices::balloon::{BalloonCounters, BalloonDevice, GuestStats};
use crate::memory::MemoryManager;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::ReclaimStats;
use serde::{Deserialize, Serialize};

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes one line to stderr with a single write, so it never interleaves with the guest's
/// serial output mid-line when both go to the same terminal or pipe.
pub fn say(line: &str) {
    use std::io::Write;
    let mut l = String::with_capacity(line.len() + 1);
    l.push_str(line);
    l.push('\n');
    let _ = std::io::stderr().lock().write_all(l.as_bytes());
}

/// Everything the VMM reports about reclaim. Fields missing from a report (another version's)
/// read as their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonReport {
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub guest_ram_bytes: u64,
    pub host_bytes_held: u64,
    /// Frames the balloon owns, from the stage-2 map's ownership states (not from counters).
    pub frames_in_balloon: u64,
    /// What backs guest RAM: memfd, shmem-thp or hugetlb.
    pub memory_backend: String,
    /// Block backends: bytes of balloon frames waiting in partial 2 MiB blocks, which the
    /// host still holds.
    pub partial_block_bytes: u64,
    pub strategy: String,
    pub device: BalloonCounters,
    pub guest: GuestStats,
    pub gather: ReclaimStats,
    pub kvm_remote_tlb_flush_requests: Option<u64>,
    pub kvm_remote_tlb_flush: Option<u64>,
    /// KVM's stage-2 mappings by size (VM statistics `pages_4k`, `pages_2m`): whether the
    /// guest is mapped with 2 MiB entries.
    pub kvm_pages_4k: Option<u64>,
    pub kvm_pages_2m: Option<u64>,
    /// `--balloon-steps`: what each step did (in the report a run writes; empty from the API).
    #[serde(default)]
    pub steps: Vec<crate::devices::balloon::steps::StepReport>,
    /// What each reclaim probe measured (in the report a run writes; empty from the API).
    #[serde(default)]
    pub probes: Vec<crate::devices::reclaim_probe::ProbeReport>,
}

impl BalloonReport {
    pub fn collect(dev: &BalloonDevice, mm: &MemoryManager) -> Self {
        let t = dev.transport.lock().unwrap();
        let b = t.device();
        let gather = &mm.gather;
        Self {
            target_bytes: b.num_pages() as u64 * PAGE_SIZE,
            actual_bytes: b.actual() as u64 * PAGE_SIZE,
            guest_ram_bytes: mm.ram.layout().total_bytes(),
            host_bytes_held: mm.ram.host_bytes_held().unwrap_or(0),
            frames_in_balloon: mm.map.in_balloon(),
            memory_backend: mm.ram.backing().name().into(),
            partial_block_bytes: mm.map.count(guest_mm::FrameState::Partial) * PAGE_SIZE,
            strategy: gather.config().strategy.to_string(),
            device: {
                let mut c = b.counters.clone();
                (c.used_ring_interrupts, c.config_interrupts) = t.interrupt().signals();
                c
            },
            guest: b.guest_stats.clone(),
            gather: gather.stats(),
            kvm_remote_tlb_flush_requests: mm.kvm_stat("remote_tlb_flush_requests"),
            kvm_remote_tlb_flush: mm.kvm_stat("remote_tlb_flush"),
            kvm_pages_4k: mm.kvm_stat("pages_4k"),
            kvm_pages_2m: mm.kvm_stat("pages_2m"),
            steps: Vec::new(),
            probes: Vec::new(),
        }
    }

    /// A few human lines; empty when the balloon was never used.
    pub fn summary(&self) -> Vec<String> {
        let d = &self.device;
        if d.inflate_buffers + d.deflate_buffers + d.report_buffers == 0 {
            return Vec::new();
        }
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let g = &self.gather;
        let reclaimed_gib = g.pages_reclaimed as f64 * PAGE_SIZE as f64 / (1u64 << 30) as f64;
        let per_gib = |n: u64| {
            if reclaimed_gib > 0.0 {
                n as f64 / reclaimed_gib
            } else {
                0.0
            }
        };
        vec![
            format!(
                "vmm: balloon target {:.1} MiB, actual {:.1} MiB of {:.1} MiB guest RAM; host holds {:.1} MiB",
                mib(self.target_bytes),
                mib(self.actual_bytes),
                mib(self.guest_ram_bytes),
                mib(self.host_bytes_held)
            ),
            format!(
                "vmm: balloon {} inflate / {} deflate / {} report buffers; pages inflated {}, deflated {}, reported {}, given back by reset {}; in the balloon now {}; invalid frames {}, malformed buffers {}",
                d.inflate_buffers, d.deflate_buffers, d.report_buffers, d.pages_inflated, d.pages_deflated,
                d.pages_reported, d.pages_returned_by_reset, self.frames_in_balloon, d.invalid_frames, d.malformed_buffers
            ),
            format!(
                "vmm: gather ({}): {} batches, {} pages in {} ranges, {} zap calls bridging {} in-use frames, {} host calls, {} KVM flush requests ({:.0} per GiB reclaimed)",
                self.strategy, g.batches, g.pages_reclaimed, g.ranges, g.spans, g.bridged, g.host_calls, g.kvm_flush_requests,
                per_gib(g.kvm_flush_requests)
            ),
            format!(
                "vmm: guest RAM on {}; KVM stage-2 mappings: {} of 4 KiB, {} of 2 MiB; 2 MiB blocks released {}, split {}, partial now {} ({:.1} MiB of balloon frames held in them)",
                self.memory_backend,
                self.kvm_pages_4k.map_or("?".into(), |v| v.to_string()),
                self.kvm_pages_2m.map_or("?".into(), |v| v.to_string()),
                g.blocks_released, g.blocks_split, g.partial_blocks,
                mib(self.partial_block_bytes)
            ),
            format!(
                "vmm: gather latency p50/p99 us: batch wait {}/{}, zap {}/{}, invalidate {}/{}, release {}/{}",
                g.wait_us.percentile(50.0), g.wait_us.percentile(99.0),
                g.zap_us.percentile(50.0), g.zap_us.percentile(99.0),
                g.invalidate_us.percentile(50.0), g.invalidate_us.percentile(99.0),
                g.release_us.percentile(50.0), g.release_us.percentile(99.0)
            ),
        ]
    }
}
