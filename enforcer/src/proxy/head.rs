//! The request-head phases: read the authority the request names and the host the policy sees, and bind that
//! authority to the connection's destination — over TLS the host must be the server name the session was opened
//! for (RFC 9110 §4.3.4: else 421, so a shared certificate cannot front for another host); over plain HTTP it must
//! really live at the original destination (`hostbind`), checked only for requests that are going to be forwarded.

use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri, Version};

use super::http::Conn;
use super::refusal::Refusal;
use super::ProxyContext;
use crate::encoding::percent_decode;
use crate::model::{Reason, Scheme};

/// What the request head names.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    /// `host[:port]` as the request named it (h2 `:authority`, absolute-form, or `Host`).
    pub authority: String,
    /// The host of `authority`, normalised and an IP literal spelt canonically (`host::request_host`): what the
    /// policy, the host binding and the upstream's certificate check see.
    pub host: String,
    /// The protocols an HTTP/1.1 request asks to upgrade the connection to (`Upgrade`, every field line as one
    /// lower-cased list: `inspect::field_list`), if any.
    pub upgrade: Option<String>,
}

/// Read the authority and host, refusing heads that name no one valid host: none, or more than one `Host` field and
/// no authority in the request's URI (RFC 9112 §3.2). A URI's authority (h2 `:authority`, HTTP/1.1 absolute form)
/// is the request's whatever its `Host` fields say (RFC 9113 §8.3.1, RFC 9112 §3.2.2); [`check`] refuses those
/// that disagree with it, once the record names the host.
pub(crate) fn read(parts: &http::request::Parts) -> Result<Head, Refusal> {
    if parts.uri.authority().is_none()
        && parts.headers.get_all(header::HOST).iter().nth(1).is_some()
    {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request has more than one Host field",
        ));
    }
    let Some(authority) = request_authority(&parts.uri, &parts.headers) else {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request names no valid host",
        ));
    };
    let host = crate::host::request_host(crate::host::authority_host(&authority)).into_owned();
    let upgrade = (parts.version == Version::HTTP_11)
        .then(|| crate::inspect::field_list(&parts.headers, header::UPGRADE))
        .flatten()
        .map(|list| list.to_ascii_lowercase());
    Ok(Head {
        authority,
        host,
        upgrade,
    })
}

/// Refuse heads the proxy will not forward although they name a host (which their record names): more than one
/// `Host` field, or (HTTP/2) one naming another host or port than `:authority` (RFC 9112 §3.2, RFC 9113 §8.3.1: a
/// server could read the other name than the policy did; the record names the authority's); field values that
/// begin or end with whitespace (RFC 9113 §8.2.1), an address in the NAT64 local-use prefix
/// (`host::nat64_local_use`: which IPv4 address it reaches is the network's choice, not the address's), `CONNECT`
/// outside the explicit listener, paths with dot segments (RFC 3986 §5.2.4: clients remove them; a server resolving
/// them would serve another path than the one the policy matched; also behind a backslash). A path with a backslash
/// is read both ways servers read it (`readings`).
pub(crate) fn check(parts: &http::request::Parts, head: &Head) -> Result<(), Refusal> {
    if conflicting_host(parts) {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request's Host field does not match its authority",
        ));
    }
    if padded_field_value(&parts.headers) {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "a header field value begins or ends with whitespace",
        ));
    }
    if crate::host::ip_literal(&head.host).is_some_and(crate::host::nat64_local_use) {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request names a NAT64 local-use address, whose IPv4 address depends on the network",
        ));
    }
    if parts.method == Method::CONNECT {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is only served by the explicit proxy listener",
        ));
    }
    if has_dot_segments(parts.uri.path()) {
        return Err(Refusal::new(
            Reason::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request path contains dot segments",
        ));
    }
    Ok(())
}

/// Over TLS, the host the request names must be the server name the agent opened the session for.
pub(crate) fn bind_to_sni(conn: &Conn, head: &Head) -> Result<(), Refusal> {
    match &conn.sni {
        Some(sni) if *sni != head.host => Err(Refusal::new(
            Reason::HostMismatch,
            StatusCode::MISDIRECTED_REQUEST,
            "the request's host does not match the TLS server name",
        )),
        _ => Ok(()),
    }
}

/// Plain HTTP has no certificate binding the name: a request that is going to be forwarded must name a host that
/// really lives at the original destination (an IP literal, a `static_hosts` pin, or DNS). Called after the
/// decision, so names the policy blocks anyway are never looked up (an agent must not turn the daemon's resolver
/// into an exfiltration channel).
pub(crate) async fn bind_to_destination(
    ctx: &ProxyContext,
    conn: &Conn,
    head: &Head,
) -> Result<(), Refusal> {
    let bound_already = conn.resolved_host.as_deref() == Some(head.host.as_str());
    if conn.scheme != Scheme::Http || bound_already {
        return Ok(());
    }
    ctx.hosts
        .bind(&head.host, conn.dst.ip())
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::info!(dst = %conn.dst, error = %e, "plain-HTTP host not bound to the destination");
            Refusal::new(
                Reason::HostMismatch,
                StatusCode::MISDIRECTED_REQUEST,
                "the request's host does not live at the connection's destination",
            )
        })
}

/// Whether `path` has a `.` or `..` segment, also percent-encoded or behind an encoded or back slash.
/// Whether a field value begins or ends with space or tab. RFC 9113 §8.2.1 makes such an HTTP/2 field malformed;
/// an HTTP/1.1 receiver strips the whitespace as optional (RFC 9112 §5.1), so `x-role: " admin"` would be decided as
/// ` admin` and acted on as `admin`. HTTP/1.1 parsing already strips it, so only an HTTP/2 (or HTTP/3) head can carry
/// one; refused whatever the version.
fn padded_field_value(headers: &HeaderMap) -> bool {
    headers.values().any(|v| {
        let v = v.as_bytes();
        let ws = |b: &u8| matches!(b, b' ' | b'\t');
        v.first().is_some_and(ws) || v.last().is_some_and(ws)
    })
}

fn has_dot_segments(path: &str) -> bool {
    let decoded = percent_decode(path, false);
    decoded
        .split(['/', '\\'])
        .any(|segment| segment == "." || segment == "..")
}

/// Whether the request carries several `Host` fields, or (HTTP/2) one naming another host or port than its
/// `:authority`. An HTTP/1.1 absolute-form request's `Host` is ignored (RFC 9112 §3.2.2): the URI's authority is
/// used, and the upstream gets a `Host` made from it.
fn conflicting_host(parts: &http::request::Parts) -> bool {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return parts.headers.contains_key(header::HOST);
    };
    let Some(authority) = parts
        .uri
        .authority()
        .filter(|_| parts.version == Version::HTTP_2)
    else {
        return false;
    };
    let default_port = if parts.uri.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let endpoint = |a: &http::uri::Authority| {
        let name = crate::host::request_host(crate::host::authority_host(a.as_str())).into_owned();
        (name, a.port_u16().unwrap_or(default_port))
    };
    match host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
    {
        Some(h) => endpoint(&h) != endpoint(authority),
        None => true,
    }
}

/// The authority the request names: the URI's (h2 `:authority`, absolute-form) or the Host header; `None` when it
/// is not a valid authority, carries userinfo, or has an empty host.
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
    fn padded_field_values_are_found() {
        let padded = |v: &'static [u8]| {
            let mut h = HeaderMap::new();
            h.insert("x-role", http::HeaderValue::from_bytes(v).unwrap());
            padded_field_value(&h)
        };
        assert!(padded(b" admin") && padded(b"\tadmin") && padded(b"admin ") && padded(b"\t"));
        assert!(!padded(b"read only") && !padded(b"") && !padded(b"a\tb"));
    }

    #[test]
    fn authorities() {
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
