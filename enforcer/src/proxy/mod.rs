//! The proxy: accepts redirected (transparent) and explicit-proxy connections, terminates TLS with leaves minted
//! by the enforcer CA, and takes every HTTP exchange through its ordered phases ([`exchange`]): the request is turned
//! into Actions, decided by the policy, carried out (blocked, rewritten or forwarded to the verified upstream) and
//! recorded once. Owns sockets, TLS and HTTP framing; knows nothing of how decisions are made (policy), how requests
//! are classified or rewritten (inspect, constrain) or how records are stored (audit).
//!
//! A connection's path: [`serve`] (one accept loop; the [`Listen`] mode says how the target is learned) →
//! `accept` (sniff) → `tls` (leaf, ALPN) or plain HTTP or `tunnel` (raw TCP, decided on the destination) → `http`
//! (the hyper server) → `exchange` for each request. The request phases, in order, each a module of its own:
//! `head` (authority, SNI and destination binding) → `body` (read and decode) → `classify` (the Actions) → the
//! session's state and the policy's decision → `enforce` (block or constrain) → `hold` (a review waits for a
//! person) → `forward` (connect, record, send) → `answer` (the response phases). `record` keeps the exchange's one audit record, `refusal` the one error type every phase returns.
//! DNS datagrams redirected by the kernel take their own short path through [`crate::dns`], and so do connections to
//! port 53 (DNS over TCP).

#![forbid(unsafe_code)]

mod accept;
mod answer;
mod batch_input;
mod body;
mod budget;
mod ca;
mod classify;
mod enforce;
mod events;
mod exchange;
mod explicit;
mod forward;
mod head;
mod hold;
mod hostbind;
mod http;
mod http2;
mod io;
mod limits;
mod proposal;
mod readings;
mod record;
mod refusal;
mod response;
mod tls;
mod tunnel;
mod upstream;
mod websocket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use tokio::net::{TcpListener, TcpStream};
pub use tokio_util::sync::CancellationToken;

pub use batch_input::{ReadInputs, KEPT_INPUT_BYTES};
pub(crate) use budget::{Reservation, INSPECTED_COPIES};
pub(crate) use ca::crypto_provider;
pub use ca::{CaError, CertAuthority, PublicFiles};
pub use classify::fuzz_request_to_action;
pub use hostbind::{Binding, HostBindError, HostBinder};
pub use http::ProxyBody;
pub(crate) use limits::budget as buffer_budget;
pub use limits::{set_limits, Limits};
pub use tls::{TlsSetupError, UpstreamTls};
pub use upstream::{set_daemon_ports, Pool as UpstreamPool, UpstreamError};
pub use websocket::fuzz_agent_messages;

use crate::audit::{Appended, AuditError, AuditLog};
use crate::inspect::InspectConfig;
use crate::model::{
    Agent, AuditEvent, Decision, Disposition, Mode, OriginLookup, Outcome, Reason, RequestSummary,
    Scheme, Verdict,
};
use crate::policy::{Policy, SharedPolicy};

/// Everything the connections share.
pub struct ProxyContext {
    /// The policy in force; each exchange decides, scrubs and records under the snapshot it took when it started.
    pub policy: SharedPolicy,
    pub audit: AuditLog,
    pub ca: Arc<CertAuthority>,
    pub upstream: UpstreamTls,
    /// Idle verified upstream connections, reused by later requests of the same agent to the same host.
    pub pool: UpstreamPool,
    pub origins: Arc<dyn OriginLookup>,
    pub inspect: InspectConfig,
    /// Binds a plain-HTTP `Host` to the original destination (transparent mode; see `hostbind`).
    pub hosts: HostBinder,
    /// The DNS stage, which serves connections to port 53 (DNS over TCP); `None`: they are decided as raw TCP.
    pub dns: Option<Arc<crate::dns::DnsStage>>,
    /// Per-agent-run state rules read (`session.*`) and write (`label:`, `count:`); kept across policy reloads.
    pub sessions: Arc<crate::session::Sessions>,
    /// Exchanges held for a person's answer (`review` verdict).
    pub reviews: Arc<crate::review::Reviews>,
    /// Where retained exchanges are written, encrypted (`traces.recipient`); `None`: nothing is retained.
    pub traces: Option<Arc<crate::trace::TraceStore>>,
    /// The batch input files whose lines were decided when they were uploaded: a batch runs only on one of them.
    pub batch_inputs: ReadInputs,
}

impl ProxyContext {
    /// Write `event` to the audit trail, durably, under `policy` (the snapshot the event was decided under). The
    /// host and path are the agent's words and can carry a secret: where one of that policy's detectors fires in
    /// one, the record shows it redacted.
    pub async fn record(&self, policy: &Policy, event: AuditEvent) -> Result<u64, AuditError> {
        let appended = self.append(policy, event)?;
        crate::metrics::global().durable(appended).await
    }

    /// [`ProxyContext::record`] in two steps: the record is in the trail (it survives the daemon being killed) when
    /// this returns; [`Appended::durable`] (through [`crate::metrics::Metrics::durable`]) says when a power cut can no
    /// longer lose it. What an agent may see of an action's result waits for that.
    pub fn append(&self, policy: &Policy, mut event: AuditEvent) -> Result<Appended, AuditError> {
        let request = &mut event.request;
        crate::constrain::scrub_for_record(
            policy,
            [&mut request.host, &mut request.path].into_iter().flatten(),
        );
        crate::metrics::global().appended(&self.audit, &event)
    }

    /// Record a refusal the proxy decided itself, outside an HTTP exchange (a connection without an origin, a TLS
    /// client offering nothing inspectable); a failing audit write is logged, the connection is refused either way.
    pub(crate) async fn record_refusal(
        &self,
        policy: &Policy,
        agent: &Agent,
        request: RequestSummary,
        (reason, status): (Reason, Option<u16>),
        message: &str,
    ) {
        let event = AuditEvent::new(
            enforcer_decision(policy, reason, message),
            agent.clone(),
            request,
            Outcome {
                disposition: Disposition::Blocked,
                status,
                error: Some(reason),
            },
        );
        if let Err(e) = self.record(policy, event).await {
            tracing::error!(error = %e, "audit write failed for a refusal");
        }
    }
}

/// A block the enforcer decides itself (malformed input, failed checks), not the policy: no rule, under `policy`'s
/// hash.
pub(crate) fn enforcer_decision(policy: &Policy, reason: Reason, message: &str) -> Decision {
    Decision {
        message: Some(message.to_string()),
        ..Decision::bare(
            Verdict::Block,
            reason,
            Mode::Enforce,
            policy.hash().to_string(),
        )
    }
}

/// Bytes the proxy's buffers hold now, over every agent: what the buffer budget counts (`proxy.max_buffered_bytes`
/// bounds it).
pub fn buffered_bytes() -> u64 {
    limits::buffered_now()
}

/// Where an accepted connection was really going, and on whose behalf.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub dst: SocketAddr,
    pub agent: Agent,
    /// The host name the client named (explicit CONNECT), when known before any byte is read. The daemon resolved
    /// it to `dst` itself, so it is bound to `dst`; transparent connections have none.
    pub host_hint: Option<String>,
    /// How long this connection's client may take over a request head (and, over HTTP/2, stay without a stream):
    /// `proxy` limits' `header_read_timeout`, shorter while the proxy is under pressure (see `limits`).
    pub head_timeout: Duration,
}

/// How a listener learns where its clients were going.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Connections redirected by the kernel: each client's original destination and agent come from the origin
    /// lookup; a client without a recorded origin is closed (and audited as a refusal), never forwarded.
    Transparent,
    /// An explicit proxy (HTTP CONNECT and absolute-form requests): the client names its target; every client gets
    /// this profile.
    Explicit { profile: String },
}

/// Serve `listener` until `shutdown` fires: one task per client connection. Every connection is accepted; it is
/// served if its agent is within its share of `proxy.max_connections` (see `limits`), else closed and recorded.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    mode: Listen,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (ctx, mode, shutdown) = (ctx.clone(), mode.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = client(ctx, stream, peer, local, mode) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// One accepted client, by listener mode: its agent and target, its admission, then the accept path.
async fn client(
    ctx: Arc<ProxyContext>,
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    mode: Listen,
) {
    let target = match mode {
        Listen::Explicit { profile } => {
            tracing::debug!(client = %peer, "explicit proxy client");
            let agent = Agent {
                profile: Some(profile),
                ..Agent::default()
            };
            let Some(admitted) = admitted(&ctx, &agent, None) else {
                return;
            };
            let _open = crate::metrics::global().connection_opened();
            return explicit::serve_client(ctx, stream, agent, admitted).await;
        }
        Listen::Transparent => match transparent_target(&ctx, peer, local).await {
            Some(target) => target,
            None => return,
        },
    };
    let Some(admitted) = admitted(&ctx, &target.agent, Some(target.dst)) else {
        return;
    };
    let _open = crate::metrics::global().connection_opened();
    let target = Target {
        head_timeout: admitted.head_timeout,
        ..target
    };
    accept::handle(ctx, stream, target).await;
    drop(admitted);
}

/// Where a redirected connection was going and for whom; `None` (closed and recorded) without a recorded origin.
async fn transparent_target(
    ctx: &ProxyContext,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> Option<Target> {
    let origin = ctx.origins.lookup(peer);
    let Some(origin) = origin.as_ref().filter(|o| Some(o.dst) != local).cloned() else {
        // A tagged connect straight to the proxy is recorded with the proxy as its destination: refused
        // like one without any, with its agent named.
        let agent = origin.map(|o| o.agent).unwrap_or_default();
        tracing::info!(client = %peer, "connection without a recorded original destination: closed");
        crate::metrics::global().connection_refused();
        let summary = RequestSummary {
            scheme: Some(Scheme::Tcp),
            ..RequestSummary::default()
        };
        let policy = ctx.policy.current();
        let message = "the connection has no recorded original destination";
        ctx.record_refusal(
            &policy,
            &agent,
            summary,
            (Reason::BadRequest, None),
            message,
        )
        .await;
        return None;
    };
    let mut agent = origin.agent;
    ctx.sessions.identify(&mut agent);
    Some(Target {
        dst: origin.dst,
        agent,
        host_hint: None,
        head_timeout: limits::limits().header_read_timeout,
    })
}

/// The connection's place among those served, or `None`: beyond its agent's share or the total, it is closed (by
/// the caller dropping it) and recorded, at most once a second per agent with the count it stands for.
fn admitted(
    ctx: &Arc<ProxyContext>,
    agent: &Agent,
    dst: Option<SocketAddr>,
) -> Option<limits::Admitted> {
    if let Some(admitted) = limits::admit(agent) {
        return Some(admitted);
    }
    crate::metrics::global().connection_refused();
    let when = match limits::refused(agent) {
        limits::Refused::Record(count) => Some((Duration::ZERO, Some(count))),
        limits::Refused::Counted(Some(after)) => Some((after, None)),
        limits::Refused::Counted(None) => None,
    };
    if let Some((after, count)) = when {
        let (ctx, agent) = (ctx.clone(), agent.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let count = count.unwrap_or_else(|| limits::unrecorded(&agent));
            if count > 0 {
                record_connection_limit(&ctx, &agent, dst, count).await;
            }
        });
    }
    None
}

/// The record of `count` connections of `agent` closed for the connection limit.
async fn record_connection_limit(
    ctx: &ProxyContext,
    agent: &Agent,
    dst: Option<SocketAddr>,
    count: u64,
) {
    tracing::info!(profile = ?agent.profile, cgroup = ?agent.cgroup, count, "connections over the agent's share closed");
    let summary = RequestSummary {
        scheme: Some(Scheme::Tcp),
        ip: dst.map(|d| d.ip()),
        port: dst.map_or(0, |d| d.port()),
        count: Some(count),
        ..RequestSummary::default()
    };
    let policy = ctx.policy.current();
    let message = "the agent has its share of the proxy's connections open";
    ctx.record_refusal(
        &policy,
        agent,
        summary,
        (Reason::ConnectionLimit, None),
        message,
    )
    .await;
}

/// [`serve`] for connections redirected by the kernel.
pub async fn serve_transparent(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
) {
    serve(listener, ctx, Listen::Transparent, shutdown).await;
}

/// [`serve`] as an explicit proxy whose clients all get `profile`.
pub async fn serve_explicit(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    profile: String,
    shutdown: CancellationToken,
) {
    serve(listener, ctx, Listen::Explicit { profile }, shutdown).await;
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA when it does not exist yet.
    Export {
        /// The daemon's state directory (the CA lives in `<state-dir>/ca`).
        #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Add the CA to the system trust store (Debian/Ubuntu: update-ca-certificates).
    Install {
        #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// Where `ca install` puts the certificate for update-ca-certificates.
const SYSTEM_CA_FILE: &str = "/usr/local/share/ca-certificates/enforcer.crt";

pub fn ca_command(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    match cmd {
        CaCommand::Export { state_dir } => {
            let ca = CertAuthority::load_or_create(&state_dir.join("ca"))?;
            print!("{}", ca.cert_pem());
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Install { state_dir } => {
            let ca = CertAuthority::load_or_create(&state_dir.join("ca"))?;
            let path = std::path::Path::new(SYSTEM_CA_FILE);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(path, ca.cert_pem())
                .with_context(|| format!("writing {}", path.display()))?;
            let status = std::process::Command::new("update-ca-certificates")
                .status()
                .context("running update-ca-certificates")?;
            anyhow::ensure!(status.success(), "update-ca-certificates failed: {status}");
            eprintln!("installed the enforcer CA as {SYSTEM_CA_FILE}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
