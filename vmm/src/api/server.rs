//! The control socket and its connections, served on a thread of its own so that nothing the
//! event loop does (gather windows, balloon steps, statistics requests, signals) ever waits
//! on a client.
//!
//! - At most MAX_CONNECTIONS connections at once; one over the bound is answered 503 at once
//!   (a fixed response, before reading anything) and closed.
//! - Each request's headers must arrive within HEADER_TIMEOUT (idle keep-alive connections
//!   too) and its body, at most MAX_BODY bytes, within BODY_TIMEOUT.
//! - The endpoints take the device and gather locks, so they run on tokio's blocking pool,
//!   never on the runtime thread that accepts and reads.

use super::routes::{self, ApiState, Reply};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Connections served at once; more are refused with 503.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest request body, in bytes.
pub const MAX_BODY: usize = 4096;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ApiServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket, never another kind of file) with mode 0600 and
    /// starts serving it on a thread of its own.
    pub fn start(path: &Path, state: ApiState) -> std::io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = Arc::new(state);
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || runtime.block_on(serve(listener, state, rx)))?;
        Ok(Self {
            path: path.to_path_buf(),
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    state: Arc<ApiState>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("api: cannot serve the control socket: {e}");
            return;
        }
    };
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("api: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            tokio::spawn(refuse(stream));
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (state, active) = (state.clone(), active.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("api: connection ended: {e}");
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Over the connection bound: a fixed 503 answer, written before reading anything.
async fn refuse(mut stream: tokio::net::UnixStream) {
    let body = format!(
        "{{\"fault_message\":\"too many connections to the control API (at most {MAX_CONNECTIONS}); try again\"}}"
    );
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(BODY_TIMEOUT, stream.write_all(msg.as_bytes())).await;
    let _ = stream.shutdown().await;
}

async fn handle(
    state: Arc<ApiState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
    let reply = match body {
        Err(_) => Reply::fault(408, "the request body did not arrive in time"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Reply::fault(413, format!("request body larger than {MAX_BODY} bytes"))
        }
        Ok(Err(e)) => Reply::fault(400, format!("cannot read the request body: {e}")),
        Ok(Ok(b)) => {
            let bytes = b.to_bytes();
            let (method, path) = (parts.method.clone(), parts.uri.path().to_string());
            tokio::task::spawn_blocking(move || routes::route(&state, &method, &path, &bytes))
                .await
                .unwrap_or_else(|e| Reply::fault(500, format!("internal error: {e}")))
        }
    };
    let mut resp = Response::builder().status(reply.status);
    let body = match reply.body {
        Some(v) => {
            resp = resp.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    Ok(resp
        .body(Full::new(body))
        .expect("a valid status and header"))
}
