//! The control API: HTTP/1.1 over a Unix socket (mode 0600), compatible with Firecracker's
//! balloon endpoints where the meaning is the same, with this VMM's own resources beside
//! them. Protocol: docs/API.md.
//!
//! - `server`: the socket and its connections, on a thread of its own (a tokio runtime), so
//!   that no client can delay the event loop: connections are bounded, over the bound refused
//!   at once, each one's headers and body read under a deadline.
//! - `deadline`: the per-connection deadlines (408 on a late request, an end to responses
//!   nobody reads).
//! - `routes`: what each endpoint does, as a plain function of method, path and body.
//! - `client`: the one client that `vmm balloon`, the tools and the tests use.

pub mod client;
mod deadline;
pub mod routes;
mod server;

pub use client::{ApiClient, ApiError};
pub use routes::ApiState;
pub use server::{ApiServer, MAX_BODY, MAX_CONNECTIONS, REQUEST_TIMEOUT};
