//! The per-request pipeline, readable top to bottom in [`handle_request`]: check Host against SNI (TLS), buffer and
//! decode the body (bounded by the policy), build the `Action`, classify, decide, bind a plain-HTTP Host to the
//! original destination (`hostbind`) unless the request is blocked anyway, then block, rewrite or forward — with the
//! single audit record written durably before anything reaches the upstream. Response bodies stream back frame by
//! frame (server-sent events are never buffered); `Upgrade` requests are relayed once the upstream agrees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite};

use super::upstream::{self, Sender};
use super::ProxyContext;
use crate::encoding::percent_decode;
use crate::inspect::{self, InspectError, Protocol};
use crate::model::{
    Action, Agent, AuditEvent, Decision, Disposition, HttpRequest, Mode, Outcome, Pairs, Reason,
    RequestSummary, Scheme, Transport, Verdict,
};
use crate::policy::Policy;

/// HTTP/2 pings to notice dead clients.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// The body type the proxy answers with: the upstream's streamed body or a small buffered one.
pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// One accepted client connection, as the request pipeline needs it.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    pub scheme: Scheme,
    /// The SNI the agent sent (TLS only).
    pub sni: Option<String>,
    /// The original destination.
    pub dst: SocketAddr,
    /// A host name the daemon itself resolved to `dst` (explicit proxy: the CONNECT or absolute-form target). A
    /// plain-HTTP request naming any other host must be bound to `dst` by the `HostBinder`.
    pub resolved_host: Option<String>,
    pub agent: Agent,
    /// The upstream connection reused across this client connection's requests.
    pub upstream: Arc<upstream::Slot>,
}

/// Serve HTTP/1.1 and HTTP/2 on an accepted (and possibly TLS-terminated) connection. `h2` is true when ALPN chose
/// h2, in which case only HTTP/2 is spoken.
pub(crate) async fn serve<S>(ctx: Arc<ProxyContext>, io: S, conn: Conn, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let dst = conn.dst;
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle_request(&ctx, &conn, req).await) }
    });
    let limits = super::limits::limits();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.h1_max_headers)
        .max_buf_size(limits.h1_max_buf_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_send_buf_size(limits.h2_max_send_buf_size);
    if h2 {
        builder = builder.http2_only();
    }
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(dst = %dst, error = %e, "client connection ended with an error");
    }
}

/// Everything known about a request for its audit record, filled as the pipeline goes.
struct Record<'a> {
    ctx: &'a ProxyContext,
    /// The policy this request is decided under (a reload does not change it mid-request).
    policy: &'a Policy,
    agent: &'a Agent,
    summary: RequestSummary,
}

impl Record<'_> {
    /// Answer with a block the proxy itself decided (not the policy), audited.
    async fn refuse(
        self,
        reason: Reason,
        status: StatusCode,
        message: &str,
    ) -> Response<ProxyBody> {
        let decision = super::proxy_decision(self.policy, reason, message);
        super::record_block(
            self.ctx,
            decision,
            self.agent,
            self.summary,
            Some(status.as_u16()),
        )
        .await;
        error_response(status, reason, message)
    }
}

/// The pipeline for one request.
pub(crate) async fn handle_request(
    ctx: &ProxyContext,
    conn: &Conn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let policy = ctx.policy.current();
    let (mut parts, body) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    let mut rec = Record {
        ctx,
        policy: &policy,
        agent: &conn.agent,
        summary: RequestSummary {
            scheme: Some(conn.scheme),
            host: None,
            ip: Some(conn.dst.ip()),
            port: conn.dst.port(),
            method: Some(parts.method.as_str().to_string()),
            path: Some(parts.uri.path().to_string()),
            ..RequestSummary::default()
        },
    };

    // 1. The host the request names, which must be the one the TLS session was opened for.
    let Some(authority) = request_authority(&parts.uri, &parts.headers) else {
        return rec
            .refuse(
                Reason::BadRequest,
                StatusCode::BAD_REQUEST,
                "the request names no valid host",
            )
            .await;
    };
    let host = super::ca::normalise_host(authority_host(&authority));
    rec.summary.host = Some(host.clone());
    if parts.method == Method::CONNECT {
        return rec
            .refuse(
                Reason::BadRequest,
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is only served by the explicit proxy listener",
            )
            .await;
    }
    if has_dot_segments(parts.uri.path()) {
        return rec
            .refuse(
                Reason::BadRequest,
                StatusCode::BAD_REQUEST,
                "the request path contains dot segments",
            )
            .await;
    }
    if let Some(sni) = &conn.sni {
        if *sni != host {
            return rec
                .refuse(
                    Reason::HostMismatch,
                    StatusCode::MISDIRECTED_REQUEST,
                    "the request's host does not match the TLS server name",
                )
                .await;
        }
    }

    // 2. The body, bounded by the policy's limit, as received and decoded.
    let limit = policy.max_body_bytes();
    let raw = match read_body(body, &parts.headers, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return rec
                .refuse(
                    Reason::BodyTooLarge,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body exceeds the inspection limit",
                )
                .await
        }
        Err(BodyError::Read) => {
            return rec
                .refuse(
                    Reason::BadRequest,
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                )
                .await
        }
        Err(BodyError::Idle) => {
            return rec
                .refuse(
                    Reason::BadRequest,
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stalled",
                )
                .await
        }
    };
    rec.summary.body_size = raw.len() as u64;
    if !raw.is_empty() {
        rec.summary.body_sha256 = Some(hex::encode(sha2::Sha256::digest(&raw)));
    }
    let encoding = header_str(&parts.headers, &header::CONTENT_ENCODING);
    let decoded = match inspect::decode_body(encoding.as_deref(), raw.clone(), limit) {
        Ok(b) => b,
        Err(e) => return refuse_inspect(rec, &e).await,
    };
    if let Err(e) = inspect::check_json_charset(&decoded) {
        return refuse_inspect(rec, &e).await;
    }

    // 3. The Action, classified into what the request asks for, and the decision.
    let action = build_action(conn, &host, &parts, raw.len() as u64, &decoded);
    let inspected = match inspect::classify(action.clone(), &ctx.inspect) {
        Ok(i) => i,
        Err(e) => return refuse_inspect(rec, &e).await,
    };
    // Inspection reads a lossy UTF-8 copy of the body: on an LLM or MCP call, bytes that are not UTF-8 could mean
    // something else to the upstream than what was decided, so they are refused rather than forwarded.
    let protocol_name = match &inspected.protocol {
        Protocol::Llm { provider, .. } => Some(provider.as_str()),
        Protocol::Mcp { .. } => Some("MCP"),
        Protocol::Http | Protocol::Provider(_) => None,
    };
    if let Some(protocol) = protocol_name {
        if std::str::from_utf8(&decoded).is_err() {
            return refuse_inspect(rec, &InspectError::BadJson { protocol }).await;
        }
    }
    let actions = if inspected.actions.is_empty() {
        vec![action]
    } else {
        inspected.actions
    };
    let (mut decision, worst) = decide(&policy, &actions);
    // The DNS stage's stand-in address for a refused name: never forwarded (see `dns::stand_in_decision`).
    if crate::dns::is_synthetic(conn.dst.ip()) {
        decision = crate::dns::stand_in_decision(&policy, &conn.agent, Some(&host), decision);
    }
    if let Some(a) = actions.get(worst) {
        fill_protocol(&mut rec.summary, a);
    }

    // 4. Plain HTTP has no certificate binding the name: a request that is going to be forwarded must name a host
    //    that really lives at the original destination. Checked after the decision, so that names the policy blocks
    //    anyway are never looked up (an agent must not turn the daemon's resolver into an exfiltration channel).
    let enforce = decision.mode == Mode::Enforce;
    let forwarding = !(enforce && decision.verdict == Verdict::Block);
    let bound_already = conn.resolved_host.as_deref() == Some(host.as_str());
    if forwarding && conn.scheme == Scheme::Http && !bound_already {
        if let Err(e) = ctx.hosts.bind(&host, conn.dst.ip()).await {
            tracing::info!(dst = %conn.dst, error = %e, "plain-HTTP host not bound to the destination");
            return rec
                .refuse(
                    Reason::HostMismatch,
                    StatusCode::MISDIRECTED_REQUEST,
                    "the request's host does not live at the connection's destination",
                )
                .await;
        }
    }

    // 5. Carry the decision out (shadow mode records it and forwards the request unmodified).
    let mut body = raw;
    let mut body_changed = false;
    if enforce && decision.verdict == Verdict::Block {
        return block(rec, decision, &inspected.protocol).await;
    }
    if enforce && decision.verdict == Verdict::Constrain {
        let mut rewritten = decoded.clone();
        match crate::constrain::apply(&decision.rewrites, &policy, &mut parts, &mut rewritten) {
            Ok(changes) => {
                // A changed body is forwarded decoded (Content-Encoding dropped) and re-framed.
                body_changed = rewritten != decoded;
                if body_changed {
                    body = rewritten;
                }
                rec.summary.changes = changes;
            }
            Err(e) => {
                let reason = match e {
                    crate::constrain::ConstrainError::SignedField { .. } => Reason::SignedField,
                    crate::constrain::ConstrainError::Unredactable { .. } => {
                        // Names only the detector and where: policy words, no request data.
                        decision.message = Some(e.to_string());
                        Reason::Unredactable
                    }
                    _ => Reason::Unparseable,
                };
                // Not the error itself: its JSON path is made of the body's (attacker-chosen) keys.
                tracing::info!(reason = ?reason, "constrain could not be applied: blocking");
                decision.verdict = Verdict::Block;
                decision.reason = reason;
                decision.rewrites.clear();
                return block(rec, decision, &inspected.protocol).await;
            }
        }
    }

    // 6. Connect and verify the upstream before the record, so a failure is the one record (a block).
    let is_upgrade =
        parts.version == Version::HTTP_11 && parts.headers.contains_key(header::UPGRADE);
    let want_h2 = parts.version == Version::HTTP_2 && !is_upgrade;
    let tls = (conn.scheme == Scheme::Https).then_some(&ctx.upstream);
    let reused = if is_upgrade {
        None
    } else {
        conn.upstream.take(&host, want_h2).await
    };
    let connected = match reused {
        Some(s) => Ok(s),
        None => upstream::connect(tls, conn.dst, &host, want_h2).await,
    };
    let mut sender = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(dst = %conn.dst, error = %e, "upstream refused");
            let message = e.client_message();
            return rec
                .refuse(e.reason(), StatusCode::BAD_GATEWAY, &message)
                .await;
        }
    };
    // 7. The request as the upstream will see it, then the record, then forward and stream the answer back.
    let upstream_req =
        match upstream_request(parts, &authority, body, body_changed, &sender, is_upgrade) {
            Some(r) => r,
            None => {
                return rec
                    .refuse(
                        Reason::BadRequest,
                        StatusCode::BAD_REQUEST,
                        "the request cannot be forwarded",
                    )
                    .await
            }
        };
    let event = AuditEvent {
        decision,
        agent: conn.agent.clone(),
        request: rec.summary,
        outcome: Outcome {
            disposition: Disposition::Forwarded,
            status: None,
            error: None,
        },
    };
    if let Err(e) = ctx.record(event).await {
        tracing::error!(error = %e, "audit write failed: not forwarding");
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": {"type": "audit_unavailable",
                "message": "the enforcer could not record the request, so it was not forwarded"}}),
        );
    }

    // Only the response head is timed: once it arrives, bodies (server-sent events) stream for as long as they run.
    let head_timeout = super::limits::limits().response_head_timeout;
    let Ok(sent) = tokio::time::timeout(head_timeout, sender.send(upstream_req)).await else {
        // The connection is left mid-request: dropped, never reused.
        tracing::info!(dst = %conn.dst, "upstream sent no response head in time");
        return error_response(
            StatusCode::GATEWAY_TIMEOUT,
            Reason::UpstreamUnreachable,
            "the upstream did not answer in time",
        );
    };
    if !is_upgrade {
        conn.upstream.put(&host, want_h2, sender).await;
    }
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(dst = %conn.dst, error = %e, "upstream request failed");
            return error_response(
                StatusCode::BAD_GATEWAY,
                Reason::UpstreamUnreachable,
                "the upstream failed to answer",
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && is_upgrade {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(relay_upgraded(client_upgrade, upstream_upgrade));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|b| b.boxed())
}

async fn relay_upgraded(client: OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
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

async fn block(rec: Record<'_>, decision: Decision, protocol: &Protocol) -> Response<ProxyBody> {
    let answer = inspect::block_response(protocol, &decision);
    let ctx = rec.ctx;
    super::record_block(ctx, decision, rec.agent, rec.summary, Some(answer.status)).await;
    let mut resp = Response::new(full(Bytes::from(answer.body)));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    for (k, v) in answer.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

async fn refuse_inspect(rec: Record<'_>, e: &InspectError) -> Response<ProxyBody> {
    let (reason, status) = match e {
        InspectError::TooLarge { .. } => (Reason::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
        InspectError::UnsupportedEncoding(_) | InspectError::NotUtf8Json => {
            (Reason::Unparseable, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        }
        InspectError::BadJson { .. } | InspectError::Corrupt { .. } => {
            (Reason::Unparseable, StatusCode::BAD_REQUEST)
        }
    };
    let message = e.to_string();
    rec.refuse(reason, status, &message).await
}

/// Evaluate every Action; the most restrictive decision wins (first among equals), carrying every matched rule and,
/// for constrain, every constrain rewrite. Returns the decision and the index of the Action that produced it.
pub(crate) fn decide(policy: &Policy, actions: &[Action]) -> (Decision, usize) {
    let mut best: Option<(Decision, usize)> = None;
    let mut matched: Vec<String> = Vec::new();
    let mut rewrites = Vec::new();
    for (i, action) in actions.iter().enumerate() {
        let d = policy.evaluate(action);
        for m in &d.matched_rules {
            if !matched.contains(m) {
                matched.push(m.clone());
            }
        }
        if d.verdict == Verdict::Constrain {
            for r in &d.rewrites {
                if !rewrites.contains(r) {
                    rewrites.push(r.clone());
                }
            }
        }
        let better = best.as_ref().is_none_or(|(b, _)| {
            d.verdict > b.verdict
                || (d.mode == Mode::Enforce && b.mode == Mode::Shadow && d.verdict == b.verdict)
        });
        if better {
            best = Some((d, i));
        }
    }
    let (mut decision, index) = best.unwrap_or_else(|| (policy.evaluate(&Action::default()), 0));
    decision.matched_rules = matched;
    if decision.verdict == Verdict::Constrain {
        decision.rewrites = rewrites;
    }
    (decision, index)
}

fn fill_protocol(summary: &mut RequestSummary, action: &Action) {
    if let Some(mcp) = &action.mcp {
        summary.mcp_method = Some(mcp.method.clone());
        summary.mcp_tool = mcp.tool.clone();
    }
    if let Some(llm) = &action.llm {
        summary.llm_provider = Some(llm.provider.clone());
        summary.llm_model = llm.model.clone();
    }
}

/// The Action for a request before classification.
pub(crate) fn build_action(
    conn: &Conn,
    host: &str,
    parts: &http::request::Parts,
    body_size: u64,
    decoded: &Bytes,
) -> Action {
    let headers = Pairs(
        parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    );
    let content_type = header_str(&parts.headers, &header::CONTENT_TYPE);
    let is_json = content_type.as_deref().is_some_and(|ct| {
        let ct = ct.to_ascii_lowercase();
        ct.contains("/json") || ct.contains("+json")
    });
    let json = if is_json && !decoded.is_empty() {
        serde_json::from_slice(decoded).ok()
    } else {
        None
    };
    Action {
        agent: conn.agent.clone(),
        transport: Transport {
            scheme: conn.scheme,
            host: Some(host.to_string()),
            ip: Some(conn.dst.ip()),
            port: conn.dst.port(),
        },
        http: Some(HttpRequest {
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            query: parse_query(parts.uri.query().unwrap_or("")),
            headers,
            content_type,
            body_size,
            body: String::from_utf8_lossy(decoded).into_owned(),
            json,
        }),
        mcp: None,
        llm: None,
    }
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` as space).
pub(crate) fn parse_query(q: &str) -> Pairs {
    Pairs(
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k, true), percent_decode(v, true))
            })
            .collect(),
    )
}

/// Whether `path` has a `.` or `..` segment, also percent-encoded or behind an encoded or back slash. Clients
/// remove dot segments before sending (RFC 3986 5.2.4); servers that resolve them would otherwise serve a path
/// other than the one the policy matched (`/repos/acme/../other` passes a `/repos/acme/**` rule).
fn has_dot_segments(path: &str) -> bool {
    let decoded = percent_decode(path, false);
    decoded
        .split(['/', '\\'])
        .any(|segment| segment == "." || segment == "..")
}

/// The authority the request names: the URI's (h2 `:authority`, absolute-form) or the Host header.
fn request_authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => headers.get(header::HOST)?.to_str().ok()?.to_string(),
    };
    let parsed: http::uri::Authority = raw.parse().ok()?;
    if parsed.host().is_empty() || parsed.as_str().contains('@') {
        return None;
    }
    Some(parsed.as_str().to_string())
}

/// The host part of an authority, without port or IPv6 brackets.
fn authority_host(authority: &str) -> &str {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host
}

enum BodyError {
    TooLarge,
    Read,
    /// No body bytes for longer than the body idle timeout.
    Idle,
}

async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    limit: u64,
) -> Result<Bytes, BodyError> {
    if let Some(len) =
        header_str(headers, &header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len > limit {
            return Err(BodyError::TooLarge);
        }
    }
    let idle = super::limits::limits().body_idle_timeout;
    let mut buf = BytesMut::new();
    loop {
        let next = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| BodyError::Idle)?;
        let Some(frame) = next else {
            break;
        };
        let frame = frame.map_err(|_| BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() as u64).saturating_add(data.len() as u64) > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Build the request sent upstream: origin-form with Host for HTTP/1.1, absolute with `:authority` for h2.
fn upstream_request(
    mut parts: http::request::Parts,
    authority: &str,
    body: Bytes,
    body_changed: bool,
    sender: &Sender,
    is_upgrade: bool,
) -> Option<Request<Full<Bytes>>> {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    strip_hop_by_hop(&mut parts.headers, is_upgrade);
    // The body is already complete: the client had its 100 Continue from us, the upstream needs none.
    parts.headers.remove(header::EXPECT);
    if body_changed {
        parts.headers.remove(header::CONTENT_ENCODING);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    if !body.is_empty() || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if sender.is_h2() {
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(path.as_str())
            .build()
            .ok()?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::builder().path_and_query(path.as_str()).build().ok()?;
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_str(authority).ok()?);
        parts.version = Version::HTTP_11;
    }
    Some(Request::from_parts(parts, Full::new(body)))
}

/// Remove connection-scoped headers (and those the Connection header names); keep Upgrade on upgrade requests.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

pub(crate) fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON error the proxy answers itself, naming the reason; never contains request data.
pub(crate) fn error_response(
    status: StatusCode,
    reason: Reason,
    message: &str,
) -> Response<ProxyBody> {
    let reason = serde_json::to_value(reason).unwrap_or(serde_json::Value::Null);
    json_response(
        status,
        serde_json::json!({"error": {"type": "enforcer_error", "reason": reason, "message": message}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_split_and_decoded() {
        let q = parse_query("a=1&b=x%20y+z&flag&&c=%zz&d=%4");
        assert_eq!(q.get("a"), Some("1"));
        assert_eq!(q.get("b"), Some("x y z"));
        assert_eq!(q.get("flag"), Some(""));
        assert_eq!(q.get("c"), Some("%zz"));
        assert_eq!(q.get("d"), Some("%4"));
    }

    #[test]
    fn dot_segments_are_found_however_spelt() {
        for bad in [
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/..%2Fb",
            "/a/..\\b",
            "/..",
        ] {
            assert!(has_dot_segments(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/a/...",
            "/a/.b/c.d",
            "/a/..b",
            "/v1/chat/completions",
            "/a+b/",
        ] {
            assert!(!has_dot_segments(ok), "{ok}");
        }
    }

    #[test]
    fn authority_hosts() {
        assert_eq!(authority_host("example.com:443"), "example.com");
        assert_eq!(authority_host("example.com"), "example.com");
        assert_eq!(authority_host("[::1]:8443"), "::1");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("user@evil.test"));
        assert_eq!(request_authority(&Uri::from_static("/x"), &h), None);
        h.insert(header::HOST, HeaderValue::from_static("ok.test:8443"));
        assert_eq!(
            request_authority(&Uri::from_static("/x"), &h).as_deref(),
            Some("ok.test:8443")
        );
    }
}
