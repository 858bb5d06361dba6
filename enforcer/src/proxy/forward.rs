//! The forward phases: connect to the verified upstream at the original destination (reusing or sharing a
//! connection of the same agent that was verified for the same host and destination, see [`upstream::Pool`]), build
//! the request exactly as the upstream will see it (origin-form with `Host` for HTTP/1.1, `:authority` for HTTP/2,
//! hop-by-hop fields removed, the body framed by `Content-Length`), and send it. Only the response head is timed:
//! once it arrives, bodies (server-sent events) stream for as long as they run.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};

use super::enforce::Outgoing;
use super::head::Head;
use super::http::Conn;
use super::refusal::Refusal;
use super::upstream::{self, PoolKey, Sender, UpstreamBody};
use super::ProxyContext;
use crate::model::{Reason, Scheme};

/// A connected, verified upstream for one request.
pub(crate) struct Upstream {
    sender: Sender,
    /// HTTP/1.1 `Upgrade` request: its connection is never returned to the pool.
    is_upgrade: bool,
    key: PoolKey,
}

impl Upstream {
    /// Whether the request asks to upgrade the connection (HTTP/1.1 `Upgrade`).
    pub fn is_upgrade(&self) -> bool {
        self.is_upgrade
    }
}

/// Connect (or reuse) and verify the upstream for `out`.
pub(crate) async fn connect(
    ctx: &ProxyContext,
    conn: &Conn,
    head: &Head,
    out: &Outgoing,
) -> Result<Upstream, Refusal> {
    let is_upgrade =
        out.parts.version == Version::HTTP_11 && out.parts.headers.contains_key(header::UPGRADE);
    let tls = conn.scheme == Scheme::Https;
    // Over TLS the upstream is offered h2 first, whichever version the agent spoke: its requests then share one
    // connection (see `upstream::Pool`). An upgrade needs HTTP/1.1 and a connection of its own.
    let want_h2 = tls && !is_upgrade;
    let key = PoolKey {
        agent: conn.agent.cgroup.clone(),
        dst: conn.dst,
        tls,
        host: head.host.clone(),
        want_h2,
    };
    let connected = if is_upgrade {
        // Boxed: opening is a large future every request would otherwise carry (see `exchange::handle`).
        Box::pin(open(ctx, &key)).await
    } else {
        ctx.pool.checkout(&key, || open(ctx, &key)).await
    };
    let sender = connected.map_err(|e| refused(conn, e))?;
    Ok(Upstream {
        sender,
        is_upgrade,
        key,
    })
}

/// The request as the upstream will see it; refused when it cannot be expressed (an authority or path that does
/// not form a URI again).
pub(crate) fn request(
    out: Outgoing,
    authority: &str,
    upstream: &Upstream,
) -> Result<Request<Bytes>, Refusal> {
    upstream_request(out, authority, &upstream.sender, upstream.is_upgrade).ok_or_else(|| {
        Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request cannot be forwarded",
        )
    })
}

/// Send `req` and wait for the response head (bounded by the response-head timeout). A request the upstream never
/// processed — refused, or left out by its GOAWAY (`upstream::unprocessed`) — is sent again (up to [`RESENDS`]
/// times), each time on another connection. A reusable connection goes back to the pool.
pub(crate) async fn send(
    ctx: &ProxyContext,
    conn: &Conn,
    mut upstream: Upstream,
    req: Request<Bytes>,
) -> Result<Response<UpstreamBody>, Refusal> {
    let head_timeout = super::limits::limits().response_head_timeout;
    let sent = tokio::time::timeout(head_timeout, async {
        let again = copy(&req);
        let mut sent = upstream.sender.send(req).await;
        for _ in 0..RESENDS {
            match sent {
                Err(e) if upstream::unprocessed(&e) && !upstream.is_upgrade => {
                    tracing::debug!(dst = %conn.dst, error = %e, "the upstream did not process the request: sending it again");
                    upstream.sender.retire();
                    let key = &upstream.key;
                    let other = ctx.pool.checkout(key, || open(ctx, key)).await;
                    upstream.sender = other.map_err(|e| refused(conn, e))?;
                    sent = upstream.sender.send(copy(&again)).await;
                }
                done => return Ok(done),
            }
        }
        Ok(sent)
    });
    let Ok(sent) = sent.await else {
        // The connection is left mid-request: dropped, never reused.
        tracing::info!(dst = %conn.dst, "upstream sent no response head in time");
        return Err(Refusal::new(
            Reason::UpstreamUnreachable,
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream did not answer in time",
        ));
    };
    let sent = sent?;
    if !upstream.is_upgrade {
        ctx.pool.put(upstream.key, upstream.sender);
    }
    sent.map_err(|e| {
        tracing::info!(dst = %conn.dst, error = %e, "upstream request failed");
        Refusal::new(
            Reason::UpstreamUnreachable,
            StatusCode::BAD_GATEWAY,
            "the upstream failed to answer",
        )
    })
}

/// A new connection for `key`: to its destination, verified as its host over TLS, offering h2 when it wants it.
fn open<'a>(
    ctx: &'a ProxyContext,
    key: &'a PoolKey,
) -> impl std::future::Future<Output = Result<Sender, upstream::UpstreamError>> + 'a {
    upstream::connect(
        key.tls.then_some(&ctx.upstream),
        key.dst,
        &key.host,
        key.want_h2,
    )
}

/// The refusal for an upstream that could not be connected to.
fn refused(conn: &Conn, e: upstream::UpstreamError) -> Refusal {
    tracing::info!(dst = %conn.dst, error = %e, "upstream refused");
    Refusal::new(e.reason(), StatusCode::BAD_GATEWAY, e.client_message())
}

/// How many times a request the upstream did not process is sent again: a new connection can refuse streams too
/// before the server's SETTINGS arrive with its stream limit.
const RESENDS: usize = 2;

/// A copy of `req` to send again (the body is shared, not copied).
fn copy(req: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

fn upstream_request(
    out: Outgoing,
    authority: &str,
    sender: &Sender,
    is_upgrade: bool,
) -> Option<Request<Bytes>> {
    let Outgoing {
        mut parts,
        body,
        body_changed,
    } = out;
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
        // TE is hop-by-hop in HTTP/1.1 (RFC 9110 §10.1.4): it concerns the proxy's own hop, not the upstream's.
        parts.headers.remove(header::TE);
        join_cookies(&mut parts.headers);
        parts.version = Version::HTTP_11;
    }
    Some(Request::from_parts(parts, body))
}

/// HTTP/2 lets a client split `Cookie` into several fields; HTTP/1.1 requires one, joined with `; ` (RFC 9113
/// §8.2.3, RFC 6265 §5.4).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Remove connection-scoped fields (RFC 9110 §7.6.1: `Connection` and the fields it names, and the classic
/// hop-by-hop set); keep `Upgrade` on upgrade requests. `TE` survives only as `trailers` (the one value HTTP/2
/// allows, RFC 9113 §8.2.2), and only when it was among the values sent.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let name = t.split(';').next().unwrap_or_default();
            name.trim().eq_ignore_ascii_case("trailers")
        });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}
