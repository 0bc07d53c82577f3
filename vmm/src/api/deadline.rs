//! Per-connection deadlines of the control socket, enforced on the connection's byte stream
//! so that no client holds one of the bounded connection slots for long:
//!
//! - **Request deadline**: a request's head must arrive within `limit` of the previous
//!   response (or of the connection's start). When it passes while the server waits for
//!   bytes, the client gets `408 Request Timeout` (written directly, best effort) and the
//!   connection ends. This covers idle keep-alive connections and clients that trickle a
//!   head out byte by byte, which an idle timer would never catch. It never fires while a
//!   request is being served (`Busy`, set by the handler from the parsed head until its
//!   answer is produced; the body has a deadline of its own there) nor while an answer is
//!   being written: hyper keeps reading the socket meanwhile (to notice a client that went
//!   away), and a 408 there would cut a request already acted on or splice into an answer.
//! - **Write stall**: a response that cannot make progress for `limit` (a client that
//!   pipelines requests and never reads its answers) ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::{Instant, Sleep};

/// The answer written when the request deadline passes.
pub const TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 73\r\nconnection: close\r\n\r\n{\"fault_message\":\"the request did not arrive in time; connection closed\"}";

/// Whether a connection's request is being served (between its parsed head and its answer).
#[derive(Clone, Default)]
pub struct Busy(Arc<AtomicBool>);

impl Busy {
    /// Marks the connection busy until the guard is dropped.
    pub fn serving(&self) -> BusyGuard {
        self.0.store(true, Ordering::Release);
        BusyGuard(self.0.clone())
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Clears `Busy` when the handler ends (or is dropped).
pub struct BusyGuard(Arc<AtomicBool>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub struct Deadlined {
    inner: UnixStream,
    limit: Duration,
    busy: Busy,
    request: Pin<Box<Sleep>>,
    /// Armed while a write is blocked.
    stall: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
}

impl Deadlined {
    pub fn new(inner: UnixStream, limit: Duration, busy: Busy) -> Self {
        Self {
            inner,
            limit,
            busy,
            request: Box::pin(tokio::time::sleep(limit)),
            stall: None,
            timed_out: false,
        }
    }

    /// Restarts the request deadline from now.
    fn restart(&mut self) {
        let next = Instant::now() + self.limit;
        self.request.as_mut().reset(next);
    }

    fn wrote(&mut self) {
        self.stall = None;
        self.restart();
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client has not read its responses for the idle limit",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        if self.busy.get() || self.stall.is_some() {
            // A request in service or an answer being written: no request is due. The
            // deadline starts again from here (the answer's write restarts it too).
            self.restart();
            return Poll::Pending;
        }
        if self.request.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The deadline passed with no request: say so, then end the stream (EOF).
        self.timed_out = true;
        let _ = self.inner.try_write(TIMEOUT_RESPONSE);
        tracing::debug!("api: request deadline passed; 408 sent, connection closed");
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.wrote();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.stalled(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn a_silent_client_gets_408_and_eof_at_the_deadline() {
        rt().block_on(async {
            let (server, mut client) = UnixStream::pair().unwrap();
            let mut s = Deadlined::new(server, Duration::from_secs(10), Busy::default());
            let mut buf = [0u8; 16];
            // Time is paused: the read completes only when the clock reaches the deadline.
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(n, 0, "EOF to the server side");
            let mut got = Vec::new();
            drop(s);
            client.read_to_end(&mut got).await.unwrap();
            assert!(
                got.starts_with(b"HTTP/1.1 408 "),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
            assert_eq!(body.len(), 73, "content-length matches the body");
        });
    }

    #[test]
    fn no_408_while_a_request_is_being_served() {
        rt().block_on(async {
            let (server, _client) = UnixStream::pair().unwrap();
            let busy = Busy::default();
            let mut s = Deadlined::new(server, Duration::from_secs(10), busy.clone());
            let guard = busy.serving();
            let mut buf = [0u8; 16];
            // A handler that takes 30 s: the reads stay pending, no 408.
            let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
            assert!(read.is_err(), "the read ended while the request was served");
            drop(guard);
            // Once served (and nothing written), the deadline runs again from the last look.
            let started = Instant::now();
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
            assert!(started.elapsed() <= Duration::from_secs(10));
        });
    }

    #[test]
    fn a_client_that_never_reads_loses_the_connection_at_the_limit() {
        rt().block_on(async {
            let (server, _client) = UnixStream::pair().unwrap();
            let mut s = Deadlined::new(server, Duration::from_secs(10), Busy::default());
            let chunk = vec![b'x'; 64 << 10];
            let started = Instant::now();
            let err = loop {
                if let Err(e) = s.write(&chunk).await {
                    break e;
                }
            };
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            assert!(started.elapsed() >= Duration::from_secs(10));
            assert!(started.elapsed() < Duration::from_secs(11));
        });
    }
}
