//! One record per exchange, on every exit of the request path: each way an exchange can end (refused on its head,
//! its body, its classification or the policy; the upstream failing before or after the record; the client
//! leaving) is driven through the real proxy, and the trail must grow by exactly one record saying what happened.
//! Also: the record keeps the policy's decision apart from an upstream failure, and a record is scrubbed and
//! hashed under the policy the exchange was decided under even when a reload happens mid-request.

mod proxy_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use enforcer::policy::Policy;
use enforcer::proxy::{set_limits, Limits};
use proxy_support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const SHORT: Duration = Duration::from_secs(1);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const H1: &[u8] = b"http/1.1";

const POLICY: &str = r#"version: 1
default: block
rules:
  - id: allow-test-hosts
    when: { host: [allowed.test, other.test, elsewhere.test] }
    verdict: log
  - id: no-admin
    when: { host: allowed.test, path: "/admin/**" }
    verdict: block
    message: the admin API is off limits
  - id: strip-signature
    when: { host: allowed.test, path: /signed }
    verdict: constrain
    constrain: { json_remove: ["$.messages[0].content[0].signature"] }
"#;

struct World {
    test_ca: TestCa,
    proxy: Proxy,
}

async fn world() -> World {
    set_limits(Limits {
        header_read_timeout: SHORT,
        body_idle_timeout: SHORT,
        response_head_timeout: SHORT,
        ..Limits::default()
    });
    let test_ca = TestCa::new("records test upstream CA");
    let proxy = start_proxy_with_hosts(
        POLICY,
        &[&test_ca],
        false,
        &[
            ("allowed.test", &[LOOPBACK]),
            ("other.test", &[LOOPBACK]),
            ("elsewhere.test", &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]),
        ],
    )
    .await;
    World { test_ca, proxy }
}

/// Write `request` on `io` and read what comes back until the proxy closes or `Connection: close` ends it.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, request: &[u8]) -> String {
    io.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The records written since `before`, waiting briefly for a record written after the answer.
async fn new_records(proxy: &Proxy, before: usize) -> Vec<serde_json::Value> {
    for _ in 0..50 {
        let all = proxy.audit_records().await;
        if all.len() > before {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return proxy.audit_records().await.split_off(before);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vec::new()
}

/// One exit of the request path: how to provoke it, and what the one record must say.
struct Exit {
    name: &'static str,
    status: u16,
    /// (verdict, deciding rule, disposition, outcome error)
    record: (
        &'static str,
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
    ),
}

fn check(exit: &Exit, response: &str, records: &[serde_json::Value]) {
    assert_eq!(
        status_of(response),
        exit.status,
        "{}: {response}",
        exit.name
    );
    assert_eq!(
        records.len(),
        1,
        "{}: exactly one record, got {records:#?}",
        exit.name
    );
    let r = &records[0];
    let (verdict, rule, disposition, error) = exit.record;
    assert_eq!(r["decision"]["verdict"], verdict, "{}: {r}", exit.name);
    assert_eq!(r["decision"]["rule"].as_str(), rule, "{}: {r}", exit.name);
    assert_eq!(
        r["outcome"]["disposition"], disposition,
        "{}: {r}",
        exit.name
    );
    assert_eq!(r["outcome"]["error"].as_str(), error, "{}: {r}", exit.name);
}

#[tokio::test]
async fn every_exit_of_a_plain_http_exchange_leaves_exactly_one_record() {
    let w = world().await;
    let (up, seen) = http_upstream().await;
    // Declared larger than the policy's 4 MiB limit: refused on the head, before a byte of the body is read.
    let too_large = format!(
        "POST /x HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        5 * 1024 * 1024
    );
    let cases: Vec<(Exit, Vec<u8>)> = vec![
        (
            Exit { name: "forwarded", status: 200, record: ("log", Some("allow-test-hosts"), "forwarded", None) },
            b"GET /ok HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit { name: "no valid host", status: 400, record: ("block", None, "blocked", Some("bad_request")) },
            b"GET / HTTP/1.1\r\nHost: a@b\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit { name: "dot segments", status: 400, record: ("block", None, "blocked", Some("bad_request")) },
            b"GET /a/../admin/x HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit { name: "CONNECT", status: 405, record: ("block", None, "blocked", Some("bad_request")) },
            b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit { name: "body too large", status: 413, record: ("block", None, "blocked", Some("body_too_large")) },
            too_large.into_bytes(),
        ),
        (
            Exit { name: "unsupported coding", status: 415, record: ("block", None, "blocked", Some("unparseable")) },
            b"POST /x HTTP/1.1\r\nHost: allowed.test\r\nContent-Encoding: x-custom\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab".to_vec(),
        ),
        (
            Exit { name: "corrupt gzip", status: 400, record: ("block", None, "blocked", Some("unparseable")) },
            b"POST /x HTTP/1.1\r\nHost: allowed.test\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope".to_vec(),
        ),
        (
            Exit { name: "policy block", status: 403, record: ("block", Some("no-admin"), "blocked", None) },
            b"GET /admin/users HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit { name: "policy default", status: 403, record: ("block", None, "blocked", None) },
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            Exit {
                name: "constrain touching a signed field",
                status: 403,
                record: ("block", Some("strip-signature"), "blocked", Some("signed_field")),
            },
            {
                let body = r#"{"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"sig"}]}]}"#;
                format!(
                    "POST /signed HTTP/1.1\r\nHost: allowed.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            },
        ),
        (
            Exit { name: "host not at the destination", status: 421, record: ("block", None, "blocked", Some("host_mismatch")) },
            b"GET / HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n".to_vec(),
        ),
    ];
    let mut forwarded = 0;
    for (exit, request) in cases {
        let before = w.proxy.audit_records().await.len();
        let response = exchange(w.proxy.connect_as(up).await, &request).await;
        let records = new_records(&w.proxy, before).await;
        check(&exit, &response, &records);
        // Every refusal of a request that named a valid host records it (refused on the head or later alike).
        let host = match exit.name {
            "no valid host" => serde_json::Value::Null,
            "policy default" => "127.0.0.1".into(),
            "host not at the destination" => "elsewhere.test".into(),
            _ => "allowed.test".into(),
        };
        assert_eq!(
            records[0]["request"]["host"], host,
            "{}: {}",
            exit.name, records[0]
        );
        if exit.record.2 == "forwarded" {
            forwarded += 1;
        }
    }
    assert_eq!(
        seen.count(),
        forwarded,
        "only forwarded exchanges reach the upstream"
    );
}

#[tokio::test]
async fn a_stalled_body_and_a_client_that_leaves_each_leave_one_record() {
    let w = world().await;
    let (up, seen) = http_upstream().await;

    // The body never completes: 408 after the idle timeout.
    let before = w.proxy.audit_records().await.len();
    let mut io = w.proxy.connect_as(up).await;
    io.write_all(b"POST /x HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await;
    let response = String::from_utf8_lossy(&out).into_owned();
    let records = new_records(&w.proxy, before).await;
    let exit = Exit {
        name: "stalled body",
        status: 408,
        record: ("block", None, "blocked", Some("bad_request")),
    };
    check(&exit, &response, &records);

    // The client sends half a body and closes: nothing forwarded, one record saying the client left.
    let before = w.proxy.audit_records().await.len();
    let mut io = w.proxy.connect_as(up).await;
    io.write_all(b"POST /x HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    drop(io);
    let records = new_records(&w.proxy, before).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        records[0]["outcome"]["disposition"], "failed",
        "{}",
        records[0]
    );
    assert_eq!(
        records[0]["outcome"]["error"], "client_closed",
        "{}",
        records[0]
    );
    // Nobody was there to be answered: no status (docs/audit.md), however the proxy learnt the client left.
    assert!(records[0]["outcome"]["status"].is_null(), "{}", records[0]);
    assert_eq!(seen.count(), 0);
}

#[tokio::test]
async fn an_allowed_request_whose_upstream_fails_keeps_the_policys_decision() {
    let w = world().await;

    // The upstream presents a certificate from an untrusted CA: refused by the enforcer, decision kept.
    let rogue = TestCa::new("rogue CA");
    let (chain, key) = rogue.leaf(&["allowed.test"]);
    let (up, seen) = https_upstream(chain, key, false).await;
    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(up, "allowed.test", &[H1]).await;
    let response = exchange(
        tls,
        b"GET /pkg HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let records = new_records(&w.proxy, before).await;
    let exit = Exit {
        name: "upstream certificate not verified",
        status: 502,
        record: (
            "log",
            Some("allow-test-hosts"),
            "blocked",
            Some("upstream_tls"),
        ),
    };
    check(&exit, &response, &records);
    assert_eq!(
        records[0]["decision"]["matched"],
        serde_json::json!(["allow-test-hosts"])
    );
    assert_eq!(seen.count(), 0);

    // Nothing listens at the destination: failed, decision kept.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst: SocketAddr = closed.local_addr().unwrap();
    drop(closed);
    let before = w.proxy.audit_records().await.len();
    let response = exchange(
        w.proxy.connect_as(dst).await,
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let records = new_records(&w.proxy, before).await;
    let exit = Exit {
        name: "upstream unreachable",
        status: 502,
        record: (
            "log",
            Some("allow-test-hosts"),
            "failed",
            Some("upstream_unreachable"),
        ),
    };
    check(&exit, &response, &records);
}

#[tokio::test]
async fn tls_exits_leave_exactly_one_record() {
    let w = world().await;
    let (chain, key) = w.test_ca.leaf(&["allowed.test", "other.test"]);
    let (up, seen) = https_upstream(chain, key, false).await;

    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(up, "allowed.test", &[H1]).await;
    let response = exchange(
        tls,
        b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let records = new_records(&w.proxy, before).await;
    let exit = Exit {
        name: "SNI mismatch",
        status: 421,
        record: ("block", None, "blocked", Some("host_mismatch")),
    };
    check(&exit, &response, &records);

    // The upstream takes longer than the response-head timeout: the record (forwarded) is already written, so the
    // 504 adds none.
    let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let acceptor = {
        let (chain, key) = w.test_ca.leaf(&["allowed.test"]);
        tls_acceptor(chain, key, &[])
    };
    tokio::spawn(async move {
        let (tcp, _) = slow.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tls.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(slow_addr, "allowed.test", &[H1]).await;
    let response = exchange(
        tls,
        b"GET /slow HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let records = new_records(&w.proxy, before).await;
    let exit = Exit {
        name: "no response head in time",
        status: 504,
        record: ("log", Some("allow-test-hosts"), "forwarded", None),
    };
    check(&exit, &response, &records);
    assert_eq!(seen.count(), 0);
}

/// A reload while a request is being read must not change the policy its record is scrubbed and hashed under.
#[tokio::test]
async fn a_reload_mid_request_leaves_the_record_under_the_policy_that_decided_it() {
    let before_yaml = r#"version: 1
default: block
redaction_marker: "[OLD:{detector}]"
detectors:
  canary: { regex: "CANARY-[0-9]{6}" }
rules:
  - id: allow-allowed
    when: { host: allowed.test }
    verdict: log
"#;
    let after_yaml = "version: 1\ndefault: allow\nredaction_marker: \"[NEW:{detector}]\"\n";
    let old_hash = Policy::from_yaml(before_yaml, "old")
        .unwrap()
        .hash()
        .to_string();
    set_limits(Limits {
        body_idle_timeout: Duration::from_secs(5),
        ..Limits::default()
    });
    let proxy =
        start_proxy_with_hosts(before_yaml, &[], false, &[("allowed.test", &[LOOPBACK])]).await;
    let (up, seen) = http_upstream().await;

    let mut io = proxy.connect_as(up).await;
    io.write_all(
        b"POST /files/CANARY-123456/upload HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The new policy has no canary detector, another marker, and allows everything.
    proxy
        .ctx
        .policy
        .replace(Policy::from_yaml(after_yaml, "new").unwrap());
    io.write_all(b"cd").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await;
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 200);
    assert_eq!(seen.count(), 1);

    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["decision"]["policy_hash"], old_hash.as_str(), "{r}");
    assert_eq!(r["decision"]["rule"], "allow-allowed", "{r}");
    assert_eq!(
        r["request"]["path"], "/files/[OLD:canary]/upload",
        "the path is scrubbed with the detectors and marker of the policy that decided it: {r}"
    );
}
