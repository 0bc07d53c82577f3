//! The endpoints: a plain function from (method, path, body) to (status, JSON), run off the
//! async runtime because it takes the device and gather locks. Every value from the client is
//! validated and every refusal says why in `{"fault_message": "..."}`, as Firecracker does.

use crate::devices::balloon::BalloonDevice;
use crate::memory::MemoryManager;
use crate::report::BalloonReport;
use guest_mm::layout::PAGE_SIZE;
use guest_mm::{GatherConfig, Strategy};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Longest statistics polling interval accepted (Firecracker takes any u16).
const MAX_POLL_INTERVAL_S: u64 = u16::MAX as u64;
/// Largest gather batch accepted through the API, in frames (4 GiB).
const MAX_BATCH_PAGES: u64 = 1 << 20;
/// Longest gather window accepted through the API.
const MAX_WINDOW_MS: u64 = 60_000;

/// What the endpoints act on.
pub struct ApiState {
    pub balloon: Arc<BalloonDevice>,
    pub memory: Arc<MemoryManager>,
}

/// An endpoint's answer: a status and, except for 204, a JSON body.
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn fault(status: u16, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "fault_message": msg.into() })),
        }
    }
}

/// The resources and the methods each allows (for 405 answers).
const RESOURCES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/balloon", "GET, PATCH"),
    ("/balloon/statistics", "GET, PATCH"),
    ("/vm/reclaim", "GET"),
    ("/vm/reclaim/config", "GET, PATCH"),
];

pub fn route(s: &ApiState, method: &Method, path: &str, body: &[u8]) -> Reply {
    match (method, path) {
        (&Method::GET, "/") => Reply::ok(json!({
            "id": "vmm",
            "state": "Running",
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "app_name": "stage2-vmm",
        })),
        (&Method::GET, "/balloon") => Reply::ok(s.balloon_config()),
        (&Method::PATCH, "/balloon") => parse(body).map_or_else(|r| r, |b| s.set_amount(b)),
        (&Method::GET, "/balloon/statistics") => s.statistics(),
        (&Method::PATCH, "/balloon/statistics") => {
            parse(body).map_or_else(|r| r, |b| s.set_polling(b))
        }
        (&Method::GET, "/vm/reclaim") => Reply::ok(
            serde_json::to_value(BalloonReport::collect(&s.balloon, &s.memory))
                .unwrap_or(Value::Null),
        ),
        (&Method::GET, "/vm/reclaim/config") => {
            Reply::ok(reclaim_config(s.memory.gather.lock().unwrap().config()))
        }
        (&Method::PATCH, "/vm/reclaim/config") => {
            parse(body).map_or_else(|r| r, |b| s.set_reclaim_config(b))
        }
        _ => match RESOURCES.iter().find(|(p, _)| *p == path) {
            Some((_, allowed)) => Reply::fault(
                405,
                format!("{method} is not allowed on {path}; use {allowed}"),
            ),
            None => Reply::fault(
                404,
                format!(
                    "no resource {path}; the API has {}",
                    RESOURCES
                        .iter()
                        .map(|(p, _)| *p)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        },
    }
}

/// Parses a JSON body into `T` (unknown fields refused), or the 400 that says why not.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| Reply::fault(400, format!("bad request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonUpdate {
    amount_mib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsUpdate {
    stats_polling_interval_s: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReclaimConfigUpdate {
    strategy: Option<String>,
    batch_pages: Option<u64>,
    batch_window_ms: Option<u64>,
    zap_span_gap: Option<u64>,
}

fn reclaim_config(c: &GatherConfig) -> Value {
    json!({
        "strategy": c.strategy,
        "batch_pages": c.max_batch_pages,
        "batch_window_ms": c.window.as_millis() as u64,
        "zap_span_gap": c.zap_span_gap,
    })
}

impl ApiState {
    fn ram_bytes(&self) -> u64 {
        self.memory.ram.layout().total_bytes()
    }

    fn balloon_config(&self) -> Value {
        let t = self.balloon.transport.lock().unwrap();
        json!({
            "amount_mib": t.device().num_pages() as u64 * PAGE_SIZE / MIB,
            // The device offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM to every driver.
            "deflate_on_oom": true,
            "stats_polling_interval_s": self.balloon.stats_interval_s(),
        })
    }

    fn set_amount(&self, b: BalloonUpdate) -> Reply {
        let ram_mib = self.ram_bytes() / MIB;
        if b.amount_mib > ram_mib {
            return Reply::fault(
                400,
                format!(
                    "amount_mib {} exceeds the guest's RAM ({ram_mib} MiB)",
                    b.amount_mib
                ),
            );
        }
        // At most the guest's RAM, so the page count fits in the device's u32.
        let pages = (b.amount_mib * MIB / PAGE_SIZE) as u32;
        self.balloon.set_target_pages(pages);
        tracing::info!("api: balloon target set to {} MiB", b.amount_mib);
        Reply::no_content()
    }

    fn statistics(&self) -> Reply {
        if self.balloon.stats_interval_s() == 0 {
            return Reply::fault(
                400,
                "statistics are disabled: set a polling interval with PATCH /balloon/statistics",
            );
        }
        let t = self.balloon.transport.lock().unwrap();
        let b = t.device();
        let (target, actual) = (b.num_pages() as u64, b.actual() as u64);
        let mut v = json!({
            "target_pages": target,
            "actual_pages": actual,
            "target_mib": target * PAGE_SIZE / MIB,
            "actual_mib": actual * PAGE_SIZE / MIB,
        });
        // The guest's statistics, under Firecracker's names, where the driver sent them.
        if let Value::Object(stats) = serde_json::to_value(&b.guest_stats).unwrap_or_default() {
            for (k, val) in stats {
                if !val.is_null() && k != "unknown_tags" && k != "updates" {
                    v[k] = val;
                }
            }
        }
        Reply::ok(v)
    }

    fn set_polling(&self, u: StatsUpdate) -> Reply {
        if u.stats_polling_interval_s > MAX_POLL_INTERVAL_S {
            return Reply::fault(
                400,
                format!(
                    "stats_polling_interval_s {} is above {MAX_POLL_INTERVAL_S}",
                    u.stats_polling_interval_s
                ),
            );
        }
        self.balloon
            .set_stats_interval_s(u.stats_polling_interval_s);
        Reply::no_content()
    }

    fn set_reclaim_config(&self, u: ReclaimConfigUpdate) -> Reply {
        let mut g = self.memory.gather.lock().unwrap();
        let mut c = *g.config();
        if let Some(s) = u.strategy {
            match s.parse::<Strategy>() {
                Ok(s) => c.strategy = s,
                Err(e) => return Reply::fault(400, e),
            }
        }
        if let Some(p) = u.batch_pages {
            if !(1..=MAX_BATCH_PAGES).contains(&p) {
                return Reply::fault(
                    400,
                    format!("batch_pages {p} is not within 1..={MAX_BATCH_PAGES}"),
                );
            }
            c.max_batch_pages = p;
        }
        if let Some(ms) = u.batch_window_ms {
            if ms > MAX_WINDOW_MS {
                return Reply::fault(
                    400,
                    format!("batch_window_ms {ms} is above {MAX_WINDOW_MS}"),
                );
            }
            c.window = Duration::from_millis(ms);
        }
        if let Some(gap) = u.zap_span_gap {
            c.zap_span_gap = gap;
        }
        // The pending batch keeps going; the next flush uses the new settings.
        g.set_config(c);
        tracing::info!("api: reclaim config {}", reclaim_config(&c));
        Reply::no_content()
    }
}
