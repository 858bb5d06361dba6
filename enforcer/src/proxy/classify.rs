//! The classify phase: the request as one plain-data [`Action`] (agent, transport, the HTTP head and the decoded
//! body, JSON parsed once), then `inspect::classify` says what it asks for — the protocol, and one Action per thing
//! the request asks for (one for plain HTTP and LLM calls, one per element of a JSON-RPC batch).

use http::header::{self, HeaderMap, HeaderName};

use super::body::{self, Body};
use super::head::Head;
use super::http::Conn;
use super::readings::{self, Readings};
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use crate::encoding::percent_decode;
use crate::inspect::{self, InspectError, Inspected, Protocol};
use crate::model::{Action, HttpRequest, Pairs, Shared, Transport};

/// Build and classify the Actions of a request; `inspected.actions` is never empty. A request that cannot be
/// classified is refused, answered in the shape of the protocol it claims to speak. A request that reads more than
/// one way (`readings`) comes with each other reading's Actions, classified alike, for the decide phase to check
/// agreement with; none for a request that reads one way.
pub(crate) fn classify(
    rec: &mut ExchangeRecord,
    conn: &Conn,
    head: &Head,
    parts: &http::request::Parts,
    body: &Body,
) -> Result<(Inspected, Readings), Refusal> {
    let mut action = build_action(conn, head, parts, body);
    // The body is parsed here once, as `inspect::classify` would parse it, so every reading shares the one parse; a
    // member named twice is found in the same pass (`inspect::read_json`).
    let parsed = match action.http.as_deref_mut() {
        Some(http) if http.json.is_none() && !http.body.trim().is_empty() => {
            inspect::read_json(&http.body, inspect::Twins::Exact)
                .map(|json| http.json = json.map(Shared::new))
                .map_err(|inspect::TwinMembers| InspectError::TwinMembers)
        }
        _ => Ok(()),
    };
    let cfg = &rec.ctx().inspect;
    let raw_query = parts.uri.query().unwrap_or("");
    let classified = parsed
        .and_then(|()| {
            action
                .http
                .as_ref()
                .map_or(Ok(readings::Built::default()), |http| {
                    readings::build(http, raw_query, rec.policy().read_fields()).map_err(
                        |e| match e {
                            readings::Unreadable::MethodInPart => InspectError::MethodOverride,
                            e @ readings::Unreadable::TooMany => {
                                InspectError::Readings(e.to_string())
                            }
                        },
                    )
                })
        })
        .and_then(|others| {
            let mut inspected = inspect_action(action.clone(), cfg, &body.decoded)?;
            // A member a condition selects, with a twin named alike once folded: refused, not decided under each.
            if inspected
                .actions
                .iter()
                .any(|a| rec.policy().reads_twin_member(a))
            {
                return Err(InspectError::TwinMembers);
            }
            let mut readings = Readings {
                kinds: others.kinds,
                actions: Vec::with_capacity(others.requests.len()),
            };
            for http in others.requests {
                let reading = Action {
                    http: Some(http.into()),
                    ..action.clone()
                };
                let reading = inspect_action(reading, cfg, &body.decoded)?;
                // A batch create under any reading (a method override to `POST`) runs only on files read.
                for input in reading.inputs {
                    if !inspected.inputs.contains(&input) {
                        inspected.inputs.push(input);
                    }
                }
                readings.actions.push(reading.actions);
            }
            Ok((inspected, readings))
        });
    match classified {
        Ok(classified) => Ok(classified),
        Err(e) => {
            let claimed = inspect::claimed_protocol(&action, cfg);
            // An LLM call whose body could not be read still names its provider (by its host).
            let provider = inspect::claimed_llm_provider(&action, cfg);
            rec.note_protocol(claimed);
            rec.note_llm_provider(provider);
            Err(body::refusal(&e))
        }
    }
}

/// Classify `action`, whose body decodes to `decoded`; the Actions are never empty (`action` itself when
/// classification names none).
pub(crate) fn inspect_action(
    action: Action,
    cfg: &inspect::InspectConfig,
    decoded: &[u8],
) -> Result<Inspected, InspectError> {
    let mut inspected = inspect::classify(action.clone(), cfg)?;
    // Inspection reads a lossy UTF-8 copy of the body: where bytes that are not UTF-8 could mean something else to
    // the upstream than what was decided (an LLM or MCP call, a batch input file's lines, any body claiming JSON),
    // they are refused.
    let protocol = match &inspected.protocol {
        Protocol::Llm { provider, .. } => Some(provider.as_str()),
        // A batch input file's lines are LLM calls, read as their bodies are.
        Protocol::Provider(provider) if inspected.carried.is_some() => Some(provider.as_str()),
        Protocol::Mcp { .. } => Some("MCP"),
        Protocol::Http | Protocol::Provider(_) => {
            let http = action.http.as_ref();
            let ct = http.and_then(|h| h.content_type.as_deref());
            inspect::claims_json(ct, http.map_or("", |h| h.body.as_str())).then_some("JSON")
        }
    };
    if let Some(protocol) = protocol.filter(|_| std::str::from_utf8(decoded).is_err()) {
        return Err(InspectError::BadJson { protocol });
    }
    if inspected.actions.is_empty() {
        inspected.actions.push(action);
    }
    Ok(inspected)
}

/// Exists for fuzzing (`fuzz/fuzz_targets/http_request.rs`), and nothing else calls it: the request phases that read
/// the agent's bytes, with the proxy's own code and in its order — `head::read` and `head::check`, the body bounded
/// by `limit` bytes and `body::decode`, the Action and its classification — for a request head already parsed from
/// the wire (`parts`) and its raw body, as if it arrived with `scheme` at `dst` from an unnamed agent. Returns what
/// the policy would decide (`actions` never empty), or the reason the proxy would refuse the request. No connection,
/// record or upstream.
pub fn fuzz_request_to_action(
    parts: &http::request::Parts,
    raw_body: bytes::Bytes,
    (scheme, dst): (crate::model::Scheme, std::net::SocketAddr),
    cfg: &inspect::InspectConfig,
    limit: u64,
) -> Result<Inspected, crate::model::Reason> {
    let head = super::head::read(parts).map_err(|r| r.reason)?;
    super::head::check(parts, &head).map_err(|r| r.reason)?;
    if raw_body.len() as u64 > limit {
        // What `body::read` refuses while reading.
        return Err(crate::model::Reason::BodyTooLarge);
    }
    let body = body::decode(raw_body, &parts.headers, limit).map_err(|r| r.reason)?;
    let conn = Conn {
        scheme,
        sni: None,
        dst,
        resolved_host: None,
        agent: crate::model::Agent::default(),
    };
    let action = build_action(&conn, &head, parts, &body);
    inspect_action(action, cfg, &body.decoded).map_err(|e| body::refusal(&e).reason)
}

/// The Action for a request before classification.
pub(crate) fn build_action(
    conn: &Conn,
    head: &Head,
    parts: &http::request::Parts,
    body: &Body,
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
    Action {
        agent: conn.agent.clone().into(),
        transport: Transport {
            scheme: conn.scheme,
            host: Some(head.host.clone()),
            ip: Some(conn.dst.ip()),
            port: conn.dst.port(),
            provider: None,
        },
        http: Some(
            HttpRequest {
                method: parts.method.as_str().to_string(),
                path: parts.uri.path().to_string(),
                query: parse_query(parts.uri.query().unwrap_or("")),
                headers,
                content_type,
                body_size: body.raw.len() as u64,
                body: crate::encoding::lossy_text(&body.decoded).into(),
                // Parsed by the classify phase (`classify`) or by `inspect::classify`, once.
                json: None,
                upgrade: head.upgrade.clone(),
            }
            .into(),
        ),
        mcp: None,
        llm: None,
        proposal: None,
        response: None,
        session: None,
    }
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` as space), split on `&` as WHATWG URL and most servers split a
/// query. Servers that also split on `;` read the query another way: `readings` decides that reading too.
pub(crate) fn parse_query(q: &str) -> Pairs {
    split_query(q, &['&'])
}

/// The query `q` split on each of `separators`, as [`parse_query`] reads its pairs: `mode=read;mode=write` split on
/// `&` and `;` (Rack 2, hence Rails; Python before 3.9.2; Go before 1.17) is `mode` = `read` and `write`.
pub(crate) fn split_query(q: &str, separators: &[char]) -> Pairs {
    let pair = |p: &str| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (percent_decode(k, true), percent_decode(v, true))
    };
    Pairs(
        q.split(separators)
            .filter(|p| !p.is_empty())
            .map(pair)
            .collect(),
    )
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
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
        let q = parse_query("mode=read;mode=write&x=1");
        let modes: Vec<&str> = q.get_all("mode").collect();
        assert_eq!(modes, ["read;mode=write"]);
        let q = split_query("mode=read;mode=write&x=1", &['&', ';']);
        let modes: Vec<&str> = q.get_all("mode").collect();
        assert_eq!(modes, ["read", "write"]);
        assert_eq!(q.get_all("x").count(), 1);
    }

    #[test]
    fn the_fuzzing_entry_runs_the_request_phases() {
        use crate::model::{Reason, Scheme};
        let cfg = inspect::InspectConfig::default();
        let dst = (Scheme::Https, "203.0.113.7:443".parse().unwrap());
        let request = |path: &str, encoding: Option<&str>, body: &[u8]| {
            let mut b = http::Request::post(path)
                .header("host", "api.openai.com")
                .header("content-type", "application/json");
            if let Some(e) = encoding {
                b = b.header("content-encoding", e);
            }
            (
                b.body(()).unwrap().into_parts().0,
                bytes::Bytes::copy_from_slice(body),
            )
        };
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, chat).unwrap();
        let (parts, body) = request("/v1/chat/completions", Some("gzip"), &gz.finish().unwrap());
        let inspected = fuzz_request_to_action(&parts, body, dst, &cfg, 1 << 20).unwrap();
        assert!(matches!(inspected.protocol, Protocol::Llm { .. }));
        assert_eq!(
            inspected.actions[0].llm.as_ref().unwrap().model.as_deref(),
            Some("gpt-4o")
        );

        let (parts, body) = request("/v1/%2e%2e/admin", None, chat);
        let refused = fuzz_request_to_action(&parts, body, dst, &cfg, 1 << 20);
        assert_eq!(refused.unwrap_err(), Reason::BadRequest);
        let (parts, body) = request("/v1/chat/completions", Some("br"), b"not brotli");
        let refused = fuzz_request_to_action(&parts, body, dst, &cfg, 1 << 20);
        assert_eq!(refused.unwrap_err(), Reason::Unparseable);
        let (parts, body) = request("/v1/chat/completions", None, chat);
        let refused = fuzz_request_to_action(&parts, body, dst, &cfg, 8);
        assert_eq!(refused.unwrap_err(), Reason::BodyTooLarge);
    }
}
