//! Audit trail benchmark (plain `Instant` harness; figures printed, nothing asserted about time).
//!
//! - durable, strict: each writer appends, waits until the record is durable, then appends the next (8 and 64 writers;
//!   one `fdatasync` covers every record waiting at the time).
//! - durable, proxy pattern: each of 8 writers appends and moves on; the record's `durable()` is awaited together with
//!   a simulated upstream exchange (1 ms), as the proxy does between forwarding a request and answering the agent,
//!   with up to 64 exchanges in flight per writer. The same with the old order (durable first, then upstream) shows
//!   what the two-step API buys. Latencies: append (µs) and append → durable (ms), p50/p99.
//! - not durable: `durable: false`, 8 writers.
//! - sealing (zstd) and `verify` throughput, plain and compressed.
//!
//! `cargo bench -p enforcer --bench audit`; `AUDIT_BENCH_DIR` picks the filesystem, `AUDIT_BENCH_SECS` the time per
//! case (default 3), `ENFORCER_BENCH_SHORT=1` (set by `cargo xtask test`) makes the whole run a few seconds.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer::audit::{verify, AuditConfig, AuditLog};
use enforcer::model::{
    Agent, AuditEvent, Decision, Disposition, Mode, Outcome, Reason, RequestSummary, Scheme,
    Verdict,
};
use tokio::sync::Semaphore;

/// The allocator the daemon ships with (`src/main.rs`), so the figures are those of the shipped binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const UPSTREAM: Duration = Duration::from_millis(1);
const IN_FLIGHT: usize = 64;

fn event(task: u32, i: u64) -> AuditEvent {
    AuditEvent {
        decision: Decision {
            verdict: if i.is_multiple_of(10) {
                Verdict::Block
            } else {
                Verdict::Allow
            },
            deciding_rule: Some("allow-llm-apis".into()),
            matched_rules: vec!["allow-llm-apis".into(), "log-everything".into()],
            reason: Reason::Rule,
            message: None,
            rewrites: vec![],
            mode: Mode::Enforce,
            policy_hash: "3a".repeat(32),
            review: None,
            labels: Vec::new(),
            counts: Vec::new(),
            retain: None,
        },
        agent: Agent {
            profile: Some("coder".into()),
            cgroup: Some(format!("/enforcer.slice/agent-{task}.scope")),
            pid: Some(4000 + task),
            exe: Some("/usr/bin/node".into()),
            uid: Some(1000),
            ..Agent::default()
        },
        request: RequestSummary {
            scheme: Some(Scheme::Https),
            host: Some("api.anthropic.com".into()),
            ip: Some(
                "10.77.0.2"
                    .parse()
                    .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            ),
            port: 443,
            method: Some("POST".into()),
            path: Some("/v1/messages".into()),
            mcp_method: None,
            mcp_tool: None,
            llm_provider: Some("anthropic".into()),
            llm_model: Some("claude-sonnet-4".into()),
            body_size: 1000 + i,
            body_sha256: Some(format!("{:064x}", u128::from(task) << 64 | u128::from(i))),
            changes: vec![],
            ..RequestSummary::default()
        },
        outcome: Outcome {
            disposition: Disposition::Forwarded,
            status: Some(200),
            error: None,
        },
        review: None,
        trace: None,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    /// append → durable → next.
    Strict,
    /// append, then (durable ∥ upstream) in its own task; the writer goes on.
    Proxy,
    /// record (append + durable), then upstream: the order before the two-step API.
    ProxyOldOrder,
    /// append only (`durable: false`).
    NotDurable,
}

#[derive(Default)]
struct Latencies {
    append_us: Vec<f64>,
    durable_ms: Vec<f64>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p) as usize]
}

async fn run(dir: &Path, pattern: Pattern, writers: u32, secs: f64) -> (u64, Duration, Latencies) {
    let mut cfg = AuditConfig::new(dir);
    cfg.checkpoint_every = 10_000;
    cfg.durable = pattern != Pattern::NotDurable;
    // Sealing (compression) runs on its own thread and is measured on its own below.
    cfg.compress = false;
    let log = AuditLog::open(cfg).await.expect("open");
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..writers {
        let log = log.clone();
        let count = count.clone();
        let lat = lat.clone();
        tasks.push(tokio::spawn(async move {
            let window = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut mine = Latencies::default();
            let mut i = 0;
            while Instant::now() < deadline {
                let ev = event(task, i);
                i += 1;
                match pattern {
                    Pattern::Strict | Pattern::NotDurable => {
                        let t = Instant::now();
                        let appended = log.append(&ev).expect("append");
                        let a = t.elapsed();
                        appended.durable().await.expect("durable");
                        if i % 16 == 0 {
                            mine.append_us.push(a.as_secs_f64() * 1e6);
                            mine.durable_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Pattern::Proxy | Pattern::ProxyOldOrder => {
                        let permit = window.clone().acquire_owned().await.expect("window");
                        let count = count.clone();
                        let lat = lat.clone();
                        let t = Instant::now();
                        if pattern == Pattern::Proxy {
                            let appended = log.append(&ev).expect("append");
                            let a = t.elapsed();
                            tokio::spawn(async move {
                                let (d, ()) = tokio::join!(
                                    async {
                                        let r = appended.durable().await;
                                        (r, t.elapsed())
                                    },
                                    tokio::time::sleep(UPSTREAM)
                                );
                                d.0.expect("durable");
                                if i % 16 == 0 {
                                    let mut l = lat.lock().expect("lat");
                                    l.append_us.push(a.as_secs_f64() * 1e6);
                                    l.durable_ms.push(d.1.as_secs_f64() * 1e3);
                                }
                                count.fetch_add(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        } else {
                            let log = log.clone();
                            tokio::spawn(async move {
                                log.record(ev).await.expect("record");
                                let d = t.elapsed();
                                tokio::time::sleep(UPSTREAM).await;
                                if i % 16 == 0 {
                                    lat.lock()
                                        .expect("lat")
                                        .durable_ms
                                        .push(d.as_secs_f64() * 1e3);
                                }
                                count.fetch_add(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                    }
                }
            }
            // Wait for this writer's exchanges in flight.
            let _ = window.acquire_many(IN_FLIGHT as u32).await;
            let mut l = lat.lock().expect("lat");
            l.append_us.append(&mut mine.append_us);
            l.durable_ms.append(&mut mine.durable_ms);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = start.elapsed();
    log.close().await.expect("close");
    let lat = std::mem::take(&mut *lat.lock().expect("lat"));
    (count.load(Ordering::Relaxed), elapsed, lat)
}

fn main() {
    let short = std::env::var_os("ENFORCER_BENCH_SHORT").is_some();
    let secs: f64 = std::env::var("AUDIT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if short { 0.4 } else { 3.0 });
    let base = match std::env::var_os("AUDIT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "audit bench in {} ({secs} s per case; upstream {} ms, {IN_FLIGHT} exchanges in flight per writer)",
        base.path().display(),
        UPSTREAM.as_millis()
    );
    let cases = [
        ("durable, strict        ", Pattern::Strict, 8u32),
        ("durable, strict        ", Pattern::Strict, 64),
        ("durable, proxy pattern ", Pattern::Proxy, 8),
        ("durable, old order     ", Pattern::ProxyOldOrder, 8),
        ("not durable            ", Pattern::NotDurable, 8),
    ];
    // `AUDIT_BENCH_ONLY=proxy` runs only the cases whose `name/writers` (e.g. `durable, strict/8`) contains it.
    let only = std::env::var("AUDIT_BENCH_ONLY").ok();
    let mut strict_8 = None;
    let mut last_dir = None;
    for (k, (name, pattern, writers)) in cases.into_iter().enumerate() {
        if only
            .as_deref()
            .is_some_and(|o| !format!("{}/{writers}", name.trim()).contains(o))
        {
            continue;
        }
        let dir = base.path().join(format!("case{k}"));
        let (n, t, mut lat) = rt.block_on(run(&dir, pattern, writers, secs));
        let rate = n as f64 / t.as_secs_f64();
        if k == 0 {
            strict_8 = Some(rate);
        }
        println!(
            "{name} {writers:>2} writers: {n:>8} records in {:.2} s = {rate:>9.0} records/s ({:>5.2}x strict/8); \
             append p50 {:.1} µs p99 {:.1} µs; until durable p50 {:.2} ms p99 {:.2} ms",
            t.as_secs_f64(),
            rate / strict_8.unwrap_or(rate),
            pct(&mut lat.append_us, 0.5),
            pct(&mut lat.append_us, 0.99),
            pct(&mut lat.durable_ms, 0.5),
            pct(&mut lat.durable_ms, 0.99),
        );
        last_dir = Some(dir);
    }
    let Some(dir) = last_dir else { return };
    if only.is_some() {
        return;
    }

    // Sealing: a trail rotated into 4 MiB files, compressed by the seal thread as it goes.
    let sealed = base.path().join("sealed");
    let records: u32 = if short { 2_000 } else { 160_000 };
    let t = rt.block_on(async {
        let mut cfg = AuditConfig::new(&sealed);
        cfg.durable = false;
        cfg.checkpoint_every = 10_000;
        cfg.rotate_bytes = 4 << 20;
        let log = AuditLog::open(cfg).await.expect("open");
        let start = Instant::now();
        for i in 0..records {
            log.record(event(i % 8, u64::from(i)))
                .await
                .expect("record");
        }
        let written = start.elapsed();
        // The seal thread compresses in the background: wait for it before closing (close stops it).
        while enforcer::audit::read::list_files(&sealed)
            .expect("list")
            .iter()
            .rev()
            .skip(1)
            .any(|f| !f.compressed)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sealed_after = start.elapsed();
        log.close().await.expect("close");
        (written, sealed_after)
    });
    let (mut plain, mut packed) = (0u64, 0u64);
    for e in std::fs::read_dir(&sealed).expect("dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let len = e.metadata().map_or(0, |m| m.len());
        if name.ends_with(".jsonl.zst") {
            packed += len;
        } else if name.ends_with(".jsonl") {
            plain += len;
        }
    }
    println!(
        "sealing: {records} records written in {:.2} s, all but the current file compressed after {:.2} s; \
         on disk {:.1} MB compressed + {:.1} MB current (plain)",
        t.0.as_secs_f64(),
        t.1.as_secs_f64(),
        packed as f64 / 1e6,
        plain as f64 / 1e6
    );
    for d in [dir, sealed] {
        // One untimed pass warms the page cache: the figure is the verifier's, not the disk's.
        let _ = verify(&d, None);
        let start = Instant::now();
        let r = verify(&d, None).expect("verify");
        let t = start.elapsed();
        assert!(r.ok(), "{:?}", r.problems);
        println!(
            "verify: {} records, {:.1} MB in {:.3} s = {:.0} MB/s ({:.0} records/s){}",
            r.records,
            r.bytes as f64 / 1e6,
            t.as_secs_f64(),
            r.bytes as f64 / 1e6 / t.as_secs_f64(),
            r.records as f64 / t.as_secs_f64(),
            if r.files > 1 {
                ", mostly compressed files"
            } else {
                ""
            }
        );
    }
}
