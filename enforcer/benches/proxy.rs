//! Proxy overhead on loopback, as ratios against direct connections measured in the same run (absolute figures vary
//! with the machine): requests on one kept-alive HTTP/1.1 connection, a fresh TLS connection per request, and leaf
//! minting. Runs for a few seconds: `cargo bench -p enforcer --bench proxy` (a fiftieth of the work with
//! `ENFORCER_BENCH_SHORT` set).

#[path = "../tests/proxy_support/mod.rs"]
mod proxy_support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use proxy_support::*;
use rustls::pki_types::ServerName;

/// The allocator the daemon ships with (`src/main.rs`), so the figures are those of the shipped binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Requests, connections and leaves per case; divided by [`SHORT_DIVISOR`] with `ENFORCER_BENCH_SHORT` set.
const KEEPALIVE_REQUESTS: u32 = 2000;
const FRESH_CONNECTIONS: u32 = 200;
const MINTS: u32 = 500;
const SHORT_DIVISOR: u32 = 50;

/// `n`, or a fiftieth of it (at least 1) in the short mode: every path once, the figures meaningless.
fn count(n: u32) -> u32 {
    if std::env::var_os("ENFORCER_BENCH_SHORT").is_some() {
        (n / SHORT_DIVISOR).max(1)
    } else {
        n
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let test_ca = TestCa::new("bench upstream CA");
    let proxy = start_proxy(&policy(&["allowed.test"], &[]), &[&test_ca], false).await;
    let (chain, key) = test_ca.leaf(&["allowed.test"]);
    let (up, _) = https_upstream(chain, key, false).await;
    let direct_tls =
        tokio_rustls::TlsConnector::from(client_trusting(&test_ca.pem, &[b"http/1.1"]));
    let name = || ServerName::try_from("allowed.test").expect("server name");

    // Kept-alive HTTP/1.1.
    let tcp = tokio::net::TcpStream::connect(up).await.expect("upstream");
    let direct = keepalive(direct_tls.connect(name(), tcp).await.expect("direct TLS")).await;
    let via = keepalive(proxy.tls_to(up, "allowed.test", &[b"http/1.1"]).await).await;
    report(
        "keep-alive h1 request",
        direct,
        via,
        count(KEEPALIVE_REQUESTS),
    );

    // A fresh TLS connection per request.
    let t = Instant::now();
    for _ in 0..count(FRESH_CONNECTIONS) {
        let tcp = tokio::net::TcpStream::connect(up).await.expect("upstream");
        let tls = direct_tls.connect(name(), tcp).await.expect("direct TLS");
        let (status, _, _) = send(tls, false, get("/", "allowed.test")).await;
        assert_eq!(status, 200);
    }
    let direct = t.elapsed();
    let t = Instant::now();
    for _ in 0..count(FRESH_CONNECTIONS) {
        let tls = proxy.tls_to(up, "allowed.test", &[b"http/1.1"]).await;
        let (status, _, _) = send(tls, false, get("/", "allowed.test")).await;
        assert_eq!(status, 200);
    }
    report(
        "new TLS connection + request",
        direct,
        t.elapsed(),
        count(FRESH_CONNECTIONS),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = enforcer::proxy::CertAuthority::load_or_create(dir.path()).expect("CA");
    let t = Instant::now();
    for i in 0..count(MINTS) {
        ca.mint(&format!("host{i}.bench.test")).expect("mint");
    }
    println!(
        "leaf minting: {:.1} µs per leaf",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(count(MINTS))
    );
}

async fn keepalive<S>(io: S) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let t = Instant::now();
    for _ in 0..count(KEEPALIVE_REQUESTS) {
        s.ready().await.expect("ready");
        let resp = s
            .send_request(get("/", "allowed.test"))
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    }
    t.elapsed()
}

fn report(what: &str, direct: Duration, via: Duration, n: u32) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "{what}: direct {:.1} µs, via proxy {:.1} µs, ratio {:.2}",
        per(direct),
        per(via),
        via.as_secs_f64() / direct.as_secs_f64()
    );
}
