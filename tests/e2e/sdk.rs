//! SDK end-to-end tests: clients nobody here wrote — the official `openai` and `anthropic` Python SDKs, the official
//! MCP Python SDK's client, and Node's built-in fetch — run unmodified (only base URL and API key set) through
//! `enforcer exec` against test servers in the harness's netns, with the real daemon deciding.
//!
//! The first SDK test sets things up once: a CA and leaf for `openai.e2e.test`, `anthropic.e2e.test`,
//! `mcp.e2e.test`; a provider-compatible LLM server (`sdk/llm_server.py`, :8444: HTTP, the Responses WebSocket mode
//! and the Realtime API) and a real MCP server (`sdk/mcp_server.py`, MCP SDK + uvicorn, Streamable HTTP, :8445) in
//! the netns, placed in a cgroup under the harness's own so the harness's cleanup kills them; then the daemon is restarted on a config that adds the SDK CA to
//! the upstream roots, names the two test hosts as providers (`inspect.provider_overrides`) and uses
//! `tests/e2e/sdk-policy.yaml` (the e2e rules plus the SDK ones). Clients resolve the test names through a private
//! hosts file bind-mounted over /etc/hosts in their own mount namespace (`unshare --mount`); the machine's
//! /etc/hosts is never touched. The servers write what they received to files the tests read directly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::{self, Env};

const OPENAI_HOST: &str = "openai.e2e.test";
const ANTHROPIC_HOST: &str = "anthropic.e2e.test";
const MCP_HOST: &str = "mcp.e2e.test";
const LLM_PORT: u16 = 8444;
const MCP_PORT: u16 = 8445;

/// What the one-time set-up left for the tests.
#[derive(Clone)]
struct Sdk {
    /// Where the servers record what they received (and where stream releases are signalled).
    records: PathBuf,
    /// The private hosts file the clients see as /etc/hosts.
    hosts: PathBuf,
    /// The identity (private key) retained traces are encrypted to, and another one.
    trace_key: PathBuf,
    other_key: PathBuf,
}

static SDK: Mutex<Option<Sdk>> = Mutex::new(None);
/// The servers; they also die with the harness's cgroup tree and with this process (PDEATHSIG).
static SERVERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn sdk(env: &mut Env) -> Sdk {
    let mut guard = SDK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(sdk) = guard.as_ref() {
        return sdk.clone();
    }
    let sdk = setup(env).unwrap_or_else(|e| panic!("SDK test set-up failed: {e}"));
    *guard = Some(sdk.clone());
    sdk
}

fn setup(env: &mut Env) -> harness::Result<Sdk> {
    let harness::ServerFiles {
        root,
        records,
        ca: ca_path,
        cert,
        key: key_path,
    } = harness::server_files(
        env.dir.path().join("sdk"),
        "enforcer e2e SDK test CA",
        &[OPENAI_HOST, ANTHROPIC_HOST, MCP_HOST],
    )?;
    let hosts = root.join("hosts");
    let line = format!(
        "127.0.0.1 localhost\n::1 localhost\n{} {OPENAI_HOST} {ANTHROPIC_HOST} {MCP_HOST} {}\n",
        env.v4,
        harness::API_HOST
    );
    std::fs::write(&hosts, line).map_err(|e| format!("write hosts: {e}"))?;

    let cgroup = env.cgroup.join("sdk-servers");
    std::fs::create_dir_all(&cgroup).map_err(|e| format!("mkdir {}: {e}", cgroup.display()))?;
    let dir = harness::repo_root().join("tests/e2e/sdk");
    for (script, port, ready) in [
        ("llm_server.py", LLM_PORT, "LLM READY"),
        ("mcp_server.py", MCP_PORT, "MCP READY"),
    ] {
        start_server(
            env,
            &dir.join(script),
            port,
            &cert,
            &key_path,
            &records,
            &cgroup,
            ready,
        )?;
    }

    // The daemon's config, plus the SDK CA as an upstream root, the providers, and the SDK policy.
    let base = std::fs::read_to_string(&env.config).map_err(|e| format!("read config: {e}"))?;
    let policy = harness::repo_root().join("tests/e2e/sdk-policy.yaml");
    let mut yaml = String::new();
    let (mut saw_policy, mut saw_roots) = (false, false);
    for l in base.lines() {
        if l.starts_with("policy:") {
            yaml.push_str(&format!("policy: {}\n", policy.display()));
            saw_policy = true;
        } else if let Some(rest) = l.strip_prefix("  extra_roots: [") {
            yaml.push_str(&format!("  extra_roots: [{}, {rest}\n", ca_path.display()));
            saw_roots = true;
        } else {
            yaml.push_str(l);
            yaml.push('\n');
        }
    }
    if !(saw_policy && saw_roots) || base.contains("\ninspect:") {
        return Err(format!("unexpected harness config layout:\n{base}"));
    }
    yaml.push_str(&format!(
        "inspect:\n  provider_overrides:\n    - {{ host: {OPENAI_HOST}, provider: openai }}\n    - {{ host: {ANTHROPIC_HOST}, provider: anthropic }}\n"
    ));
    if !base.lines().any(|l| l.starts_with("audit:")) {
        // A signed checkpoint every second, so `enforcer audit verify` can check the live trail.
        yaml.push_str("audit:\n  checkpoint_interval_secs: 1\n");
    }
    // Retained traces (the policy retains reviewed proposals), encrypted to a key `enforcer trace keygen` made.
    let (trace_key, other_key) = (root.join("trace.key"), root.join("other.key"));
    let recipient = trace_keygen(&trace_key)?;
    trace_keygen(&other_key)?;
    yaml.push_str(&format!("traces:\n  recipient: {recipient}\n"));
    let config = root.join("enforcer-sdk.yaml");
    std::fs::write(&config, yaml).map_err(|e| format!("write config: {e}"))?;
    env.restart_daemon(config)?;
    Ok(Sdk {
        records,
        hosts,
        trace_key,
        other_key,
    })
}

/// A new age identity in `path`; its recipient.
fn trace_keygen(path: &Path) -> harness::Result<String> {
    let _ = std::fs::remove_file(path);
    let mut cmd = Command::new(harness::enforcer_bin());
    cmd.args(["trace", "keygen", "--out"]).arg(path);
    let (code, out, err) = harness::output(cmd);
    if code != 0 || !out.trim().starts_with("age1") {
        return Err(format!("trace keygen: {out}{err}"));
    }
    Ok(out.trim().to_owned())
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site per server, all plain paths"
)]
fn start_server(
    env: &Env,
    script: &Path,
    port: u16,
    cert: &Path,
    key: &Path,
    records: &Path,
    cgroup: &Path,
    ready: &str,
) -> harness::Result<()> {
    let log_path = records.join(format!("{port}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &env.netns, harness::PYTHON])
        .arg(script)
        .args(["--port", &port.to_string()])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--record-dir")
        .arg(records)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    harness::die_with_harness(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", script.display()))?;
    // Into the harness's cgroup tree, whose removal kills whatever is left in it.
    let _ = std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string());
    let stdout = child.stdout.take();
    SERVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(child);
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        let mut told = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !told && line.contains(&ready) {
                let _ = tx.send(());
                told = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        format!(
            "{} did not become ready; log:\n{}",
            script.display(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    })
}

/// `unshare --mount` → bind the private hosts file over /etc/hosts → `enforcer exec --profile e2e --user … -- CMD…`.
fn tagged(env: &Env, sdk: &Sdk, cmd: &[&str]) -> Command {
    env.tagged_with_file(&sdk.hosts, "/etc/hosts", cmd)
}

/// The leaf key the SDK servers (root) read: nobody else needs it.
/// Run a tagged client; every `FIRST <id>` line it prints releases stream `<id>` on the LLM server (only then may
/// the server send the rest). Returns the client's JSON lines, its stderr and whether it exited 0.
fn run_client(
    env: &Env,
    sdk: &Sdk,
    cmd: &[&str],
) -> (Vec<serde_json::Value>, Vec<String>, String, bool) {
    let mut child = tagged(env, sdk, cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut json, mut released) = (Vec::new(), Vec::new());
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            let _ = child.kill();
            panic!("{cmd:?} did not finish in time; so far {json:?}");
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(id) = line.strip_prefix("FIRST ") {
                    let file = sdk.records.join(format!("release-{}", id.trim()));
                    std::fs::write(&file, "").unwrap_or_else(|e| panic!("release {id}: {e}"));
                    released.push(id.trim().to_string());
                } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    json.push(v);
                } else {
                    eprintln!("sdk client said: {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        }
    }
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    let err = err_thread.join().unwrap_or_default();
    (json, released, err, status.success())
}

fn step<'a>(lines: &'a [serde_json::Value], name: &str, err: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|v| v["step"] == name)
        .unwrap_or_else(|| panic!("no {name:?} step in {lines:?}; stderr:\n{err}"))
}

/// The requests the LLM server received whose body contains `needle`.
fn llm_requests(sdk: &Sdk, needle: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(sdk.records.join("llm-requests.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["body"].as_str().is_some_and(|b| b.contains(needle)))
        .collect()
}

/// OpenAI's steps exercise two of some things (HTTP and the Responses API or its WebSocket mode).
fn per_kind(provider: &str) -> usize {
    if provider == "openai" {
        2
    } else {
        1
    }
}

fn run_id(env: &Env, tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}{}x{}", env.id, N.fetch_add(1, Ordering::Relaxed))
}

/// The OpenAI SDK's Responses API through the proxy: a function tool call works, the pasted key arrives redacted
/// with the rest of the request intact, and a blocked model raises the SDK's permission error without reaching
/// the upstream.
fn responses_api(sdk: &Sdk, lines: &[serde_json::Value], err: &str, run: &str, pasted: &str) {
    let r = step(lines, "responses", err);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["tool"], "get_weather", "{r}");
    assert_eq!(r["args"]["city"], "Paris", "{r}");
    let recs = llm_requests(sdk, &format!("responses-{run}"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    let raw = recs[0]["body"].as_str().unwrap_or_default();
    assert!(!raw.contains(pasted), "the key reached the upstream: {raw}");
    let body: serde_json::Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("upstream body not JSON ({e}): {raw}"));
    assert_eq!(
        body["input"],
        format!("responses-{run}: my key is [REDACTED:openai-key], what is the weather in Paris?")
            .as_str(),
        "{body}"
    );
    assert_eq!(body["model"], "e2e-model", "{body}");
    assert_eq!(body["tools"][0]["name"], "get_weather", "{body}");

    let b = step(lines, "responses_blocked", err);
    assert_eq!(b["ok"], false, "{b}");
    assert_eq!(b["exception"], "openai.BadRequestError", "{b}");
    assert_eq!(b["status"], 400, "{b}");
    assert_eq!(b["should_retry"], "false", "{b}");
    assert!(
        llm_requests(sdk, &format!("responses-blocked-{run}")).is_empty(),
        "a blocked Responses call reached the upstream"
    );
}

/// The OpenAI SDK's Responses WebSocket mode (`client.responses.connect()`) through the proxy: a pasted key in a
/// `response.create` event reaches the provider redacted, a blocked model is answered with an error event on the
/// open connection, and a proposed `shell` call that curls a key to an unlisted host arrives as a message saying
/// it was refused — in the events and in the final response.
fn websocket_mode(sdk: &Sdk, lines: &[serde_json::Value], err: &str, run: &str, pasted: &str) {
    let ws = step(lines, "websocket", err);
    assert_eq!(ws["ok"], true, "{ws}");
    assert_eq!(ws["redact"]["text"], "Hello over WebSocket.", "{ws}");
    let recs = llm_requests(sdk, &format!("wskey-{run}"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    let raw = recs[0]["body"].as_str().unwrap_or_default();
    assert!(!raw.contains(pasted), "the key reached the upstream: {raw}");
    assert!(raw.contains("[REDACTED:openai-key]"), "{raw}");

    let blocked = ws["blocked"].to_string();
    assert!(
        blocked.contains("blocked_by_policy") && blocked.contains("this model is not approved"),
        "{ws}"
    );
    assert!(llm_requests(sdk, &format!("wsdeny-{run}")).is_empty());

    let p = &ws["proposal"];
    assert_eq!(
        p["items"],
        serde_json::json!(["message", "message"]),
        "{ws}"
    );
    assert_eq!(
        p["final"],
        serde_json::json!(["message", "message"]),
        "{ws}"
    );
    let text = p["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("Hello over WebSocket.") && text.contains("refused the tool call `shell`"),
        "{ws}"
    );
    assert!(!ws.to_string().contains("AKIA"), "{ws}");
}

// ---- tests ----

pub fn openai_python_sdk(env: &mut Env) {
    llm_sdk(
        env,
        "openai",
        OPENAI_HOST,
        &format!("https://{OPENAI_HOST}:{LLM_PORT}/v1"),
    );
}

pub fn anthropic_python_sdk(env: &mut Env) {
    llm_sdk(
        env,
        "anthropic",
        ANTHROPIC_HOST,
        &format!("https://{ANTHROPIC_HOST}:{LLM_PORT}"),
    );
}

/// One provider's SDK through every step: a tool call, a stream that streams, a redacted and capped request, a block.
fn llm_sdk(env: &mut Env, provider: &str, host: &str, base_url: &str) {
    env.need_daemon();
    let sdk = sdk(env);
    env.need_daemon();
    let run = run_id(env, provider);
    let script = env.script("sdk/llm_client.py");
    let (lines, released, err, _) =
        run_client(env, &sdk, &["python3", &script, provider, base_url, &run]);
    let client = step(&lines, "client", &err);
    assert_eq!(
        client["max_retries"], 2,
        "the SDK's default retries must stay on"
    );
    let pasted = client["pasted"].as_str().unwrap_or_default().to_string();
    assert!(pasted.len() > 20, "{client}");

    // An allowed call with a tool declared returns the server's tool call.
    let basic = step(&lines, "basic", &err);
    assert_eq!(basic["ok"], true, "{basic}");
    assert_eq!(basic["tool"], "get_weather", "{basic}");
    assert_eq!(basic["args"]["city"], "Paris", "{basic}");
    let recs = llm_requests(&sdk, &format!("basic-{run}"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["host"], format!("{host}:{LLM_PORT}"), "{}", recs[0]);

    // Streaming: the first delta reached the client while the server still held the rest back (it sends the rest
    // only once the client reported the first delta; after 20 s it would send " timeout" instead).
    let stream = step(&lines, "stream", &err);
    assert_eq!(stream["ok"], true, "{stream}");
    assert_eq!(released, vec![format!("{provider}-{run}")], "{lines:?}");
    assert_eq!(
        stream["text"], "first second",
        "the stream was buffered: {stream}"
    );
    assert_eq!(stream["tool"], "get_weather", "{stream}");
    assert_eq!(stream["args"]["city"], "Paris", "{stream}");

    // The pasted key reaches the upstream redacted, everything else intact; max_tokens arrives capped.
    let redact = step(&lines, "redact", &err);
    assert_eq!(redact["ok"], true, "{redact}");
    assert_eq!(redact["content"], "Hello from the e2e server.", "{redact}");
    let recs = llm_requests(&sdk, &format!("redact-{run}"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    let raw = recs[0]["body"].as_str().unwrap_or_default();
    assert!(
        !raw.contains(&pasted),
        "the key reached the upstream: {raw}"
    );
    let body: serde_json::Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("upstream body not JSON ({e}): {raw}"));
    let detector = format!("{provider}-key");
    let prompt = format!("redact-{run}: my key is [REDACTED:{detector}], why does it fail?");
    assert_eq!(body["model"], "e2e-model", "{body}");
    assert_eq!(body["max_tokens"], 256, "max_tokens not capped: {body}");
    if provider == "openai" {
        assert_eq!(
            body["messages"][0]["content"], "You are a helpful assistant.",
            "{body}"
        );
        assert_eq!(body["messages"][1]["role"], "user", "{body}");
        assert_eq!(body["messages"][1]["content"], prompt.as_str(), "{body}");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(2), "{body}");
        assert_eq!(
            recs[0]["headers"]["authorization"], "Bearer e2e-not-a-real-key",
            "the client's own credentials must pass: {}",
            recs[0]
        );
    } else {
        assert_eq!(body["system"], "You are a helpful assistant.", "{body}");
        assert_eq!(body["messages"][0]["content"], prompt.as_str(), "{body}");
        // anthropic 2.x sends the key as a bearer token, earlier versions as x-api-key; either way it passes.
        let h = &recs[0]["headers"];
        assert!(
            h["x-api-key"] == "e2e-not-a-real-key"
                || h["authorization"] == "Bearer e2e-not-a-real-key",
            "the client's own credentials must pass: {}",
            recs[0]
        );
    }
    let declared: usize = recs[0]["headers"]["content-length"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    assert_eq!(
        declared,
        raw.len(),
        "Content-Length does not match the rewritten body"
    );

    // A blocked model: the SDK's error for the provider's block status (docs/protocols.md), the policy's message,
    // no retry, nothing upstream.
    let blocked = step(&lines, "blocked", &err);
    assert_eq!(blocked["ok"], false, "{blocked}");
    let (exception, status) = match provider {
        "openai" => ("openai.BadRequestError", 400),
        _ => ("anthropic.APIStatusError", 451),
    };
    assert_eq!(blocked["exception"], exception, "{blocked}");
    assert_eq!(blocked["status"], status, "{blocked}");
    assert_eq!(blocked["should_retry"], "false", "{blocked}");
    let message = blocked["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("this model is not approved for agents")
            && message.contains("sdk-block-model"),
        "{blocked}"
    );
    assert!(
        llm_requests(&sdk, &format!("blocked-{run}")).is_empty(),
        "a blocked call reached the upstream"
    );
    if provider == "openai" {
        responses_api(&sdk, &lines, &err, &run, &pasted);
        websocket_mode(&sdk, &lines, &err, &run, &pasted);
    }

    // The model proposes a `shell` call that curls an AWS key to an unlisted host: the SDK's streaming helper
    // accumulates a message without any tool call, whose text says why, and the turn no longer asks for tools.
    let p = step(&lines, "proposal", &err);
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(p["tool_calls"], serde_json::json!([]), "{p}");
    let content = p["content"].as_str().unwrap_or_default();
    assert!(
        content.contains("refused the tool call `shell`")
            && content.contains("(policy rule: sdk-no-fetch-to-unlisted-hosts)"),
        "{p}"
    );
    assert!(
        !p.to_string().contains("AKIA"),
        "the key reached the agent: {p}"
    );
    let finish = if provider == "openai" {
        "stop"
    } else {
        "end_turn"
    };
    assert_eq!(p["finish"], finish, "{p}");

    // The audit trail: one record per call (so no retry ever reached the proxy), the right decisions, no secret.
    let records = env.audit_records();
    let mine: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["request"]["host"] == host && r["request"]["llm_provider"] == provider)
        .filter(|r| r["request"]["phase"].is_null())
        .collect();
    // One record per refused proposal (the streamed one; for OpenAI also the WebSocket one), linked to its request.
    let proposals: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["request"]["host"] == host && r["request"]["phase"] == "proposal")
        .collect();
    assert_eq!(proposals.len(), per_kind(provider), "{proposals:#?}");
    for rec in &proposals {
        assert_eq!(rec["request"]["tool"], "shell", "{rec}");
        assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
        assert_eq!(
            rec["decision"]["rule"], "sdk-no-fetch-to-unlisted-hosts",
            "{rec}"
        );
        assert_eq!(
            rec["decision"]["matched"],
            serde_json::json!([
                "sdk-no-fetch-to-unlisted-hosts",
                "sdk-no-secrets-in-tool-calls"
            ]),
            "{rec}"
        );
        assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
        // Its parent is the LLM call it answers: the request, or over the WebSocket the `response.create` message,
        // whose model it names.
        let parent = &rec["request"]["parent"];
        let call = records.iter().find(|r| &r["seq"] == parent);
        let call = call.unwrap_or_else(|| panic!("no parent record: {rec}"));
        let ws = rec["request"]["upgrade"] == "websocket";
        let phase = if ws { "request" } else { "" };
        assert_eq!(
            call["request"]["phase"].as_str().unwrap_or_default(),
            phase,
            "{call}"
        );
        assert_eq!(call["request"]["llm_provider"], provider, "{call}");
        assert_eq!(
            rec["request"]["llm_model"], call["request"]["llm_model"],
            "{rec}"
        );
    }
    // OpenAI's Responses steps add one blocked and one redacted call.
    let per_kind = per_kind(provider);
    let blocked_recs: Vec<_> = mine
        .iter()
        .filter(|r| r["request"]["llm_model"] == "e2e-blocked-model")
        .collect();
    assert_eq!(blocked_recs.len(), per_kind, "{blocked_recs:?}");
    for rec in &blocked_recs {
        assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
        assert_eq!(rec["decision"]["rule"], "sdk-block-model", "{rec}");
        assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
    }
    let constrained: Vec<_> = mine
        .iter()
        .filter(|r| r["decision"]["verdict"] == "constrain")
        .collect();
    assert_eq!(constrained.len(), per_kind, "{constrained:?}");
    for rec in &constrained {
        let text = rec.to_string();
        assert!(text.contains(&detector), "changes not recorded: {text}");
        assert_eq!(rec["outcome"]["disposition"], "forwarded", "{text}");
    }
    let text = constrained[0].to_string();
    assert!(text.contains("max_tokens"), "cap not recorded: {text}");
    // basic, stream, redact and proposal, plus the blocked and constrained ones.
    assert_eq!(
        mine.len(),
        3 + 2 * per_kind,
        "one record per call: {mine:?}"
    );
    let all = records.iter().map(|r| r.to_string()).collect::<String>();
    assert!(!all.contains(&pasted), "the audit trail holds the key");
}

/// The OpenAI SDK's Realtime API, GA interface (`client.realtime.connect(model=…)` and its event iterator), through
/// the proxy to the LLM server's `/v1/realtime`, which answers each `response.create` with an audio message (a
/// 24 KiB `response.output_audio.delta`) and a function call in its GA events. A `shell` call that curls a key to an
/// unlisted host reaches the SDK as an assistant message saying it was refused — no `function_call` item and no
/// argument event among everything the iterator yields, in the response or the conversation — while the audio
/// before it arrives whole; an allowed `read_file` call arrives intact, every event of it. Each call is recorded
/// once, with the session's model, linked to the `response.create` that asked for it.
pub fn openai_realtime_python_sdk(env: &mut Env) {
    env.need_daemon();
    let sdk = sdk(env);
    env.need_daemon();
    let run = run_id(env, "realtime");
    let script = env.script("sdk/realtime_client.py");
    let base_url = format!("https://{OPENAI_HOST}:{LLM_PORT}/v1");
    let (lines, _, err, _) = run_client(env, &sdk, &["python3", &script, &base_url, &run]);
    let rt = step(&lines, "realtime", &err);
    assert_eq!(rt["ok"], true, "{rt}; stderr:\n{err}");
    assert_eq!(
        rt["session"],
        serde_json::json!(["shell", "read_file"]),
        "{rt}"
    );
    let model = "e2e-realtime-model";
    let updates: Vec<_> = llm_requests(&sdk, "session.update")
        .into_iter()
        .filter(|r| r["path"] == format!("ws:/v1/realtime?model={model}"))
        .collect();
    assert!(
        !updates.is_empty(),
        "the session.update never reached the upstream"
    );

    // The refused call: the audio message whole, then the call's item events carrying a message with the refusal,
    // its text streamed before the item is done, and nothing of the call itself.
    let b = &rt["blocked"];
    let types: Vec<&str> = b["types"]
        .as_array()
        .unwrap_or_else(|| panic!("{b}"))
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert_eq!(
        types,
        [
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
            "response.output_item.added",
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_item.done",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "conversation.item.done",
            "response.output_item.done",
            "response.done",
        ],
        "{b}"
    );
    assert_eq!(b["audio_bytes"], 18 * 1024, "the audio arrived whole: {b}");
    assert_eq!(b["args"], "", "no argument event reached the SDK: {b}");
    let refusal = b["text"].as_str().unwrap_or_default();
    assert!(
        refusal.starts_with("[The enforcer refused the tool call `shell`: ")
            && refusal.contains("(policy rule: sdk-no-fetch-to-unlisted-hosts)"),
        "{b}"
    );
    let message = serde_json::json!({"id": "item_call_1", "type": "message", "role": "assistant", "text": refusal});
    let items: Vec<&serde_json::Value> = b["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{b}"))
        .iter()
        .filter(|i| i["id"] == "item_call_1")
        .collect();
    assert_eq!(items.len(), 2, "{b}");
    for (item, event) in items
        .iter()
        .zip(["conversation.item.done", "response.output_item.done"])
    {
        let mut expected = message.clone();
        expected["event"] = event.into();
        assert_eq!(**item, expected, "{b}");
    }
    assert_eq!(b["final"][1], message, "{b}");
    assert_eq!(b["final"][0]["type"], "message", "{b}");
    assert_eq!(b["final"].as_array().map(Vec::len), Some(2), "{b}");
    assert!(
        !rt.to_string().contains("AKIA"),
        "the key reached the agent: {rt}"
    );
    assert!(!b.to_string().contains("function_call"), "{b}");

    // The allowed call: every event as the upstream sent it, the arguments as proposed.
    let a = &rt["allowed"];
    let types: Vec<&str> = a["types"]
        .as_array()
        .unwrap_or_else(|| panic!("{a}"))
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let args = r#"{"path": "README.md"}"#;
    let mut sent = vec![
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_item.done",
        "response.output_item.added",
        "conversation.item.added",
    ];
    sent.extend(std::iter::repeat_n(
        "response.function_call_arguments.delta",
        args.len().div_ceil(9),
    ));
    sent.extend([
        "response.function_call_arguments.done",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
    ]);
    assert_eq!(types, sent, "{a}");
    assert_eq!(a["args"], args, "{a}");
    assert_eq!(a["audio_bytes"], 18 * 1024, "{a}");
    let call = serde_json::json!({"id": "item_call_2", "type": "function_call", "name": "read_file",
        "call_id": "call_rt_2", "arguments": args});
    for event in ["conversation.item.done", "response.output_item.done"] {
        let mut expected = call.clone();
        expected["event"] = event.into();
        let items = a["items"].as_array().unwrap_or_else(|| panic!("{a}"));
        assert!(items.contains(&expected), "no {event} of the call: {a}");
    }
    assert_eq!(a["final"][1], call, "{a}");

    // The audit trail: each call decided once, with the session's model, linked to the response.create asking.
    let records = env.audit_records();
    let proposals: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["request"]["phase"] == "proposal")
        .filter(|r| r["request"]["host"] == OPENAI_HOST)
        .filter(|r| {
            r["request"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v1/realtime"))
        })
        .collect();
    assert_eq!(proposals.len(), 2, "{proposals:#?}");
    let expected = [
        (
            "shell",
            "block",
            "sdk-no-fetch-to-unlisted-hosts",
            "blocked",
        ),
        ("read_file", "log", "sdk-log-file-reads", "forwarded"),
    ];
    for (rec, (tool, verdict, rule, disposition)) in proposals.iter().zip(expected) {
        assert_eq!(rec["request"]["tool"], tool, "{rec}");
        assert_eq!(rec["request"]["upgrade"], "websocket", "{rec}");
        assert_eq!(rec["request"]["llm_provider"], "openai", "{rec}");
        assert_eq!(rec["request"]["llm_model"], model, "{rec}");
        assert_eq!(rec["decision"]["verdict"], verdict, "{rec}");
        assert_eq!(rec["decision"]["rule"], rule, "{rec}");
        assert_eq!(rec["outcome"]["disposition"], disposition, "{rec}");
        let parent = &rec["request"]["parent"];
        let call = records.iter().find(|r| &r["seq"] == parent);
        let call = call.unwrap_or_else(|| panic!("no parent record: {rec}"));
        assert_eq!(call["request"]["phase"], "request", "{call}");
        assert_eq!(call["request"]["llm_model"], model, "{call}");
        assert_eq!(call["request"]["llm_provider"], "openai", "{call}");
    }
    assert_eq!(
        proposals[0]["decision"]["matched"],
        serde_json::json!([
            "sdk-no-fetch-to-unlisted-hosts",
            "sdk-no-secrets-in-tool-calls"
        ]),
        "{}",
        proposals[0]
    );
    let all = records.iter().map(|r| r.to_string()).collect::<String>();
    assert!(!all.contains("AKIA"), "the audit trail holds the key");
}

pub fn mcp_python_sdk(env: &mut Env) {
    env.need_daemon();
    let sdk = sdk(env);
    env.need_daemon();
    let run = run_id(env, "mcp");
    let script = env.script("sdk/mcp_client.py");
    let url = format!("https://{MCP_HOST}:{MCP_PORT}/mcp");
    let (lines, _, err, ok) = run_client(env, &sdk, &["python3", &script, &url, &run]);
    assert!(ok, "MCP client failed: {lines:?}\n{err}");
    let list = step(&lines, "list", &err);
    assert_eq!(
        list["tools"],
        serde_json::json!(["delete_file", "list_records", "read_file"]),
        "{list}"
    );

    let allowed = step(&lines, "allowed", &err);
    assert_eq!(allowed["ok"], true, "{allowed}");
    assert_eq!(allowed["is_error"], false, "{allowed}");
    assert_eq!(
        allowed["text"],
        format!("contents of notes-{run}.txt: hello from the MCP server"),
        "{allowed}"
    );

    // The SDK hands the block to the caller as a tool error carrying the policy's message.
    let blocked = step(&lines, "blocked", &err);
    assert_eq!(
        blocked["ok"], true,
        "the SDK raised instead of returning a tool error: {blocked}"
    );
    assert_eq!(blocked["is_error"], true, "{blocked}");
    let text = blocked["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("destructive MCP tools are not allowed")
            && text.contains("sdk-no-delete-tools"),
        "{blocked}"
    );

    // The server executed the allowed call only.
    let calls = std::fs::read_to_string(sdk.records.join("mcp-calls.jsonl")).unwrap_or_default();
    let file = format!("notes-{run}.txt");
    let executed: Vec<serde_json::Value> = calls
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|c| c["path"] == file.as_str())
        .collect();
    assert_eq!(
        executed,
        vec![serde_json::json!({"tool": "read_file", "path": file})]
    );

    // A result of 150 items, each with a key, reaches the SDK capped to 100 and redacted.
    let got = step(&lines, "records", &err);
    assert_eq!(got["ok"], true, "{got}");
    assert_eq!(got["is_error"], false, "{got}");
    let items = got["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 100, "{got}");
    assert_eq!(
        items[5],
        format!("record 5 of {run}: key [REDACTED:aws-access-key]").as_str()
    );
    assert!(!got.to_string().contains("AKIA"), "{got}");

    let records = env.audit_records();
    let responses: Vec<_> = records
        .iter()
        .filter(|r| r["request"]["host"] == MCP_HOST && r["request"]["phase"] == "response")
        .filter(|r| r["request"]["mcp_tool"] == "list_records")
        .collect();
    assert_eq!(responses.len(), 1, "{responses:#?}");
    let rec = responses[0];
    assert_eq!(rec["decision"]["verdict"], "constrain", "{rec}");
    assert_eq!(
        rec["decision"]["matched"],
        serde_json::json!(["sdk-mcp-results-at-most-100", "sdk-mcp-redact-results"]),
        "{rec}"
    );
    let changes = rec["request"]["changes"].to_string();
    assert!(
        changes.contains(r#""path":"$.result.content","cause":"json_truncate""#)
            && changes.contains("redact:aws-access-key"),
        "{rec}"
    );
    let parent = &rec["request"]["parent"];
    assert!(
        records
            .iter()
            .any(|r| &r["seq"] == parent && r["request"]["mcp_tool"] == "list_records"),
        "{rec}"
    );
    let tool_recs: Vec<_> = records
        .iter()
        .filter(|r| r["request"]["host"] == MCP_HOST && r["request"]["mcp_method"] == "tools/call")
        .filter(|r| r["request"]["phase"].is_null())
        .collect();
    let rec_for = |tool: &str| {
        let found: Vec<_> = tool_recs
            .iter()
            .filter(|r| r["request"]["mcp_tool"] == tool)
            .collect();
        assert_eq!(found.len(), 1, "{tool}: {found:?}");
        (*found[0]).clone()
    };
    let rec = rec_for("read_file");
    assert_eq!(rec["decision"]["verdict"], "log", "{rec}");
    assert_eq!(rec["outcome"]["disposition"], "forwarded", "{rec}");
    let rec = rec_for("delete_file");
    assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
    assert_eq!(rec["decision"]["rule"], "sdk-no-delete-tools", "{rec}");
    assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
}

pub fn node_fetch(env: &mut Env) {
    env.need_daemon();
    let sdk = sdk(env);
    env.need_daemon();
    let script = env.script("sdk/fetch.mjs");
    let fetch = |args: &[&str]| -> serde_json::Value {
        let mut cmd = vec!["node", script.as_str()];
        cmd.extend_from_slice(args);
        let (lines, _, err, _) = run_client(env, &sdk, &cmd);
        lines
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("node printed nothing: {err}"))
    };
    let run = run_id(env, "node");
    let allowed = format!("/allowed/{run}");
    let out = fetch(&[&format!("https://{}{allowed}", harness::API_HOST)]);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(
        out["body"],
        format!("upstream ok: GET {allowed} host={}\n", harness::API_HOST),
        "{out}"
    );
    assert_eq!(env.upstream_count(&allowed), 1);

    let blocked = format!("/blocked/{run}");
    let out = fetch(&[&format!("https://{}{blocked}", harness::API_HOST)]);
    assert_eq!(out["status"], 403, "{out}");
    let body: serde_json::Value = serde_json::from_str(out["body"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("403 body not JSON ({e}): {out}"));
    assert_eq!(body["error"]["rule"], "e2e-block-path", "{body}");
    assert_eq!(
        env.upstream_count(&blocked),
        0,
        "a blocked fetch reached the upstream"
    );

    // A raw fetch of a blocked model on a provider host gets the provider's own error shape.
    let request = format!(
        r#"{{"model": "e2e-blocked-model", "messages": [{{"role": "user", "content": "blocked-{run}"}}]}}"#
    );
    let out = fetch(&[
        &format!("https://{OPENAI_HOST}:{LLM_PORT}/v1/chat/completions"),
        "POST",
        &request,
    ]);
    assert_eq!(out["status"], 400, "{out}");
    assert_eq!(out["should_retry"], "false", "{out}");
    let body: serde_json::Value = serde_json::from_str(out["body"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("400 body not JSON ({e}): {out}"));
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["code"], "blocked_by_policy", "{body}");
    assert!(llm_requests(&sdk, &format!("blocked-{run}")).is_empty());

    // A chunked request body (a stream, no Content-Length) that CONSTRAIN rewrites arrives re-framed: the upstream
    // parses exactly the rewritten body, redacted and capped, and answers it.
    let key = "sk-proj-NodeFakeKey0123456789abcdefghijklmnop";
    let request = format!(
        r#"{{"model": "e2e-model", "max_tokens": 4096, "messages": [{{"role": "user", "content": "chunked-{run} key {key} end"}}]}}"#
    );
    let out = fetch(&[
        &format!("https://{OPENAI_HOST}:{LLM_PORT}/v1/chat/completions"),
        "POST",
        &request,
        "stream",
    ]);
    assert_eq!(out["status"], 200, "{out}");
    let recs = llm_requests(&sdk, &format!("chunked-{run}"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    let raw = recs[0]["body"].as_str().unwrap_or_default();
    let body: serde_json::Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("upstream body not JSON ({e}): {raw}"));
    assert_eq!(
        body["messages"][0]["content"],
        format!("chunked-{run} key [REDACTED:openai-key] end"),
        "{body}"
    );
    assert_eq!(body["max_tokens"], 256, "{body}");
    if let Some(len) = recs[0]["headers"]["content-length"].as_str() {
        assert_eq!(len.parse::<usize>().ok(), Some(raw.len()), "{}", recs[0]);
    }
}

/// Stop the SDK servers (the harness's cleanup would kill them too) and check the trail still verifies.
/// The Anthropic SDK streams an answer whose `deploy_service` call a `review` rule holds: the call waits (the stream
/// kept alive) until `enforcer review approve` — then the SDK's accumulated message has the call as the model
/// proposed it — or `enforcer review deny` — then it has the refusal text, no tool call, and stop reason `end_turn`.
/// The held and closing records name the tool and how the review ended.
pub fn review_holds_a_streamed_tool_call_until_approved_or_denied(env: &mut Env) {
    env.need_daemon();
    let sdk = sdk(env);
    env.need_daemon();
    let run = run_id(env, "review");
    let script = env.script("sdk/review_client.py");
    let base = format!("https://{ANTHROPIC_HOST}:{LLM_PORT}");
    let mut closings = Vec::new();
    for verb in ["approve", "deny"] {
        let prompt = format!("review-{verb}-{run}: ship it");
        let env = &*env;
        let (lines, err, id) = std::thread::scope(|s| {
            let client = s.spawn(|| run_client(env, &sdk, &["python3", &script, &base, &prompt]));
            let id = pending_proposal(env, "deploy_service");
            let config = env.config.display().to_string();
            let mut cmd = Command::new(harness::enforcer_bin());
            cmd.args([
                "review",
                verb,
                &id.to_string(),
                "--reason",
                "e2e",
                "--config",
                &config,
            ]);
            let (code, out, err) = harness::output(cmd);
            assert_eq!(code, 0, "review {verb}: {out}{err}");
            let (lines, _, err, _) = client.join().unwrap_or_else(|_| panic!("client thread"));
            (lines, err, id)
        });
        let got = lines
            .first()
            .unwrap_or_else(|| panic!("no answer from the client; stderr:\n{err}"));
        assert_eq!(got["ok"], true, "{got}; stderr:\n{err}");
        if verb == "approve" {
            assert_eq!(
                got["tool_calls"],
                serde_json::json!([{"id": "toolu_e2e_2", "name": "deploy_service", "input": {"city": "Paris"}}]),
                "{got}"
            );
            assert_eq!(got["content"], "first second", "{got}");
            assert_eq!(got["finish"], "tool_use", "{got}");
        } else {
            assert_eq!(got["tool_calls"], serde_json::json!([]), "{got}");
            assert_eq!(
                got["content"],
                "first second[The enforcer refused the tool call `deploy_service`: a deployment needs a person's \
                 approval: denied by a reviewer: e2e (policy rule: sdk-review-deploys)]",
                "{got}"
            );
            assert_eq!(got["finish"], "end_turn", "{got}");
        }
        let closing = env
            .audit_records()
            .into_iter()
            .find(|r| r["review"]["held_seq"] == id)
            .unwrap_or_else(|| panic!("no closing record for review {id}"));
        assert_eq!(closing["request"]["phase"], "proposal", "{closing}");
        assert_eq!(closing["request"]["tool"], "deploy_service", "{closing}");
        let (result, disposition) = match verb {
            "approve" => ("approved", "forwarded"),
            _ => ("denied", "blocked"),
        };
        assert_eq!(closing["review"]["result"], result, "{closing}");
        assert_eq!(closing["outcome"]["disposition"], disposition, "{closing}");
        assert_eq!(closing["review"]["by"]["via"], "cli", "{closing}");
        closings.push(closing["seq"].as_u64().unwrap_or_default());
    }
    retained_proposal_traces(env, &sdk, &run, closings[0], closings[1]);
}

/// The reviewed proposals' exchanges were retained (`retain: true` on the review rule): the denied one decrypts with
/// the key — the request and the tool call as the model proposed it, not the refusal — and not with another key;
/// the approved one's file in its place is caught by `enforcer audit verify`.
fn retained_proposal_traces(env: &Env, sdk: &Sdk, run: &str, approved: u64, denied: u64) {
    let file = |of: u64| -> PathBuf {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rec = env
                .audit_records()
                .into_iter()
                .find(|r| r["outcome"]["disposition"] == "retained" && r["trace"]["of"] == of);
            if let Some(rec) = rec {
                assert_eq!(rec["request"]["tool"], "deploy_service", "{rec}");
                let name = rec["trace"]["file"].as_str().unwrap_or_default();
                return env.audit_dir.join("traces").join(name);
            }
            assert!(
                Instant::now() < deadline,
                "no trace retained for record {of}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (file_a, file_d) = (file(approved), file(denied));
    let show = |key: &Path| {
        let mut cmd = Command::new(harness::enforcer_bin());
        cmd.args(["trace", "show", &denied.to_string(), "--identity"])
            .arg(key)
            .arg("--audit-dir")
            .arg(&env.audit_dir);
        harness::output(cmd)
    };
    let (code, text, err) = show(&sdk.trace_key);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("review-deny-{run}: ship it")),
        "{text}"
    );
    assert!(
        text.contains("toolu_e2e_2") && text.contains("deploy_service"),
        "{text}"
    );
    assert!(
        !text.contains("The enforcer refused"),
        "the trace holds the call as proposed: {text}"
    );
    let (code, _, err) = show(&sdk.other_key);
    assert_ne!(code, 0);
    assert!(err.contains("cannot decrypt"), "{err}");
    env.assert_audit_verifies();
    let original = std::fs::read(&file_d).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&file_a, &file_d).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = env.audit_verify();
    std::fs::write(&file_d, &original).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ok, "audit verify missed a swapped trace: {out}");
    assert!(out.contains("swapped: trace"), "{out}");
    env.assert_audit_verifies();
}

/// Poll `enforcer review list --json` until a proposal of `tool` is held; its id.
fn pending_proposal(env: &Env, tool: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let config = env.config.display().to_string();
    loop {
        let mut cmd = Command::new(harness::enforcer_bin());
        cmd.args(["review", "list", "--json", "--config", &config]);
        let (code, out, err) = harness::output(cmd);
        assert_eq!(code, 0, "review list: {err}");
        let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if let Some(p) = list.as_array().and_then(|l| {
            l.iter()
                .find(|p| p["phase"] == "proposal" && p["proposal_tool"] == tool)
        }) {
            return p["id"].as_u64().unwrap_or_else(|| panic!("{p}"));
        }
        assert!(
            Instant::now() < deadline,
            "no proposal of {tool} held: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn sdk_audit_verifies(env: &mut Env) {
    env.need_daemon();
    env.assert_audit_verifies();
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    for mut child in servers.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}
