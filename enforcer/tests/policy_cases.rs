//! Every policy shipped in `policies/` runs against its `NAME.cases.yaml` through the same code as
//! `enforcer policy test`.

use std::path::{Path, PathBuf};

use enforcer::policy::cases;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn shipped_policies() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(policies_dir())
        .expect("policies/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".yaml") && !name.ends_with(".cases.yaml")
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_shipped_policy_passes_its_cases() {
    let policies = shipped_policies();
    let names: Vec<String> = policies
        .iter()
        .map(|p| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for required in ["default", "example"] {
        assert!(
            names.iter().any(|n| n == required),
            "policies/{required}.yaml is missing"
        );
    }
    let mut total = 0;
    for policy in &policies {
        let cases_path = cases::default_cases_path(policy);
        assert!(
            cases_path.exists(),
            "{} has no cases file",
            policy.display()
        );
        let outcomes = cases::run_files(policy, &cases_path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !outcomes.is_empty(),
            "{} has no cases",
            cases_path.display()
        );
        for o in &outcomes {
            assert!(
                o.passed(),
                "{}: case `{}` failed: {:?} (matched {:?})",
                policy.display(),
                o.name,
                o.failures,
                o.decision.matched_rules
            );
        }
        total += outcomes.len();
    }
    assert!(total >= 40, "only {total} cases ran");
}

#[test]
fn a_wrong_expectation_is_reported_with_what_differed() {
    let policy = policies_dir().join("example.yaml");
    let src = std::fs::read_to_string(&policy).unwrap();
    let file = cases::parse(
        r#"
cases:
  - name: wrong on purpose
    action:
      transport: { host: api.github.com, port: 443 }
      http: { method: DELETE, path: /repos/acme/x }
    expect: { verdict: allow, rule: github-read-only, reason: rule, matched: [github-read-only] }
"#,
        "inline",
    )
    .unwrap();
    let outcomes = cases::run(&src, "example.yaml", &file).unwrap();
    assert_eq!(outcomes.len(), 1);
    let o = &outcomes[0];
    assert!(!o.passed());
    assert_eq!(o.failures.len(), 4, "{:?}", o.failures);
    assert!(
        o.failures[0].contains("expected allow, got block"),
        "{:?}",
        o.failures
    );
}

#[test]
fn a_malformed_cases_file_names_file_line_and_column() {
    let err = cases::parse(
        "cases:\n  - name: x\n    action: {}\n    expect: { verdict: maybe }\n",
        "bad.cases.yaml",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("bad.cases.yaml:4:"), "{text}");
}
