//! A body the proxy parses as JSON is held parsed once, as the buffer budget counts it (`budget::json_tree_bound`,
//! one tree per body): a request body a `constrain` rule rewrites is rewritten in the classify phase's parse, not
//! parsed a second time, and an answer a `phase: response` rule rewrites is rewritten where it lies, not copied. Seen
//! from the process's allocator: while the exchange runs, the bytes allocated beyond what was held before stay below
//! one and a half parses of the body (two parses held at once would be at least two). A test binary of its own, one
//! test: the allocator counts the whole process.

mod proxy_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use enforcer::proxy::{set_limits, Limits};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use proxy_support::*;
use serde_json::Value;

/// The system allocator, counting the bytes allocated now and the most allocated at once since [`reset_peak`].
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::AcqRel) + n;
    PEAK.fetch_max(now, Ordering::AcqRel);
}

fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Ordering::AcqRel);
}

// SAFETY: every call is passed on to `System` with its own arguments; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (`System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`, with the caller's new size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated now; the peak starts again from here.
fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Acquire);
    PEAK.store(now, Ordering::Release);
    now
}

fn peak() -> usize {
    PEAK.load(Ordering::Acquire)
}

const HOST: &str = "api.parsed.test";

/// Rewrites `$.note` out of request bodies sent to `/rewrite` and answers fetched from `/answer`.
const POLICY: &str = r#"version: 1
default: allow
max_body_bytes: 4MiB
rules:
  - id: no-note-out
    when: { path: /rewrite }
    verdict: constrain
    constrain: { json_remove: ["$.note"] }
  - id: no-note-in
    phase: response
    when: { path: "/answer/*" }
    verdict: constrain
    constrain: { json_remove: ["$.note"] }
"#;

/// `{"note":1,"x":[0,0,…]}` with `n` zeros: about 2 bytes of text and 80 of parsed JSON (`preserve_order`) each.
fn zeros(n: usize) -> String {
    format!("{{\"note\":1,\"x\":[{}0]}}", "0,".repeat(n - 1))
}

/// `zeros(n)` without its note, as the rewrites write it.
fn rewritten(n: usize) -> String {
    format!("{{\"x\":[{}0]}}", "0,".repeat(n - 1))
}

/// What one parse of `text` holds (the allocator's count with the value alive).
fn one_parse(text: &str) -> usize {
    let base = reset_peak();
    let value: Value = serde_json::from_str(text).unwrap();
    let held = CURRENT.load(Ordering::Acquire) - base;
    drop(value);
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_body_and_answer_are_held_parsed_once() {
    assert!(set_limits(Limits {
        max_buffered_bytes: 1 << 30,
        max_buffered_bytes_per_agent: 1 << 29,
        ..Limits::default()
    }));
    // 2^18 - 1 zeros: the parse's array fills its capacity, so a copy of it is as large as the parse.
    let n = (1 << 18) - 1;
    let body = zeros(n);
    let tree = one_parse(&body);
    assert!(tree > 20 * body.len(), "{tree} bytes parsed");

    let ca = TestCa::new("parsed once CA");
    let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let seen = received.clone();
    let answer = rewritten(n);
    let up = answering_upstream(&ca, &[HOST], move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let path = req.uri().path().to_string();
            let got = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(got);
            let (content_type, out) = if path.starts_with("/answer") {
                let n = path.trim_start_matches("/answer/").parse().unwrap_or(1);
                ("application/json", zeros(n))
            } else {
                ("text/plain", "ok".to_string())
            };
            hyper::Response::builder()
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(out)).boxed())
                .unwrap()
        }
    })
    .await;
    let p = start_proxy(POLICY, &[&ca], false).await;
    let post = |body: String| {
        Request::builder()
            .method("POST")
            .uri("/rewrite")
            .header("host", HOST)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };

    // Each way once with a small body first: what the first exchange sets up once is not counted below.
    let tls = p.tls_to(up, HOST, &[b"http/1.1"]).await;
    let (status, _, _) = send(tls, false, post(zeros(3))).await;
    assert_eq!(status, 200);
    let tls = p.tls_to(up, HOST, &[b"http/1.1"]).await;
    let (status, _, got) = send(tls, false, get("/answer/3", HOST)).await;
    assert_eq!((status, got), (200, rewritten(3).into_bytes()));

    // A request body a constrain rule rewrites.
    let tls = p.tls_to(up, HOST, &[b"http/1.1"]).await;
    let sent = post(body.clone());
    let base = reset_peak();
    let (status, _, _) = send(tls, false, sent).await;
    let used = peak() - base;
    assert_eq!(status, 200);
    let last = received.lock().unwrap().last().cloned().unwrap();
    assert!(
        last == rewritten(n).as_bytes(),
        "the upstream got another body"
    );
    assert!(
        used < tree + tree / 2,
        "the request held {used} bytes at once; one parse is {tree}"
    );

    // An answer a response rule rewrites.
    let tls = p.tls_to(up, HOST, &[b"http/1.1"]).await;
    let base = reset_peak();
    let (status, _, got) = send(tls, false, get(&format!("/answer/{n}"), HOST)).await;
    let used = peak() - base;
    assert_eq!(status, 200);
    assert!(got == answer.as_bytes(), "the agent got another answer");
    assert!(
        used < tree + tree / 2,
        "the answer held {used} bytes at once; one parse is {tree}"
    );
    assert!(p.close_and_verify().await > 0);
}
