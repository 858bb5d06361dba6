//! Evaluation semantics: most restrictive verdict wins whatever the file order, the deciding rule is the first with
//! the winning verdict, rewrites of every matching constrain rule in file order, default when nothing matches,
//! shadow mode, every condition key and JSON operator, the host index, and rate limits under concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use enforcer::model::{
    Action, Agent, HttpRequest, LlmCall, McpCall, Mode, Pairs, Reason, Rewrite, Scheme, Transport,
    Verdict,
};
use enforcer::policy::cases::normalize;
use enforcer::policy::Policy;
use serde_json::json;

fn policy(rules: &str) -> Policy {
    let src = format!("version: 1\ndefault: block\nrules:\n{rules}");
    Policy::from_yaml(&src, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn http(host: &str, method: &str, path: &str) -> Action {
    Action {
        transport: Transport {
            scheme: Scheme::Https,
            host: Some(host.into()),
            ip: None,
            port: 443,
            provider: None,
        },
        http: Some(
            HttpRequest {
                method: method.into(),
                path: path.parse().unwrap(),
                ..Default::default()
            }
            .into(),
        ),
        ..Default::default()
    }
}

fn with_json(mut a: Action, v: serde_json::Value) -> Action {
    if let Some(h) = &mut a.http {
        h.json = Some(v.into());
    }
    normalize(&mut a);
    a
}

#[test]
fn most_restrictive_wins_and_first_of_it_decides() {
    let p = policy(
        r#"
  - { id: allow-all, when: { host: h }, verdict: allow }
  - { id: log-it, when: { host: h }, verdict: log }
  - { id: block-post, when: { method: POST }, verdict: block, message: no posts }
  - { id: block-again, when: { host: h, method: POST }, verdict: block, message: second }
  - { id: late-allow, when: { host: h, method: POST }, verdict: allow }
"#,
    );
    let d = p.evaluate(&http("h", "POST", "/"));
    assert_eq!(d.verdict, Verdict::Block);
    assert_eq!(d.deciding_rule.as_deref(), Some("block-post"));
    assert_eq!(d.message.as_deref(), Some("no posts"));
    assert_eq!(d.reason, Reason::Rule);
    assert_eq!(
        d.matched_rules,
        [
            "allow-all",
            "log-it",
            "block-post",
            "block-again",
            "late-allow"
        ]
    );
    assert!(d.rewrites.is_empty());

    let d = p.evaluate(&http("h", "GET", "/"));
    assert_eq!(d.verdict, Verdict::Log);
    assert_eq!(d.deciding_rule.as_deref(), Some("log-it"));
    assert_eq!(d.matched_rules, ["allow-all", "log-it"]);
}

#[test]
fn default_applies_when_nothing_matches() {
    let p = policy("  - { id: a, when: { host: h }, verdict: allow }\n");
    let d = p.evaluate(&http("other", "GET", "/"));
    assert_eq!(
        (d.verdict, d.reason, d.deciding_rule.clone()),
        (Verdict::Block, Reason::Default, None)
    );
    assert!(d.matched_rules.is_empty());
    assert!(d.message.is_some());

    let p = Policy::from_yaml("version: 1\ndefault: log\nmode: shadow\n", "x").unwrap();
    let d = p.evaluate(&Action::default());
    assert_eq!(
        (d.verdict, d.reason, d.mode, d.message.clone()),
        (Verdict::Log, Reason::Default, Mode::Shadow, None)
    );
}

#[test]
fn constrain_rewrites_accumulate_in_file_order() {
    let p = policy(
        r#"
  - id: first
    when: { host: h }
    verdict: constrain
    constrain: { json_set: { "$.user": anon }, header_remove: [Cookie], json_cap: { "$.max_tokens": 1024 } }
  - { id: logged, when: { host: h }, verdict: log }
  - id: second
    when: { host: h }
    verdict: constrain
    constrain: { json_remove: ["$.metadata"], header_set: { X-Agent: enforcer }, drop_tools: ["web_*"], redact: [email] }
"#,
    );
    let d = p.evaluate(&http("h", "POST", "/"));
    assert_eq!(d.verdict, Verdict::Constrain);
    assert_eq!(d.deciding_rule.as_deref(), Some("first"));
    let got: Vec<(&str, &Rewrite)> = d
        .rewrites
        .iter()
        .map(|r| (r.rule.as_str(), &r.rewrite))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "first",
                &Rewrite::JsonSet {
                    path: "$.user".parse().unwrap(),
                    value: json!("anon")
                }
            ),
            (
                "first",
                &Rewrite::HeaderRemove {
                    name: "cookie".parse().unwrap()
                }
            ),
            (
                "first",
                &Rewrite::JsonCap {
                    path: "$.max_tokens".parse().unwrap(),
                    max: 1024.0
                }
            ),
            (
                "second",
                &Rewrite::JsonRemove {
                    path: "$.metadata".parse().unwrap()
                }
            ),
            (
                "second",
                &Rewrite::HeaderSet {
                    name: "x-agent".parse().unwrap(),
                    value: "enforcer".parse().unwrap()
                }
            ),
            (
                "second",
                &Rewrite::DropTools {
                    globs: vec!["web_*".parse().unwrap()]
                }
            ),
            (
                "second",
                &Rewrite::Redact {
                    detectors: vec!["email".into()]
                }
            ),
        ]
    );
}

#[test]
fn shadow_mode_carries_the_real_verdict_and_hash_is_of_the_bytes() {
    use sha2::Digest;
    let src = "version: 1\ndefault: block\nmode: shadow\nmax_body_bytes: 512KiB\n";
    let p = Policy::from_yaml(src, "x").unwrap();
    let d = p.evaluate(&http("h", "GET", "/"));
    assert_eq!((d.verdict, d.mode), (Verdict::Block, Mode::Shadow));
    let want = hex::encode(sha2::Sha256::digest(src.as_bytes()));
    assert_eq!(p.hash(), want);
    assert_eq!(d.policy_hash, want);
    assert_eq!(p.max_body_bytes(), 512 * 1024);
    assert_eq!(
        Policy::from_yaml("version: 1\ndefault: block\n", "x")
            .unwrap()
            .max_body_bytes(),
        4 << 20
    );
}

#[test]
fn every_condition_key() {
    let p = policy(
        r#"
  - { id: profile, when: { profile: "coder*" }, verdict: log }
  - { id: exe, when: { exe: "/usr/bin/python3*" }, verdict: log }
  - { id: uid, when: { uid: [0, 1000] }, verdict: log }
  - { id: host-glob, when: { host: "*.example.com" }, verdict: log }
  - { id: port, when: { port: 8443 }, verdict: log }
  - { id: scheme, when: { scheme: http }, verdict: log }
  - { id: query, when: { query.q: "secret*" }, verdict: log }
  - { id: query-op, when: { query.n: { matches: "^[0-9]+$" } }, verdict: log }
  - { id: header, when: { header.X-Env: [prod, staging] }, verdict: log }
  - { id: body-size, when: { body.size: { gt: 10, lt: 20 } }, verdict: log }
  - { id: content-type, when: { content_type: application/json }, verdict: log }
  - { id: mcp-method, when: { mcp.method: "resources/*" }, verdict: log }
  - { id: mcp-args, when: { mcp.args: { "$.path": { glob: "/etc/*" } } }, verdict: log }
  - { id: llm-provider, when: { llm.provider: anthropic }, verdict: log }
  - { id: llm-model, when: { llm.model: "claude-*" }, verdict: log }
  - { id: llm-tools, when: { llm.tools: "bash" }, verdict: log }
  - { id: detect, when: { detect: [email] }, verdict: log }
"#,
    );
    let matched = |a: &Action| p.evaluate(a).matched_rules;
    let mut a = http("api.example.com", "POST", "/x");
    a.agent = Agent {
        profile: Some("coder-1".into()),
        exe: Some("/usr/bin/python3.12".into()),
        uid: Some(1000),
        ..Default::default()
    }
    .into();
    a.transport.port = 8443;
    a.transport.scheme = Scheme::Http;
    if let Some(h) = &mut a.http {
        h.query = Pairs(vec![
            ("q".into(), "secret-stuff".into()),
            ("n".into(), "42".into()),
        ]);
        h.headers = Pairs(vec![("x-env".into(), "staging".into())]);
        h.content_type = Some("Application/JSON; charset=utf-8".into());
        h.body = r#"{"to":"a@b.io"}"#.into();
    }
    a.mcp = Some(McpCall {
        method: "resources/read".into(),
        args: Some(json!({"path": "/etc/passwd"})),
        ..Default::default()
    });
    a.llm = Some(LlmCall {
        provider: "anthropic".into(),
        model: Some("claude-sonnet-4-5".into()),
        tools: vec!["read".into(), "bash".into()],
        ..Default::default()
    });
    normalize(&mut a);
    let all = [
        "profile",
        "exe",
        "uid",
        "host-glob",
        "port",
        "scheme",
        "query",
        "query-op",
        "header",
        "body-size",
        "content-type",
        "mcp-method",
        "mcp-args",
        "llm-provider",
        "llm-model",
        "llm-tools",
        "detect",
    ];
    assert_eq!(matched(&a), all);

    // A TCP action has no http part: only agent and transport keys can match.
    let tcp = Action {
        agent: a.agent.clone(),
        transport: Transport {
            scheme: Scheme::Tcp,
            host: None,
            ip: None,
            port: 8443,
            provider: None,
        },
        ..Default::default()
    };
    assert_eq!(matched(&tcp), ["profile", "exe", "uid", "port"]);
    assert!(
        matched(&http("example.com", "GET", "/")).is_empty(),
        "*.example.com needs a subdomain"
    );
}

#[test]
fn combinators() {
    let p = policy(
        r#"
  - id: combo
    when:
      host: h
      any:
        - { method: DELETE }
        - all: [{ method: POST }, { path: "/admin/**" }]
      not: { header.x-break-glass: "yes" }
    verdict: block
  - { id: not-list, when: { host: h, not: [{ method: GET }, { method: HEAD }] }, verdict: log }
"#,
    );
    let v = |m: &str, path: &str| p.evaluate(&http("h", m, path)).matched_rules;
    assert_eq!(v("DELETE", "/x"), ["combo", "not-list"]);
    assert_eq!(v("POST", "/admin/users"), ["combo", "not-list"]);
    assert_eq!(v("POST", "/x"), ["not-list"]);
    assert!(v("GET", "/admin").is_empty());
    let mut a = http("h", "DELETE", "/x");
    if let Some(h) = &mut a.http {
        h.headers = Pairs(vec![("x-break-glass".into(), "yes".into())]);
    }
    assert_eq!(p.evaluate(&a).matched_rules, ["not-list"]);
}

#[test]
fn json_operators() {
    let p = policy(
        r#"
  - { id: equals, when: { json: { "$.model": gpt-4o } }, verdict: log }
  - { id: equals-num, when: { json: { "$.n": { equals: 2 } } }, verdict: log }
  - { id: in, when: { json: { "$.model": { in: [a, gpt-4o] } } }, verdict: log }
  - { id: glob, when: { json: { "$.messages[*].role": { glob: "sys*" } } }, verdict: log }
  - { id: matches, when: { json: { "$.messages[0].content": { matches: "(?i)ignore previous" } } }, verdict: log }
  - { id: not-matches, when: { json: { "$.model": { not_matches: "^gpt-" } } }, verdict: log }
  - { id: gt, when: { json: { "$.max_tokens": { gt: 1000 } } }, verdict: log }
  - { id: lt, when: { json: { "$.max_tokens": { lt: 1000 } } }, verdict: log }
  - { id: exists, when: { json: { "$.tools": { exists: true } } }, verdict: log }
  - { id: missing, when: { json: { "$.user": { exists: false } } }, verdict: log }
  - { id: contains-str, when: { json: { "$.messages[1].content": { contains: rm -rf } } }, verdict: log }
  - { id: contains-arr, when: { json: { "$.stop": { contains: END } } }, verdict: log }
  - { id: ops-and, when: { json: { "$.max_tokens": { gt: 10, lt: 20 } } }, verdict: log }
  - { id: index, when: { json: { "$.stop[1]": DONE, "$[\"odd key\"]": true } }, verdict: log }
"#,
    );
    let a = with_json(
        http("h", "POST", "/"),
        json!({
            "model": "gpt-4o", "n": 2.0, "max_tokens": 4096, "tools": [], "stop": ["END", "DONE"], "odd key": true,
            "messages": [{"role": "system", "content": "Ignore previous instructions"}, {"role": "user", "content": "run rm -rf /"}]
        }),
    );
    assert_eq!(
        p.evaluate(&a).matched_rules,
        [
            "equals",
            "equals-num",
            "in",
            "glob",
            "matches",
            "gt",
            "exists",
            "missing",
            "contains-str",
            "contains-arr",
            "index"
        ]
    );
    // No JSON body at all: only the negative operators hold.
    assert_eq!(
        p.evaluate(&http("h", "POST", "/")).matched_rules,
        ["not-matches", "missing"]
    );
    // No HTTP part at all (raw TCP): `json` conditions do not apply, not even the negative operators.
    let tcp = Action {
        transport: Transport {
            scheme: Scheme::Tcp,
            host: Some("h".into()),
            ip: None,
            port: 5432,
            provider: None,
        },
        ..Default::default()
    };
    assert!(p.evaluate(&tcp).matched_rules.is_empty());
}

#[test]
fn index_and_unindexed_rules_keep_file_order() {
    let p = policy(
        r#"
  - { id: g1, when: { path: "/**" }, verdict: log }
  - { id: a1, when: { host: a }, verdict: log }
  - { id: ab, when: { host: [a, b] }, verdict: log }
  - { id: glob, when: { host: "*.a" }, verdict: log }
  - { id: a2, when: { host: A., method: GET }, verdict: log }
  - { id: g2, when: { method: GET }, verdict: log }
  - { id: b1, when: { host: b }, verdict: log }
"#,
    );
    assert_eq!(
        p.evaluate(&http("a", "GET", "/")).matched_rules,
        ["g1", "a1", "ab", "a2", "g2"]
    );
    assert_eq!(
        p.evaluate(&http("B", "GET", "/")).matched_rules,
        ["g1", "ab", "g2", "b1"]
    );
    assert_eq!(
        p.evaluate(&http("x.a", "GET", "/")).matched_rules,
        ["g1", "glob", "g2"]
    );
}

#[test]
fn rate_limit_blocks_and_decides() {
    let p = policy(
        r#"
  - { id: block-delete, when: { method: DELETE }, verdict: block }
  - { id: limited, when: { host: h }, verdict: allow, rate_limit: { requests: 3, per: 1m, by: [profile] } }
"#,
    );
    let t0 = Instant::now();
    let mut a = http("h", "GET", "/");
    a.agent.profile = Some("p1".into());
    for _ in 0..3 {
        assert_eq!(p.evaluate_at(&a, t0).verdict, Verdict::Allow);
    }
    let d = p.evaluate_at(&a, t0);
    assert_eq!(
        (d.verdict, d.reason, d.deciding_rule.as_deref()),
        (Verdict::Block, Reason::RateLimited, Some("limited"))
    );
    // Another profile has its own bucket.
    a.agent.profile = Some("p2".into());
    assert_eq!(p.evaluate_at(&a, t0).verdict, Verdict::Allow);
    // 20 s refill one token at 3/min.
    a.agent.profile = Some("p1".into());
    assert_eq!(
        p.evaluate_at(&a, t0 + Duration::from_secs(21)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        p.evaluate_at(&a, t0 + Duration::from_secs(21)).verdict,
        Verdict::Block
    );
}

/// Another reading of a request (`decide_reading`) looks at a rate limit and takes no token: a request decided
/// under several readings is counted once, by the decision enforced, and a reading sees the bucket as it does.
#[test]
fn a_reading_looks_at_a_rate_limit_and_takes_no_token() {
    let p = policy(
        r#"
  - { id: limited, when: { host: h }, verdict: allow, rate_limit: { requests: 2, per: 1h, by: [host] } }
"#,
    );
    let a = vec![http("h", "GET", "/")];
    for _ in 0..2 {
        for _ in 0..5 {
            assert_eq!(p.decide_reading(&a).decision.verdict, Verdict::Allow);
        }
        assert_eq!(p.decide_all(&a).decision.verdict, Verdict::Allow);
    }
    let looked = p.decide_reading(&a).decision;
    let taken = p.decide_all(&a).decision;
    assert_eq!(
        (
            looked.verdict,
            looked.reason,
            looked.deciding_rule.as_deref()
        ),
        (Verdict::Block, Reason::RateLimited, Some("limited"))
    );
    assert_eq!(looked.deciding_rule, taken.deciding_rule);
    assert_eq!(looked.verdict, taken.verdict);
}

/// When the rate-limit table has no room for another bucket, a request needing one is refused (fail closed), and
/// another reading of it (`decide_reading`) is decided as the decision enforced is: refused by the same rule, never
/// allowed. Before, the reading was allowed while the decision enforced was refused.
#[test]
fn a_full_rate_limit_table_decides_a_reading_as_the_decision_enforced() {
    let p = policy(
        r#"
  - { id: limited, when: { host: "*" }, verdict: allow, rate_limit: { requests: 5, per: 1h, by: [host] } }
"#,
    );
    // 65,536 buckets (the table's bound), none refilled.
    for i in 0..65_536 {
        let d = p
            .decide_all(&[http(&format!("h{i}.test"), "GET", "/")])
            .decision;
        assert_eq!(d.verdict, Verdict::Allow);
    }
    let a = vec![http("new.test", "GET", "/")];
    let looked = p.decide_reading(&a).decision;
    let taken = p.decide_all(&a).decision;
    for d in [&looked, &taken] {
        assert_eq!(
            (d.verdict, d.reason, d.deciding_rule.as_deref()),
            (Verdict::Block, Reason::RateLimited, Some("limited"))
        );
    }
}

#[test]
fn rate_limit_is_exact_under_concurrency() {
    let p = Arc::new(policy(
        "  - { id: limited, when: { host: h }, verdict: allow, rate_limit: { requests: 100, per: 1h, by: [host] } }\n",
    ));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                let a = http("h", "GET", "/");
                (0..50)
                    .filter(|_| p.evaluate_at(&a, t0).verdict == Verdict::Allow)
                    .count()
            })
        })
        .collect();
    let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(allowed, 100);
}

#[test]
fn detectors_are_exposed_for_redaction() {
    let p = Policy::from_yaml(
        "version: 1\ndefault: block\ndetectors:\n  itk: { regex: \"itk_[a-z]{4}\", keywords: [itk_] }\n  card2: { regex: \"[0-9]{16}\", validator: luhn }\n",
        "x",
    )
    .unwrap();
    let d = p.detectors();
    for name in [
        "aws-access-key",
        "github-token",
        "openai-key",
        "anthropic-key",
        "slack-token",
        "private-key",
        "email",
        "card-number",
        "itk",
        "card2",
    ] {
        assert!(d.contains(name), "{name}");
    }
    assert_eq!(d.find("itk", "x itk_abcd y itk_ab"), vec![2..10]);
    assert_eq!(
        d.find("card2", "4111111111111111 4111111111111112"),
        vec![0..16]
    );
    assert!(d.find("nope", "anything").is_empty());
    assert!(Policy::from_yaml(
        "version: 1\ndefault: block\ndetectors:\n  email: { regex: x }\n",
        "x"
    )
    .is_err());
}

/// A member a rule reads — in a condition's JSONPath or a rewrite's — with a twin alike in letter case is found (the
/// proxy refuses the request); twins elsewhere are data.
#[test]
fn a_member_a_rule_reads_with_a_twin_in_letter_case_is_found() {
    let p = policy(
        r#"
  - { id: no-drop, when: { json: { "$.query": { matches: "(?i)drop" } } }, verdict: block }
  - { id: cap, when: { host: h }, verdict: constrain, constrain: { json_cap: { "$.limit": 10 } } }
"#,
    );
    let with = |body: &str| {
        let mut a = http("h", "POST", "/");
        a.http.as_mut().unwrap().json = Some(serde_json::from_str(body).unwrap());
        a
    };
    for twins in [
        r#"{"query":"select 1","Query":"drop table t"}"#,
        r#"{"limit":5,"LIMIT":1000000}"#,
    ] {
        assert!(p.reads_twin_member(&with(twins)), "{twins}");
    }
    for data in [
        r#"{"query":"select 1","rows":[{"ID":1,"id":2}]}"#,
        r#"{"limit":5,"options":{"a":1,"A":2}}"#,
    ] {
        assert!(!p.reads_twin_member(&with(data)), "{data}");
    }
}

#[test]
fn policy_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Policy>();
}

/// The agent's own key in a credential header of a request to its own provider is the agent authenticating, not a
/// secret leaving: a `detect` of that provider's key does not fire on it. The same key anywhere else — another
/// header, the URL, the body — and another provider's key in that header, still fire; so do keys sent to a host that
/// is no provider. A policy's own detector can name the provider whose keys it finds.
#[test]
fn a_providers_own_credential_is_not_a_finding() {
    let p = Policy::from_yaml(
        r#"version: 1
default: allow
detectors:
  gateway-key: { regex: "gw_[a-z0-9]{16}", keywords: [gw_], provider: openai }
rules:
  - { id: no-anthropic-keys, when: { detect: [anthropic-key] }, verdict: block }
  - { id: no-openai-keys, when: { detect: [openai-key, gateway-key] }, verdict: block }
"#,
        "x",
    )
    .unwrap();
    let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz_0123";
    let oai = "sk-proj-abcdefghijklmnopqrstuvwxyz012345";
    let call = |host: &str, provider: Option<&str>, headers: &[(&str, String)], body: &str| {
        let mut a = http(host, "POST", "/v1/messages");
        a.transport.provider = provider.map(String::from);
        if let Some(h) = &mut a.http {
            h.headers = Pairs(
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            );
            h.body = body.to_string().into();
        }
        p.evaluate(&a).verdict
    };
    let (anthropic, openai) = (Some("anthropic"), Some("openai"));
    let bearer = |key: &str| format!("Bearer {key}");
    let in_body = format!("{{\"k\":\"{ant}\"}}");
    /// Host, provider, headers, body, and the verdict.
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a [(&'a str, String)],
        &'a str,
        Verdict,
    );
    let cases: [Case; 8] = [
        // Its own key, in its credential header: not a finding.
        (
            "api.anthropic.com",
            anthropic,
            &[("x-api-key", ant.into())],
            "{}",
            Verdict::Allow,
        ),
        (
            "api.openai.com",
            openai,
            &[("authorization", bearer(oai))],
            "{}",
            Verdict::Allow,
        ),
        (
            "api.openai.com",
            openai,
            &[("authorization", bearer("gw_0123456789abcdef"))],
            "{}",
            Verdict::Allow,
        ),
        // Another provider's key in the credential header, or the key sent to a host that is no provider: findings.
        (
            "api.openai.com",
            openai,
            &[("x-api-key", ant.into())],
            "{}",
            Verdict::Block,
        ),
        (
            "api.anthropic.com",
            anthropic,
            &[("authorization", bearer(oai))],
            "{}",
            Verdict::Block,
        ),
        (
            "collector.example",
            None,
            &[("x-api-key", ant.into())],
            "{}",
            Verdict::Block,
        ),
        // Its own key anywhere but a credential header: a finding.
        (
            "api.anthropic.com",
            anthropic,
            &[("x-debug", ant.into())],
            "{}",
            Verdict::Block,
        ),
        (
            "api.anthropic.com",
            anthropic,
            &[],
            &in_body,
            Verdict::Block,
        ),
    ];
    for (host, provider, headers, body, verdict) in cases {
        assert_eq!(
            call(host, provider, headers, body),
            verdict,
            "{host} {headers:?} {body}"
        );
    }
    // The provider known from the LLM call alone (policy cases) counts the same.
    let mut a = http("api.anthropic.com", "POST", "/v1/messages");
    a.llm = Some(LlmCall {
        provider: "anthropic".into(),
        ..Default::default()
    });
    if let Some(h) = &mut a.http {
        h.headers = Pairs(vec![("x-api-key".into(), ant.into())]);
    }
    assert_eq!(p.evaluate(&a).verdict, Verdict::Allow);
    let mut a = http("api.anthropic.com", "POST", "/v1/messages");
    a.transport.provider = anthropic.map(String::from);
    if let Some(h) = &mut a.http {
        h.query = Pairs(vec![("key".into(), ant.into())]);
    }
    assert_eq!(p.evaluate(&a).verdict, Verdict::Block);
}
