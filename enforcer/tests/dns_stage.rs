//! The DNS stage in-process, on loopback: its UDP listener and DNS over TCP through the proxy's accept path (a
//! connection whose original destination port is 53), forwarding to a loopback resolver that answers over UDP and
//! TCP (and truncates over UDP as a real one does); and the proxy refusing connections to the stand-in address a
//! synthetic answer points at. The kernel side (redirection of real clients' datagrams and connections, glibc's
//! retry over TCP) is covered by the privileged end-to-end tests in tests/e2e/dns.rs.

mod proxy_support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enforcer::config::DnsConfig;
use enforcer::dns::{SYNTHETIC_V4, SYNTHETIC_V6};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// The address the test agents believe they query (the original destination of their datagrams and connections).
const RESOLVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53)), 53);
/// What the loopback resolver answers A queries for ordinary names with.
const ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// Queries the loopback resolver received, by (lower-case name, "udp" | "tcp").
#[derive(Default)]
struct Seen(Mutex<HashMap<(String, &'static str), u64>>);

impl Seen {
    fn count(&self, name: &str, transport: &'static str) -> u64 {
        let seen = self.0.lock().unwrap();
        seen.get(&(name.to_string(), transport))
            .copied()
            .unwrap_or(0)
    }
}

/// The loopback resolver's answer to `query` (None: not answered). `big.test`: 60 A records (more than 512 bytes,
/// less than 1232); `huge.test`: 120 (more than 1232); `ignores-limit.test`: 60, never truncated (a resolver that
/// ignores the client's UDP size); `silent.test`: no answer; anything else: one A record. Over UDP an answer longer
/// than the query's limit (its EDNS size, else 512) is truncated to the question with TC set.
fn resolver_answer(query: &[u8], transport: &'static str, seen: &Seen) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_lowercase();
    *seen
        .0
        .lock()
        .unwrap()
        .entry((name.clone(), transport))
        .or_default() += 1;
    let count = match name.as_str() {
        "silent.test" => return None,
        "big.test" | "ignores-limit.test" => 60,
        "huge.test" => 120,
        _ => 1,
    };
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    if question.query_type() == RecordType::A {
        for i in 0..count {
            let ip = if count == 1 {
                ANSWER
            } else {
                Ipv4Addr::new(198, 51, 100, i as u8)
            };
            reply.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(ip)),
            ));
        }
    }
    let bytes = reply.to_vec().ok()?;
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()));
    if transport == "udp" && bytes.len() > limit && name != "ignores-limit.test" {
        let mut truncated = Message::response(request.metadata.id, OpCode::Query);
        truncated.metadata.truncation = true;
        truncated.add_query(question);
        return truncated.to_vec().ok();
    }
    Some(bytes)
}

/// A resolver on 127.0.0.1 answering over UDP and TCP on one port.
async fn loopback_resolver() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            if let Some(reply) = resolver_answer(&buf[..n], "udp", &s) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                while let Ok(len) = conn.read_u16().await {
                    let mut query = vec![0u8; usize::from(len)];
                    if conn.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    if let Some(reply) = resolver_answer(&query, "tcp", &s) {
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        let _ = conn.write_all(&framed).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

const POLICY: &str = r#"version: 1
default: block
rules:
  - id: test-names
    when: { host: "*.test" }
    verdict: allow
  - id: no-exfil
    when: { host: "*.exfil.test" }
    verdict: block
    message: no exfiltration
  - id: dns-only
    when: { scheme: dns, host: "*.dnsonly.test" }
    verdict: block
    message: dnsonly names do not resolve for agents
  - id: raw-tcp
    when: { scheme: tcp, port: 7000 }
    verdict: allow
"#;

fn with_refused_answer(mode: &str) -> String {
    format!("dns: {{ refused_answer: {mode} }}\n{POLICY}")
}

async fn proxy_with_resolver(policy: &str) -> (Proxy, Arc<Seen>) {
    let (upstream, seen) = loopback_resolver().await;
    let proxy = start_proxy_with_dns(policy, upstream, DnsConfig::default()).await;
    (proxy, seen)
}

/// A query for `name` of `qtype` with RD, and an OPT record offering `edns` bytes when given.
fn query(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Send one datagram as a redirected query to [`RESOLVER`] and wait for the reply.
async fn ask_udp(proxy: &Proxy, packet: &[u8]) -> Message {
    let socket = proxy.dns_socket_as(RESOLVER).await;
    socket.send(packet).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn dns_records(records: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    records
        .iter()
        .filter(|r| r["request"]["scheme"] == "dns")
        .collect()
}

/// A connection to the proxy whose original destination is port 53 is DNS: several length-prefixed queries
/// written at once are each decided, recorded and answered (allowed ones forwarded over TCP and arriving whole,
/// refused ones answered locally, malformed ones FORMERR); nothing is decided as raw TCP.
#[tokio::test]
async fn tcp_to_port_53_is_served_by_the_dns_stage_with_pipelining() {
    let (proxy, seen) = proxy_with_resolver(POLICY).await;
    let mut conn = proxy.connect_as(RESOLVER).await;
    let mut malformed = query(4, "bad.test", RecordType::A, None);
    malformed[5] = 2; // two questions
    let frames = [
        query(1, "a.test", RecordType::A, None),
        query(2, "huge.test", RecordType::A, None),
        query(3, "x.exfil.test", RecordType::A, None),
        malformed,
    ];
    let mut out = Vec::new();
    for f in &frames {
        out.extend_from_slice(&(f.len() as u16).to_be_bytes());
        out.extend_from_slice(f);
    }
    conn.write_all(&out).await.unwrap();
    let mut replies = HashMap::new();
    for _ in 0..frames.len() {
        let len = tokio::time::timeout(Duration::from_secs(10), conn.read_u16())
            .await
            .expect("an answer in time")
            .unwrap();
        let mut reply = vec![0u8; usize::from(len)];
        conn.read_exact(&mut reply).await.unwrap();
        let m = Message::from_vec(&reply).unwrap();
        replies.insert(m.metadata.id, m);
    }
    assert_eq!(addresses(&replies[&1]), vec![IpAddr::V4(ANSWER)]);
    let huge = &replies[&2];
    assert!(!huge.metadata.truncation);
    assert_eq!(addresses(huge).len(), 120, "the whole answer, over TCP");
    assert_eq!(addresses(&replies[&3]), vec![IpAddr::V4(SYNTHETIC_V4)]);
    assert_eq!(replies[&4].metadata.response_code, ResponseCode::FormErr);
    assert_eq!(
        (seen.count("a.test", "tcp"), seen.count("huge.test", "tcp")),
        (1, 1)
    );
    assert_eq!(seen.count("x.exfil.test", "tcp"), 0);
    assert_eq!(seen.count("huge.test", "udp"), 0, "forwarded over TCP only");
    // The connection stays open for more queries.
    let again = query(5, "b.test", RecordType::A, None);
    let mut framed = (again.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&again);
    conn.write_all(&framed).await.unwrap();
    let len = conn.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    conn.read_exact(&mut reply).await.unwrap();
    assert_eq!(Message::from_vec(&reply).unwrap().metadata.id, 5);
    drop(conn);

    let records = proxy.audit_records().await;
    assert!(
        records.iter().all(|r| r["request"]["scheme"] != "tcp"),
        "decided as raw TCP: {records:?}"
    );
    let dns = dns_records(&records);
    let hosts: Vec<&str> = dns
        .iter()
        .filter_map(|r| r["request"]["host"].as_str())
        .collect();
    assert_eq!(hosts, ["a.test", "huge.test", "x.exfil.test", "b.test"]);
    for r in &dns {
        assert_eq!(r["request"]["ip"], "10.0.0.53", "{r}");
        assert_eq!(r["agent"]["profile"], "test-agent", "{r}");
        let want = if r["request"]["host"] == "x.exfil.test" {
            "blocked"
        } else {
            "forwarded"
        };
        assert_eq!(r["outcome"]["disposition"], want, "{r}");
    }
    assert_eq!(proxy.close_and_verify().await, records.len() as u64);
}

/// Over UDP the client gets at most what it takes: 512 bytes without EDNS, its EDNS size (at most 1232 offered
/// upstream) with it. A truncated upstream answer is passed on (the client retries over TCP); an upstream answer
/// over the client's size is replaced by a truncated one.
#[tokio::test]
async fn udp_answers_never_exceed_what_the_client_takes() {
    let (proxy, seen) = proxy_with_resolver(POLICY).await;
    let plain = ask_udp(&proxy, &query(1, "big.test", RecordType::A, None)).await;
    assert!(plain.metadata.truncation && plain.answers.is_empty());
    let edns = ask_udp(&proxy, &query(2, "big.test", RecordType::A, Some(4096))).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(addresses(&edns).len(), 60);
    let huge = ask_udp(&proxy, &query(3, "huge.test", RecordType::A, Some(4096))).await;
    assert!(
        huge.metadata.truncation,
        "1232 bytes at most were offered upstream"
    );
    let careless = ask_udp(&proxy, &query(4, "ignores-limit.test", RecordType::A, None)).await;
    assert!(
        careless.metadata.truncation && careless.answers.is_empty(),
        "an upstream answer over 512 bytes is not passed to a client without EDNS"
    );
    assert_eq!(careless.metadata.id, 4);
    assert_eq!(seen.count("big.test", "udp"), 2);
    assert_eq!(seen.count("big.test", "tcp"), 0);
}

/// How a refused name is answered follows the policy's `dns.refused_answer`; the name never goes upstream.
#[tokio::test]
async fn refused_names_are_answered_as_the_policy_says() {
    for (mode, rcode, want) in [
        (None, ResponseCode::NoError, Some(IpAddr::V4(SYNTHETIC_V4))),
        (
            Some("synthetic"),
            ResponseCode::NoError,
            Some(IpAddr::V4(SYNTHETIC_V4)),
        ),
        (Some("nxdomain"), ResponseCode::NXDomain, None),
        (Some("refused"), ResponseCode::Refused, None),
    ] {
        let policy = mode.map_or_else(|| POLICY.to_string(), with_refused_answer);
        let (proxy, seen) = proxy_with_resolver(&policy).await;
        let a = ask_udp(&proxy, &query(7, "Q.Exfil.test", RecordType::A, None)).await;
        assert_eq!(a.metadata.response_code, rcode, "{mode:?}");
        assert_eq!(
            addresses(&a),
            want.into_iter().collect::<Vec<_>>(),
            "{mode:?}"
        );
        assert_eq!(
            a.queries[0].name().to_ascii(),
            "Q.Exfil.test.",
            "the question is echoed as asked"
        );
        if mode != Some("nxdomain") && mode != Some("refused") {
            let aaaa = ask_udp(&proxy, &query(8, "q.exfil.test", RecordType::AAAA, None)).await;
            assert_eq!(addresses(&aaaa), vec![IpAddr::V6(SYNTHETIC_V6)]);
            let txt = ask_udp(&proxy, &query(9, "q.exfil.test", RecordType::TXT, None)).await;
            assert_eq!(
                (txt.metadata.response_code, txt.answers.len()),
                (ResponseCode::NoError, 0),
                "NODATA for other types"
            );
        }
        assert_eq!(seen.count("q.exfil.test", "udp"), 0, "{mode:?}");
        let records = proxy.audit_records().await;
        for r in dns_records(&records) {
            assert_eq!(r["decision"]["rule"], "no-exfil", "{r}");
            assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        }
    }
}

/// A connection to the stand-in address reaches the proxy like any redirected one and is refused there, with the
/// message of the rule that refused the name, and nothing is forwarded: HTTPS gets 403 (also when only a `scheme:
/// dns` rule refuses the name and its requests alone would be allowed), raw TCP is closed.
#[tokio::test]
async fn the_stand_in_address_is_refused_with_the_rules_message() {
    let (proxy, _) = proxy_with_resolver(POLICY).await;
    for (dst, host, message, rule) in [
        (
            IpAddr::V4(SYNTHETIC_V4),
            "q.exfil.test",
            "no exfiltration",
            "no-exfil",
        ),
        (
            IpAddr::V6(SYNTHETIC_V6),
            "a.dnsonly.test",
            "dnsonly names do not resolve for agents",
            "dns-only",
        ),
    ] {
        let tls = proxy
            .tls_to(SocketAddr::new(dst, 443), host, &[b"http/1.1"])
            .await;
        let (status, _, body) = send(tls, false, get("/stand-in", host)).await;
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains(message), "{body}");
        let records = proxy.audit_records().await;
        let r = records.last().unwrap();
        assert_eq!(
            (&r["decision"]["verdict"], &r["decision"]["rule"]),
            (&serde_json::json!("block"), &serde_json::json!(rule)),
            "{r}"
        );
        assert_eq!(r["request"]["ip"], dst.to_string(), "{r}");
    }
    // Raw TCP to an allowed port: closed, recorded as a block, nothing relayed.
    let mut conn = proxy
        .connect_as(SocketAddr::new(IpAddr::V4(SYNTHETIC_V4), 7000))
        .await;
    conn.write_all(b"\x00\x01hello").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection is closed");
    let records = proxy.audit_records().await;
    let r = records.last().unwrap();
    assert_eq!(r["request"]["scheme"], "tcp", "{r}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
    assert_eq!(r["decision"]["reason"], "upstream_unreachable", "{r}");
}
