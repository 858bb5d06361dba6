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
) -> Result<UpstreamRequest, Refusal> {
    UpstreamRequest::new(out, authority, upstream.is_upgrade).ok_or_else(|| {
        Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request cannot be forwarded",
        )
    })
}

/// Send `req`, shaped for the connection's protocol, and wait for the response head (bounded by the response-head
/// timeout). A request the upstream never processed — refused, or left out by its GOAWAY (`upstream::unprocessed`)
/// — is sent again (up to [`RESENDS`] times), each time on another connection and shaped for that connection's
/// protocol. A reusable connection goes back to the pool.
pub(crate) async fn send(
    ctx: &ProxyContext,
    conn: &Conn,
    mut upstream: Upstream,
    req: UpstreamRequest,
) -> Result<Response<UpstreamBody>, Refusal> {
    let head_timeout = super::limits::limits().response_head_timeout;
    let sent = tokio::time::timeout(head_timeout, async {
        let mut sent = upstream.sender.send(req.shaped_for(&upstream.sender)).await;
        for _ in 0..RESENDS {
            match sent {
                Err(e) if upstream::unprocessed(&e) && !upstream.is_upgrade => {
                    tracing::debug!(dst = %conn.dst, error = %e, "the upstream did not process the request: sending it again");
                    upstream.sender.retire();
                    let key = &upstream.key;
                    let other = ctx.pool.checkout(key, || open(ctx, key)).await;
                    upstream.sender = other.map_err(|e| refused(conn, e))?;
                    // The other connection may speak the other protocol (the upstream's ALPN answer can
                    // change between connections): the request is shaped for it anew.
                    sent = upstream.sender.send(req.shaped_for(&upstream.sender)).await;
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
    let status = match e {
        upstream::UpstreamError::DaemonEndpoint { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_GATEWAY,
    };
    Refusal::new(e.reason(), status, e.client_message())
}

/// How many times a request the upstream did not process is sent again: a new connection can refuse streams too
/// before the server's SETTINGS arrive with its stream limit.
const RESENDS: usize = 2;

/// A request made ready for the upstream in both shapes a connection for its key may need. The protocol is the
/// connection's (ALPN, RFC 7301), and a request sent again may go out on a connection that speaks the other: the
/// upstream's answer can change between connections, and the pool then hands out an HTTP/1.1 connection after an
/// HTTP/2 one (or the reverse). So the shape is chosen for each connection the request is sent on
/// ([`UpstreamRequest::shaped_for`]), never kept from the first.
pub(crate) struct UpstreamRequest {
    method: Method,
    /// Without connection-scoped fields and `Host`, the body framed by `Content-Length`.
    headers: HeaderMap,
    extensions: http::Extensions,
    body: Bytes,
    /// HTTP/2: `https://{authority}{path}`, sent as `:scheme`, `:authority` and `:path` (RFC 9113 §8.3.1).
    absolute: Uri,
    /// HTTP/1.1: the origin-form target, `{path}` (RFC 9112 §3.2.1), ...
    origin: Uri,
    /// ... and `Host: {authority}`, which every HTTP/1.1 request carries (RFC 9112 §3.2).
    host: HeaderValue,
}

impl UpstreamRequest {
    /// `out` made ready for an upstream named `authority`; `None` when the authority or path does not form a URI
    /// again. An upgrade keeps its `Upgrade` field (it is only ever sent over HTTP/1.1, and never sent again).
    fn new(out: Outgoing, authority: &str, is_upgrade: bool) -> Option<UpstreamRequest> {
        let Outgoing {
            mut parts,
            body,
            body_changed,
        } = out;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let absolute = Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(path)
            .build()
            .ok()?;
        let origin = Uri::builder().path_and_query(path).build().ok()?;
        let host = HeaderValue::from_str(authority).ok()?;
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
        parts.headers.remove(header::HOST);
        Some(UpstreamRequest {
            method: parts.method,
            headers: parts.headers,
            extensions: parts.extensions,
            body,
            absolute,
            origin,
            host,
        })
    }

    /// The request as `sender`'s connection carries it (the body is shared, not copied).
    fn shaped_for(&self, sender: &Sender) -> Request<Bytes> {
        self.shaped(sender.is_h2())
    }

    /// The request in HTTP/2's shape (`h2`: the absolute URI, no `Host`) or HTTP/1.1's (origin-form with `Host`,
    /// no `TE`, one `Cookie` field).
    fn shaped(&self, h2: bool) -> Request<Bytes> {
        let mut req = Request::new(self.body.clone());
        *req.method_mut() = self.method.clone();
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        if h2 {
            *req.uri_mut() = self.absolute.clone();
            *req.version_mut() = Version::HTTP_2;
        } else {
            *req.uri_mut() = self.origin.clone();
            *req.version_mut() = Version::HTTP_11;
            let headers = req.headers_mut();
            headers.insert(header::HOST, self.host.clone());
            // TE is hop-by-hop in HTTP/1.1 (RFC 9110 §10.1.4): it concerns the proxy's own hop, not the upstream's.
            headers.remove(header::TE);
            join_cookies(headers);
        }
        req
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 agent's request (absolute URI, split `Cookie`, `TE: trailers`) in each shape.
    fn ready() -> UpstreamRequest {
        let (parts, ()) = Request::builder()
            .method("POST")
            .uri("https://api.test:8443/v1/x?y=1")
            .version(Version::HTTP_2)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("te", "trailers")
            .body(())
            .unwrap()
            .into_parts();
        let out = Outgoing {
            parts,
            body: Bytes::from_static(b"{}"),
            body_changed: false,
        };
        UpstreamRequest::new(out, "api.test:8443", false).unwrap()
    }

    /// Either shape can be asked of one request, in either order, as a resend on a connection of the other protocol
    /// asks: HTTP/1.1's carries `Host` and an origin-form target (RFC 9112 §3.2), HTTP/2's the absolute URI and no
    /// `Host` (RFC 9113 §8.3.1).
    #[test]
    fn a_request_is_shaped_for_each_protocol_in_turn() {
        let req = ready();
        for h2 in [true, false, true] {
            let shaped = req.shaped(h2);
            let headers = shaped.headers();
            assert_eq!(shaped.body().as_ref(), b"{}");
            assert_eq!(headers[header::CONTENT_LENGTH], "2");
            if h2 {
                assert_eq!(shaped.version(), Version::HTTP_2);
                assert_eq!(shaped.uri(), "https://api.test:8443/v1/x?y=1");
                assert!(!headers.contains_key(header::HOST));
                assert_eq!(headers[header::TE], "trailers");
                assert_eq!(headers.get_all(header::COOKIE).iter().count(), 2);
            } else {
                assert_eq!(shaped.version(), Version::HTTP_11);
                assert_eq!(shaped.uri(), "/v1/x?y=1");
                assert_eq!(headers[header::HOST], "api.test:8443");
                assert!(!headers.contains_key(header::TE));
                assert_eq!(headers[header::COOKIE], "a=1; b=2");
            }
        }
    }
}
