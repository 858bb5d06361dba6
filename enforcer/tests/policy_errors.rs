//! A bad policy never half-loads: every kind of error names the file, line and column and what was expected, and
//! hostile YAML (alias bombs, deep nesting, huge files) is refused promptly instead of hanging or panicking.

use std::sync::mpsc;
use std::time::Duration;

use enforcer::policy::{Policy, PolicyError};

fn load(src: &str) -> Result<Policy, PolicyError> {
    Policy::from_yaml(src, "bad.yaml")
}

/// Loads `src` and returns the error text, asserting it is located at `line:col`.
fn error_at(src: &str, line: u64, col: u64) -> String {
    let err = load(src).expect_err("the policy must be rejected");
    let text = err.to_string();
    assert_eq!(err.location(), Some((line, col)), "{text}");
    assert!(
        text.starts_with(&format!("bad.yaml:{line}:{col}: ")),
        "{text}"
    );
    text
}

const HEAD: &str = "version: 1\ndefault: block\nrules:\n";

#[test]
fn unknown_condition_key() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ hots: x }}\n    verdict: allow\n"),
        5,
        13,
    );
    assert!(
        t.contains("unknown condition `hots`") && t.contains("expected one of profile"),
        "{t}"
    );
}

#[test]
fn unknown_top_level_and_rule_keys() {
    let t = error_at("version: 1\ndefault: block\nmodee: shadow\n", 3, 1);
    assert!(
        t.contains("unknown key `modee`") && t.contains("expected one of"),
        "{t}"
    );
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: allow\n    mesage: hi\n"),
        6,
        5,
    );
    assert!(t.contains("unknown key `mesage` in a rule"), "{t}");
}

#[test]
fn bad_regex() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when:\n      json: {{ \"$.q\": {{ matches: \"(unclosed\" }} }}\n    verdict: block\n"),
        6,
        33,
    );
    assert!(t.contains("bad regex"), "{t}");
    let t = error_at(
        "version: 1\ndefault: block\ndetectors:\n  d: { regex: \"[a-\" }\n",
        4,
        15,
    );
    assert!(t.contains("bad regex"), "{t}");
}

#[test]
fn bad_glob() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ path: \"/a**\" }}\n    verdict: allow\n"),
        5,
        19,
    );
    assert!(
        t.contains("bad glob `/a**`") && t.contains("whole path segment"),
        "{t}"
    );
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ host: \"api.*.com\" }}\n    verdict: allow\n"),
        5,
        19,
    );
    assert!(t.contains("bad glob") && t.contains("*.example.com"), "{t}");
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ mcp.tool: \"del[ae]te\" }}\n    verdict: allow\n"),
        5,
        23,
    );
    assert!(t.contains("not supported in globs"), "{t}");
}

#[test]
fn bad_jsonpath() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when:\n      json: {{ \"a.b\": {{ exists: true }} }}\n    verdict: allow\n"),
        6,
        15,
    );
    assert!(
        t.contains("bad JSONPath `a.b`") && t.contains("start with `$`"),
        "{t}"
    );
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: constrain\n    constrain:\n      json_remove: [\"$.a[x]\"]\n"),
        7,
        21,
    );
    assert!(t.contains("bad JSONPath"), "{t}");
}

#[test]
fn unknown_detector() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ detect: [email, ssn] }}\n    verdict: block\n"),
        5,
        29,
    );
    assert!(
        t.contains("unknown detector `ssn`") && t.contains("card-number"),
        "{t}"
    );
    let t = error_at(
        &format!(
            "{HEAD}  - id: a\n    verdict: constrain\n    constrain: {{ redact: [passwords] }}\n"
        ),
        6,
        27,
    );
    assert!(t.contains("unknown detector `passwords`"), "{t}");
}

#[test]
fn duplicate_rule_id() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: allow\n  - id: b\n    verdict: allow\n  - id: a\n    verdict: block\n"),
        8,
        5,
    );
    assert!(
        t.contains("duplicate rule id `a`") && t.contains("line 4"),
        "{t}"
    );
}

#[test]
fn constrain_without_rewrites() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    when: {{ host: x }}\n    verdict: constrain\n"),
        6,
        14,
    );
    assert!(t.contains("no `constrain:` rewrites"), "{t}");
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: constrain\n    constrain: {{}}\n"),
        6,
        16,
    );
    assert!(t.contains("no rewrites"), "{t}");
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: allow\n    constrain: {{ redact: [email] }}\n"),
        6,
        5,
    );
    assert!(t.contains("verdict is not constrain"), "{t}");
}

#[test]
fn other_semantic_errors_are_located() {
    error_at("version: 2\ndefault: block\n", 1, 10);
    error_at("version: 1\ndefault: deny\n", 2, 10);
    error_at(&format!("{HEAD}  - id: a\n    verdict: allow\n    rate_limit: {{ requests: 10, per: 1 fortnight }}\n"), 6, 38);
    error_at(
        &format!("{HEAD}  - id: a\n    when: {{ port: 70000 }}\n    verdict: allow\n"),
        5,
        19,
    );
    let t = error_at(
        "version: 1\ndefault: block\nprofiles: { coder: {} }\nrules:\n  - id: a\n    when: { profile: codr }\n    verdict: allow\n",
        6,
        22,
    );
    assert!(t.contains("unknown profile `codr`"), "{t}");
}

#[test]
fn yaml_syntax_errors_are_located() {
    let err = load(&format!(
        "{HEAD}  - id: a\n    when: {{ host: x\n    verdict: allow\n"
    ))
    .unwrap_err();
    assert!(matches!(err, PolicyError::Yaml { .. }), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("bad.yaml:6:"), "{text}");
    assert!(
        !text.contains(" at line "),
        "location is not repeated: {text}"
    );
}

#[test]
fn duplicate_keys_are_refused() {
    let err = load(&format!(
        "{HEAD}  - id: a\n    when: {{ host: a, host: b }}\n    verdict: allow\n"
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("bad.yaml:5:")
            && text.contains("duplicate")
            && text.contains("expected each key once"),
        "{text}"
    );
}

#[test]
fn nothing_half_loads() {
    // A valid rule followed by a broken one: the whole policy is refused.
    assert!(load(&format!(
        "{HEAD}  - id: ok\n    verdict: allow\n  - id: broken\n    when: {{ path: \"/x/***\" }}\n    verdict: allow\n"
    ))
    .is_err());
}

/// Runs `f` on a thread and fails the test if it does not finish: a hang is a failure, not a stuck suite.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("hostile input must not hang the loader")
}

#[test]
fn billion_laughs_is_refused() {
    let mut src = String::from(
        "version: 1\ndefault: block\nlol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    let mut prev = 'a';
    for name in 'b'..='j' {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        src.push_str(&format!("l{name}: &{name} [{refs}]\n"));
        prev = name;
    }
    let err = finishes(move || load(&src).map(|_| ()).unwrap_err());
    let text = err.to_string();
    assert!(text.starts_with("bad.yaml:"), "{text}");
    assert!(text.contains("alias"), "{text}");
}

#[test]
fn deep_nesting_is_refused() {
    let flow = format!(
        "version: 1\ndefault: block\nrules: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let err = finishes(move || load(&flow).map(|_| ()).unwrap_err());
    assert!(err.to_string().contains("nesting is too deep"), "{err}");

    let mut block = String::from("version: 1\ndefault: block\nrules:\n");
    for depth in 1..1_000 {
        block.push_str(&" ".repeat(depth));
        block.push_str("a:\n");
    }
    let err = finishes(move || load(&block).map(|_| ()).unwrap_err());
    assert!(err.to_string().contains("nesting is too deep"), "{err}");

    // Deeply nested conditions (not/any) stay within the same budget.
    let mut when = String::from("{ host: x }");
    for _ in 0..200 {
        when = format!("{{ not: {when} }}");
    }
    let src = format!("{HEAD}  - id: a\n    when: {when}\n    verdict: allow\n");
    assert!(finishes(move || load(&src).is_err()));
}

#[test]
fn huge_input_is_refused() {
    let big = format!(
        "version: 1\ndefault: block\ndescription: \"{}\"\n",
        "x".repeat(5 * 1024 * 1024)
    );
    let err = finishes(move || load(&big).map(|_| ()).unwrap_err());
    assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");

    // Within the size cap but with too many nodes.
    let many = format!(
        "version: 1\ndefault: block\nx: [{}0]\n",
        "0,".repeat(110_000)
    );
    let err = finishes(move || load(&many).map(|_| ()).unwrap_err());
    let text = err.to_string();
    assert!(
        text.starts_with("bad.yaml") && text.contains("too large"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    std::fs::write(
        &path,
        format!(
            "# {}\nversion: 1\ndefault: block\n",
            "x".repeat(5 * 1024 * 1024)
        ),
    )
    .unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");
}

#[test]
fn garbage_never_panics() {
    for src in [
        "",
        "~",
        "[]",
        "42",
        "version: 1",
        "version: 1\ndefault: block\nrules: 5\n",
        "version: 1\ndefault: block\nrules: [5]\n",
        "version: 1\ndefault: block\nrules: [{ id: [1], verdict: allow }]\n",
        "version: 1\ndefault: block\nrules: [{ id: a, verdict: allow, when: [1] }]\n",
        "version: 1\ndefault: block\nrules: [{ id: a, verdict: allow, when: { json: 5 } }]\n",
        "version: 1\ndefault: block\nrules: [{ id: a, verdict: allow, when: { body.size: { gt: -1 } } }]\n",
        "version: 1\ndefault: block\nrules: [{ id: a, verdict: allow, when: { any: { host: x } } }]\n",
        "version: 1\ndefault: block\n? [a]\n: b\n",
        "\u{feff}version: 1\ndefault: block\n\t- x",
        "version: 1\ndefault: block\n---\nversion: 1\n",
    ] {
        assert!(load(src).is_err(), "{src:?} must be rejected");
    }
}

#[test]
fn every_broken_rule_is_reported_not_just_the_first() {
    let src = format!(
        "{HEAD}  - id: a\n    when: {{ hots: x }}\n    verdict: allow\n  \
         - id: fine\n    when: {{ host: x }}\n    verdict: allow\n  \
         - id: b\n    when: {{ path: \"[\" }}\n    verdict: block\n  \
         - id: fine\n    verdict: log\n"
    );
    let t = error_at(&src, 5, 13);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert!(lines[0].contains("unknown condition `hots`"), "{t}");
    assert!(lines[1].starts_with("bad.yaml:11:"), "{t}");
    assert!(
        lines[2].starts_with("bad.yaml:13:") && lines[2].contains("duplicate rule id `fine`"),
        "{t}"
    );
}

#[test]
fn an_opaque_relay_is_only_for_rules_that_let_a_connection_through() {
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: block\n    relay: opaque\n"),
        6,
        12,
    );
    assert!(
        t.contains("relays opaque but its verdict is not allow or log"),
        "{t}"
    );
    let t = error_at(
        &format!("{HEAD}  - id: a\n    verdict: allow\n    relay: blind\n"),
        6,
        12,
    );
    assert!(
        t.contains("unknown relay, expected inspect or opaque"),
        "{t}"
    );
    assert!(load(&format!(
        "{HEAD}  - id: a\n    when: {{ upgrade: websocket }}\n    verdict: log\n    relay: opaque\n"
    ))
    .is_ok());
}
