//! Decision time of a generated 1,000-rule policy: p50/p99 of `Policy::evaluate` for a host/path-only Action and
//! for an LLM request whose 16 KiB JSON body runs JSON conditions and secret detectors.
//! Run with `cargo bench -p enforcer --bench policy` (about 10 s; set POLICY_BENCH_ITERS to change the count, or
//! ENFORCER_BENCH_SHORT for 100 iterations).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use enforcer::model::{Action, HttpRequest, LlmCall, Pairs, Scheme, Transport, Verdict};
use enforcer::policy::Policy;

/// The allocator the daemon ships with (`src/main.rs`), so the figures are those of the shipped binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LLM_HOSTS: [&str; 3] = [
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
];

/// 1,000 rules: 900 host-indexed API rules, 50 glob-host rules, 30 MCP rules without a host, and 20 LLM rules
/// with JSON conditions and detectors.
fn generate_policy() -> String {
    let mut s = String::from(
        "version: 1\ndefault: block\ndetectors:\n  internal-token: { regex: \"itk_[A-Za-z0-9]{32}\", keywords: [\"itk_\"] }\nrules:\n",
    );
    for i in 0..900 {
        let verdict = if i % 3 == 0 { "log" } else { "allow" };
        let _ = writeln!(
            s,
            "  - {{ id: api-{i}, when: {{ host: svc{i}.example.com, method: [GET, HEAD], path: \"/api/v1/{i}/**\" }}, verdict: {verdict} }}"
        );
    }
    for i in 0..50 {
        let _ = writeln!(
            s,
            "  - {{ id: zone-{i}, when: {{ host: \"*.zone{i}.example.net\", path: \"/v{i}/*/items\" }}, verdict: allow }}"
        );
    }
    for i in 0..30 {
        let _ = writeln!(
            s,
            "  - {{ id: mcp-{i}, when: {{ mcp.tool: \"tool{i}_*\", mcp.args: {{ \"$.path\": {{ glob: \"/etc/*\" }} }} }}, verdict: block }}"
        );
    }
    let hosts = LLM_HOSTS.join(", ");
    for i in 0..20 {
        match i % 4 {
            0 => {
                let _ = writeln!(
                    s,
                    "  - id: llm-{i}\n    when: {{ host: [{hosts}], json: {{ \"$.model\": {{ in: [gpt-4o, claude-sonnet-4-5, m{i}] }} }} }}\n    verdict: log"
                );
            }
            1 => {
                let _ = writeln!(
                    s,
                    "  - id: llm-{i}\n    when: {{ host: [{hosts}], json: {{ \"$.messages[*].content\": {{ matches: \"(?i)ignore (all )?previous instructions {i}\" }} }} }}\n    verdict: block"
                );
            }
            2 => {
                let _ = writeln!(
                    s,
                    "  - id: llm-{i}\n    when: {{ host: [{hosts}], detect: [aws-access-key, github-token, openai-key, anthropic-key, slack-token, private-key, internal-token] }}\n    verdict: constrain\n    constrain: {{ redact: [aws-access-key, github-token, openai-key, anthropic-key, slack-token, private-key, internal-token] }}"
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  - id: llm-{i}\n    when: {{ host: [{hosts}], json: {{ \"$.max_tokens\": {{ gt: {} }} }} }}\n    verdict: constrain\n    constrain: {{ json_cap: {{ \"$.max_tokens\": 8192 }} }}",
                    8192 + i
                );
            }
        }
    }
    s
}

fn host_path_action() -> Action {
    Action {
        transport: Transport {
            scheme: Scheme::Https,
            host: Some("svc517.example.com".into()),
            ip: None,
            port: 443,
            provider: None,
        },
        http: Some(
            HttpRequest {
                method: "GET".into(),
                path: "/api/v1/517/repos/items".into(),
                headers: Pairs(vec![
                    ("user-agent".into(), "bench/1".into()),
                    ("accept".into(), "*/*".into()),
                ]),
                ..Default::default()
            }
            .into(),
        ),
        ..Default::default()
    }
}

/// An OpenAI-style chat request with a 16 KiB JSON body of ordinary prose (no secrets).
fn llm_action() -> Action {
    let words = "the quick brown fox jumps over the lazy dog while the agent summarises a long design document \
                 about egress policy, caching, retries and budgets for version 2 of the service ";
    let mut messages = Vec::new();
    let mut size = 0;
    let mut n = 0;
    while size < 16 * 1024 {
        let content = words.repeat(4);
        size += content.len() + 40;
        messages.push(serde_json::json!({"role": if n % 2 == 0 { "user" } else { "assistant" }, "content": content}));
        n += 1;
    }
    let json = serde_json::json!({"model": "gpt-4o", "max_tokens": 4096, "stream": true, "messages": messages});
    let body = json.to_string();
    Action {
        transport: Transport {
            scheme: Scheme::Https,
            host: Some("api.openai.com".into()),
            ip: None,
            port: 443,
            provider: None,
        },
        http: Some(
            HttpRequest {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                headers: Pairs(vec![
                    ("content-type".into(), "application/json".into()),
                    ("authorization".into(), "Bearer redacted-by-bench".into()),
                ]),
                content_type: Some("application/json".into()),
                body_size: body.len() as u64,
                body: body.into(),
                json: Some(json.into()),
                ..Default::default()
            }
            .into(),
        ),
        llm: Some(LlmCall {
            provider: "openai".into(),
            model: Some("gpt-4o".into()),
            stream: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn measure(name: &str, policy: &Policy, action: &Action, iters: usize) {
    for _ in 0..iters / 10 {
        black_box(policy.evaluate(black_box(action)));
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let d = policy.evaluate(black_box(action));
        samples.push(t.elapsed());
        black_box(d);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name:<40} p50 {:>9.2?}  p99 {:>9.2?}  min {:>9.2?}  ({iters} runs)",
        pct(0.50),
        pct(0.99),
        samples[0]
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep that run short, as the short
    // mode of `cargo xtask bench` (ENFORCER_BENCH_SHORT) does.
    let quick = !std::env::args().any(|a| a == "--bench")
        || std::env::var_os("ENFORCER_BENCH_SHORT").is_some();
    let iters = std::env::var("POLICY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 100 } else { 200_000 });

    let src = generate_policy();
    let t = Instant::now();
    let policy = match Policy::from_yaml(&src, "generated.yaml") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!(
        "generated policy: {} rules, {} KiB, compiled in {:.1?}",
        policy.rule_ids().count(),
        src.len() / 1024,
        t.elapsed()
    );

    let a = host_path_action();
    let d = policy.evaluate(&a);
    assert_eq!(
        (d.verdict, d.deciding_rule.as_deref()),
        (Verdict::Allow, Some("api-517"))
    );
    measure("host/path-only action", &policy, &a, iters);

    let b = llm_action();
    let d = policy.evaluate(&b);
    assert_eq!(d.verdict, Verdict::Log, "{:?}", d.matched_rules);
    println!(
        "llm action: {} byte body, {} matching rules",
        b.http.as_ref().map_or(0, |h| h.body.len()),
        d.matched_rules.len()
    );
    measure(
        "JSON conditions + detectors, 16 KiB body",
        &policy,
        &b,
        iters / 10,
    );

    // Where the time goes: each detector alone over the body, and each regex rule's text.
    let body = b.http.as_ref().map(|h| h.body.clone()).unwrap_or_default();
    for name in policy.detectors().names() {
        let t = Instant::now();
        let n = iters / 10;
        for _ in 0..n {
            black_box(policy.detectors().find(name, black_box(&body)));
        }
        println!(
            "  detector {name:<16} {:>9.2?} per 16 KiB scan",
            t.elapsed() / n.max(1) as u32
        );
    }
}
