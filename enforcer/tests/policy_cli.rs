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
            action: action.display().to_string(),
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
        action: action.display().to_string(),
        json: false
    })
    .is_err());
}

/// The binary: `--action` takes inline JSON, a file, or `-` (standard input), and says so in its help.
#[test]
fn eval_action_is_inline_json_a_file_or_stdin() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    const ACTION: &str = r#"{"transport":{"host":"sql.internal","port":443},"http":{"method":"POST","path":"/query","json":{"query":"select 1","limit":1000}}}"#;
    let policy = policies().join("example.yaml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("action.json");
    std::fs::write(&file, ACTION).unwrap();
    let eval = |action: &str, stdin: Option<&str>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_enforcer"))
            .args(["policy", "eval"])
            .arg(&policy)
            .args(["--action", action])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let path = file.display().to_string();
    for (action, stdin) in [(ACTION, None), (path.as_str(), None), ("-", Some(ACTION))] {
        let (code, out, err) = eval(action, stdin);
        assert_eq!(code, Some(0), "--action {action}: {err}");
        assert!(
            out.contains("deciding rule: sql-cap-rows"),
            "--action {action}: {out}"
        );
    }
    // Errors name where the action came from.
    let (code, _, err) = eval("{not json", None);
    assert_ne!(code, Some(0));
    assert!(err.contains("--action is not a valid Action"), "{err}");
    let (code, _, err) = eval("-", Some("nope"));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("standard input is not a valid Action"),
        "{err}"
    );
    let missing = dir.path().join("missing.json").display().to_string();
    let (code, _, err) = eval(&missing, None);
    assert_ne!(code, Some(0));
    assert!(err.contains(&missing), "{err}");

    let help = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["policy", "eval", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("inline JSON") && help.contains("standard input"),
        "{help}"
    );
}
