//! Explicit proxy mode, for hosts without eBPF: HTTP CONNECT (the target named in the request, resolved once through
//! the `static_hosts` pins or DNS, then
//! the same sniff → TLS / HTTP / TCP path as a transparent connection) and absolute-form plain-HTTP requests (the
//! same request pipeline). The agent's profile comes from the listener's configuration.

use std::net::SocketAddr;
use std::sync::Arc;

use ::http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::accept;
use super::body::ClientBody;
use super::http::{detach_head, full, Conn, ProxyBody};
use super::limits::Admitted;
use super::refusal::error_response;
use super::{exchange, HostBinder, ProxyContext, Target};
use crate::model::{Agent, Reason, RequestSummary, Scheme};

/// Serve one explicit-proxy client for as long as it holds its place (`admitted`).
pub(crate) async fn serve_client(
    ctx: Arc<ProxyContext>,
    stream: TcpStream,
    agent: Agent,
    admitted: Admitted,
) {
    let head_timeout = admitted.head_timeout;
    // A CONNECT tunnel outlives this HTTP connection: it keeps the place too.
    let admitted = Arc::new(admitted);
    let service = service_fn(move |req| {
        let req = detach_head(req);
        let ctx = ctx.clone();
        let agent = agent.clone();
        let admitted = admitted.clone();
        async move {
            Ok::<_, std::convert::Infallible>(explicit_request(ctx, agent, req, admitted).await)
        }
    });
    let limits = super::limits::limits();
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_headers(limits.h1_max_headers)
        .max_buf_size(limits.h1_max_buf_size)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "explicit proxy client connection ended with an error");
    }
}

async fn explicit_request(
    ctx: Arc<ProxyContext>,
    agent: Agent,
    mut req: Request<Incoming>,
    admitted: Arc<Admitted>,
) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().cloned() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            "the explicit proxy serves CONNECT and absolute-form http:// requests only",
        );
    };
    let connect = req.method() == Method::CONNECT;
    if !connect && req.uri().scheme_str() != Some("http") {
        return error_response(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            "use CONNECT for https:// through the explicit proxy",
        );
    }
    let host = crate::host::request_host(authority.host().trim_matches(['[', ']'])).into_owned();
    let default_port = if connect { 443 } else { 80 };
    let port = authority.port_u16().unwrap_or(default_port);
    let Some(dst) = resolve(&ctx.hosts, &host, port).await else {
        let summary = RequestSummary {
            scheme: Some(if connect { Scheme::Tcp } else { Scheme::Http }),
            host: Some(host),
            port,
            method: Some(req.method().as_str().to_string()),
            ..RequestSummary::default()
        };
        let message = "the destination could not be resolved";
        let policy = ctx.policy.current();
        let refusal = (Reason::UpstreamUnreachable, Some(502));
        ctx.record_refusal(&policy, &agent, summary, refusal, message)
            .await;
        return error_response(
            StatusCode::BAD_GATEWAY,
            Reason::UpstreamUnreachable,
            message,
        );
    };
    if connect {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let target = Target {
            dst,
            agent,
            host_hint: Some(host),
            head_timeout: admitted.head_timeout,
        };
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    accept::handle(ctx, TokioIo::new(upgraded), target).await;
                    drop(admitted);
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT tunnel was not established"),
            }
        });
        return Response::new(full(bytes::Bytes::new()));
    }
    let conn = Conn {
        scheme: Scheme::Http,
        sni: None,
        dst,
        resolved_host: Some(host),
        agent,
    };
    exchange::handle(&ctx, &conn, Box::new(req.map(ClientBody::Http1))).await
}

/// Resolve a CONNECT or absolute-form target once (an IP literal, a `proxy.static_hosts` pin, else DNS through the
/// host binder's cache: 2 s timeout, answers kept 60 s); the upstream connection uses exactly this address.
async fn resolve(hosts: &HostBinder, host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    match hosts.addresses(host).await {
        Ok(addrs) => addrs.first().map(|ip| SocketAddr::new(*ip, port)),
        Err(e) => {
            tracing::debug!(error = %e, "explicit proxy target did not resolve");
            None
        }
    }
}
