//! Deterministic fuzz-style robustness tests for everything that reads network bytes: random and mutated bodies
//! (from the golden provider and MCP requests) through `inspect::decode_body`, `inspect::classify`, the policy and
//! `constrain::apply`, mutated raw HTTP/1.1 requests through a loopback proxy, and mutated DNS queries through the
//! DNS stage's parser and over DNS-over-TCP connections. Nothing may panic. Plain Rust
//! loops over a seeded xorshift generator, bounded iterations, no extra dependencies.
//! The coverage-guided targets over the same parsers (libFuzzer, committed corpora) live in `fuzz/`.

/// The checks the `dns_query` fuzz target runs on each input.
#[path = "../../fuzz/src/dns.rs"]
mod dns_check;
mod proxy_support;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use enforcer::constrain;
use enforcer::inspect::{self, InspectConfig, Provider, ProviderOverride};
use enforcer::model::{Action, HttpRequest, Pairs, PlannedRewrite, Reason, Rewrite, Transport};
use enforcer::policy::Policy;
use enforcer::proxy::{set_limits, Limits};
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"1e400",
    b"-0",
    b"18446744073709551616",
    b"\xff",
    b"\xc3",
    b"%",
    b"%zz",
    b"\r\n",
    b"\0",
    b"\"jsonrpc\":\"2.0\"",
    b"\"method\":\"tools/call\"",
    b"\"type\":\"thinking\"",
    b"\"signature\":\"s\"",
    b"\"encrypted_content\":\"e\"",
    b"\"thoughtSignature\":\"t\"",
    b"AKIAIOSFODNN7EXAMPLE",
    b"ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    b"sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    b"4111 1111 1111 1111",
    b"a@b.example",
    b"-----BEGIN RSA PRIVATE KEY-----",
];

fn mutate(rng: &mut Rng, seed: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, (rng.next() & 0xff) as u8),
            2 if !v.is_empty() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            3 => {
                let t = rng.pick(TOKENS);
                v.splice(at..at, t.iter().copied());
            }
            4 => {
                let other = rng.pick(seeds);
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                v.splice(at..at, other[from..to].iter().copied());
            }
            5 => {
                // Deep nesting.
                let depth = rng.below(300);
                let open = if rng.below(2) == 0 { b'[' } else { b'{' };
                v.splice(at..at, std::iter::repeat_n(open, depth));
            }
            6 if !v.is_empty() => {
                let end = (at + rng.below(32)).min(v.len());
                let piece: Vec<u8> = v[at.min(end)..end].to_vec();
                v.splice(at..at, piece);
            }
            _ => {
                let n = rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| (rng.next() & 0xff) as u8).collect();
                v.splice(at..at, bytes);
            }
        }
    }
    v
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = format!("{}/../tests/fixtures/protocols", env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            v["request"]["body"].to_string().into_bytes()
        })
        .collect();
    assert!(out.len() >= 5, "fixtures missing from {dir}");
    out.push(
        br#"{"model":"claude","max_tokens":99999,"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"AKIAIOSFODNN7EXAMPLE","signature":"sig"},{"type":"text","text":"ghp_abcdefghijklmnopqrstuvwxyz0123456789"}]}],"tools":[{"name":"delete_all","input_schema":{}}]}"#
            .to_vec(),
    );
    out.push(b"plain text with a@b.example and 4111 1111 1111 1111".to_vec());
    out.push(Vec::new());
    out
}

fn compress(rng: &mut Rng, body: &[u8]) -> (Vec<u8>, &'static str) {
    match rng.below(4) {
        0 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            (e.finish().unwrap(), "gzip")
        }
        1 => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            (e.finish().unwrap(), "deflate")
        }
        2 => {
            let mut out = Vec::new();
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 20);
            w.write_all(body).unwrap();
            drop(w);
            (out, "br")
        }
        _ => {
            // A zstd frame magic followed by whatever the mutator made.
            let mut out = vec![0x28, 0xb5, 0x2f, 0xfd];
            out.extend_from_slice(body);
            (out, "zstd")
        }
    }
}

const HOSTS: &[&str] = &[
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "127.0.0.1",
    "mcp.example",
];
const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1beta/models/gemini-2.5-pro:generateContent",
    "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
    "/v1beta/models/:generateContent",
    "/v1beta/models",
    "/mcp",
    "/messages/",
    "/",
    "",
];
const QUERIES: &[&str] = &[
    "",
    "alt=sse",
    "key=AKIAIOSFODNN7EXAMPLE&x=%zz",
    "session_id=s1&%",
    "a=%F0%9F%98&b=+&&=",
];

fn rewrites() -> Vec<PlannedRewrite> {
    let rw = |rewrite| PlannedRewrite {
        rule: "fuzz".into(),
        rewrite,
    };
    vec![
        rw(Rewrite::Redact {
            detectors: enforcer::policy::detect::Detectors::builtin()
                .names()
                .map(str::to_string)
                .collect(),
        }),
        rw(Rewrite::JsonCap {
            path: "$.max_tokens".parse().unwrap(),
            max: 1024.0,
        }),
        rw(Rewrite::JsonCap {
            path: "$.params.arguments.*".parse().unwrap(),
            max: 5.0,
        }),
        rw(Rewrite::JsonSet {
            path: "$.messages[*].content".parse().unwrap(),
            value: serde_json::json!("x"),
        }),
        rw(Rewrite::JsonRemove {
            path: "$.tools[*].input_schema".parse().unwrap(),
        }),
        rw(Rewrite::HeaderSet {
            name: "x-enforced".parse().unwrap(),
            value: "1".parse().unwrap(),
        }),
        rw(Rewrite::HeaderRemove {
            name: "cookie".parse().unwrap(),
        }),
        rw(Rewrite::DropTools {
            globs: vec!["delete_*".parse().unwrap(), "mcp:*".parse().unwrap()],
        }),
    ]
}

fn default_policy() -> Policy {
    Policy::from_yaml(&default_policy_yaml(), "default.yaml").unwrap()
}

fn default_policy_yaml() -> String {
    let path = format!("{}/../policies/default.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn random_and_mutated_bodies_never_panic_inspect_policy_or_constrain() {
    let seeds = seeds();
    let policy = default_policy();
    let all_rewrites = rewrites();
    let cfg = InspectConfig {
        provider_overrides: vec![ProviderOverride {
            host: "mcp.example:8443".into(),
            provider: Provider::Anthropic,
        }],
        ..InspectConfig::default()
    };
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let limit = 256 * 1024;
    let iterations = 4000;
    let mut classified = 0usize;
    let mut refused = 0usize;
    let mut rewritten = 0usize;
    for _ in 0..iterations {
        let seed = rng.pick(&seeds).clone();
        let body = mutate(&mut rng, &seed, &seeds);

        // Content-Encoding: random stacks over raw bytes, and real compression of the mutated body (then maybe
        // damaged).
        let encodings = [
            "gzip", "deflate", "br", "zstd", "identity", "gzip, br", "br,gzip", "", " , ",
            "x-gzip", "compress",
        ];
        let _ = inspect::decode_body(
            Some(*rng.pick(&encodings)),
            Bytes::from(body.clone()),
            limit,
        );
        let (compressed, coding) = compress(&mut rng, &body);
        let compressed = if rng.below(2) == 0 {
            mutate(&mut rng, &compressed, &seeds)
        } else {
            compressed
        };
        let decoded = inspect::decode_body(Some(coding), Bytes::from(compressed), limit)
            .unwrap_or_else(|_| Bytes::from(body.clone()));

        let _ = inspect::check_json_charset(&body);
        let _ = inspect::check_json_charset(&decoded);

        let host = *rng.pick(HOSTS);
        let path = *rng.pick(PATHS);
        let query = *rng.pick(QUERIES);
        let method = *rng.pick(&["POST", "GET", "post", "PUT"]);
        let json: Option<serde_json::Value> = if rng.below(2) == 0 {
            serde_json::from_slice(&decoded).ok()
        } else {
            None
        };
        let action = Action {
            transport: Transport {
                host: Some(host.to_string()),
                port: *rng.pick(&[443, 8443, 80]),
                ..Transport::default()
            },
            http: Some(
                HttpRequest {
                    method: method.to_string(),
                    path: path.to_string(),
                    query: Pairs(vec![("key".into(), query.into())]),
                    headers: Pairs(vec![
                        (
                            "mcp-session-id".into(),
                            String::from_utf8_lossy(&body[..body.len().min(8)]).into_owned(),
                        ),
                        ("content-type".into(), "application/json".into()),
                    ]),
                    content_type: Some("application/json".into()),
                    body_size: decoded.len() as u64,
                    body: String::from_utf8_lossy(&decoded).into_owned().into(),
                    json: json.map(Into::into),
                    upgrade: None,
                }
                .into(),
            ),
            ..Action::default()
        };
        let claimed = inspect::claimed_protocol(&action, &cfg);
        let Ok(inspected) = inspect::classify(action, &cfg) else {
            // Refused (a body claiming JSON that does not parse, an LLM call without JSON): answered in the shape
            // of the protocol the request claims.
            let _ = inspect::refusal_response(&claimed, 400, Reason::Unparseable, "refused");
            refused += 1;
            continue;
        };
        classified += 1;
        for a in &inspected.actions {
            let d = policy.evaluate(a);
            let _ = inspect::block_response(&inspected.protocol, &d);
        }

        let n = rng.below(all_rewrites.len()) + 1;
        let start = rng.below(all_rewrites.len());
        let chosen: Vec<PlannedRewrite> = all_rewrites
            .iter()
            .cycle()
            .skip(start)
            .take(n)
            .cloned()
            .collect();
        let uri = if query.is_empty() {
            format!("{path}/x")
        } else {
            format!("/p?{query}")
        };
        let mut parts = http::Request::builder()
            .method("POST")
            .uri(uri.as_str())
            .header("content-length", decoded.len())
            .header("content-encoding", coding)
            .header("x-note", "AKIAIOSFODNN7EXAMPLE")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = decoded.clone();
        if let Ok(changes) = constrain::apply(&chosen, &policy, None, &mut parts, &mut out) {
            if out != decoded {
                rewritten += 1;
                // A changed body is re-framed: identity-encoded and its Content-Length exact.
                assert!(parts.headers.get("content-encoding").is_none());
                assert_eq!(
                    parts.headers["content-length"].to_str().unwrap(),
                    out.len().to_string()
                );
                assert!(!changes.is_empty());
            }
        }
    }
    // Most mutated bodies claim JSON (its media type, or a leading `{`) without parsing, and are refused; enough
    // must still reach the policy and the rewrites.
    assert_eq!(classified + refused, iterations);
    assert!(classified > iterations / 20, "{classified}");
    assert!(rewritten > 0);
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Count panics on any thread (a panic in a connection task would otherwise vanish into its JoinHandle).
fn count_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// One connection to the proxy as if redirected from `dst` per input: the input written (then the write side
/// closed when `half_close`), and whatever comes back read until the proxy closes or 4 s pass; 48 at most at once.
async fn throw_at_proxy(
    p: &Proxy,
    dst: std::net::SocketAddr,
    inputs: Vec<Vec<u8>>,
    half_close: bool,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for bytes in inputs {
        let mut stream = p.connect_as(dst).await;
        tasks.spawn(async move {
            let _ = stream.write_all(&bytes).await;
            if half_close {
                let _ = stream.shutdown().await;
            }
            let mut sink = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(4), stream.read_to_end(&mut sink)).await;
        });
        if tasks.len() >= 48 {
            let _ = tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_raw_requests_never_panic_the_proxy() {
    count_panics();
    set_limits(Limits {
        header_read_timeout: Duration::from_millis(500),
        body_idle_timeout: Duration::from_millis(500),
        response_head_timeout: Duration::from_secs(2),
        ..Limits::default()
    });
    let p = Arc::new(start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await);
    let (up, seen) = http_upstream().await;
    let mcp = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"delete_x","arguments":{"a":1}}}"#;
    let valid: Vec<Vec<u8>> = vec![
        format!("GET /a?b=c%20d HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n").into_bytes(),
        [
            format!("POST /mcp HTTP/1.1\r\nHost: {up}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", mcp.len()).as_bytes(),
            mcp,
        ]
        .concat(),
        format!("POST /c HTTP/1.1\r\nHost: {up}\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n").into_bytes(),
        format!("GET http://{up}/abs HTTP/1.1\r\nHost: {up}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").into_bytes(),
    ];
    let mut rng = Rng(0xfeed_beef_0bad_cafe);
    let inputs = (0..240)
        .map(|round| {
            let seed = rng.pick(&valid).clone();
            if round % 10 == 0 {
                (0..rng.below(200))
                    .map(|_| (rng.next() & 0xff) as u8)
                    .collect()
            } else {
                mutate(&mut rng, &seed, &valid)
            }
        })
        .collect();
    throw_at_proxy(&p, up, inputs, false).await;

    // Still serving, and nothing panicked along the way.
    let mut s = p.connect_as(up).await;
    s.write_all(
        format!("GET /after HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(seen.count() >= 1);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a connection task panicked"
    );
}

/// A well-formed query for `name` (A, RD), optionally with an EDNS OPT record carrying an option.
fn dns_query(id: u16, name: &str, edns: bool) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0, 0, 1, 0, 1]);
    if edns {
        out.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 4, 0, 10, 0, 0]);
    }
    out
}

/// Random and mutated DNS messages through the DNS stage's parser (hickory-proto's decoder underneath) and every
/// answer built from what it accepts, and the accepted names through the policy as dns actions. Nothing may panic;
/// what parses must round-trip, and every answer built for a query must answer it.
#[test]
fn random_and_mutated_dns_queries_never_panic() {
    let policy = default_policy();
    let seeds = [
        dns_query(1, "api.openai.com", false),
        dns_query(2, "AKIAIOSFODNN7EXAMPLE.exfil.test", true),
        dns_query(3, "a.b.c.d.e.f.g", false),
    ];
    let seed_list: Vec<Vec<u8>> = seeds.to_vec();
    let mut rng = Rng(0xd450_fd45);
    let mut parsed = 0;
    for i in 0..20_000 {
        let packet = if i % 5 == 0 {
            (0..rng.below(600)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = rng.pick(&seed_list).clone();
            let mut p = mutate(&mut rng, &seed, &seed_list);
            // Byte flips aimed at the header and length octets, which `mutate` rarely hits.
            for _ in 0..rng.below(3) {
                if !p.is_empty() {
                    let at = rng.below(p.len().min(40));
                    p[at] = rng.next() as u8;
                }
            }
            p
        };
        if dns_check::check_query(&packet, std::slice::from_ref(&policy)) {
            parsed += 1;
        }
    }
    assert!(
        parsed > 100,
        "too few mutated queries parsed ({parsed}) to exercise the rest"
    );
}

/// Random and mutated byte streams on DNS-over-TCP connections (the proxy hands a connection to port 53 to the DNS
/// stage): framed seed queries, mutated as a whole so lengths and messages break in every way, and random bytes.
/// No connection task may panic, and the stage still answers a well-formed query afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_dns_over_tcp_streams_never_panic_the_stage() {
    count_panics();
    // Nothing listens upstream: allowed queries fail fast (SERVFAIL), the framing and decisions are what is tested.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dns = enforcer::config::DnsConfig {
        timeout_ms: 300,
        ..enforcer::config::DnsConfig::default()
    };
    let p = start_proxy_with_dns(&default_policy_yaml(), nowhere, dns).await;
    let resolver: std::net::SocketAddr = "10.0.0.53:53".parse().unwrap();
    let framed = |m: &[u8]| [&(m.len() as u16).to_be_bytes()[..], m].concat();
    let seeds: Vec<Vec<u8>> = vec![
        framed(&dns_query(1, "api.openai.com", false)),
        [
            framed(&dns_query(2, "AKIAIOSFODNN7EXAMPLE.exfil.test", true)),
            framed(&dns_query(3, "a.b.c", false)),
        ]
        .concat(),
        framed(&[0xff; 40]),
    ];
    let mut rng = Rng(0x0d45_07c9);
    let inputs = (0..200)
        .map(|round| {
            if round % 8 == 0 {
                (0..rng.below(300)).map(|_| rng.next() as u8).collect()
            } else {
                let seed = rng.pick(&seeds).clone();
                mutate(&mut rng, &seed, &seeds)
            }
        })
        .collect();
    throw_at_proxy(&p, resolver, inputs, true).await;

    let mut s = p.connect_as(resolver).await;
    s.write_all(&framed(&dns_query(0x77, "x.exfil.test", false)))
        .await
        .unwrap();
    let len = tokio::time::timeout(Duration::from_secs(5), s.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[..2], &[0, 0x77]);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a connection task panicked"
    );
}
