//! The policy side of review, sessions, roles and retention: `review` sits between block and constrain; a review's
//! terms, labels, counter additions and retention are carried by the decision; `session.*`, `user` and `groups`
//! conditions read the Action; a profile can be kept to some users; every new key is checked with a located error.

use enforcer::model::{
    Action, Agent, HttpRequest, HttpResponse, Reason, ReviewSpec, SessionState, Transport, Verdict,
};
use enforcer::policy::Policy;
use serde_json::json;

fn policy(rules: &str) -> Policy {
    Policy::from_yaml(
        &format!("version: 1\ndefault: block\nrules:\n{rules}"),
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn request(host: &str, path: &str) -> Action {
    Action {
        transport: Transport {
            host: Some(host.into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: "POST".into(),
                path: path.into(),
                ..HttpRequest::default()
            }
            .into(),
        ),
        ..Action::default()
    }
}

fn error(rules: &str) -> String {
    Policy::from_yaml(
        &format!("version: 1\ndefault: block\nrules:\n{rules}"),
        "p.yaml",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_else(|| panic!("loaded: {rules}"))
}

#[test]
fn review_is_between_block_and_constrain() {
    let p = policy(
        "  - { id: log, when: { host: a.test }, verdict: log }\n\
         \x20 - { id: cap, when: { host: a.test }, verdict: constrain, constrain: { json_cap: { \"$.n\": 1 } } }\n\
         \x20 - { id: ask, when: { host: a.test, path: /merge }, verdict: review }\n\
         \x20 - { id: no, when: { host: a.test, path: /nuke }, verdict: block }\n\
         \x20 - { id: ask2, when: { host: a.test, path: /nuke }, verdict: review, review: { timeout: 30s, fallback: log } }\n",
    );
    let d = p.evaluate(&request("a.test", "/merge"));
    assert_eq!(
        (d.verdict, d.deciding_rule.as_deref()),
        (Verdict::Review, Some("ask"))
    );
    assert_eq!(
        d.review,
        Some(ReviewSpec {
            timeout_secs: 300,
            fallback: Verdict::Block
        })
    );
    // The constrain rule's rewrites go with the review, applied once it is approved.
    assert_eq!(d.rewrites.len(), 1);
    let d = p.evaluate(&request("a.test", "/nuke"));
    assert_eq!((d.verdict, d.review), (Verdict::Block, None));
    assert!(Verdict::Block > Verdict::Review && Verdict::Review > Verdict::Constrain);
    let both = p.decide_all(&[request("a.test", "/other"), request("a.test", "/merge")]);
    assert_eq!(both.decision.verdict, Verdict::Review);
    assert_eq!(both.index, 1);
}

#[test]
fn labels_counts_and_retention_travel_with_the_decision() {
    let p = policy(
        "  - { id: crm, when: { host: crm.test }, verdict: log, label: [customer-data, crm], retain: true }\n\
         \x20 - { id: rows, phase: response, when: { host: crm.test }, verdict: log, count: { records: \"$.rows[*]\", calls: 1 } }\n\
         \x20 - { id: sample, when: { host: crm.test }, verdict: allow, retain: { sample: 0.25 }, label: crm }\n",
    );
    let d = p.evaluate(&request("crm.test", "/x"));
    assert_eq!(d.labels, ["customer-data", "crm"]);
    assert_eq!(d.retain, Some(1.0));
    let mut response = request("crm.test", "/x");
    response.response = Some(HttpResponse {
        status: 200,
        json: Some(json!({"rows": [1, 2, 3]})),
        ..HttpResponse::default()
    });
    let d = p.evaluate(&response);
    let counts: Vec<(String, u64)> = d.counts.iter().map(|c| (c.counter.clone(), c.by)).collect();
    assert_eq!(
        counts,
        [("records".to_string(), 3), ("calls".to_string(), 1)]
    );
    assert_eq!(d.verdict, Verdict::Log);
}

#[test]
fn session_conditions_read_the_stated_session() {
    let p = policy(
        "  - { id: tagged, when: { session.labels: \"customer-*\" }, verdict: block }\n\
         \x20 - { id: budget, when: { session.count: { records: { gt: 100, within: 1h } } }, verdict: block }\n\
         \x20 - { id: total, when: { session.count: { records: { gt: 1000 } } }, verdict: block }\n\
         \x20 - { id: after, when: { session.previous_tool: read_* }, verdict: log }\n",
    );
    assert_eq!(
        p.session_counters(),
        [
            ("records".to_string(), Some(3600)),
            ("records".to_string(), None)
        ]
    );
    let with = |state: SessionState| {
        let mut a = request("x.test", "/");
        a.session = Some(state.into());
        p.evaluate(&a)
    };
    assert_eq!(p.evaluate(&request("x.test", "/")).reason, Reason::Default);
    let d = with(SessionState {
        labels: vec!["customer-data".into()],
        ..SessionState::default()
    });
    assert_eq!(d.deciding_rule.as_deref(), Some("tagged"));
    let counts = |pairs: &[(&str, u64)]| SessionState {
        counts: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..SessionState::default()
    };
    assert_eq!(
        with(counts(&[("records", 101)])).deciding_rule.as_deref(),
        Some("budget")
    );
    assert_eq!(
        with(counts(&[("records", 900), ("records@3600", 3)])).reason,
        Reason::Default
    );
    assert_eq!(
        with(counts(&[("records", 1001), ("records@3600", 3)]))
            .deciding_rule
            .as_deref(),
        Some("total")
    );
    let d = with(SessionState {
        previous_tool: Some("read_inbox".into()),
        ..SessionState::default()
    });
    assert_eq!(
        (d.verdict, d.deciding_rule.as_deref()),
        (Verdict::Log, Some("after"))
    );
}

#[test]
fn the_person_decides_user_and_groups_and_restricted_profiles() {
    let src = "version: 1\ndefault: block\nprofiles:\n  analysts: { groups: [dba, analysts] }\n  open: {}\n\
               rules:\n  - { id: dba, when: { groups: dba }, verdict: log }\n\
               \x20 - { id: alice, when: { user: alice }, verdict: allow }\n";
    let p = Policy::from_yaml(src, "p.yaml").unwrap_or_else(|e| panic!("{e}"));
    let as_person = |profile: &str, user: Option<&str>, groups: &[&str]| {
        let mut a = request("db.test", "/q");
        a.agent = Agent {
            profile: Some(profile.into()),
            user: user.map(str::to_string),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Agent::default()
        }
        .into();
        a
    };
    let d = p.evaluate(&as_person("analysts", Some("dave"), &["dave", "dba"]));
    assert_eq!(d.deciding_rule.as_deref(), Some("dba"));
    let d = p.evaluate(&as_person("open", Some("alice"), &["alice"]));
    assert_eq!(d.deciding_rule.as_deref(), Some("alice"));
    let d = p.evaluate(&as_person("analysts", Some("alice"), &["alice"]));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Block, Reason::UserNotAllowed)
    );
    // Unknown person: no `user`/`groups` condition matches, and a restricted profile is closed.
    let d = p.evaluate(&as_person("analysts", None, &[]));
    assert_eq!(d.reason, Reason::UserNotAllowed);
    assert!(p.profile_admits(&as_person("analysts", Some("x"), &["analysts"]).agent));
    assert!(!p.profile_admits(&as_person("analysts", Some("x"), &["x"]).agent));
    assert!(p.profile_admits(&as_person("open", None, &[]).agent));
}

#[test]
fn new_keys_are_checked_with_located_errors() {
    let cases = [
        ("  - { id: a, verdict: log, review: { timeout: 1m } }\n", "has `review:` but its verdict is not review"),
        ("  - { id: a, verdict: review, review: { timeout: 2h } }\n", "expected a duration from 1s to 1h"),
        ("  - { id: a, verdict: review, review: { fallback: constrain } }\n", "unknown fallback, expected allow, log or block"),
        ("  - { id: a, verdict: log, label: \"bad label\" }\n", "bad label `bad label`"),
        ("  - { id: a, verdict: log, count: { requests: 1 } }\n", "`requests` is counted by the enforcer itself"),
        ("  - { id: a, verdict: log, count: { rows: \"$.[\" } }\n", "bad JSONPath"),
        ("  - { id: a, verdict: log, retain: { sample: 1.5 } }\n", "a fraction above 0 and at most 1"),
        ("  - { id: a, verdict: log, when: { session.count: { rows: { gt: 1, within: 2d } } } }\n", "a window from 1m to 24h"),
        ("  - { id: a, verdict: log, when: { session.count: { rows: { within: 1h } } } }\n", "expected `gt` or `lt`"),
        ("  - { id: a, verdict: revue }\n", "expected allow, log, constrain, review or block"),
    ];
    for (rule, want) in cases {
        let e = error(rule);
        assert!(e.starts_with("p.yaml:4:"), "{e}");
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let e = Policy::from_yaml("version: 1\ndefault: review\n", "p.yaml")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("`default` cannot be review"), "{e}");
}
