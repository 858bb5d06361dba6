//! Resource bounds for everything a client or upstream can hold open or make the proxy buffer: how many client
//! connections are served at once, how long a request head and each gap in a request body may take, how long an
//! upstream may take to start answering, and the hyper limits on header counts, header sizes, per-connection
//! buffers and concurrent HTTP/2 streams. The defaults are
//! the product's values; [`set_limits`] exists so tests can shorten the timeouts (first call wins, process-wide).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The proxy's resource bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections served at once, over every listener. Beyond it the proxy stops accepting (clients
    /// wait in the kernel's backlog) until a connection ends, so a runaway agent cannot exhaust memory or files.
    pub max_connections: usize,
    /// How long an HTTP/1.1 client may take to send a request head (slow-loris on the head).
    pub header_read_timeout: Duration,
    /// The longest silence allowed while a request body is being read (slow-loris on the body): 408 after it.
    pub body_idle_timeout: Duration,
    /// How long the upstream may take to send its response head; streaming bodies are never timed out once the
    /// head has arrived. 504 after it.
    pub response_head_timeout: Duration,
    /// How long a response may hold a part of an upstream's answer for its decision: a tool call whose arguments
    /// are still streaming, or a body read whole for a response rule. Refused (`hold_timeout`) after it.
    pub hold_timeout: Duration,
    /// HTTP/1.1: most header fields in a request head.
    pub h1_max_headers: usize,
    /// HTTP/1.1: the connection's read buffer, which bounds a request head's size.
    pub h1_max_buf_size: usize,
    /// HTTP/2: most concurrent streams a client may open on one connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: the largest decoded header list (the h2 analogue of the head size).
    pub h2_max_header_list_size: u32,
    /// HTTP/2: streams reset by the client before the proxy saw them (rapid-reset bound).
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2: bytes buffered per stream for sending.
    pub h2_max_send_buf_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(30),
            response_head_timeout: Duration::from_secs(120),
            hold_timeout: Duration::from_secs(300),
            h1_max_headers: 100,
            h1_max_buf_size: 64 * 1024,
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 64 * 1024,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_send_buf_size: 400 * 1024,
        }
    }
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Replace the default limits for this process. Only the first call (before any connection is served) has an
/// effect; returns whether it did.
pub fn set_limits(limits: Limits) -> bool {
    LIMITS.set(limits).is_ok()
}

/// The limits in force.
pub(crate) fn limits() -> &'static Limits {
    LIMITS.get_or_init(Limits::default)
}

/// Wait for a free connection slot; the connection holds the permit for its whole life.
pub(crate) async fn connection_slot() -> OwnedSemaphorePermit {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| Arc::new(Semaphore::new(limits().max_connections.max(1))));
    slots
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed")
}
