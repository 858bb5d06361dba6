//! The response phases: what the agent receives of the upstream's answer. Today one phase — connection-scoped
//! fields removed and the body streamed through frame by frame (server-sent events are never buffered) — and, for
//! an upgrade the upstream accepted (`101`), the two upgraded connections relayed. Response-side decisions (a
//! response body, a server-to-client stream event, a WebSocket message, a proposed tool call) are added here as
//! phases of their own, after the request's record and without touching the request phases.

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::forward::strip_hop_by_hop;
use super::http::ProxyBody;

/// The agent's answer from the upstream's `resp`. `client_upgrade` is the client side of an `Upgrade` request.
pub(crate) fn respond(
    mut resp: Response<Incoming>,
    client_upgrade: Option<OnUpgrade>,
) -> Response<ProxyBody> {
    match client_upgrade {
        Some(client) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(relay_upgraded(client, upstream));
        }
        _ => strip_hop_by_hop(resp.headers_mut(), false),
    }
    resp.map(|b| b.boxed())
}

async fn relay_upgraded(client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded relay ended with an error");
    }
}
