//! Redaction throughput: `constrain::apply` with every built-in detector on a 1 MiB chat-completions body, once with
//! nothing to find (parse + scan, body left as is) and once with secrets scattered through it (parse + scan +
//! replace + re-serialise). Plain `Instant` timing; prints MB/s (MiB-based) per case. Target: ≥ 200 MB/s.
//!
//! Run: `cargo bench -p enforcer --bench redact` (about 10 s; with `ENFORCER_BENCH_SHORT` set, each case runs once).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use enforcer::constrain::{apply_with, ConstrainOptions};
use enforcer::model::{PlannedRewrite, Rewrite};
use enforcer::policy::detect::Detectors;
use serde_json::{json, Value};

/// The allocator the daemon ships with (`src/main.rs`), so the figures are those of the shipped binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET: usize = 1 << 20;

const PROSE: &str = "The deployment pipeline builds the service, runs the integration suite against a disposable \
database, and promotes the image when every check passes. Reviewers asked for clearer rollback notes, version \
1.4.2 of the client, and a summary of the 37 open tickets before Friday. ";

const CODE: &str =
    "fn main() {\n    let total: u64 = (1..=100).sum();\n    println!(\"total = {total}\");\n}\n";

const SECRETS: &[&str] = &[
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
    "xoxb-1234567890-abcdefghij",
    "ops@example.com",
    "4111 1111 1111 1111",
];

/// A chat-completions body of about 1 MiB: many turns of prose and code, with `secrets` secrets sprinkled in.
fn body(secrets: usize) -> (Vec<u8>, usize) {
    let mut messages = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    let mut size = 0;
    let mut i = 0;
    let mut inserted = 0;
    while size < TARGET {
        let mut content = String::new();
        for _ in 0..6 {
            content.push_str(PROSE);
        }
        content.push_str(CODE);
        if inserted < secrets && i % 20 == 0 {
            content.push_str(" credentials: ");
            content.push_str(SECRETS[inserted % SECRETS.len()]);
            content.push('\n');
            inserted += 1;
        }
        size += content.len() + 40;
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": content}));
        i += 1;
    }
    let v: Value = json!({
        "model": "gpt-4o",
        "stream": true,
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}],
    });
    (serde_json::to_vec(&v).unwrap_or_default(), inserted)
}

/// How long each case runs at least, and how many runs at least: 4 s and 5, or one run in the short mode.
fn case_time() -> (Duration, usize) {
    if std::env::var_os("ENFORCER_BENCH_SHORT").is_some() {
        (Duration::ZERO, 1)
    } else {
        (Duration::from_secs(4), 5)
    }
}

fn measure(name: &str, raw: &[u8], rewrites: &[PlannedRewrite], detectors: &Detectors) {
    let options = ConstrainOptions::default();
    let template = http::Request::builder()
        .method("POST")
        .uri("https://api.openai.com/v1/chat/completions")
        .header("content-length", raw.len())
        .body(())
        .map(|r| r.into_parts().0);
    let Ok(template) = template else {
        return;
    };
    let src = Bytes::copy_from_slice(raw);
    let mut times = Vec::new();
    let mut changes = 0;
    let started = Instant::now();
    while started.elapsed() < case_time().0 || times.len() < case_time().1 {
        let mut parts = template.clone();
        let mut body = src.clone();
        let t = Instant::now();
        let out = apply_with(rewrites, detectors, &options, &mut parts, &mut body);
        times.push(t.elapsed());
        changes = out.map(|c| c.len()).unwrap_or(usize::MAX);
        black_box(body);
    }
    times.sort();
    let median = times[times.len() / 2];
    let best = times[0];
    let mbps = |d: Duration| raw.len() as f64 / (1024.0 * 1024.0) / d.as_secs_f64();
    println!(
        "{name:<28} {:>8} bytes  {changes:>3} changes  median {:>8.2?} ({:>6.0} MB/s)  best {:>8.2?} ({:>6.0} MB/s)  n={}",
        raw.len(),
        median,
        mbps(median),
        best,
        mbps(best),
        times.len()
    );
}

fn main() {
    let detectors = Detectors::builtin();
    let all: Vec<String> = detectors.names().map(str::to_string).collect();
    let rewrites = vec![PlannedRewrite {
        rule: "redact-secrets".into(),
        rewrite: Rewrite::Redact { detectors: all },
    }];
    // Baseline: parsing the body alone, which every redaction pays.
    let (clean, _) = body(0);
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < case_time().0 / 4 || n == 0 {
        black_box(serde_json::from_slice::<Value>(&clean).ok());
        n += 1;
    }
    let per = t.elapsed() / n;
    println!(
        "{:<28} {:>8} bytes  median {:>8.2?} ({:>6.0} MB/s)",
        "serde_json parse only",
        clean.len(),
        per,
        clean.len() as f64 / (1024.0 * 1024.0) / per.as_secs_f64()
    );
    measure("redact, nothing to find", &clean, &rewrites, &detectors);
    let (dirty, n) = body(20);
    measure(
        &format!("redact, {n} secrets"),
        &dirty,
        &rewrites,
        &detectors,
    );
}
