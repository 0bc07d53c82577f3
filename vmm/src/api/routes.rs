//! The endpoints: a plain function from (method, path, body) to (status, JSON), run off the
//! async runtime because it takes the device and gather locks. Every value from the client is
//! validated and every refusal says why in `{"fault_message": "..."}`, as Firecracker does.
//! A body must be a JSON object (an array or a number is refused with 400, never read as
//! the object's fields in order); a 405 names the allowed methods in `Allow`.

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

/// An endpoint's answer: a status and, except for 204, a JSON body; for 405, the methods
/// the resource allows (the `Allow` header).
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub allow: Option<&'static str>,
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
    /// Offered unless the VM was started with `--balloon-free-page-reporting false`.
    pub free_page_reporting: bool,
    /// Offered when the VM was started with `--balloon-free-page-hinting`.
    pub free_page_hinting: bool,
}

impl Reply {
    fn typed(body: &impl Serialize) -> Self {
        Self::ok(serde_json::to_value(body).unwrap_or(Value::Null))
    }

    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
            allow: None,
        }
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            allow: None,
        }
    }

    pub fn fault(status: u16, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "fault_message": msg.into() })),
            allow: None,
        }
    }

    fn from_result(r: Result<(), &str>) -> Self {
        r.map_or_else(|e| Self::fault(400, e), |()| Self::no_content())
    }
}

/// The resources and the methods each allows (for 405 answers).
const RESOURCES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/balloon", "GET, PUT, PATCH"),
    ("/balloon/statistics", "GET, PATCH"),
    ("/balloon/hinting/start", "PATCH"),
    ("/balloon/hinting/status", "GET"),
    ("/balloon/hinting/stop", "PATCH"),
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
        (&Method::PUT, "/balloon") => Reply::fault(
            400,
            "the balloon is configured on the command line when the VM starts (PUT /balloon is \
             only for a VM not yet booted, and this VMM boots at start); change its size with \
             PATCH /balloon",
        ),
        (&Method::PATCH, "/balloon") => parse(body).map_or_else(|r| r, |b| s.set_amount(b)),
        (&Method::PATCH, "/balloon/hinting/start") => {
            parse_optional(body).map_or_else(|r| r, |b: HintingStart| s.start_hinting(b))
        }
        (&Method::GET, "/balloon/hinting/status") => s
            .balloon
            .hinting_status()
            .map_or_else(|e| Reply::fault(400, e), |st| Reply::typed(&st)),
        (&Method::PATCH, "/balloon/hinting/stop") => {
            Reply::from_result(s.balloon.stop_hinting().map(|()| {
                tracing::info!("api: free page hinting stopped");
            }))
        }
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
            Some((_, allowed)) => Reply {
                allow: Some(allowed),
                ..Reply::fault(
                    405,
                    format!("{method} is not allowed on {path}; use {allowed}"),
                )
            },
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

/// Parses a JSON object body into `T` (unknown fields refused), or the 400 that says why
/// not. Only an object is taken: serde would read an array such as `[512]` as the struct's
/// fields in order.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    let bad = |e: String| Reply::fault(400, format!("bad request body: {e}"));
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad(format!(
            "expected a JSON object, got {}",
            match value {
                Value::Array(_) => "an array",
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Object(_) => unreachable!(),
            }
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// `parse`, where an empty body means the defaults (Firecracker's optional bodies).
fn parse_optional<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body)
}

/// `PATCH /balloon/hinting/start`'s optional body (Firecracker's `BalloonStartCmd`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HintingStart {
    /// Write DONE as soon as the driver sends STOP (default), rather than on
    /// `PATCH /balloon/hinting/stop`.
    #[serde(default = "yes")]
    acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

impl Default for HintingStart {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
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
            free_page_reporting: t.device().offered().free_page_reporting,
            free_page_hinting: t.device().hinting_offered(),
        }
    }

    fn start_hinting(&self, b: HintingStart) -> Reply {
        match self.balloon.start_hinting(b.acknowledge_on_stop) {
            Ok(id) => {
                tracing::info!(
                    "api: free page hinting run {id} started (acknowledge_on_stop: {})",
                    b.acknowledge_on_stop
                );
                Reply::no_content()
            }
            Err(e) => Reply::fault(400, e),
        }
    }

    fn set_amount(&self, b: BalloonUpdate) -> Reply {
        if self
            .balloon
            .steps_pending
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Reply::fault(
                409,
                "the balloon target follows --balloon-steps until its last step is reached or \
                 times out; PATCH /balloon is refused until then",
            );
        }
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
