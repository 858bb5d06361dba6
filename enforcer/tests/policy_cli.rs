//! `enforcer policy check|test|eval` through the same entry point the binary uses.

use std::process::ExitCode;

use enforcer::policy::cli::{run, PolicyCommand};
use enforcer::policy::Policy;

fn policies() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn check_accepts_good_and_refuses_bad_policies() {
    let ok = run(PolicyCommand::Check {
        file: policies().join("example.yaml"),
    })
    .unwrap();
    assert_eq!(ok, ExitCode::SUCCESS);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\ndefault: block\nrules:\n  - { id: a, verdict: constrain }\n",
    )
    .unwrap();
    assert_eq!(
        run(PolicyCommand::Check { file: bad }).unwrap(),
        ExitCode::FAILURE
    );
    let missing = dir.path().join("missing.yaml");
    assert_eq!(
        run(PolicyCommand::Check { file: missing }).unwrap(),
        ExitCode::FAILURE
    );
}

#[test]
fn test_uses_the_default_cases_path_and_fails_on_a_wrong_case() {
    let ok = run(PolicyCommand::Test {
        file: policies().join("default.yaml"),
        cases: None,
    })
    .unwrap();
    assert_eq!(ok, ExitCode::SUCCESS);

    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("wrong.cases.yaml");
    std::fs::write(
        &cases,
        "cases:\n  - name: wrong\n    action: { transport: { host: example.com } }\n    expect: { verdict: allow }\n",
    )
    .unwrap();
    let code = run(PolicyCommand::Test {
        file: policies().join("default.yaml"),
        cases: Some(cases),
    })
    .unwrap();
    assert_eq!(code, ExitCode::FAILURE);
}

#[test]
fn eval_explains_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let action = dir.path().join("action.json");
    std::fs::write(
        &action,
        r#"{"transport":{"host":"sql.internal","port":443},"http":{"method":"POST","path":"/query","json":{"query":"select 1","limit":1000}}}"#,
    )
    .unwrap();
    let file = policies().join("example.yaml");
    for json in [false, true] {
        let code = run(PolicyCommand::Eval {
            file: file.clone(),
            action: action.clone(),
            json,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
    }
    // The explanation text itself.
    let policy = Policy::load(&file).unwrap();
    let mut a: enforcer::model::Action =
        serde_json::from_str(&std::fs::read_to_string(&action).unwrap()).unwrap();
    enforcer::policy::cases::normalize(&mut a);
    let text = enforcer::policy::cli::explain(&policy, &policy.evaluate(&a));
    assert!(text.contains("verdict: constrain (reason: rule)"), "{text}");
    assert!(text.contains("deciding rule: sql-cap-rows"), "{text}");
    assert!(
        text.contains("cap $.limit at 100 (rule sql-cap-rows)"),
        "{text}"
    );
    assert!(text.contains(policy.hash()), "{text}");

    std::fs::write(&action, "{not json").unwrap();
    assert!(run(PolicyCommand::Eval {
        file,
        action,
        json: false
    })
    .is_err());
}
