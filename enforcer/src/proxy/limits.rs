//! Resource bounds for everything a client or upstream can hold open or make the proxy buffer: how many client
//! connections are served at once and for whom, how long a request head and each gap in a request body may take,
//! how long an upstream may take to start answering, and the hyper/h2 limits on header counts, header sizes,
//! per-connection buffers and concurrent HTTP/2 streams. The defaults are the product's values; [`set_limits`]
//! exists so the daemon can apply its configuration and tests can shorten the timeouts (first call wins,
//! process-wide).
//!
//! Connections are admitted per agent (its cgroup, as the origin lookup names it; else its profile or process), the
//! way the DNS stage admits queries (`dns::Admission`): every agent has its own share of connections inside the
//! total, so one agent holding many (slow) connections uses up its own share and nobody else's. A connection beyond
//! its agent's share, or the total, is accepted and closed at once — never left in the kernel's backlog, where it
//! would make every agent wait — and recorded ([`refused`] keeps an agent flooding the proxy from flooding the audit
//! trail). While an agent's share or the total is more than half used, new connections get the shorter
//! `pressure_head_timeout` for their TLS handshake and request head. Bytes held in buffers are shared out the same
//! way ([`budget`], `max_buffered_bytes` and `max_buffered_bytes_per_agent`; see the `budget` module).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::budget::Budget;
use crate::dns::{agent_key, Admission};
use crate::model::Agent;

/// The proxy's resource bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections served at once, over every listener and agent.
    pub max_connections: usize,
    /// Most client connections served at once for one agent (cgroup).
    pub max_connections_per_agent: usize,
    /// Most bytes held in buffers at once (bodies, events and messages read whole before they are decided), over
    /// every agent: see `budget`.
    pub max_buffered_bytes: u64,
    /// Most bytes one agent's buffers hold at once: its share of [`Limits::max_buffered_bytes`].
    pub max_buffered_bytes_per_agent: u64,
    /// What a request refused for the buffer budget is told to wait before trying again (`Retry-After`, RFC 9110
    /// §10.2.3; whole seconds).
    pub buffer_retry_after: Duration,
    /// How long an HTTP/1.1 client may take to send a request head (slow-loris on the head), and an HTTP/2 client
    /// may keep a connection without an open stream.
    pub header_read_timeout: Duration,
    /// [`Limits::header_read_timeout`] (and the TLS handshake's bound) for connections admitted while their agent's
    /// share or the total is more than half used.
    pub pressure_head_timeout: Duration,
    /// The longest silence allowed while a request body is being read (slow-loris on the body): 408 after it.
    pub body_idle_timeout: Duration,
    /// How long the upstream may take to send its response head; streaming bodies are never timed out once the
    /// head has arrived. 504 after it.
    pub response_head_timeout: Duration,
    /// How long a response may hold a part of an upstream's answer for its decision: a tool call whose arguments
    /// are still streaming, or a body read whole for a response rule. Refused (`hold_timeout`) after it.
    pub hold_timeout: Duration,
    /// How often a stream of server-sent events whose tool call a review holds gets a comment line (`: …`), so the
    /// agent's client and any proxy between see bytes well within their idle timeouts.
    pub review_keepalive: Duration,
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
            max_connections_per_agent: crate::config::DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            max_buffered_bytes: crate::config::DEFAULT_MAX_BUFFERED_BYTES,
            max_buffered_bytes_per_agent: crate::config::DEFAULT_MAX_BUFFERED_BYTES_PER_AGENT,
            buffer_retry_after: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(30),
            pressure_head_timeout: Duration::from_secs(5),
            body_idle_timeout: Duration::from_secs(30),
            response_head_timeout: Duration::from_secs(120),
            hold_timeout: Duration::from_secs(300),
            review_keepalive: Duration::from_secs(15),
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

static BUDGET: OnceLock<Arc<Budget>> = OnceLock::new();

/// The budget of bytes held in buffers (`budget`), under the limits in force.
pub(crate) fn budget() -> &'static Arc<Budget> {
    BUDGET.get_or_init(|| {
        let l = limits();
        Arc::new(Budget::new(
            l.max_buffered_bytes,
            l.max_buffered_bytes_per_agent,
        ))
    })
}

/// Bytes held in buffers now, over every agent; 0 before anything was buffered (reading it neither fixes the limits
/// nor starts the budget, so a scrape before the daemon applies its configuration changes nothing).
pub(crate) fn buffered_now() -> u64 {
    BUDGET.get().map_or(0, |b| b.used())
}

/// A connection's place among the ones served: held for the connection's whole life.
#[derive(Debug)]
pub(crate) struct Admitted {
    _place: crate::dns::Place,
    /// How long the connection's client may take over its TLS handshake and each request head.
    pub head_timeout: Duration,
}

/// A place for a connection of `agent`, or `None` when its share or the total is in use (the connection is then
/// closed, see [`refused`]).
pub(crate) fn admit(agent: &Agent) -> Option<Admitted> {
    static ADMISSION: OnceLock<Admission> = OnceLock::new();
    let l = limits();
    let admission =
        ADMISSION.get_or_init(|| Admission::new(l.max_connections, l.max_connections_per_agent));
    let place = admission.try_admit(Some(agent))?;
    let head_timeout = if admission.pressed(Some(agent)) {
        l.pressure_head_timeout.min(l.header_read_timeout)
    } else {
        l.header_read_timeout
    };
    Some(Admitted {
        _place: place,
        head_timeout,
    })
}

/// How often one agent's refused connections are recorded at most; the ones in between are counted.
pub(crate) const REFUSAL_RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// What to do about a refused connection of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Write a record now, standing for this many refused connections (this one and the unrecorded ones before it).
    Record(u64),
    /// Counted for a later record; the first one counted after a record asks for a record of the count after
    /// this long ([`unrecorded`]).
    Counted(Option<Duration>),
}

/// Per agent: when its last refusal record was written, and how many refusals since are unrecorded.
static REFUSED: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);

/// Account for a refused connection of `agent`: at most one record per agent every [`REFUSAL_RECORD_INTERVAL`],
/// each counting the refusals it stands for, so the counts add up to what was refused.
pub(crate) fn refused(agent: &Agent) -> Refused {
    let now = Instant::now();
    let mut guard = REFUSED.lock().unwrap_or_else(PoisonError::into_inner);
    let table = guard.get_or_insert_with(HashMap::new);
    if table.len() >= 1024 {
        table.retain(|_, (at, pending)| {
            *pending > 0 || now.duration_since(*at) < REFUSAL_RECORD_INTERVAL
        });
    }
    let key = agent_key(Some(agent));
    let Some(entry) = table.get_mut(&key) else {
        table.insert(key, (now, 0));
        return Refused::Record(1);
    };
    let since = now.duration_since(entry.0);
    if since >= REFUSAL_RECORD_INTERVAL {
        let count = entry.1 + 1;
        *entry = (now, 0);
        return Refused::Record(count);
    }
    entry.1 += 1;
    Refused::Counted((entry.1 == 1).then(|| REFUSAL_RECORD_INTERVAL - since))
}

/// The refusals of `agent` counted since its last record, now taken for a record (0: none are left).
pub(crate) fn unrecorded(agent: &Agent) -> u64 {
    let mut guard = REFUSED.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(entry) = guard
        .as_mut()
        .and_then(|t| t.get_mut(&agent_key(Some(agent))))
    else {
        return 0;
    };
    let count = entry.1;
    if count > 0 {
        *entry = (Instant::now(), 0);
    }
    count
}
