//! How the proxy carries decisions out beyond allow/block: constrain rewrites the forwarded request (and the audit
//! lists what changed), shadow mode records the real decision but forwards unmodified.

mod proxy_support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use proxy_support::*;

const H1: &[u8] = b"http/1.1";

async fn upstream(ca: &TestCa) -> (std::net::SocketAddr, std::sync::Arc<Seen>) {
    let (chain, key) = ca.leaf(&["allowed.test", "blocked.test"]);
    https_upstream(chain, key, true).await
}

fn post_json(path: &str, host: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn constrain_rewrites_the_forwarded_body_and_records_the_changes() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: ok
   when: { host: allowed.test }
   verdict: allow
 - id: cap
   when: { host: allowed.test, path: /cap }
   verdict: constrain
   constrain: { json_cap: { "$.limit": 100 } }
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "allowed.test", &[H1]).await;
    let (status, _, body) = send(
        tls,
        false,
        post_json("/cap", "allowed.test", r#"{"limit":5000,"q":"x"}"#),
    )
    .await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    let sent = body.split("body=").nth(1).unwrap();
    let sent: serde_json::Value = serde_json::from_str(sent).unwrap();
    assert_eq!(sent["limit"], 100);
    assert_eq!(sent["q"], "x");
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"]["verdict"], "constrain");
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
    let changes = records[0]["request"]["changes"].as_array().unwrap();
    assert!(
        changes.iter().any(|c| c["cause"] == "json_cap"),
        "{changes:?}"
    );
}

#[tokio::test]
async fn shadow_mode_forwards_unmodified_but_records_the_block() {
    let ca = TestCa::new("decisions CA");
    let yaml = "version: 1\nmode: shadow\ndefault: allow\nrules:\n - id: no-blocked\n   when: { host: blocked.test }\n   verdict: block\n";
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "blocked.test", &[H1]).await;
    let (status, _, _) = send(tls, false, get("/", "blocked.test")).await;
    assert_eq!(status, 200);
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"]["verdict"], "block");
    assert_eq!(records[0]["decision"]["mode"], "shadow");
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
}

#[tokio::test]
async fn constrain_header_rewrite_reaches_the_upstream() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: tag
   when: { host: allowed.test }
   verdict: constrain
   constrain: { header_set: { x-tag: enforced } }
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "allowed.test", &[b"h2"]).await;
    let req = Request::builder()
        .uri("https://allowed.test/t")
        .header("x-tag", "original")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(tls, true, req).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tag=enforced"), "{body}");
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records[0]["request"]["changes"][0]["cause"], "header_set");
}
