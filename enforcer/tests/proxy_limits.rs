//! The proxy's per-agent shares. Connections: one agent holding many slow connections uses up its own share of
//! `max_connections` and nobody else's; its connections beyond the share are closed at once (not left in the kernel's
//! backlog, where every agent would wait) and recorded, the records counting every refused connection. Buffered
//! bytes: one agent sending many large bodies slowly on HTTP/2 streams holds at most its share of the buffer budget;
//! the streams beyond it are refused with 503 and `Retry-After`, recorded, never forwarded, while the others (and
//! other agents) are served. A test binary of its own, because the limits are process-wide (set once for both).

mod proxy_support;

use std::time::Duration;

use bytes::Bytes;
use enforcer::model::Agent;
use enforcer::proxy::{buffered_bytes, set_limits, Limits};
use http::Request;
use http_body_util::Full;
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHARE: usize = 8;
const MIB: u64 = 1024 * 1024;
/// One agent's share of the buffer budget, and the total.
const BUFFERED_PER_AGENT: u64 = 8 * MIB;
const BUFFERED: u64 = 12 * MIB;

/// The limits of this test binary (process-wide, set once).
fn limits() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        assert!(set_limits(Limits {
            max_connections: 4 * SHARE,
            max_connections_per_agent: SHARE,
            pressure_head_timeout: Duration::from_secs(2),
            max_buffered_bytes: BUFFERED,
            max_buffered_bytes_per_agent: BUFFERED_PER_AGENT,
            ..Limits::default()
        }));
    });
}

fn agent(cgroup: &str) -> Agent {
    Agent {
        profile: Some("test-agent".into()),
        cgroup: Some(cgroup.into()),
        ..Agent::default()
    }
}

#[tokio::test]
async fn one_agent_flooding_with_slow_connections_does_not_starve_another() {
    limits();
    let p = start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await;
    let (up, seen) = http_upstream().await;
    let flooder = agent("/agents/flooder");

    // The flooder opens ten times its share of connections, each sending the start of a request head and then
    // nothing (a slow-loris).
    let mut slow = Vec::new();
    for _ in 0..10 * SHARE {
        let mut s = p.connect_as_agent(up, flooder.clone()).await;
        let _ = s
            .write_all(b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            .await;
        slow.push(s);
    }
    // Those beyond its share are closed at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 9 * SHARE, "connections beyond the flooder's share");

    // Another agent is served at once, while the flooder's share is still held.
    let mut other = p.connect_as_agent(up, agent("/agents/worker")).await;
    let req = format!("GET /work HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    other.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), other.read_to_end(&mut buf))
        .await
        .expect("the other agent was not served within a second")
        .unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(seen.count(), 1);

    // The flooder's held connections admitted under pressure (its share more than half used) get the short head
    // timeout; the first ones the normal one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut open = 0;
    for s in slow.iter_mut().take(SHARE) {
        let mut b = [0u8; 64];
        if tokio::time::timeout(Duration::from_millis(100), s.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert_eq!(
        open,
        SHARE / 2,
        "only the connections admitted without pressure stay open"
    );

    // Every refused connection is counted in the records (at most one a second for the agent).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "connection_limit")
        .collect();
    assert!(!records.is_empty() && records.len() <= 3, "{records:#?}");
    let counted: u64 = records
        .iter()
        .map(|r| r["request"]["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, (9 * SHARE) as u64, "{records:#?}");
    for r in &records {
        assert_eq!(r["agent"]["cgroup"], "/agents/flooder", "{r}");
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
    }
}

const HOST: &str = "api.budget.test";
/// A body the policy allows (`max_body_bytes: 1MiB`). Each counts twice (the buffer, and inspection's text of it):
/// five of them fit in an agent's share, six do not.
const BODY: usize = 768 * 1024;
const CHUNK: usize = 64 * 1024;
/// Long enough for anything on loopback; only reached when the proxy fails to answer.
const WAIT: Duration = Duration::from_secs(10);

type Stream = (h2::client::ResponseFuture, h2::SendStream<Bytes>);

/// The budget tests take turns: each counts every byte the proxy buffers.
static BUDGET_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A budget test's turn ([`BUDGET_TESTS`]), starting once the budget holds nothing: what an earlier test's exchanges
/// held is given back by tasks that may end after that test did.
async fn budget_turn() -> tokio::sync::MutexGuard<'static, ()> {
    let turn = BUDGET_TESTS.lock().await;
    all_given_back().await;
    turn
}

/// An HTTP/2 client (the h2 crate's, for control over every frame) on `io`.
async fn h2_client<S>(io: S) -> h2::client::SendRequest<Bytes>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Windows large enough for every answer at once: they are read one after the other.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// Open stream `POST /upload/{i}` on `client`, its body to follow (declaring `declared` bytes, or no length).
async fn open(
    client: &h2::client::SendRequest<Bytes>,
    i: usize,
    declared: Option<usize>,
) -> Stream {
    let mut req = Request::post(format!("https://{HOST}/upload/{i}"));
    if let Some(len) = declared {
        req = req.header("content-length", len);
    }
    let mut c = client.clone().ready().await.unwrap();
    c.send_request(req.body(()).unwrap(), false).unwrap()
}

/// The response's status, `Retry-After` and body.
async fn answer(resp: h2::client::ResponseFuture) -> (u16, Option<String>, String) {
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
        let Ok(chunk) = chunk else { break };
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, retry, String::from_utf8_lossy(&got).into_owned())
}

/// The value of the series `series` (name and labels) in the daemon's metrics, 0 when absent.
fn metric(series: &str) -> u64 {
    let text = enforcer::metrics::global().encode(false);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.parse().unwrap_or_else(|_| panic!("{series} {v}")))
}

/// The buffered total is within the budget: an agent's share while only one agent sends, the total always.
fn within(share: u64) -> u64 {
    let now = buffered_bytes();
    assert!(now <= share && now <= BUFFERED, "{now} bytes buffered");
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_h2_bodies_stay_within_the_agents_share_of_the_buffer_budget() {
    limits();
    let _turn = budget_turn().await;
    let ca = TestCa::new("budget upstream CA");
    let (chain, key) = ca.leaf(&[HOST]);
    let (up, seen) = https_upstream(chain, key, true).await;
    // Answers under `/big/` are read whole for a response rule.
    let yaml = format!(
        "{} - id: big-answers\n   phase: response\n   when: {{ path: \"/big/*\", detect: [aws-access-key] }}\n   verdict: block\nmax_body_bytes: 1MiB\n",
        policy(&[HOST], &[])
    );
    let p = start_proxy(&yaml, &[&ca], false).await;
    let flooder = agent("/agents/bodies");
    let client = h2_client(p.tls_to_as(up, HOST, &[b"h2"], flooder.clone()).await).await;
    let refused_requests = metric("enforcer_buffer_refusals_total{phase=\"request\"}");
    let refused_responses = metric("enforcer_buffer_refusals_total{phase=\"response\"}");

    // Five streams declaring their length: their bytes are reserved as their bodies start, before any arrive.
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(open(&client, i, Some(BODY)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(within(BUFFERED_PER_AGENT), 5 * 2 * BODY as u64);
    // Operators see what is held.
    assert_eq!(metric("enforcer_buffered_bytes"), 5 * 2 * BODY as u64);

    // A sixth is refused at once: 503, Retry-After.
    let (resp, _tx) = open(&client, 5, Some(BODY)).await;
    let (status, retry, body) = answer(resp).await;
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{body}");
    assert!(body.contains("buffer_limit"), "{body}");

    // A stream without a length is counted as it grows: its first 256 KiB (twice: 512 KiB) fit in what is left of
    // the share (8 MiB - 7.5 MiB), the next are refused.
    let (resp, mut tx) = open(&client, 6, None).await;
    for _ in 0..(BODY / CHUNK) {
        if tx.send_data(Bytes::from(vec![b'b'; CHUNK]), false).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        within(BUFFERED_PER_AGENT);
    }
    let (status, retry, _) = answer(resp).await;
    assert_eq!((status, retry.as_deref()), (503, Some("1")));

    // An answer read whole for a response rule counts too: 600 KB do not fit in what is left.
    let mut c = client.clone().ready().await.unwrap();
    let (resp, _) = c
        .send_request(
            Request::get(format!("https://{HOST}/big/600000"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let (status, retry, body) = answer(resp).await;
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{body}");
    assert!(body.contains("buffer_limit"), "{body}");
    let big: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["request"]["path"] == "/big/600000")
        .collect();
    assert_eq!(
        big.len(),
        2,
        "the request and its refused response: {big:#?}"
    );
    assert_eq!(big[1]["request"]["phase"], "response", "{big:#?}");
    assert_eq!(big[1]["outcome"]["error"], "buffer_limit", "{big:#?}");
    assert_eq!(big[1]["outcome"]["status"], 503, "{big:#?}");

    // More streams beyond the share, each refused; the connection and its first streams carry on.
    for i in 7..12 {
        let (resp, _tx) = open(&client, i, Some(BODY)).await;
        assert_eq!(answer(resp).await.0, 503, "stream {i}");
    }

    // Another agent is served meanwhile, from its own share.
    let other = p
        .tls_to_as(up, HOST, &[b"h2"], agent("/agents/other"))
        .await;
    let req = Request::post(format!("https://{HOST}/other"))
        .body(Full::new(Bytes::from(vec![b'o'; BODY])))
        .unwrap();
    let (status, _, _) = send(other, true, req).await;
    assert_eq!(status, 200, "the other agent was starved");

    // The first five bodies arrive, slowly, and are forwarded whole.
    for round in 0..(BODY / CHUNK) {
        for (_, tx) in &mut first {
            let last = round + 1 == BODY / CHUNK;
            tx.send_data(Bytes::from(vec![b'a'; CHUNK]), last).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        within(BUFFERED_PER_AGENT);
    }
    for (i, (resp, _)) in first.into_iter().enumerate() {
        let (status, _, body) = answer(resp).await;
        assert_eq!(status, 200, "stream {i}: {body}");
    }
    {
        let log = seen.log.lock().unwrap();
        let uploads: Vec<_> = log
            .iter()
            .filter(|(_, _, path, _)| path.starts_with("/upload/"))
            .collect();
        assert_eq!(uploads.len(), 5, "only the first five were forwarded");
        for (_, _, path, body) in uploads {
            assert!(
                path.as_str() < "/upload/5" && body.len() == BODY,
                "{path}: {} bytes",
                body.len()
            );
        }
    }

    // Each refused stream is recorded once, as the budget's refusal.
    let records: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "buffer_limit" && r["request"]["phase"].is_null())
        .collect();
    let mut paths: Vec<_> = records
        .iter()
        .map(|r| {
            r["request"]["path"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    paths.sort();
    let mut expected: Vec<_> = (5..12).map(|i| format!("/upload/{i}")).collect();
    expected.sort();
    assert_eq!(paths, expected, "{records:#?}");
    for r in &records {
        assert_eq!(r["agent"]["cgroup"], "/agents/bodies", "{r}");
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["status"], 503, "{r}");
    }
    // And counted for operators: the seven requests, the one response.
    assert_eq!(
        metric("enforcer_buffer_refusals_total{phase=\"request\"}") - refused_requests,
        7
    );
    assert_eq!(
        metric("enforcer_buffer_refusals_total{phase=\"response\"}") - refused_responses,
        1
    );

    // Everything is given back once the exchanges end: the agent's whole share is there again.
    let released = async {
        while buffered_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, released)
        .await
        .unwrap_or_else(|_| panic!("{} bytes still held", buffered_bytes()));
    assert_eq!(metric("enforcer_buffered_bytes"), 0);
    let client = h2_client(p.tls_to_as(up, HOST, &[b"h2"], flooder).await).await;
    let mut again = Vec::new();
    for i in 20..25 {
        let (resp, mut tx) = open(&client, i, Some(BODY)).await;
        tx.send_data(Bytes::from(vec![b'c'; BODY]), true).unwrap();
        again.push(resp);
    }
    for resp in again {
        assert_eq!(answer(resp).await.0, 200);
    }
}

/// What an agent has sent of a WebSocket message counts as it arrives (twice: the message, and inspection's text of
/// it): four connections each holding 900 KiB of an unfinished message fit in the agent's share, a fifth is closed
/// with 1013 (try again later) and recorded, and the four messages are relayed once they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_websocket_messages_count_in_the_agents_share() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    limits();
    let _turn = budget_turn().await;
    let ca = TestCa::new("budget ws CA");
    let (chain, key) = ca.leaf(&[HOST]);
    let (up, seen) = ws_upstream(chain, key).await;
    let yaml = format!("{}max_body_bytes: 1MiB\n", policy(&[HOST], &[]));
    let p = start_proxy(&yaml, &[&ca], false).await;
    let who = agent("/agents/ws");
    let refused_before = metric("enforcer_buffer_refusals_total{phase=\"request\"}");
    // The upstream answers a message naming "response.create" with a short event.
    let first = format!("\"response.create\" {}", "w".repeat(900 * 1024));
    let mut open = Vec::new();
    let mut fifth_sent = Ok(());
    for i in 0..5 {
        let mut ws = ws_connect_as(&p, who.clone(), up, HOST, "/ws", &[])
            .await
            .expect("upgraded");
        let frame = Frame::message(first.clone(), OpCode::Data(Data::Text), false);
        let sent = ws.send(Message::Frame(frame)).await;
        if i < 4 {
            sent.unwrap();
        } else {
            // The proxy may close the fifth while its frame is still being written (the client then sees a broken
            // pipe): its refusal is asserted by its record below.
            fifth_sent = sent;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        within(BUFFERED_PER_AGENT);
        open.push(ws);
    }
    let mut fifth = open.pop().unwrap();
    match (
        tokio::time::timeout(WAIT, fifth.next()).await.unwrap(),
        &fifth_sent,
    ) {
        (Some(Ok(Message::Close(Some(frame)))), _) => assert_eq!(frame.code, CloseCode::Again),
        (Some(Err(_)) | None, Err(_)) => {}
        (other, _) => panic!("expected a close with 1013, got {other:?} (sent: {fifth_sent:?})"),
    }
    for ws in &mut open {
        let end = Frame::message("!".to_string(), OpCode::Data(Data::Continue), true);
        ws.send(Message::Frame(end)).await.unwrap();
    }
    for ws in &mut open {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), r#"{"type":"response.completed"}"#)
            }
            other => panic!("expected the upstream's answer, got {other:?}"),
        }
    }
    assert_eq!(seen.messages.lock().unwrap().len(), 4);
    let refused: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "buffer_limit")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0]["agent"]["cgroup"], "/agents/ws");
    assert_eq!(
        refused[0]["request"]["phase"], "request",
        "{:#}",
        refused[0]
    );
    assert_eq!(
        metric("enforcer_buffer_refusals_total{phase=\"request\"}") - refused_before,
        1,
        "the refused message is counted"
    );
    // Carried out, the messages are no longer held.
    let released = async {
        while buffered_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, released)
        .await
        .unwrap_or_else(|_| panic!("{} bytes still held", buffered_bytes()));
}

/// The JSON a body is parsed into counts in the agent's share, reserved before the parse: found by a black-box
/// attack, where 4 MB bodies of `[0,0,…]` (eighty times their text once parsed) made one agent's exchanges hold about
/// 2 GB while the budget counted only their text. 600 KB of `0,` can become 48 MB: refused (503, `buffer_limit`)
/// within the 8 MiB share; as much text in one string parses into one value and is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parsed_json_of_a_body_counts_in_the_agents_share() {
    limits();
    let _turn = budget_turn().await;
    let ca = TestCa::new("budget upstream CA");
    let (chain, key) = ca.leaf(&[HOST]);
    let (up, _seen) = https_upstream(chain, key, true).await;
    let yaml = format!("{}max_body_bytes: 1MiB\n", policy(&[HOST], &[]));
    let p = start_proxy(&yaml, &[&ca], false).await;
    let post = |path: &str, body: String| {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("host", HOST)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let zeros = format!("{{\"x\":[{}0]}}", "0,".repeat(300_000));
    let tls = p
        .tls_to_as(up, HOST, &[b"http/1.1"], agent("/agents/json"))
        .await;
    let (status, headers, body) = send(tls, false, post("/zeros", zeros)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(body.contains("buffer_limit"), "{body}");
    // One record for the refusal, which never reached the upstream.
    let zeros: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["request"]["path"] == "/zeros")
        .collect();
    assert_eq!(zeros.len(), 1, "{zeros:#?}");
    assert_eq!(zeros[0]["outcome"]["error"], "buffer_limit", "{zeros:#?}");
    assert_eq!(zeros[0]["outcome"]["status"], 503, "{zeros:#?}");
    let text = format!("{{\"x\":\"{}\"}}", "a".repeat(600_000));
    let tls = p
        .tls_to_as(up, HOST, &[b"http/1.1"], agent("/agents/json"))
        .await;
    let (status, _, body) = send(tls, false, post("/text", text)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let released = async {
        while buffered_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, released)
        .await
        .unwrap_or_else(|_| panic!("{} bytes still held", buffered_bytes()));
}

/// 600 KB of `0,` in JSON: 1.2 MB of text held twice, 48 MB once parsed (160 bytes per element): far beyond the
/// 8 MiB share, while its text alone fits.
fn zeros() -> String {
    format!("[{}0]", "0,".repeat(300_000))
}

/// The start of a long text, for a failing assertion's message.
fn short(text: &str) -> &str {
    &text[..text.len().min(400)]
}

/// Proposal rules (the answers of `api.openai.com` are read for tool calls), a 1 MiB inspection limit.
fn proposal_policy() -> String {
    format!(
        "{} - id: no-shell\n   phase: proposal\n   when: {{ proposal.tool: shell }}\n   verdict: block\nmax_body_bytes: 1MiB\n",
        policy(&["api.openai.com"], &[])
    )
}

/// An OpenAI upstream whose answers carry [`zeros`]: whole (`/v1/chat/completions`, a completion with them in an
/// extra member) or as one event of a stream (`"stream": true`).
async fn zeros_upstream(ca: &TestCa) -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    answering_upstream(ca, &["api.openai.com"], |req: Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let asked = String::from_utf8_lossy(&body).into_owned();
        if asked.contains("\"model\":\"held\"") {
            return hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Full::new(Bytes::from(held_call_stream())).boxed())
                .unwrap();
        }
        let stream = asked.contains("\"stream\":true");
        let completion = format!(
            r#"{{"id":"c","object":"chat.completion","model":"gpt-4o","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"x":{}}}"#,
            zeros()
        );
        let (content_type, body) = if stream {
            let chunk = format!(
                r#"{{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{{"index":0,"delta":{{"content":"hi"}}}}],"x":{}}}"#,
                zeros()
            );
            ("text/event-stream", format!("data: {chunk}\n\ndata: [DONE]\n\n"))
        } else if asked.contains("\"model\":\"bom\"") {
            ("application/json", format!("\u{feff}{completion}"))
        } else {
            ("application/json", completion)
        };
        hyper::Response::builder()
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    })
    .await
}

/// A Chat Completions stream proposing one call of `run` whose arguments are `{"a":[0,0,…]}` (200,000 zeros: 400 KB
/// of text, held within the 1 MiB limit; 32 MB once parsed), in ten deltas, then its finish and `[DONE]`.
fn held_call_stream() -> String {
    let args = format!("{{\"a\":[{}0]}}", "0,".repeat(199_999));
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let c = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    let mut out = chunk(
        serde_json::json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "run", "arguments": ""}}]}),
        None,
    );
    let piece = args.len() / 10 + 1;
    for part in args.as_bytes().chunks(piece) {
        let part = std::str::from_utf8(part).unwrap();
        out.push_str(&chunk(
            serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
            None,
        ));
    }
    out.push_str(&chunk(serde_json::json!({}), Some("tool_calls")));
    out.push_str("data: [DONE]\n\n");
    out
}

/// The error event a Chat stream ends with when the budget cannot hold what its reading would parse.
const OVER_BUDGET_EVENT: &str = "data: {\"type\":\"error\",\"error\":{\"message\":\"the proxy's buffer budget \
    cannot hold the upstream's answer for inspection; retry later (policy default)\",\"type\":\"permission_error\",\
    \"param\":null,\"code\":\"blocked_by_policy\"}}\n\n";

/// Wait until the proxy holds nothing in the buffer budget; the gauge says so too.
async fn all_given_back() {
    let released = async {
        while buffered_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, released)
        .await
        .unwrap_or_else(|_| panic!("{} bytes still held", buffered_bytes()));
    assert_eq!(metric("enforcer_buffered_bytes"), 0);
}

/// The records written since the first `before`: exactly the request's and one refusal, the answer's (in `phase`,
/// `buffer_limit`, blocked, with `status`), linked to the request's record.
async fn one_answer_refusal(p: &Proxy, before: usize, status: Option<u16>, phase: &str) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = p.audit_records().await.split_off(before);
    assert_eq!(
        recs.len(),
        2,
        "the request and its refused answer: {recs:#?}"
    );
    assert_eq!(
        recs[0]["request"]["path"], "/v1/chat/completions",
        "{recs:#?}"
    );
    let r = &recs[1];
    assert_eq!(r["request"]["phase"], phase, "{r:#}");
    assert_eq!(r["request"]["parent"], recs[0]["seq"], "{r:#}");
    assert_eq!(r["request"]["llm_provider"], "openai", "{r:#}");
    assert_eq!(r["decision"]["verdict"], "block", "{r:#}");
    assert_eq!(r["decision"]["reason"], "buffer_limit", "{r:#}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{r:#}");
    assert_eq!(r["outcome"]["error"], "buffer_limit", "{r:#}");
    assert_eq!(
        r["outcome"]["status"],
        status.map_or(serde_json::Value::Null, Into::into),
        "{r:#}"
    );
}

/// The JSON an LLM answer is parsed into for its tool calls counts in the agent's share, reserved before the parse,
/// as a request body's does: a whole answer and one event of a stream of `[0,0,…]` (eighty times their text once
/// parsed) are refused, never passed on unread — the whole one with 503 and `Retry-After`, the stream ended with the
/// protocol's error event — each recorded once (`buffer_limit`), and everything is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parsed_json_of_an_answer_counts_in_the_agents_share() {
    limits();
    let _turn = budget_turn().await;
    let ca = TestCa::new("budget answers CA");
    let up = zeros_upstream(&ca).await;
    let p = start_proxy(&proposal_policy(), &[&ca], false).await;
    let refused_before = metric("enforcer_buffer_refusals_total{phase=\"response\"}");
    let ask = |model: &str, stream: bool| {
        let body = serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("host", "api.openai.com")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };

    // Whole: 503, Retry-After, the protocol's error shape naming the reason.
    let before = p.audit_records().await.len();
    let tls = p
        .tls_to_as(
            up,
            "api.openai.com",
            &[b"http/1.1"],
            agent("/agents/answers"),
        )
        .await;
    let (status, headers, body) = send(tls, false, ask("gpt-4o", false)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{}", short(&body));
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(body.contains("buffer_limit"), "{}", short(&body));
    assert!(
        !body.contains("0,0,0"),
        "the answer was passed on: {}",
        short(&body)
    );
    one_answer_refusal(&p, before, Some(503), "response").await;
    all_given_back().await;

    // The same answer after a byte-order mark, which the proposal reader skips as the SDKs' parsers do: its JSON is
    // bounded all the same.
    let before = p.audit_records().await.len();
    let tls = p
        .tls_to_as(
            up,
            "api.openai.com",
            &[b"http/1.1"],
            agent("/agents/answers"),
        )
        .await;
    let (status, _, body) = send(tls, false, ask("bom", false)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{}", short(&body));
    one_answer_refusal(&p, before, Some(503), "response").await;
    all_given_back().await;

    // Streamed: the event is not passed on; the stream ends with the protocol's error event saying why.
    let before = p.audit_records().await.len();
    let tls = p
        .tls_to_as(
            up,
            "api.openai.com",
            &[b"http/1.1"],
            agent("/agents/answers"),
        )
        .await;
    let (status, _, body) = send(tls, false, ask("gpt-4o", true)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{}", short(&body));
    // Nothing but the error event: not the event, not the rest of the stream.
    assert_eq!(short(&body), OVER_BUDGET_EVENT);
    one_answer_refusal(&p, before, None, "response").await;
    assert_eq!(
        metric("enforcer_buffer_refusals_total{phase=\"response\"}") - refused_before,
        3
    );
    all_given_back().await;

    // A tool call held until its arguments are complete: the parsed JSON of its events (and of the arguments they
    // carry, parsed once complete) stays reserved while it is held; beyond the share the stream ends (`proposal`),
    // the call never reaching the agent.
    let refused_before = metric("enforcer_buffer_refusals_total{phase=\"proposal\"}");
    let before = p.audit_records().await.len();
    let tls = p
        .tls_to_as(
            up,
            "api.openai.com",
            &[b"http/1.1"],
            agent("/agents/answers"),
        )
        .await;
    let (status, _, body) = send(tls, false, ask("held", true)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{}", short(&body));
    assert_eq!(short(&body), OVER_BUDGET_EVENT);
    one_answer_refusal(&p, before, None, "proposal").await;
    assert_eq!(
        metric("enforcer_buffer_refusals_total{phase=\"proposal\"}") - refused_before,
        1
    );
    all_given_back().await;
}

/// The JSON of a WebSocket message read for tool calls (Realtime server events) or decided as an agent's message
/// counts in the agent's share, reserved before the parse: an upstream's event of `[0,0,…]` closes the connection
/// with 1013 (try again later), recorded once (`response`, `buffer_limit`), never passed on; an agent's message of
/// them likewise (`request`), never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parsed_json_of_a_websocket_message_counts_in_the_agents_share() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    limits();
    let _turn = budget_turn().await;
    let ca = TestCa::new("budget realtime CA");
    let (chain, key) = ca.leaf(&["api.openai.com"]);
    let (up, seen) = ws_upstream(chain, key).await;
    let p = start_proxy(&proposal_policy(), &[&ca], false).await;
    let who = agent("/agents/realtime");
    let path = "/v1/realtime?model=gpt-realtime";
    let event = format!(
        r#"{{"type":"response.output_text.delta","delta":"hi","x":{}}}"#,
        zeros()
    );

    let closed = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Text(t))) => {
                assert!(!t.contains("0,0,0"), "the event was passed on");
            }
            other => panic!("expected a close, got {other:?}"),
        }
    };

    // From the upstream (which sends what follows `reply:`).
    let mut ws = ws_connect_as(&p, who.clone(), up, "api.openai.com", path, &[])
        .await
        .expect("upgraded");
    ws.send(Message::Text(format!("reply:{event}").into()))
        .await
        .unwrap();
    assert_eq!(closed(&mut ws).await, CloseCode::Again);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "buffer_limit")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(
        refused[0]["request"]["phase"], "response",
        "{:#}",
        refused[0]
    );
    assert_eq!(refused[0]["agent"]["cgroup"], "/agents/realtime");
    all_given_back().await;

    // From the agent.
    let mut ws = ws_connect_as(&p, who, up, "api.openai.com", path, &[])
        .await
        .expect("upgraded");
    ws.send(Message::Text(event.clone().into())).await.unwrap();
    assert_eq!(closed(&mut ws).await, CloseCode::Again);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "buffer_limit")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert_eq!(
        refused[1]["request"]["phase"], "request",
        "{:#}",
        refused[1]
    );
    assert!(
        seen.messages
            .lock()
            .unwrap()
            .iter()
            .all(|m| !m.starts_with('{')),
        "the agent's message was forwarded"
    );
    all_given_back().await;
}

/// What a retained trace keeps counts in the agent's share of the buffer budget, given back once the trace is
/// written. A copy the budget cannot hold is not kept, and the exchange goes on: the trace is written without it and
/// says so (`over_budget`), and its record says so too (`outcome.error: buffer_limit`), for a reader without the key.
/// Here the agent's share holds 7.5 MiB of slow uploads: a 200 KB request (400 KB held while it is decided) fits in
/// the 512 KiB left, its trace's copy does not; nor does the 3 MB answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_the_budget_cannot_hold_loses_its_bodies_not_the_exchange() {
    limits();
    let _turn = budget_turn().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("trace.key");
    let recipient = enforcer::trace::cli::keygen(&key).unwrap();
    let settings = enforcer::trace::TraceSettings {
        recipient: Some(recipient),
        ..Default::default()
    };
    let ca = TestCa::new("budget traces CA");
    let (chain, key_der) = ca.leaf(&[HOST]);
    let (up, _seen) = https_upstream(chain, key_der, true).await;
    let yaml = format!(
        "{} - id: traced\n   when: {{ host: {HOST}, path: \"/big/*\" }}\n   verdict: log\n   retain: true\nmax_body_bytes: 1MiB\n",
        policy(&[HOST], &[])
    );
    let p = start_proxy_retaining(&yaml, &[&ca], &[], settings).await;
    let who = agent("/agents/traced");
    let client = h2_client(p.tls_to_as(up, HOST, &[b"h2"], who.clone()).await).await;
    let mut uploads = Vec::new();
    for i in 0..5 {
        uploads.push(open(&client, i, Some(BODY)).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(within(BUFFERED_PER_AGENT), 5 * 2 * BODY as u64);

    let sent = format!("{{\"x\":\"{}\"}}", "r".repeat(200_000));
    let req = Request::post(format!("https://{HOST}/big/3000000"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(sent)))
        .unwrap();
    let tls = p.tls_to_as(up, HOST, &[b"http/1.1"], who).await;
    let (status, _, body) = send(tls, false, req).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 3_000_000, "the whole answer reached the agent");

    // The trace is written in the background.
    for _ in 0..100 {
        let records = p.audit_records().await;
        if records
            .iter()
            .any(|r| r["outcome"]["disposition"] == "retained")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exchange: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["request"]["path"] == "/big/3000000")
        .collect();
    assert_eq!(
        exchange.len(),
        2,
        "the exchange and its trace: {exchange:#?}"
    );
    assert_eq!(
        exchange[0]["outcome"]["disposition"], "forwarded",
        "{:#}",
        exchange[0]
    );
    let r = &exchange[1];
    assert_eq!(r["outcome"]["disposition"], "retained", "{r:#}");
    assert_eq!(r["outcome"]["error"], "buffer_limit", "{r:#}");
    assert_eq!(r["trace"]["of"], exchange[0]["seq"], "{r:#}");
    let of = exchange[0]["seq"].as_u64().unwrap();
    let audit_dir = p.audit_dir.clone();
    let text = enforcer::trace::cli::show(&audit_dir, &audit_dir.join("traces"), of, &key).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(trace["request"]["body"], "", "{}", short(&text));
    assert_eq!(trace["request"]["over_budget"], true, "{}", short(&text));
    let kept = trace["response"]["body"].as_str().unwrap().len();
    assert!(kept < 524_288, "{kept} bytes of the answer kept");
    assert_eq!(trace["response"]["truncated"], true, "{}", short(&text));
    assert_eq!(trace["response"]["over_budget"], true, "{}", short(&text));

    // The uploads end; everything is given back.
    drop(uploads);
    drop(client);
    all_given_back().await;
}
