//! The endpoints: a plain function from (method, path, body) to (status, JSON), run off the
//! async runtime because it takes the device and gather locks. Every value from the client is
//! validated and every refusal says why in `{"fault_message": "..."}`, as Firecracker does.

use crate::devices::balloon::{BalloonDevice, BalloonStatistics};
use crate::memory::MemoryManager;
use crate::report::BalloonReport;
use guest_mm::layout::PAGE_SIZE;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// Longest statistics polling interval accepted (Firecracker takes any u16).
const MAX_POLL_INTERVAL_S: u64 = u16::MAX as u64;

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

/// `GET /`: what the VM says of itself (Firecracker's shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// `GET /balloon`: the balloon's configuration (Firecracker's shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    pub stats_polling_interval_s: u64,
}

impl Reply {
    fn typed(body: &impl Serialize) -> Self {
        Self::ok(serde_json::to_value(body).unwrap_or(Value::Null))
    }

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
        (&Method::GET, "/") => Reply::typed(&VmInfo {
            id: "vmm".into(),
            state: "Running".into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "stage2-vmm".into(),
        }),
        (&Method::GET, "/balloon") => Reply::typed(&s.balloon_config()),
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
            Reply::ok(serde_json::to_value(s.memory.gather.config()).unwrap_or(Value::Null))
        }
        (&Method::PATCH, "/vm/reclaim/config") => {
            parse(body).map_or_else(|r| r, |b| s.patch_reclaim_config(b))
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

impl ApiState {
    fn ram_bytes(&self) -> u64 {
        self.memory.ram.layout().total_bytes()
    }

    fn balloon_config(&self) -> BalloonConfig {
        let t = self.balloon.transport.lock().unwrap();
        BalloonConfig {
            amount_mib: t.device().num_pages() as u64 * PAGE_SIZE / MIB,
            // The device offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM to every driver.
            deflate_on_oom: true,
            stats_polling_interval_s: self.balloon.stats_interval_s(),
        }
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
        let reply = BalloonStatistics {
            target_pages: target,
            actual_pages: actual,
            target_mib: target * PAGE_SIZE / MIB,
            actual_mib: actual * PAGE_SIZE / MIB,
            values: b.guest_stats.values.clone(),
        };
        Reply::typed(&reply)
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

    /// Changes the reclaim settings the body names (`ReclaimConfig`'s fields; one
    /// validation, as on the command line). The pending batch keeps going; the next batch
    /// uses the new settings.
    fn patch_reclaim_config(&self, changes: serde_json::Map<String, Value>) -> Reply {
        match self.memory.gather.patch_config(&changes) {
            Ok(c) => {
                tracing::info!("api: reclaim config {c:?}");
                Reply::no_content()
            }
            Err(e) => Reply::fault(400, e.to_string()),
        }
    }
}
