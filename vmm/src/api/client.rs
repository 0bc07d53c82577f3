//! The control API's client: what `vmm balloon`, the tools and the tests use to talk to a
//! running VM. One HTTP/1.1 request per connection over the Unix socket.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("cannot connect to {path} (is `vmm run --api-sock` running?): {err}")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error("HTTP exchange with {path} failed: {err}")]
    Http { path: PathBuf, err: hyper::Error },
    #[error("{method} {resource} answered {status}: {fault}")]
    Refused {
        method: Method,
        resource: String,
        status: u16,
        fault: String,
    },
    #[error("{resource} answered JSON this client cannot read: {err}")]
    Decode {
        resource: String,
        err: serde_json::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A status and the JSON body (Null when there is none).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// How long a connect may keep finding the server's accept queue full.
const CONNECT_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects, retrying while the server's accept queue is full: a connect to a Unix socket
/// whose backlog is full fails with EAGAIN instead of waiting, as many busy clients see.
async fn connect(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let start = std::time::Instant::now();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && start.elapsed() < CONNECT_RETRY_FOR =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            r => return r,
        }
    }
}

pub struct ApiClient {
    sock: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl ApiClient {
    pub fn new(sock: &Path) -> Result<Self, ApiError> {
        Ok(Self {
            sock: sock.to_path_buf(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Sends one request; any status comes back as an `Answer`.
    pub fn send(
        &self,
        method: Method,
        resource: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ApiError> {
        let path = self.sock.clone();
        self.runtime.block_on(async {
            let stream = connect(&path).await.map_err(|err| ApiError::Connect {
                path: path.clone(),
                err,
            })?;
            let http = |err| ApiError::Http {
                path: path.clone(),
                err,
            };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(http)?;
            tokio::spawn(conn);
            let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
            let mut req = Request::builder()
                .method(method)
                .uri(resource)
                .header("host", "localhost");
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            let req = req.body(Full::new(bytes)).expect("a valid request");
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok(Answer {
                status,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            })
        })
    }

    /// Sends one request and requires a 2xx answer; its body.
    pub fn call(
        &self,
        method: Method,
        resource: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let a = self.send(method.clone(), resource, body)?;
        if (200..300).contains(&a.status) {
            return Ok(a.body);
        }
        Err(ApiError::Refused {
            method,
            resource: resource.to_string(),
            status: a.status,
            fault: a.body["fault_message"]
                .as_str()
                .unwrap_or("(no fault_message)")
                .to_string(),
        })
    }

    pub fn get(&self, resource: &str) -> Result<Value, ApiError> {
        self.call(Method::GET, resource, None)
    }

    pub fn patch(&self, resource: &str, body: &Value) -> Result<Value, ApiError> {
        self.call(Method::PATCH, resource, Some(body))
    }

    /// The balloon target, in MiB (Firecracker's `PATCH /balloon`).
    pub fn set_balloon_mib(&self, mib: u64) -> Result<(), ApiError> {
        self.patch("/balloon", &serde_json::json!({ "amount_mib": mib }))
            .map(drop)
    }

    /// `GET resource`, read as `T`.
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, resource: &str) -> Result<T, ApiError> {
        serde_json::from_value(self.get(resource)?).map_err(|err| ApiError::Decode {
            resource: resource.to_string(),
            err,
        })
    }

    /// Everything this VMM reports about reclaim (`GET /vm/reclaim`): the balloon, the
    /// device's and the gather's counters, KVM's flush counters, host bytes held.
    pub fn reclaim(&self) -> Result<crate::report::BalloonReport, ApiError> {
        self.get_as("/vm/reclaim")
    }

    /// The balloon's target, actual size and the driver's statistics
    /// (`GET /balloon/statistics`).
    pub fn statistics(&self) -> Result<crate::devices::balloon::BalloonStatistics, ApiError> {
        self.get_as("/balloon/statistics")
    }

    /// Starts a free page hinting run (`PATCH /balloon/hinting/start`).
    pub fn start_hinting(&self, acknowledge_on_stop: bool) -> Result<(), ApiError> {
        let body = serde_json::json!({ "acknowledge_on_stop": acknowledge_on_stop });
        self.patch("/balloon/hinting/start", &body).map(drop)
    }

    /// The hinting run's commands (`GET /balloon/hinting/status`).
    pub fn hinting_status(
        &self,
    ) -> Result<crate::devices::balloon::hinting::HintingStatus, ApiError> {
        self.get_as("/balloon/hinting/status")
    }

    /// The reclaim settings (`GET /vm/reclaim/config`).
    pub fn reclaim_config(&self) -> Result<guest_mm::ReclaimConfig, ApiError> {
        self.get_as("/vm/reclaim/config")
    }
}
