//! Scripted balloon targets (`vmm run --balloon-steps 768M,0`): set each target once the
//! driver has reached the previous one, and report how long each took and what the host got
//! back.

use super::BalloonDevice;
use crate::config::format_size;
use guest_mm::layout::PAGE_SIZE;
use std::time::{Duration, Instant};

pub struct BalloonSteps {
    targets: Vec<u64>,
    next: usize,
    current: Option<(u64, Instant, u64)>,
    timeout: Duration,
}

impl BalloonSteps {
    pub fn new(targets: Vec<u64>, timeout: Duration) -> Self {
        Self {
            targets,
            next: 0,
            current: None,
            timeout,
        }
    }

    /// Advances the script; call often from the event loop.
    pub fn tick(&mut self, dev: &BalloonDevice) {
        let mut t = dev.transport.lock().unwrap();
        let mm = t.device().memory().clone();
        if let Some((target, since, held_before)) = self.current {
            let actual = t.device().actual() as u64 * PAGE_SIZE;
            if actual == target {
                // Give a pending gather batch its window before reading host bytes.
                drop(t);
                if let Some(r) = mm.gather.lock().unwrap().flush() {
                    tracing::debug!("balloon: flushed batch {} at step end", r.id);
                }
                let held = mm.ram.host_bytes_held().unwrap_or(0);
                crate::report::say(&format!(
                    "vmm: balloon step {} reached: balloon {} after {:.3}s; host bytes held {} -> {} ({}) \
                     [step={} target_bytes={target} seconds={:.3} held_before={held_before} held_after={held}]",
                    self.next,
                    format_size(target),
                    since.elapsed().as_secs_f64(),
                    format_size_approx(held_before),
                    format_size_approx(held),
                    signed_mib(held as i64 - held_before as i64),
                    self.next,
                    since.elapsed().as_secs_f64(),
                ));
                self.current = None;
                return;
            }
            if since.elapsed() > self.timeout {
                crate::report::say(&format!(
                    "vmm: balloon step {} not reached after {:?}: target {} actual {}",
                    self.next,
                    self.timeout,
                    format_size(target),
                    format_size_approx(actual)
                ));
                self.current = None;
            }
            return;
        }
        if self.next < self.targets.len() && t.is_active() {
            let target = self.targets[self.next];
            self.next += 1;
            if t.device_mut().set_num_pages((target / PAGE_SIZE) as u32) {
                t.config_changed();
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
}

pub fn format_size_approx(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn signed_mib(delta: i64) -> String {
    format!("{:+.1} MiB", delta as f64 / (1u64 << 20) as f64)
}
