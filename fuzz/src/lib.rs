//! What the fuzz targets share: the project's own policies (every `policies/*.yaml`, compiled once), the inspect
//! settings the daemon uses by default, one of each constrain rewrite, and an HTTP/1.1 request reader (httparse for
//! the head, `Content-Length` or chunked framing for the body, as RFC 9112 §6 says) that turns raw bytes into the
//! `http::request::Parts` and body the proxy's phases take. Nothing here decides or parses for the product: the
//! targets call the enforcer's own functions.

pub mod dns;

use std::sync::OnceLock;

use bytes::Bytes;
use enforcer::inspect::{self, InspectConfig, Inspected, ProviderOverride};
use enforcer::model::{Decided, PlannedRewrite, Rewrite};
use enforcer::policy::Policy;

/// Every policy the project ships, by file name.
const POLICIES: &[(&str, &str)] = &[
    ("default.yaml", include_str!("../../policies/default.yaml")),
    ("example.yaml", include_str!("../../policies/example.yaml")),
    (
        "redact-secrets.yaml",
        include_str!("../../policies/redact-secrets.yaml"),
    ),
    (
        "sql-select-only.yaml",
        include_str!("../../policies/sql-select-only.yaml"),
    ),
    (
        "github-read-only.yaml",
        include_str!("../../policies/github-read-only.yaml"),
    ),
    (
        "rate-limit.yaml",
        include_str!("../../policies/rate-limit.yaml"),
    ),
    (
        "body-size.yaml",
        include_str!("../../policies/body-size.yaml"),
    ),
    (
        "deny-unknown.yaml",
        include_str!("../../policies/deny-unknown.yaml"),
    ),
];

/// The shipped policies, compiled once per process.
pub fn policies() -> &'static [Policy] {
    static POLICIES_COMPILED: OnceLock<Vec<Policy>> = OnceLock::new();
    POLICIES_COMPILED.get_or_init(|| {
        POLICIES
            .iter()
            .map(|(name, src)| {
                Policy::from_yaml(src, name).unwrap_or_else(|e| panic!("{name}: {e}"))
            })
            .collect()
    })
}

/// The daemon's default inspect settings, plus a provider override on a port of its own (as tests configure one).
pub fn inspect_config() -> &'static InspectConfig {
    static CFG: OnceLock<InspectConfig> = OnceLock::new();
    CFG.get_or_init(|| InspectConfig {
        provider_overrides: vec![ProviderOverride {
            host: "llm.internal:8443".into(),
            provider: inspect::Provider::Anthropic,
        }],
        ..InspectConfig::default()
    })
}

/// One of each rewrite a constrain rule can plan, in the order a policy would list them.
pub fn rewrites() -> &'static [PlannedRewrite] {
    static REWRITES: OnceLock<Vec<PlannedRewrite>> = OnceLock::new();
    REWRITES.get_or_init(|| {
        let detectors = enforcer::policy::detect::Detectors::builtin()
            .names()
            .map(str::to_string)
            .collect();
        [
            Rewrite::Redact { detectors },
            Rewrite::JsonCap {
                path: "$.max_tokens".parse().expect("path"),
                max: 1024.0,
            },
            Rewrite::JsonCap {
                path: "$.params.arguments.*".parse().expect("path"),
                max: 5.0,
            },
            Rewrite::JsonSet {
                path: "$.messages[*].content".parse().expect("path"),
                value: serde_json::json!("x"),
            },
            Rewrite::JsonRemove {
                path: "$.tools[*].input_schema".parse().expect("path"),
            },
            Rewrite::HeaderSet {
                name: "x-enforced".parse().expect("name"),
                value: "1".parse().expect("value"),
            },
            Rewrite::HeaderRemove {
                name: "cookie".parse().expect("name"),
            },
            Rewrite::DropTools {
                globs: vec![
                    "delete_*".parse().expect("glob"),
                    "mcp:*".parse().expect("glob"),
                ],
            },
        ]
        .into_iter()
        .map(|rewrite| PlannedRewrite {
            rule: "fuzz".into(),
            rewrite,
        })
        .collect()
    })
}

/// Decide `inspected` under `policy` as the proxy does, and build the answer a block would get (in the protocol's
/// own shape) and a constrain's rewrite of the request; returns the decision.
pub fn decide_and_carry_out(
    policy: &Policy,
    inspected: &Inspected,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Decided {
    let decided = policy.decide_all(&inspected.actions);
    let _ = inspect::block_response(&inspected.protocol, &decided.decision);
    if decided.decision.verdict == enforcer::model::Verdict::Constrain {
        let mut parts = parts.clone();
        let mut body = body.clone();
        // The provider whose own credential header is no finding: the deciding request's, as the proxy passes it.
        let provider = inspected
            .actions
            .first()
            .and_then(|a| a.transport.provider.as_deref());
        let _ = enforcer::constrain::apply(
            &decided.decision.rewrites,
            policy,
            provider,
            &mut parts,
            &mut body,
        );
    }
    decided
}

/// An HTTP/1.1 request read from `bytes` as a server reads one off the wire: its head (httparse, at most 64 header
/// fields) and its body framed by `Transfer-Encoding: chunked` or `Content-Length` (RFC 9112 §6.3), or `None` where
/// a server would answer 400. Bytes after the framed body are ignored (the next request on the connection).
pub fn parse_http1(bytes: &[u8]) -> Option<(http::request::Parts, Bytes)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = req.parse(bytes).ok()? else {
        return None;
    };
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(req.method?.as_bytes()).ok()?)
        .uri(req.path?.parse::<http::Uri>().ok()?)
        .version(match req.version? {
            0 => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    let (mut chunked, mut length) = (false, None::<usize>);
    for h in req.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_bytes(h.value).ok()?;
        if name == http::header::TRANSFER_ENCODING {
            chunked = value.to_str().ok()?.trim().eq_ignore_ascii_case("chunked");
        } else if name == http::header::CONTENT_LENGTH {
            let n = value.to_str().ok()?.trim().parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
        builder = builder.header(name, value);
    }
    let rest = &bytes[head_len..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.get(..length.unwrap_or(0))?.to_vec()
    };
    let (parts, ()) = builder.body(()).ok()?.into_parts();
    Some((parts, Bytes::from(body)))
}

/// The data of a chunked body (RFC 9112 §7.1); extensions and trailers are read past.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// The upgrade requests the WebSocket target's connections start from, as raw HTTP/1.1: the OpenAI Responses API's
/// WebSocket mode, the OpenAI Realtime API (model in the query), MCP over WebSocket, and a plain WebSocket.
const UPGRADES: &[(&str, &str)] = &[
    ("api.openai.com", "/v1/responses"),
    (
        "api.openai.com",
        "/v1/realtime?model=gpt-4o-realtime-preview",
    ),
    ("mcp.example", "/mcp"),
    ("example.com", "/socket"),
];

/// The deciding Action of each upgrade request in [`UPGRADES`], as the proxy hands it to its WebSocket relay (no
/// body).
pub fn upgrade_actions() -> &'static [enforcer::model::Action] {
    static ACTIONS: OnceLock<Vec<enforcer::model::Action>> = OnceLock::new();
    ACTIONS.get_or_init(|| {
        UPGRADES
            .iter()
            .map(|(host, path)| {
                request_action(&format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ))
            })
            .collect()
    })
}

/// The (first) Action of the raw HTTP/1.1 request `raw`, sent over TLS to 203.0.113.7:443, built by the proxy's own
/// request phases (`enforcer::proxy::fuzz_request_to_action`). Panics when the proxy would refuse it.
pub fn request_action(raw: &str) -> enforcer::model::Action {
    let (parts, body) = parse_http1(raw.as_bytes()).expect("a whole request");
    let to = (
        enforcer::model::Scheme::Https,
        "203.0.113.7:443".parse().expect("address"),
    );
    match enforcer::proxy::fuzz_request_to_action(&parts, body, to, inspect_config(), 1 << 20) {
        Ok(inspected) => inspected.actions[0].clone(),
        Err(reason) => panic!("refused ({reason:?}): {raw}"),
    }
}
