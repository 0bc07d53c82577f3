//! The control socket and its connections, served on a thread of its own so that nothing the
//! event loop does (gather windows, balloon steps, statistics requests, signals) ever waits
//! on a client.
//!
//! - The socket: created in a private directory (mode 0700) and set to 0600 there, then
//!   linked into place, so it never appears at its path with a looser mode; a socket at the
//!   path that still accepts connections belongs to a live process and is never replaced;
//!   on exit the path is removed only if it is still this server's socket.
//! - At most MAX_CONNECTIONS connections at once; one over the bound gets a fixed 503 after
//!   its request head is read (so that the client can read the answer) and is closed.
//! - Each request's head must arrive within REQUEST_TIMEOUT of the previous response (idle
//!   keep-alive connections and trickled heads too), else 408 and close; its body, at most
//!   MAX_BODY bytes, within BODY_TIMEOUT; a response the client does not read for
//!   REQUEST_TIMEOUT ends the connection (`deadline`).
//! - The endpoints take the device and gather locks, so they run on tokio's blocking pool,
//!   never on the runtime thread that accepts and reads.

use super::deadline::{Busy, Deadlined};
use super::routes::{self, ApiState, Reply};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections served at once; more are refused with 503.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest request body, in bytes.
pub const MAX_BODY: usize = 4096;
/// How long a request's head may take, and how long a response may wait for its reader.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// sun_path's size (108 bytes with its NUL).
const SUN_PATH_MAX: usize = 108;
/// How long a refused connection may take to send its request head and to read the 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket this server bound: the path is removed on exit only if
    /// it still names it.
    socket_id: (u64, u64),
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` with mode 0600 (replacing a stale socket, never a live one nor another
    /// kind of file) and starts serving it on a thread of its own.
    pub fn start(path: &Path, state: ApiState) -> std::io::Result<Self> {
        let (listener, socket_id) = bind_private(path)?;
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
            socket_id,
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
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.socket_id => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::warn!(
                "api: {} is no longer this VMM's socket; left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

fn io_error(kind: std::io::ErrorKind, msg: String) -> std::io::Error {
    std::io::Error::new(kind, msg)
}

/// Makes sure nothing live is at `path`: a socket that refuses connections is stale and is
/// removed; one that accepts them (or that this process may not probe) is another
/// process's, and so is any file that is not a socket.
fn clear_stale(path: &Path) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let shown = path.display();
    if !meta.file_type().is_socket() {
        return Err(io_error(
            std::io::ErrorKind::AlreadyExists,
            format!("{shown} exists and is not a socket; refusing to replace it"),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io_error(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{shown} is the live control socket of another process (it accepts \
                 connections); stop that VMM or choose another --api-sock path"
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(io_error(
            e.kind(),
            format!("{shown} exists and cannot be probed ({e}); refusing to replace it"),
        )),
    }
}

/// Binds the socket in a fresh private directory beside `path`, sets it to 0600 there, then
/// links it to `path` (which fails if anything appeared there meanwhile). Returns the
/// listener and the socket's (device, inode).
fn bind_private(path: &Path) -> std::io::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    // sun_path holds 108 bytes with the terminating NUL: a longer path could be bound through
    // a shorter one, but no client could connect to it.
    let len = path.as_os_str().len();
    if len >= SUN_PATH_MAX {
        return Err(io_error(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is {len} bytes; a Unix socket path must be shorter than {SUN_PATH_MAX} \
                 bytes: choose a shorter --api-sock path",
                path.display()
            ),
        ));
    }
    clear_stale(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut template = parent
        .join(".vmm-api.XXXXXX")
        .into_os_string()
        .into_encoded_bytes();
    template.push(0);
    // SAFETY: a NUL-terminated template that mkdtemp rewrites in place.
    let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if made.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(io_error(
            e.kind(),
            format!(
                "cannot create a private directory in {}: {e}",
                parent.display()
            ),
        ));
    }
    template.pop();
    // SAFETY: mkdtemp wrote a path of the same length, from bytes of our OsString.
    let dir = PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(template) });
    let private = dir.join("s");
    let bound = (|| {
        // Bound through /proc/self/fd when it is there, so that the private directory's
        // longer path does not count against sun_path's 108 bytes (only `path` must fit).
        let dir_file = std::fs::File::open(&dir)?;
        let short = PathBuf::from(format!("/proc/self/fd/{}/s", dir_file.as_raw_fd()));
        let listener = match std::os::unix::net::UnixListener::bind(&short) {
            Ok(l) => l,
            Err(_) => std::os::unix::net::UnixListener::bind(&private)?,
        };
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&private, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                io_error(
                    e.kind(),
                    format!("{} appeared while this VMM was binding it", path.display()),
                )
            } else {
                e
            }
        })?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_file(&private);
    let _ = std::fs::remove_dir(&dir);
    bound
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
    let refusing = Arc::new(AtomicUsize::new(0));
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
            // Refusals are bounded too; past that bound a connection is just closed.
            if refusing.load(Ordering::Acquire) < MAX_CONNECTIONS {
                refusing.fetch_add(1, Ordering::AcqRel);
                let refusing = refusing.clone();
                tokio::spawn(async move {
                    refuse(stream).await;
                    refusing.fetch_sub(1, Ordering::AcqRel);
                });
            }
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (state, active) = (state.clone(), active.clone());
        tokio::spawn(async move {
            let busy = Busy::default();
            let serving = busy.clone();
            let svc = service_fn(move |req| handle(state.clone(), req, serving.clone()));
            // Deadlines are the stream's (408 and write stalls); hyper's own header timeout
            // would close without an answer.
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .serve_connection(
                    TokioIo::new(Deadlined::new(stream, REQUEST_TIMEOUT, busy)),
                    svc,
                );
            if let Err(e) = conn.await {
                tracing::debug!("api: connection ended: {e}");
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Over the connection bound: a fixed 503. The request head is read first and whatever the
/// client sends after the answer is drained until it closes (within REFUSE_TIMEOUT each):
/// a Unix socket closed with unread bytes makes the client's read fail with ECONNRESET
/// instead of returning the answer.
async fn refuse(mut stream: tokio::net::UnixStream) {
    let mut buf = [0u8; 1024];
    let mut head = Vec::new();
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        while let Ok(n) = stream.read(&mut buf).await {
            head.extend_from_slice(&buf[..n]);
            if n == 0 || head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > MAX_BODY {
                break;
            }
        }
    })
    .await;
    let body = format!(
        "{{\"fault_message\":\"too many connections to the control API (at most {MAX_CONNECTIONS}); try again\"}}"
    );
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, stream.write_all(msg.as_bytes())).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn handle(
    state: Arc<ApiState>,
    req: Request<Incoming>,
    busy: Busy,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    // From the parsed head until the answer exists, no request deadline (`deadline`).
    let _serving = busy.serving();
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
    if let Some(allow) = reply.allow {
        resp = resp.header("allow", allow);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Under `umask 000` a socket bound at its path is 0777 until chmod; a watcher that
    /// stats the path in a loop sees every mode it ever has there.
    #[test]
    fn the_socket_never_appears_at_its_path_with_a_looser_mode_than_0600() {
        let dir = scratch_dir("api-umask");
        let path = dir.join("api.sock");
        // SAFETY: umask only; restored below. Other tests of this binary create no files
        // whose mode they check.
        let old = unsafe { libc::umask(0) };
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(std::sync::Barrier::new(2));
        let watcher = {
            let (stop, path, running) = (stop.clone(), path.clone(), running.clone());
            std::thread::spawn(move || {
                let (mut seen, mut loose) = (0u64, 0u64);
                running.wait();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        seen += 1;
                        if m.mode() & 0o777 != 0o600 {
                            loose += 1;
                        }
                    }
                }
                (seen, loose)
            })
        };
        running.wait();
        for _ in 0..3000 {
            let (listener, _) = bind_private(&path).unwrap();
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, loose) = watcher.join().unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert!(seen > 0, "the watcher never saw the socket");
        assert_eq!(
            loose, 0,
            "{loose} of {seen} looks at the path found a mode other than 0600"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "private directories left behind: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_that_fits_sun_path_binds_however_deep_its_directory() {
        let base = scratch_dir("api-long");
        // The final path is 107 bytes: it fits; the private directory beside it would not.
        let room = 107 - base.as_os_str().len() - "/a.sock".len() - 1;
        let deep = base.join("d".repeat(room));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("a.sock");
        assert_eq!(path.as_os_str().len(), 107);
        let (_l, _) = bind_private(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        let too_long = deep.join("ab.sock");
        let e = bind_private(&too_long).unwrap_err();
        assert!(
            e.to_string().contains("must be shorter than 108 bytes"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = scratch_dir("api-owner");
        let path = dir.join("api.sock");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = bind_private(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            e.to_string()
                .contains("live control socket of another process"),
            "{e}"
        );
        drop(live); // the file stays: a stale socket
        let (_listener, id) = bind_private(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((m.dev(), m.ino()), id);
        std::fs::write(dir.join("file"), b"x").unwrap();
        let e = bind_private(&dir.join("file")).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
