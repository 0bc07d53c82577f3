//! Scripted balloon targets (`vmm run --balloon-steps 768M,0`): set each target once the
//! driver has reached the previous one, and report how long each took and what the host got
//! back: one line per step for people, one `StepReport` per step in the run's report.

use super::BalloonDevice;
use crate::config::format_size;
use guest_mm::layout::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// One scripted step: its target, when the driver acknowledged it, and the host memory the
/// guest held around it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based, in the order of `--balloon-steps`.
    pub step: u32,
    pub target_bytes: u64,
    /// Seconds from setting the target until the driver's `actual` equalled it; None if the
    /// step timed out.
    pub reached_s: Option<f64>,
    /// Seconds until the last batch of the step was through the protocol (its host memory
    /// returned), after the target was reached.
    pub settled_s: Option<f64>,
    /// Host bytes the guest held (the memfd's allocated bytes) when the target was set, and
    /// once the step had settled (or timed out).
    pub held_before: u64,
    pub held_after: u64,
}

pub struct BalloonSteps {
    targets: Vec<u64>,
    next: usize,
    current: Option<(u64, Instant, u64)>,
    timeout: Duration,
    reports: Vec<StepReport>,
}

impl BalloonSteps {
    pub fn new(targets: Vec<u64>, timeout: Duration) -> Self {
        Self {
            targets,
            next: 0,
            current: None,
            timeout,
            reports: Vec::new(),
        }
    }

    /// Advances the script; call often from the event loop.
    pub fn tick(&mut self, dev: &BalloonDevice) {
        let mut t = dev.transport.lock().unwrap();
        let mm = t.device().memory().clone();
        if let Some((target, since, held_before)) = self.current {
            let actual = t.device().actual() as u64 * PAGE_SIZE;
            let mut report = StepReport {
                step: self.next as u32,
                target_bytes: target,
                held_before,
                ..Default::default()
            };
            if actual == target {
                // The driver acknowledged the target; the last batch may still be pending or
                // in flight. Wait for it before reading host bytes.
                report.reached_s = Some(since.elapsed().as_secs_f64());
                drop(t);
                mm.gather.flush();
                report.settled_s = Some(since.elapsed().as_secs_f64());
                report.held_after = mm.ram.host_bytes_held().unwrap_or(0);
                crate::report::say(&format!(
                    "vmm: balloon step {} reached: balloon {} after {:.3}s (host memory back after {:.3}s); host bytes held {} -> {} ({})",
                    report.step,
                    format_size(target),
                    report.reached_s.unwrap_or_default(),
                    report.settled_s.unwrap_or_default(),
                    format_size_approx(held_before),
                    format_size_approx(report.held_after),
                    signed_mib(report.held_after as i64 - held_before as i64),
                ));
            } else if since.elapsed() > self.timeout {
                report.held_after = mm.ram.host_bytes_held().unwrap_or(0);
                crate::report::say(&format!(
                    "vmm: balloon step {} not reached after {:?}: target {} actual {}",
                    report.step,
                    self.timeout,
                    format_size(target),
                    format_size_approx(actual)
                ));
            } else {
                return;
            }
            self.reports.push(report);
            self.current = None;
            return;
        }
        if self.next < self.targets.len() && t.is_active() {
            let target = self.targets[self.next];
            self.next += 1;
            let changed = t.device_mut().set_num_pages((target / PAGE_SIZE) as u32);
            if changed {
                t.config_changed();
            }
            if changed && t.device().target_met() {
                drop(t);
                super::split_at_target(&mm);
            }
            let held = mm.ram.host_bytes_held().unwrap_or(0);
            crate::report::say(&format!(
                "vmm: balloon step {}: target {}",
                self.next,
                format_size(target)
            ));
            self.current = Some((target, Instant::now(), held));
        }
    }

    pub fn done(&self) -> bool {
        self.next >= self.targets.len() && self.current.is_none()
    }

    /// What each step did, in order.
    pub fn into_reports(self) -> Vec<StepReport> {
        self.reports
    }
}

pub fn format_size_approx(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn signed_mib(delta: i64) -> String {
    format!("{:+.1} MiB", delta as f64 / (1u64 << 20) as f64)
}
