//! The proxy: accepts redirected (transparent) and explicit-proxy connections, terminates TLS with leaves minted
//! by the enforcer CA, turns each request into an `Action`, has it decided and audited, then forwards it upstream
//! (verifying the real certificate) or answers with a block. Owns sockets, TLS and HTTP framing; knows nothing of
//! how decisions are made (policy), how requests are classified or rewritten (inspect, constrain) or how records
//! are stored (audit).
//!
//! A connection's path: [`serve_transparent`] / [`serve_explicit`] → `accept` (original destination, sniff) →
//! `tls` (leaf, ALPN) or plain HTTP or `tunnel` (TCP) → `http` (the per-request pipeline; for plain HTTP the
//! `hostbind` check that the claimed Host lives at the original destination) → `upstream`. DNS datagrams redirected
//! by the kernel take their own short path through [`crate::dns`].

mod accept;
mod ca;
mod explicit;
mod hostbind;
mod http;
mod io;
mod limits;
mod tls;
mod tunnel;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use tokio::net::TcpListener;
pub use tokio_util::sync::CancellationToken;

pub use ca::{CaError, CertAuthority};
pub use hostbind::{Binding, HostBindError, HostBinder};
pub use limits::{set_limits, Limits};
pub use tls::{TlsSetupError, UpstreamTls};
pub use upstream::UpstreamError;

use crate::audit::AuditLog;
use crate::inspect::InspectConfig;
use crate::model::{
    Agent, AuditEvent, Decision, Disposition, Mode, OriginLookup, Outcome, Reason, RequestSummary,
    Scheme, Verdict,
};
use crate::policy::{Policy, SharedPolicy};

/// Everything the connections share.
pub struct ProxyContext {
    /// The policy in force; each request decides under the snapshot it took when it started.
    pub policy: SharedPolicy,
    pub audit: AuditLog,
    pub ca: Arc<CertAuthority>,
    pub upstream: UpstreamTls,
    pub origins: Arc<dyn OriginLookup>,
    pub inspect: InspectConfig,
    /// Binds a plain-HTTP `Host` to the original destination (transparent mode; see `hostbind`).
    pub hosts: HostBinder,
}

impl ProxyContext {
    /// Write `event` to the audit trail (durably; the caller acts only on success). The host and path are the
    /// agent's words and can carry a secret: where a policy detector fires in one, the record shows it redacted.
    pub(crate) async fn record(
        &self,
        mut event: AuditEvent,
    ) -> Result<u64, crate::audit::AuditError> {
        let request = &mut event.request;
        crate::constrain::scrub_for_record(
            &self.policy.current(),
            [&mut request.host, &mut request.path].into_iter().flatten(),
        );
        self.audit.record(event).await
    }
}

/// Serve redirected connections: each client's original destination and agent come from `ctx.origins`. A client
/// without a recorded origin is closed (and audited as a TCP block), never forwarded. Returns once `shutdown` fires.
pub async fn serve_transparent(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = limits::connection_slot() => slot,
        };
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
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let origin = ctx.origins.lookup(peer);
            let Some(origin) = origin.as_ref().filter(|o| Some(o.dst) != local).cloned() else {
                // A tagged connect straight to the proxy is recorded with the proxy as its destination: refused
                // like one without any, with its agent named.
                let agent = origin.map(|o| o.agent).unwrap_or_default();
                tracing::info!(client = %peer, "connection without a recorded original destination: closed");
                let summary = RequestSummary {
                    scheme: Some(Scheme::Tcp),
                    ..RequestSummary::default()
                };
                let decision = proxy_decision(
                    &ctx.policy.current(),
                    Reason::BadRequest,
                    "the connection has no recorded original destination",
                );
                record_block(&ctx, decision, &agent, summary, None).await;
                return;
            };
            let target = accept::Target {
                dst: origin.dst,
                agent: origin.agent,
                host_hint: None,
            };
            tokio::select! {
                _ = accept::handle(ctx, stream, target) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Serve the explicit proxy (HTTP CONNECT and absolute-form requests); every client gets `profile`.
pub async fn serve_explicit(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    profile: String,
    shutdown: CancellationToken,
) {
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = limits::connection_slot() => slot,
        };
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
        tracing::debug!(client = %peer, "explicit proxy client");
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let agent = Agent {
            profile: Some(profile.clone()),
            ..Agent::default()
        };
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = explicit::serve_client(ctx, stream, agent) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// A block the proxy decides itself (protocol errors, upstream failures), under the current policy's hash.
pub(crate) fn proxy_decision(policy: &Policy, reason: Reason, message: &str) -> Decision {
    Decision {
        verdict: Verdict::Block,
        deciding_rule: None,
        matched_rules: Vec::new(),
        reason,
        message: Some(message.to_string()),
        rewrites: Vec::new(),
        mode: Mode::Enforce,
        policy_hash: policy.hash().to_string(),
    }
}

/// Record a block; a failing audit write is logged (the request is refused either way).
pub(crate) async fn record_block(
    ctx: &ProxyContext,
    decision: Decision,
    agent: &Agent,
    request: RequestSummary,
    status: Option<u16>,
) {
    let error = match decision.reason {
        Reason::Rule | Reason::Default | Reason::RateLimited => None,
        other => Some(other),
    };
    let event = AuditEvent {
        decision,
        agent: agent.clone(),
        request,
        outcome: Outcome {
            disposition: Disposition::Blocked,
            status,
            error,
        },
    };
    if let Err(e) = ctx.record(event).await {
        tracing::error!(error = %e, "audit write failed for a block");
    }
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
