//! `enforcer policy check|test|eval`: the command-line edge of the policy engine. Errors in the policy or cases
//! are reported (with file, line and column) and turn into exit code 1; only unexpected failures become `Err`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::{cases, Policy};
use crate::model::{Action, Decision, Rewrite};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load a policy and report errors with file, line and column.
    Check { file: PathBuf },
    /// Run a policy's test cases (default: FILE with `.yaml` replaced by `.cases.yaml`).
    Test {
        file: PathBuf,
        cases: Option<PathBuf>,
    },
    /// Decide one action (JSON) and explain the decision.
    Eval {
        file: PathBuf,
        /// The Action (the model::Action shape, as in a cases file's `action:`): inline JSON (`'{"host": ...}'`), a
        /// path to a JSON file, or `-` to read it from standard input.
        #[arg(long, value_name = "JSON|FILE|-")]
        action: String,
        /// Print the decision as JSON instead of an explanation.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file } => Ok(check(&file)),
        PolicyCommand::Test { file, cases } => {
            let cases = cases.unwrap_or_else(|| cases::default_cases_path(&file));
            Ok(test(&file, &cases))
        }
        PolicyCommand::Eval { file, action, json } => eval(&file, &action, json),
    }
}

fn check(file: &Path) -> ExitCode {
    match Policy::load(file) {
        Ok(p) => {
            println!(
                "{}: ok: {} rules, default {}, mode {}, max body {} bytes, sha256 {}",
                file.display(),
                p.rule_ids().count(),
                p.default_verdict().as_str(),
                mode_str(p.mode()),
                p.max_body_bytes(),
                p.hash()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn test(file: &Path, cases_path: &Path) -> ExitCode {
    let outcomes = match cases::run_files(file, cases_path) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let failed: Vec<&cases::Outcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    for o in &failed {
        println!("FAIL {}", o.name);
        for f in &o.failures {
            println!("    {f}");
        }
        println!(
            "    matched rules: [{}]; deciding: {}",
            o.decision.matched_rules.join(", "),
            o.decision.deciding_rule.as_deref().unwrap_or("(default)")
        );
    }
    println!(
        "{}: {} passed, {} failed ({})",
        file.display(),
        outcomes.len() - failed.len(),
        failed.len(),
        cases_path.display()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Where `--action` came from, for error messages.
fn action_source(arg: &str) -> String {
    match arg {
        "-" => "standard input".to_string(),
        a if looks_inline(a) => "--action".to_string(),
        path => path.to_string(),
    }
}

/// Inline JSON starts with `{` (an Action is an object); anything else is a path.
fn looks_inline(arg: &str) -> bool {
    arg.trim_start().starts_with('{')
}

/// The text of `--action`: itself when it is inline JSON, standard input for `-`, else the file it names.
fn read_action(arg: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading the action from standard input")?;
        Ok(text)
    } else if looks_inline(arg) {
        Ok(arg.to_string())
    } else {
        std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))
    }
}

fn eval(file: &Path, action_arg: &str, json: bool) -> anyhow::Result<ExitCode> {
    let policy = match Policy::load(file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let text = read_action(action_arg)?;
    let mut action: Action = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid Action", action_source(action_arg)))?;
    cases::normalize(&mut action);
    let decision = policy.evaluate(&action);
    if json {
        println!("{}", serde_json::to_string_pretty(&decision)?);
    } else {
        print!("{}", explain(&policy, &decision));
    }
    Ok(ExitCode::SUCCESS)
}

fn mode_str(m: crate::model::Mode) -> &'static str {
    match m {
        crate::model::Mode::Enforce => "enforce",
        crate::model::Mode::Shadow => "shadow",
    }
}

/// A decision as a person reads it.
pub fn explain(policy: &Policy, d: &Decision) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let reason = serde_json::to_value(d.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = writeln!(s, "verdict: {} (reason: {reason})", d.verdict.as_str());
    match &d.deciding_rule {
        Some(r) => {
            let _ = writeln!(s, "deciding rule: {r}");
        }
        None => {
            let _ = writeln!(s, "deciding rule: none (policy default)");
        }
    }
    if d.matched_rules.is_empty() {
        let _ = writeln!(s, "matched rules: none");
    } else {
        let _ = writeln!(s, "matched rules:");
        for r in &d.matched_rules {
            match policy.rule_description(r) {
                Some(desc) => {
                    let _ = writeln!(s, "  - {r}: {desc}");
                }
                None => {
                    let _ = writeln!(s, "  - {r}");
                }
            }
        }
    }
    if let Some(m) = &d.message {
        let _ = writeln!(s, "message: {m}");
    }
    if !d.rewrites.is_empty() {
        let _ = writeln!(s, "rewrites:");
        for p in &d.rewrites {
            let what = match &p.rewrite {
                Rewrite::Redact { detectors } => format!("redact {}", detectors.join(", ")),
                Rewrite::JsonSet { path, value } => format!("set {path} = {value}"),
                Rewrite::JsonRemove { path } => format!("remove {path}"),
                Rewrite::JsonCap { path, max } => format!("cap {path} at {max}"),
                Rewrite::JsonTruncate { path, max } => format!("keep the first {max} of {path}"),
                Rewrite::HeaderSet { name, value } => {
                    format!(
                        "set header {name}: {}",
                        String::from_utf8_lossy(value.as_bytes())
                    )
                }
                Rewrite::HeaderRemove { name } => format!("remove header {name}"),
                Rewrite::DropTools { globs } => {
                    let globs: Vec<&str> = globs.iter().map(|g| g.as_str()).collect();
                    format!("drop tools {}", globs.join(", "))
                }
            };
            let _ = writeln!(s, "  - {what} (rule {})", p.rule);
        }
    }
    let _ = writeln!(s, "mode: {}", mode_str(d.mode));
    if d.mode == crate::model::Mode::Shadow {
        let _ = writeln!(
            s,
            "  (shadow: recorded only, the request is forwarded unmodified)"
        );
    }
    let _ = writeln!(s, "policy: sha256 {}", d.policy_hash);
    s
}
