//! Policy hot reload: the daemon is restarted on a policy file the test owns (the e2e policy plus one rule for
//! `/reload/**`), which the test then rewrites and announces as an operator would: with `enforcer reload` (checks
//! the policy, then signals the daemon through its pid file) and with a bare SIGHUP. A good policy takes over for
//! new requests and its hash appears in the audit records from then on; a malformed one is refused by `enforcer
//! reload` without signalling, and rejected by the daemon with a located error while the last good policy keeps
//! enforcing.

use std::time::Duration;

use sha2::Digest;

use crate::harness::{self, Env, API_HOST};

/// How long a reload may take to show up in the daemon log (bounded wait, not a timing assertion).
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// The e2e policy plus the rule under test, with `verdict` (and `when_key` for the host condition, so a typo can
/// make it malformed).
fn policy_text(verdict: &str, when_key: &str) -> String {
    let base = std::fs::read_to_string(harness::repo_root().join("tests/e2e/policy.yaml"))
        .unwrap_or_else(|e| panic!("read tests/e2e/policy.yaml: {e}"));
    format!(
        "{base}\n  - id: e2e-reload\n    description: blocked, then allowed by a reloaded policy\n    \
         when: {{ {when_key}: {API_HOST}, path: \"/reload/**\" }}\n    verdict: {verdict}\n"
    )
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// One tagged HTTPS request for `path`; returns the status and the request's single audit record.
fn request(env: &Env, path: &str) -> (u16, serde_json::Value) {
    let url = format!("https://{API_HOST}{path}");
    let out = env.curl_tagged(&["--resolve", &env.resolve(API_HOST, 443, false), &url]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut recs = super::records_for(env, path);
    assert_eq!(recs.len(), 1, "audit records for {path}: {recs:?}");
    (out.status, recs.remove(0))
}

/// Send SIGHUP and wait for the daemon to log `needle` about it; returns that log line.
fn hangup(env: &mut Env, needle: &str) -> String {
    let since = env.daemon_log_len();
    env.hangup_daemon().unwrap_or_else(|e| panic!("{e}"));
    let seen = env.wait_for_daemon_log(since, needle, RELOAD_WAIT);
    seen.unwrap_or_else(|e| panic!("{e}\n(daemon still running: {})", env.daemon_running()))
}

pub fn sighup_reloads_the_policy(env: &mut Env) {
    env.need_daemon();
    let policy = env.dir.path().join("reload-policy.yaml");
    let blocking = policy_text("block", "host");
    let allowing = policy_text("allow", "host");
    let malformed = policy_text("block", "hots");
    let (old_hash, new_hash) = (sha256_hex(&blocking), sha256_hex(&allowing));
    std::fs::write(&policy, &blocking).unwrap_or_else(|e| panic!("write policy: {e}"));
    let config = env
        .config_with_policy(&policy, "enforcer-reload.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    env.restart_daemon(config.clone())
        .unwrap_or_else(|e| panic!("restart: {e}"));
    let reload = || {
        std::process::Command::new(harness::enforcer_bin())
            .args(["reload", "--config"])
            .arg(&config)
            .output()
            .unwrap_or_else(|e| panic!("enforcer reload: {e}"))
    };

    // 1. The policy the daemon started with blocks the path.
    let path = super::unique("/reload", "before");
    let (status, rec) = request(env, &path);
    assert_eq!(status, 403, "{rec}");
    super::assert_record(&rec, "block", Some("e2e-reload"), "blocked");
    assert_eq!(rec["decision"]["policy_hash"], old_hash.as_str(), "{rec}");
    assert_eq!(env.upstream_count(&path), 0);

    // 2. Rewritten to allow it and announced with `enforcer reload`: allowed, under the new hash.
    std::fs::write(&policy, &allowing).unwrap_or_else(|e| panic!("write policy: {e}"));
    let since = env.daemon_log_len();
    let out = reload();
    assert!(out.status.success(), "enforcer reload: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&new_hash),
        "{out:?}"
    );
    let line = env
        .wait_for_daemon_log(since, "policy reloaded", RELOAD_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        line.contains(&format!("old_hash={old_hash}"))
            && line.contains(&format!("new_hash={new_hash}")),
        "{line}"
    );
    let path = super::unique("/reload", "after");
    let (status, rec) = request(env, &path);
    assert_eq!(status, 200, "{rec}");
    super::assert_record(&rec, "allow", Some("e2e-reload"), "forwarded");
    assert_eq!(rec["decision"]["policy_hash"], new_hash.as_str(), "{rec}");
    assert_eq!(env.upstream_count(&path), 1);

    // 3. A malformed policy is rejected with its file:line:column; the daemon runs on under the last good policy,
    //    which still allows the path (the malformed one would block it) and still blocks what it blocks.
    std::fs::write(&policy, &malformed).unwrap_or_else(|e| panic!("write policy: {e}"));
    let typo_line = malformed
        .lines()
        .position(|l| l.contains("hots:"))
        .map_or(0, |i| i + 1);
    // `enforcer reload` names the error and leaves the daemon alone...
    let since = env.daemon_log_len();
    let out = reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(&format!("{}:{typo_line}:", policy.display()))
            && stderr.contains("not signalled"),
        "{stderr}"
    );
    assert!(
        env.wait_for_daemon_log(since, "policy reload", Duration::from_secs(2))
            .is_err(),
        "the daemon was signalled for a malformed policy"
    );
    // ...and a bare SIGHUP with the same file is rejected by the daemon itself.
    let line = hangup(env, "policy reload failed");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("{}:{typo_line}:", policy.display())),
        "the error does not name {}:{typo_line}: {line}",
        policy.display()
    );
    assert!(line.contains(&format!("policy_hash={new_hash}")), "{line}");
    assert!(env.daemon_running(), "the daemon exited after a bad reload");
    let path = super::unique("/reload", "after-bad");
    let (status, rec) = request(env, &path);
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["decision"]["policy_hash"], new_hash.as_str(), "{rec}");
    let path = super::unique("/blocked", "after-bad");
    let (status, rec) = request(env, &path);
    assert_eq!(status, 403, "{rec}");
    super::assert_record(&rec, "block", Some("e2e-block-path"), "blocked");
    assert_eq!(rec["decision"]["policy_hash"], new_hash.as_str(), "{rec}");
    assert!(env.daemon_running(), "the daemon exited");

    // Leave a loadable policy behind: later tests may restart the daemon on this configuration.
    std::fs::write(&policy, &allowing).unwrap_or_else(|e| panic!("write policy: {e}"));

    // 4. The trail across both reloads verifies.
    env.assert_audit_verifies();
}
