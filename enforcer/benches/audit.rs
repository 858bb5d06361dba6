//! Audit trail benchmark (plain `Instant` harness): durable records per second with 8 and 64 concurrent writers
//! (group commit: one fsync per batch), and `verify` throughput in MB/s.
//!
//! `cargo bench -p enforcer --bench audit`; set `AUDIT_BENCH_DIR` to measure on another filesystem and
//! `AUDIT_BENCH_SECS` to change the time spent per writer count (default 3).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use enforcer::audit::{verify, AuditConfig, AuditLog};
use enforcer::model::{
    Agent, AuditEvent, Decision, Disposition, Mode, Outcome, Reason, RequestSummary, Scheme,
    Verdict,
};

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
            body_sha256: Some("5e".repeat(32)),
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

async fn durable(dir: &Path, writers: u32, secs: f64) -> (u64, Duration) {
    let mut cfg = AuditConfig::new(dir);
    cfg.checkpoint_every = 10_000;
    let log = AuditLog::open(cfg).await.expect("open");
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..writers {
        let log = log.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                log.record(event(task, i)).await.expect("record");
                i += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = start.elapsed();
    log.close().await.expect("close");
    (count.load(Ordering::Relaxed), elapsed)
}

fn main() {
    let secs: f64 = std::env::var("AUDIT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
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
        "audit bench in {} ({secs} s per case)",
        base.path().display()
    );
    let mut last_dir = None;
    for writers in [8u32, 64] {
        let dir = base.path().join(format!("w{writers}"));
        let (n, t) = rt.block_on(durable(&dir, writers, secs));
        println!(
            "durable, {writers:>2} writers: {n:>8} records in {:.2} s = {:>9.0} records/s",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64()
        );
        last_dir = Some(dir);
    }
    let Some(dir) = last_dir else { return };
    // Verify a larger trail too: grow it without fsync to ~100 MB.
    let big = base.path().join("big");
    rt.block_on(async {
        let mut cfg = AuditConfig::new(&big);
        cfg.durable = false;
        cfg.checkpoint_every = 10_000;
        let log = AuditLog::open(cfg).await.expect("open");
        let start = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20_000 {
                    log.record(event(task, i)).await.expect("record");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let t = start.elapsed();
        log.close().await.expect("close");
        println!(
            "not durable,  8 writers: {:>8} records in {:.2} s = {:>9.0} records/s",
            160_000,
            t.as_secs_f64(),
            160_000.0 / t.as_secs_f64()
        );
    });
    for d in [dir, big] {
        // One untimed pass warms the page cache: the figure is the verifier's, not the disk's.
        let _ = verify(&d, None);
        let start = Instant::now();
        let r = verify(&d, None).expect("verify");
        let t = start.elapsed();
        assert!(r.ok(), "{:?}", r.problems);
        println!(
            "verify: {} records, {:.1} MB in {:.3} s = {:.0} MB/s ({:.0} records/s)",
            r.records,
            r.bytes as f64 / 1e6,
            t.as_secs_f64(),
            r.bytes as f64 / 1e6 / t.as_secs_f64(),
            r.records as f64 / t.as_secs_f64()
        );
    }
}
