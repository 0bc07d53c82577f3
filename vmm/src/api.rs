//! The control API: a Unix socket (owner-only permissions) speaking one JSON request per
//! connection, one JSON response back. Protocol: docs/API.md.

use crate::devices::balloon::BalloonDevice;
use crate::memory::MemoryManager;
use crate::report::BalloonReport;
use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_mm::layout::PAGE_SIZE;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;

/// Longest request accepted, in bytes.
pub const MAX_REQUEST: usize = 4096;
/// Bytes of an oversized request read and discarded, at most.
const DRAIN_LIMIT: usize = 1 << 20;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_millis(500);

pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    balloon: Arc<BalloonDevice>,
    memory: Arc<MemoryManager>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket, never another kind of file) with mode 0600.
    pub fn bind(
        path: &Path,
        balloon: Arc<BalloonDevice>,
        memory: Arc<MemoryManager>,
    ) -> std::io::Result<Self> {
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
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            balloon,
            memory,
        })
    }

    fn serve(&self, mut conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(READ_TIMEOUT));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        let response = loop {
            match conn.read(&mut chunk) {
                Ok(0) => break self.handle_bytes(&buf),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_REQUEST {
                        // Read the rest first (bounded), so the client gets the answer
                        // instead of a reset.
                        let mut drained = 0;
                        while let Ok(n @ 1..) = conn.read(&mut chunk) {
                            drained += n;
                            if drained > DRAIN_LIMIT {
                                break;
                            }
                        }
                        break error(&format!("request longer than {MAX_REQUEST} bytes"));
                    }
                    if buf.contains(&b'\n') {
                        break self.handle_bytes(&buf);
                    }
                }
                Err(e) => break error(&format!("cannot read request: {e}")),
            }
        };
        let mut out = response.to_string();
        out.push('\n');
        let _ = conn.write_all(out.as_bytes());
    }

    fn handle_bytes(&self, buf: &[u8]) -> Value {
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        match std::str::from_utf8(line) {
            Ok(text) => self.handle(text),
            Err(_) => error("request is not UTF-8"),
        }
    }

    /// Handles one request line.
    pub fn handle(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return error(&format!("malformed JSON: {e}")),
        };
        match req.get("cmd").and_then(Value::as_str) {
            Some("ping") => json!({ "ok": true }),
            Some("stats") => {
                json!({ "ok": true, "stats": BalloonReport::collect(&self.balloon, &self.memory) })
            }
            Some("set") => match req.get("target_bytes").and_then(Value::as_u64) {
                Some(bytes) => self.set_target(bytes),
                None => error("'set' needs \"target_bytes\": a non-negative integer"),
            },
            Some(other) => error(&format!("unknown cmd '{other}': use set, stats or ping")),
            None => error("request needs a \"cmd\" string"),
        }
    }

    fn set_target(&self, bytes: u64) -> Value {
        let ram = self.memory.ram.layout().total_bytes();
        if !bytes.is_multiple_of(PAGE_SIZE) {
            return error(&format!("target_bytes {bytes} is not a multiple of 4096"));
        }
        if bytes > ram {
            return error(&format!(
                "target_bytes {bytes} exceeds guest RAM ({ram} bytes)"
            ));
        }
        let mut t = self.balloon.transport.lock().unwrap();
        if t.device_mut().set_num_pages((bytes / PAGE_SIZE) as u32) {
            t.config_changed();
        }
        tracing::info!("api: balloon target set to {bytes} bytes");
        json!({ "ok": true, "target_bytes": bytes })
    }
}

fn error(msg: &str) -> Value {
    json!({ "ok": false, "error": msg })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("api: cannot watch the control socket: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((conn, _)) = self.listener.accept() {
            self.serve(conn);
        }
    }
}

/// Client side: sends one request and returns the response.
pub fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let mut conn = UnixStream::connect(path)?;
    let mut line = req.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)?;
    serde_json::from_str(&resp).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
