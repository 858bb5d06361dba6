//! Privileged end-to-end tests: the real daemon (eBPF capture, transparent TLS-intercepting proxy, policy, audit)
//! enforcing real curl clients run through `enforcer exec` against a network-namespace upstream host.
//!
//! Runs as root only. Without root: skipped with a message locally, a failure when `CI` is set. This is its own
//! test runner (`harness = false`) so one environment — one netns host, one daemon — serves every test in turn and
//! its cleanup (see `harness::Env`'s `Drop`) runs after the last test whatever happened; the output follows libtest's
//! (`test NAME ... ok`, `test result: …`). Arguments that do not start with `-` filter tests by substring.

mod agent;
mod conform;
mod dns;
mod harness;
mod kernel;
mod ops;
mod reload;
mod sdk;
mod sessions;
mod terminal;

use std::io::{BufRead, BufReader};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dns::DNS_CLIENT;
use harness::{
    Env, API_HOST, BAD_HOST, BAD_TLS_PORT, ECHO_ALLOWED, ECHO_BLOCKED, UDP_SINK, V4_ONLY_HOST,
};

type Test = (&'static str, fn(&mut Env));

/// In order; the last one stops the daemon.
const TESTS: &[Test] = &[
    (
        "netns_upstream_reachable_untagged",
        netns_upstream_reachable_untagged,
    ),
    (
        "allowed_https_reaches_upstream_h1_h2_v4_v6",
        allowed_https_reaches_upstream,
    ),
    (
        "allowed_plain_http_reaches_upstream",
        allowed_plain_http_reaches_upstream,
    ),
    (
        "spoofed_plain_http_host_gets_421_and_never_reaches_upstream",
        spoofed_plain_http_host_gets_421_and_never_reaches_upstream,
    ),
    (
        "ip_literal_hosts_are_decided_as_their_address",
        ip_literal_hosts_are_decided_as_their_address,
    ),
    (
        "blocked_gets_403_and_never_reaches_upstream",
        blocked_gets_403_and_never_reaches_upstream,
    ),
    (
        "untagged_request_is_not_intercepted",
        untagged_request_is_not_intercepted,
    ),
    ("sse_arrives_event_by_event", sse_arrives_event_by_event),
    (
        "bad_upstream_certificate_is_blocked_and_audited",
        bad_upstream_certificate_is_blocked_and_audited,
    ),
    (
        "tcp_allowed_port_relays_blocked_port_closed",
        tcp_allowed_port_relays_blocked_port_closed,
    ),
    (
        "websocket_is_decided_then_relayed",
        websocket_is_decided_then_relayed,
    ),
    (
        "explicit_proxy_connect_and_absolute_form",
        explicit_proxy_connect_and_absolute_form,
    ),
    (
        "udp_from_tagged_is_refused_untagged_arrives",
        udp_from_tagged_is_refused_untagged_arrives,
    ),
    (
        "dns_allowed_resolves_blocked_answered_locally_each_audited",
        dns::allowed_resolves_blocked_answered_locally_each_audited,
    ),
    (
        "dns_glibc_resolver_accepts_redirected_answers",
        dns::glibc_resolver_accepts_redirected_answers,
    ),
    (
        "dns_over_tcp_large_answers_and_pipelining",
        dns::over_tcp_large_answers_and_pipelining,
    ),
    (
        "dns_refused_answer_modes_under_glibc_and_curl",
        dns::refused_answer_modes_under_glibc_and_curl,
    ),
    (
        "dns_one_agent_flooding_does_not_starve_another",
        dns::one_agent_flooding_does_not_starve_another,
    ),
    (
        "raw_and_packet_sockets_of_a_tagged_root_process_are_refused_and_recorded",
        kernel::raw_and_packet_sockets_of_a_tagged_root_process_are_refused_and_recorded,
    ),
    (
        "icmp_ping_sockets_of_a_tagged_process_are_refused",
        kernel::icmp_ping_sockets_of_a_tagged_process_are_refused,
    ),
    (
        "other_ways_to_connect_are_captured_too",
        kernel::other_ways_to_connect_are_captured_too,
    ),
    (
        "tagging_the_daemons_cgroup_is_refused",
        kernel::tagging_the_daemons_cgroup_is_refused,
    ),
    (
        "a_tagged_listener_is_unreachable_from_another_host_unless_its_profile_serves",
        kernel::a_tagged_listener_is_unreachable_from_another_host_unless_its_profile_serves,
    ),
    (
        "getpeername_reports_the_original_destination",
        kernel::getpeername_reports_the_original_destination,
    ),
    (
        "a_connect_straight_to_the_proxy_is_recorded_with_its_agent",
        kernel::a_connect_straight_to_the_proxy_is_recorded_with_its_agent,
    ),
    (
        "origins_are_keyed_by_the_full_local_address",
        kernel::origins_are_keyed_by_the_full_local_address,
    ),
    (
        "exec_starts_no_agent_a_stopped_daemon_cannot_register",
        kernel::exec_starts_no_agent_a_stopped_daemon_cannot_register,
    ),
    (
        "kernel_refusals_are_rate_bounded_and_counted",
        kernel::kernel_refusals_are_rate_bounded_and_counted,
    ),
    (
        "a_tagged_process_with_the_dead_daemons_pid_is_not_exempt",
        kernel::a_tagged_process_with_the_dead_daemons_pid_is_not_exempt,
    ),
    (
        "one_audit_record_per_request_and_verify_passes",
        one_audit_record_per_request_and_verify_passes,
    ),
    (
        "agent_runs_unprivileged_without_capabilities",
        agent::runs_unprivileged_without_capabilities,
    ),
    (
        "exec_runs_the_command_in_its_own_cgroup_and_passes_its_exit_on",
        agent::exec_runs_the_command_in_its_own_cgroup_and_passes_its_exit_on,
    ),
    (
        "agent_ignoring_sigterm_is_killed_whole_after_the_stop_timeout",
        agent::ignoring_sigterm_is_killed_whole_after_the_stop_timeout,
    ),
    (
        "agent_killing_its_cgroup_ends_a_run_at_once",
        agent::killing_its_cgroup_ends_a_run_at_once,
    ),
    (
        "agent_root_agent_that_left_its_cgroup_is_killed_with_its_run",
        agent::root_agent_that_left_its_cgroup_is_killed_with_its_run,
    ),
    (
        "agent_ending_on_sigterm_keeps_its_status_within_the_stop_timeout",
        agent::ending_on_sigterm_keeps_its_status_within_the_stop_timeout,
    ),
    (
        "agent_ctrl_c_is_the_agents_to_handle",
        agent::ctrl_c_is_the_agents_to_handle,
    ),
    (
        "agent_cannot_escape_read_keys_or_stop_the_daemon",
        agent::cannot_escape_read_keys_or_stop_the_daemon,
    ),
    (
        "agent_cannot_reach_processes_of_its_user_outside_its_run",
        agent::cannot_reach_processes_of_its_user_outside_its_run,
    ),
    (
        "exec_cgroup_abandoned_before_registration_is_removed",
        agent::abandoned_exec_cgroup_is_removed,
    ),
    (
        "agent_cannot_reach_processes_of_its_user_by_other_names",
        agent::cannot_reach_processes_of_its_user_by_other_names,
    ),
    (
        "agent_cannot_type_into_the_terminal_it_shares",
        agent::cannot_type_into_the_terminal_it_shares,
    ),
    (
        "agent_terminal_handed_out_is_dead_after_the_run",
        terminal::agent_terminal_handed_out_is_dead_after_the_run,
    ),
    (
        "agent_ctrl_c_typed_at_the_terminal_reaches_the_agent",
        terminal::agent_ctrl_c_typed_at_the_terminal_reaches_the_agent,
    ),
    (
        "agent_output_arrives_whole_and_the_terminal_is_restored",
        terminal::agent_output_arrives_whole_and_the_terminal_is_restored,
    ),
    (
        "agent_sees_the_operators_window_size_and_its_changes",
        terminal::agent_sees_the_operators_window_size_and_its_changes,
    ),
    (
        "agent_ctrl_z_stops_the_agent_and_exec_continues_it",
        terminal::agent_ctrl_z_stops_the_agent_and_exec_continues_it,
    ),
    (
        "agent_started_in_the_background_gets_the_terminal_on_fg",
        terminal::agent_started_in_the_background_gets_the_terminal_on_fg,
    ),
    (
        "agent_sudo_caller_root_refusal_and_allow_root",
        agent::sudo_caller_root_refusal_and_allow_root,
    ),
    (
        "agent_published_bundle_is_readable_keys_are_not",
        agent::published_bundle_is_readable_keys_are_not,
    ),
    (
        "trust_variables_replace_inherited_values",
        agent::trust_variables_replace_inherited_values,
    ),
    (
        "trust_every_runtime_trusts_the_enforcer_ca",
        agent::every_runtime_trusts_the_enforcer_ca,
    ),
    (
        "trust_a_client_refusing_the_certificate_is_recorded",
        agent::a_client_refusing_the_certificate_is_recorded,
    ),
    (
        "upstream_trust_comes_from_the_system_store",
        agent::upstream_trust_comes_from_the_system_store,
    ),
    (
        "ops_status_reports_the_daemon",
        ops::status_reports_the_daemon,
    ),
    (
        "ops_metrics_pass_promtool_and_prometheus_scrapes_them",
        ops::metrics_pass_promtool_and_prometheus_scrapes_them,
    ),
    (
        "ops_notify_ready_watchdog_reload_stopping",
        ops::notify_ready_watchdog_reload_stopping,
    ),
    (
        "ops_glob_profiles_tag_cgroups_as_they_appear",
        ops::glob_profiles_tag_cgroups_as_they_appear,
    ),
    (
        "ops_setup_errors_name_what_is_missing",
        ops::setup_errors_name_what_is_missing,
    ),
    (
        "ops_the_units_capabilities_suffice_and_each_is_needed",
        ops::the_units_capabilities_suffice_and_each_is_needed,
    ),
    ("sdk_openai_python", sdk::openai_python_sdk),
    (
        "sdk_openai_realtime_python",
        sdk::openai_realtime_python_sdk,
    ),
    ("sdk_anthropic_python", sdk::anthropic_python_sdk),
    ("sdk_mcp_python", sdk::mcp_python_sdk),
    ("sdk_node_fetch", sdk::node_fetch),
    (
        "sdk_review_holds_a_streamed_tool_call_until_approved_or_denied",
        sdk::review_holds_a_streamed_tool_call_until_approved_or_denied,
    ),
    ("sdk_audit_verifies", sdk::sdk_audit_verifies),
    (
        "conform_h2_expect_100_continue_curl_and_node",
        conform::h2_expect_100_continue_curl_and_node,
    ),
    (
        "conform_agent_clis_and_sdks_read_blocks_as_policy_refusals",
        conform::agent_clis_and_sdks_read_blocks_as_policy_refusals,
    ),
    (
        "conform_default_policy_runs_the_agent_clis_without_rewrites",
        conform::default_policy_runs_the_agent_clis_without_rewrites,
    ),
    (
        "conform_agent_clis_run_a_proposed_command_without_a_proposal_rule",
        conform::agent_clis_run_a_proposed_command_without_a_proposal_rule,
    ),
    (
        "conform_agent_clis_proposed_exfiltration_is_refused_at_the_proposal",
        conform::agent_clis_proposed_exfiltration_is_refused_at_the_proposal,
    ),
    ("policy_reload_on_sighup", reload::sighup_reloads_the_policy),
    (
        "sessions_review_approved_through_the_cli_is_forwarded_once",
        sessions::review_approved_through_the_cli_is_forwarded_once,
    ),
    (
        "sessions_review_denied_never_reaches_the_upstream_and_times_out_to_a_block",
        sessions::review_denied_never_reaches_the_upstream_and_times_out_to_a_block,
    ),
    (
        "sessions_review_cannot_be_answered_by_the_agent_it_holds",
        sessions::review_cannot_be_answered_by_the_agent_it_holds,
    ),
    (
        "sessions_review_approved_through_the_webhook_link",
        sessions::review_approved_through_the_webhook_link,
    ),
    (
        "sessions_customer_data_then_no_egress",
        sessions::session_customer_data_then_no_egress,
    ),
    (
        "sessions_query_budget_per_hour",
        sessions::session_query_budget_per_hour,
    ),
    (
        "sessions_no_external_mail_right_after_the_inbox",
        sessions::session_no_external_mail_right_after_the_inbox,
    ),
    (
        "sessions_list_shows_a_live_run_and_forgets_it_when_it_ends",
        sessions::session_list_shows_a_live_run_and_forgets_it_when_it_ends,
    ),
    (
        "sessions_role_of_the_sudo_caller_decides_and_profiles_are_restricted",
        sessions::role_of_the_sudo_caller_decides_and_profiles_are_restricted,
    ),
    (
        "sessions_trace_decrypts_with_its_key_only_and_a_swap_is_caught",
        sessions::trace_decrypts_with_its_key_only_and_a_swap_is_caught,
    ),
    (
        "sessions_restore_the_harness_configuration",
        sessions::sessions_restore_the_harness_configuration,
    ),
    (
        "a_killed_daemon_fails_closed_until_restarted",
        a_killed_daemon_fails_closed_until_restarted,
    ),
    (
        "daemon_stops_cleanly_on_sigterm",
        daemon_stops_cleanly_on_sigterm,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<&Test> = TESTS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    let filtered_out = TESTS.len() - selected.len();
    let started = Instant::now();

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var_os("CI").is_some() {
            println!("\nrunning e2e: the privileged end-to-end tests need root and CI is set");
            println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n");
            return ExitCode::FAILURE;
        }
        println!(
            "\nskipping the privileged end-to-end tests: not root (they run as root, and in CI)"
        );
        println!("test result: ok. 0 passed; 0 failed; {} ignored; 0 measured; 0 filtered out; finished in 0.00s\n", TESTS.len());
        return ExitCode::SUCCESS;
    }
    if selected.is_empty() {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in 0.00s\n");
        return ExitCode::SUCCESS;
    }

    println!("\nrunning {} tests", selected.len() + 1);
    let mut env = match Env::start() {
        Ok(env) => env,
        Err(err) => {
            println!("test e2e_environment ... FAILED\n\nthe end-to-end environment did not come up: {err}");
            println!("\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {:.2}s\n", started.elapsed().as_secs_f64());
            return ExitCode::FAILURE;
        }
    };
    let id = env.id;
    if let Some(err) = &env.daemon_error {
        eprintln!("e2e: the daemon did not start; tests that need it will fail:\n{err}");
    }
    let mut passed = 0;
    let mut failed = Vec::new();
    for (name, test) in selected {
        let result = catch_unwind(AssertUnwindSafe(|| test(&mut env)));
        if result.is_ok() {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            // At once: later tests restart the daemon and add to both logs, and a flake's cause is in what came
            // just before its failure.
            eprintln!(
                "---- {name}: daemon log (tail) ----\n{}",
                env.daemon_log_tail()
            );
            eprintln!(
                "---- {name}: upstream log (tail) ----\n{}",
                env.upstream_log_tail()
            );
            failed.push(*name);
        }
    }
    drop(env);
    let left = harness::leftovers(id);
    if left.is_empty() {
        println!("test cleanup_leaves_nothing_behind ... ok");
        passed += 1;
    } else {
        println!("test cleanup_leaves_nothing_behind ... FAILED\n  left behind: {left:?}");
        failed.push("cleanup_leaves_nothing_behind");
    }

    let elapsed = started.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!("\ntest result: ok. {passed} passed; 0 failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {elapsed:.2}s\n");
        ExitCode::SUCCESS
    } else {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
        println!("\ntest result: FAILED. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {elapsed:.2}s\n", failed.len());
        ExitCode::FAILURE
    }
}

/// A path nobody else uses, so counts and audit records belong to exactly one request.
fn unique(prefix: &str, tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}/{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The four client variants: HTTP version flag × address family.
const VARIANTS: [(&str, bool); 4] = [
    ("--http1.1", false),
    ("--http2", false),
    ("--http1.1", true),
    ("--http2", true),
];

fn variant_tag(http: &str, v6: bool) -> String {
    format!(
        "{}-{}",
        http.trim_start_matches("--"),
        if v6 { "v6" } else { "v4" }
    )
}

/// The audit records of requests for `path` (`request.path`, query excluded).
fn records_for(env: &Env, path: &str) -> Vec<serde_json::Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["request"]["path"].as_str() == Some(path))
        .collect()
}

/// The audit records of raw TCP connections to `port`.
fn tcp_records(env: &Env, port: u16) -> usize {
    env.audit_records()
        .iter()
        .filter(|r| r["request"]["scheme"] == "tcp" && r["request"]["port"] == port)
        .count()
}

/// Check one record's decision and outcome: (verdict, deciding rule, disposition).
fn assert_record(rec: &serde_json::Value, verdict: &str, rule: Option<&str>, disposition: &str) {
    assert_eq!(rec["decision"]["verdict"], verdict, "{rec}");
    if let Some(rule) = rule {
        assert_eq!(rec["decision"]["rule"], rule, "{rec}");
    }
    assert_eq!(rec["outcome"]["disposition"], disposition, "{rec}");
    assert_eq!(rec["agent"]["profile"], harness::PROFILE, "{rec}");
}

fn mentions(v: &serde_json::Value, needle: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s == needle,
        serde_json::Value::Array(a) => a.iter().any(|x| mentions(x, needle)),
        serde_json::Value::Object(o) => o.values().any(|x| mentions(x, needle)),
        _ => false,
    }
}

// ---- tests ----

/// The harness itself: the netns host answers HTTPS (test CA) and HTTP directly on IPv4 and IPv6.
fn netns_upstream_reachable_untagged(env: &mut Env) {
    let ca = env.test_ca.display().to_string();
    for v6 in [false, true] {
        let path = unique("/allowed", "untagged-direct");
        let url = format!("https://{API_HOST}{path}");
        let out = env.curl_untagged(&[
            "--cacert",
            &ca,
            "--resolve",
            &env.resolve(API_HOST, 443, v6),
            &url,
        ]);
        assert_eq!((out.code, out.status), (0, 200), "{out:?}");
        assert!(
            out.body
                .contains(&format!("upstream ok: GET {path} host={API_HOST}")),
            "{out:?}"
        );
        assert_eq!(env.upstream_count(&path), 1);
    }
    let out = env.curl_untagged(&[&format!("http://[{}]/allowed/plain-direct", env.v6)]);
    assert_eq!(out.status, 200, "{out:?}");
    sse_event_by_event(
        env,
        Command::new("curl"),
        "--http1.1",
        "untagged",
        &["--cacert", &ca],
    );
    // The untrusted-certificate server answers TLS, with a certificate the test CA does not vouch for.
    let bad = format!("https://{BAD_HOST}:{BAD_TLS_PORT}/allowed/x");
    let out = env.curl_untagged(&[
        "--cacert",
        &ca,
        "--resolve",
        &env.resolve(BAD_HOST, BAD_TLS_PORT, false),
        &bad,
    ]);
    assert_eq!(out.code, 60, "{out:?}");
    let out = env.curl_untagged(&[
        "-k",
        "--resolve",
        &env.resolve(BAD_HOST, BAD_TLS_PORT, true),
        &bad,
    ]);
    assert_eq!(out.status, 200, "{out:?}");
    for port in [ECHO_ALLOWED, ECHO_BLOCKED] {
        let (code, out, err) = run(&["python3", "-c", TCP_CLIENT, &env.v6, &port.to_string()]);
        assert_eq!(
            (code, out.trim()),
            (0, "RECV ping-e2e"),
            "echo {port}: {err}"
        );
    }
}

fn allowed_https_reaches_upstream(env: &mut Env) {
    env.need_daemon();
    for (http, v6) in VARIANTS {
        let path = unique("/allowed", &variant_tag(http, v6));
        let url = format!("https://{API_HOST}{path}");
        let out = env.curl_tagged(&[
            "-v",
            http,
            "--resolve",
            &env.resolve(API_HOST, 443, v6),
            &url,
        ]);
        assert_eq!((out.code, out.status), (0, 200), "{http} v6={v6}: {out:?}");
        assert!(
            out.body
                .contains(&format!("upstream ok: GET {path} host={API_HOST}")),
            "{http} v6={v6}: {out:?}"
        );
        if http == "--http2" {
            assert!(
                out.stderr.contains("< HTTP/2 200"),
                "h2 was not negotiated with the proxy: {}",
                out.stderr
            );
        }
        assert_eq!(env.upstream_count(&path), 1, "{http} v6={v6}");
        let recs = records_for(env, &path);
        assert_eq!(recs.len(), 1, "{http} v6={v6}: audit records {recs:?}");
        assert_record(&recs[0], "allow", Some("e2e-allow-api"), "forwarded");
    }
}

fn allowed_plain_http_reaches_upstream(env: &mut Env) {
    env.need_daemon();
    for v6 in [false, true] {
        let path = unique("/allowed", if v6 { "plain-v6" } else { "plain-v4" });
        let url = format!("http://{API_HOST}{path}");
        let out = env.curl_tagged(&["--resolve", &env.resolve(API_HOST, 80, v6), &url]);
        assert_eq!((out.code, out.status), (0, 200), "v6={v6}: {out:?}");
        assert!(
            out.body.contains(&format!("upstream ok: GET {path}")),
            "{out:?}"
        );
        assert_eq!(env.upstream_count(&path), 1);
        let recs = records_for(env, &path);
        assert_eq!(recs.len(), 1, "v6={v6}: audit records {recs:?}");
        assert_record(&recs[0], "allow", Some("e2e-allow-api"), "forwarded");
        assert_eq!(recs[0]["request"]["scheme"], "http", "{}", recs[0]);
    }
}

/// Plain HTTP has no certificate to bind the Host to the address: the daemon binds it through `static_hosts`. The
/// policy allows the v4-only name; at the IPv4 address it is forwarded, at the IPv6 address (where it does not live)
/// it is a spoofed Host: 421, audited as host_mismatch, never forwarded.
fn spoofed_plain_http_host_gets_421_and_never_reaches_upstream(env: &mut Env) {
    env.need_daemon();
    for v6 in [false, true] {
        let path = unique("/allowed", if v6 { "spoof-v6" } else { "pinned-v4" });
        let url = format!("http://{V4_ONLY_HOST}{path}");
        let out = env.curl_tagged(&["--resolve", &env.resolve(V4_ONLY_HOST, 80, v6), &url]);
        let recs = records_for(env, &path);
        assert_eq!(recs.len(), 1, "v6={v6}: audit records {recs:?}");
        if v6 {
            assert_eq!((out.code, out.status), (0, 421), "{out:?}");
            assert!(!out.body.contains("upstream ok"), "{out:?}");
            assert_eq!(
                env.upstream_count(&path),
                0,
                "a spoofed Host reached the upstream"
            );
            assert_record(&recs[0], "block", None, "blocked");
            assert_eq!(recs[0]["outcome"]["status"], 421, "{}", recs[0]);
            assert_eq!(recs[0]["outcome"]["error"], "host_mismatch", "{}", recs[0]);
        } else {
            assert_eq!((out.code, out.status), (0, 200), "{out:?}");
            assert_eq!(env.upstream_count(&path), 1);
            assert_record(&recs[0], "allow", Some("e2e-allow-v4only"), "forwarded");
        }
    }
}

/// The e2e policy plus a block on the upstream's own addresses (by `host:`, the only way a rule names one) and an
/// allow for one path on any host: only the spelling of the address can tell the two apart.
fn address_block_policy(env: &Env) -> String {
    let base = std::fs::read_to_string(harness::repo_root().join("tests/e2e/policy.yaml"))
        .unwrap_or_else(|e| panic!("read tests/e2e/policy.yaml: {e}"));
    format!(
        "{base}\
         \x20 - id: e2e-block-upstream-address\n    when: {{ host: [\"{v4}\", \"{v6}\"] }}\n    verdict: block\n\
         \x20   message: the upstream's address is blocked\n\
         \x20 - id: e2e-allow-anyhost\n    when: {{ path: \"/anyhost/**\" }}\n    verdict: allow\n",
        v4 = env.v4,
        v6 = env.v6,
    )
}

/// A request to an address is decided on that address however the client spells it: a rule blocking the upstream's
/// IPv4 and IPv6 addresses refuses plain HTTP naming them as an IPv4-mapped IPv6 literal, a decimal or hexadecimal
/// number, octal parts, a shortened form or an uncompressed upper-case IPv6 literal (transparent, and absolute-form
/// through the explicit proxy), and the record names the address in its one spelling. (Before, each of these was
/// bound to the destination — as an IP literal, or by `getaddrinfo` reading the number — and decided on the
/// spelling, which no rule named: allowed and forwarded.)
fn ip_literal_hosts_are_decided_as_their_address(env: &mut Env) {
    env.need_daemon();
    let original = env.config.clone();
    let policy = env.dir.path().join("address-block-policy.yaml");
    std::fs::write(&policy, address_block_policy(env)).unwrap_or_else(|e| panic!("write: {e}"));
    let config = env
        .config_with_policy(&policy, "enforcer-address-block.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    env.restart_daemon(config)
        .unwrap_or_else(|e| panic!("restart: {e}"));
    let v4: std::net::Ipv4Addr = env.v4.parse().unwrap_or_else(|e| panic!("v4: {e}"));
    let v6: std::net::Ipv6Addr = env.v6.parse().unwrap_or_else(|e| panic!("v6: {e}"));
    let [a, b, c, d] = v4.octets();
    let full_v6 = v6
        .segments()
        .iter()
        .map(|s| format!("{s:04X}"))
        .collect::<Vec<_>>()
        .join(":");
    let v4_hosts = [
        env.v4.clone(),
        format!("[::ffff:{v4}]"),
        format!(
            "[::FFFF:{:x}:{:x}]",
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d])
        ),
        u32::from(v4).to_string(),
        format!("{:#x}", u32::from(v4)),
        format!("0{a:o}.0{b:o}.{c}.0x{d:x}"),
        format!("{a}.{}", u32::from_be_bytes([0, b, c, d])),
    ];
    let v6_hosts = [format!("[{v6}]"), format!("[{full_v6}]")];
    let cases = v4_hosts
        .iter()
        .map(|h| (h, &env.v4, format!("http://{}", env.v4)))
        .chain(
            v6_hosts
                .iter()
                .map(|h| (h, &env.v6, format!("http://[{}]", env.v6))),
        );
    let mut misdecided = Vec::new();
    for (i, (host, canonical, base)) in cases.enumerate() {
        let path = unique("/anyhost", &format!("spelling-{i}"));
        let out = env.curl_tagged(&["-H", &format!("Host: {host}"), &format!("{base}{path}")]);
        let reached = env.upstream_count(&path);
        let recs = records_for(env, &path);
        let blocked = (out.code, out.status) == (0, 403)
            && out.body.contains("the upstream's address is blocked")
            && reached == 0
            && recs.len() == 1
            && recs[0]["decision"]["rule"] == "e2e-block-upstream-address"
            && recs[0]["outcome"]["disposition"] == "blocked"
            && recs[0]["request"]["host"] == canonical.as_str();
        if !blocked {
            misdecided.push(format!(
                "Host: {host}: status {} (curl {}), upstream saw {reached}, records {recs:?}",
                out.status, out.code
            ));
        }
    }
    assert!(
        misdecided.is_empty(),
        "decided on the spelling, not the address:\n{}",
        misdecided.join("\n")
    );
    // The explicit proxy resolves an absolute-form target itself: the mapped spelling is still the address.
    let proxy = format!("http://127.0.0.1:{}", env.explicit_port);
    let path = unique("/anyhost", "explicit-mapped");
    let out = env.curl_untagged(&["-x", &proxy, &format!("http://[::ffff:{v4}]{path}")]);
    assert_eq!((out.code, out.status), (0, 403), "{out:?}");
    assert_eq!(
        env.upstream_count(&path),
        0,
        "the explicit request reached the upstream"
    );
    let recs = records_for(env, &path);
    assert_eq!(recs.len(), 1, "audit records {recs:?}");
    assert_eq!(
        recs[0]["decision"]["rule"], "e2e-block-upstream-address",
        "{}",
        recs[0]
    );
    assert_eq!(recs[0]["request"]["host"], env.v4.as_str(), "{}", recs[0]);
    // Control: the allowed path on a name is still forwarded under this policy.
    let path = unique("/anyhost", "name");
    let url = format!("http://{API_HOST}{path}");
    let out = env.curl_tagged(&["--resolve", &env.resolve(API_HOST, 80, false), &url]);
    assert_eq!((out.code, out.status), (0, 200), "{out:?}");
    assert_eq!(env.upstream_count(&path), 1);
    env.assert_audit_verifies();
    env.restart_daemon(original)
        .unwrap_or_else(|e| panic!("restart: {e}"));
}

/// A WebSocket upgrade is a request like any other: decided and audited, then (allowed) relayed both ways message
/// by message, each message from the agent decided and recorded too (linked to the upgrade's record), or (blocked)
/// answered 403 without reaching the upstream. The client is a tagged Python script speaking RFC 6455 itself
/// (tests/e2e/ws_client.py).
fn websocket_is_decided_then_relayed(env: &mut Env) {
    env.need_daemon();
    let script = env.script("ws_client.py");
    let script = script.as_str();
    for allowed in [true, false] {
        let path = unique(if allowed { "/allowed" } else { "/blocked" }, "websocket");
        let (code, out, err) =
            env.exec_tagged(&["python3", script, &env.v4, API_HOST, &path, "one", "two"]);
        assert_eq!(
            code, 0,
            "ws client: {out}
{err}"
        );
        let recs = records_for(env, &path);
        if allowed {
            assert_eq!(out, "STATUS 101\nRECV echo: one\nRECV echo: two\n", "{err}");
            assert_eq!(env.upstream_count(&path), 1);
            assert_eq!(recs.len(), 3, "the upgrade and each message: {recs:?}");
            assert_record(&recs[0], "allow", Some("e2e-allow-api"), "forwarded");
            for (rec, message) in recs[1..].iter().zip(["one", "two"]) {
                assert_record(rec, "allow", Some("e2e-allow-api"), "forwarded");
                assert_eq!(rec["request"]["parent"], recs[0]["seq"], "{rec}");
                assert_eq!(rec["request"]["phase"], "request", "{rec}");
                assert_eq!(rec["request"]["body_size"], message.len(), "{rec}");
            }
        } else {
            assert_eq!(recs.len(), 1, "audit records {recs:?}");
            assert_eq!(out, "STATUS 403\n", "{err}");
            assert_eq!(
                env.upstream_count(&path),
                0,
                "a blocked upgrade reached the upstream"
            );
            assert_record(&recs[0], "block", Some("e2e-block-path"), "blocked");
        }
    }
}

/// Explicit proxy mode, for hosts without eBPF: an untagged curl told to use the listener (`-x`) is decided and
/// audited like a captured agent, under the listener's profile. HTTPS goes through CONNECT (the daemon resolves the
/// target through its `static_hosts` pins and intercepts the tunnel with its own CA); plain HTTP is absolute-form.
fn explicit_proxy_connect_and_absolute_form(env: &mut Env) {
    env.need_daemon();
    let proxy = format!("http://127.0.0.1:{}", env.explicit_port);
    let bundle = env.dir.path().join("state/public/bundle.pem");
    let bundle = bundle.to_str().unwrap_or_default();
    for (scheme, allowed) in [("https", true), ("https", false), ("http", true)] {
        let tag = format!("explicit-{scheme}");
        let path = unique(if allowed { "/allowed" } else { "/blocked" }, &tag);
        let url = format!("{scheme}://{API_HOST}{path}");
        let out = env.curl_untagged(&["-x", &proxy, "--cacert", bundle, &url]);
        let recs = records_for(env, &path);
        assert_eq!(recs.len(), 1, "{url}: audit records {recs:?}");
        if allowed {
            assert_eq!((out.code, out.status), (0, 200), "{url}: {out:?}");
            assert!(
                out.body.contains(&format!("upstream ok: GET {path}")),
                "{out:?}"
            );
            assert_eq!(env.upstream_count(&path), 1);
            assert_record(&recs[0], "allow", Some("e2e-allow-api"), "forwarded");
        } else {
            assert_eq!((out.code, out.status), (0, 403), "{url}: {out:?}");
            assert_eq!(
                env.upstream_count(&path),
                0,
                "blocked request reached the upstream"
            );
            assert_record(&recs[0], "block", Some("e2e-block-path"), "blocked");
        }
        assert_eq!(recs[0]["request"]["scheme"], scheme, "{}", recs[0]);
    }
}

fn blocked_gets_403_and_never_reaches_upstream(env: &mut Env) {
    env.need_daemon();
    for (http, v6) in VARIANTS {
        let path = unique("/blocked", &variant_tag(http, v6));
        let url = format!("https://{API_HOST}{path}");
        let out = env.curl_tagged(&[http, "--resolve", &env.resolve(API_HOST, 443, v6), &url]);
        assert_eq!((out.code, out.status), (0, 403), "{http} v6={v6}: {out:?}");
        let body: serde_json::Value = serde_json::from_str(&out.body)
            .unwrap_or_else(|e| panic!("403 body is not JSON ({e}): {:?}", out.body));
        assert!(
            mentions_substring(&body, "e2e-block-path"),
            "403 body does not name the rule: {body}"
        );
        assert!(!out.body.contains("upstream ok"), "{out:?}");
        assert_eq!(
            env.upstream_count(&path),
            0,
            "blocked request reached the upstream"
        );
        let recs = records_for(env, &path);
        assert_eq!(recs.len(), 1, "{http} v6={v6}: audit records {recs:?}");
        assert_record(&recs[0], "block", Some("e2e-block-path"), "blocked");
    }
    // A host no rule allows falls to the default block and never reaches the upstream either.
    let path = unique("/anything", "unknown-host");
    let url = format!("https://unknown.e2e.test{path}");
    let out = env.curl_tagged(&[
        "--resolve",
        &env.resolve("unknown.e2e.test", 443, false),
        &url,
    ]);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(env.upstream_count(&path), 0);
}

fn mentions_substring(v: &serde_json::Value, needle: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(needle),
        serde_json::Value::Array(a) => a.iter().any(|x| mentions_substring(x, needle)),
        serde_json::Value::Object(o) => o.values().any(|x| mentions_substring(x, needle)),
        _ => false,
    }
}

/// Tagged, the client sees the enforcer's certificate; untagged, the same request sees the upstream's own.
fn untagged_request_is_not_intercepted(env: &mut Env) {
    env.need_daemon();
    let enforcer_ca = env.dir.path().join("state/public/ca.pem");
    assert!(
        enforcer_ca.exists(),
        "no enforcer CA at {}",
        enforcer_ca.display()
    );
    let enforcer_ca = enforcer_ca.display().to_string();
    let test_ca = env.test_ca.display().to_string();
    for v6 in [false, true] {
        let resolve = env.resolve(API_HOST, 443, v6);
        let path = unique("/allowed", "untagged");
        let url = format!("https://{API_HOST}{path}");
        // Untagged: trusting only the test CA works (the upstream's own certificate) ...
        let out = env.curl_untagged(&["--cacert", &test_ca, "--resolve", &resolve, &url]);
        assert_eq!(
            (out.code, out.status),
            (0, 200),
            "untagged v6={v6}: {out:?}"
        );
        // ... and trusting only the enforcer CA fails: nothing intercepted it.
        let out = env.curl_untagged(&["--cacert", &enforcer_ca, "--resolve", &resolve, &url]);
        assert_eq!(
            out.code, 60,
            "untagged request was intercepted? v6={v6}: {out:?}"
        );
        // Tagged, the reverse: the enforcer's leaf, which the test CA alone does not verify.
        let out = env.curl_tagged(&["--cacert", &enforcer_ca, "--resolve", &resolve, &url]);
        assert_eq!((out.code, out.status), (0, 200), "tagged v6={v6}: {out:?}");
        let out = env.curl_tagged(&["--cacert", &test_ca, "--resolve", &resolve, &url]);
        assert_eq!(
            out.code, 60,
            "tagged request was not intercepted? v6={v6}: {out:?}"
        );
        // Exactly the two requests that verified reached the upstream.
        assert_eq!(env.upstream_count(&path), 2, "v6={v6}");
    }
}

/// The upstream sends event 2 only after the test saw event 1 arrive at the client through the proxy.
fn sse_arrives_event_by_event(env: &mut Env) {
    env.need_daemon();
    for (i, http) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let mut cmd = env.exec_command();
        cmd.arg("curl");
        sse_event_by_event(env, cmd, http, &format!("tagged-{i}"), &[]);
    }
}

/// Stream `/sse` with curl (`cmd` is the command up to and including `curl`) and check that event 1 reaches the
/// client before the upstream is allowed to send event 2, and that event 2 follows once released.
fn sse_event_by_event(env: &Env, mut cmd: Command, http: &str, tag: &str, extra: &[&str]) {
    let id = format!("sse-{}-{tag}", env.id);
    let url = format!("https://{API_HOST}/sse?id={id}");
    let mut child = cmd
        .args(["-sS", "-N", "--max-time", "40", http])
        .args(extra)
        .args(["--resolve", &env.resolve(API_HOST, 443, false), &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn curl: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str, timeout: Duration| -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(what);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("{tag} {http}: {what:?} did not arrive within {timeout:?}; saw {seen:?}");
    };
    let first = wait_for("data: first", Duration::from_secs(20));
    assert!(
        !first
            .iter()
            .any(|l| l.contains("second") || l.contains("timeout")),
        "{tag} {http}: {first:?}"
    );
    env.release_sse(&id);
    let second = wait_for("data: ", Duration::from_secs(20));
    assert!(
        second.iter().any(|l| l == "data: second"),
        "{tag} {http}: {second:?}"
    );
    let status = child.wait().unwrap_or_else(|e| panic!("wait curl: {e}"));
    assert!(status.success(), "{tag} {http}: curl exited {status}");
}

fn bad_upstream_certificate_is_blocked_and_audited(env: &mut Env) {
    env.need_daemon();
    let path = unique("/allowed", "bad-cert");
    let url = format!("https://{BAD_HOST}:{BAD_TLS_PORT}{path}");
    // Sanity: the upstream really serves there (untagged, trusting nothing → certificate error, not refusal).
    let out = env.curl_untagged(&[
        "--resolve",
        &env.resolve(BAD_HOST, BAD_TLS_PORT, false),
        &url,
    ]);
    assert_eq!(out.code, 60, "{out:?}");
    let out = env.curl_tagged(&[
        "--resolve",
        &env.resolve(BAD_HOST, BAD_TLS_PORT, false),
        &url,
    ]);
    assert!(
        out.status != 200 && !out.body.contains("upstream ok"),
        "forwarded despite a bad certificate: {out:?}"
    );
    assert!(out.status == 403 || out.status == 502, "{out:?}");
    assert_eq!(env.upstream_count(&path), 0);
    let recs = records_for(env, &path);
    assert_eq!(recs.len(), 1, "audit records for {path}: {recs:?}");
    assert_eq!(recs[0]["outcome"]["disposition"], "blocked", "{}", recs[0]);
    assert!(
        mentions(&recs[0], "upstream_tls"),
        "no upstream_tls reason: {}",
        recs[0]
    );
}

/// A raw TCP client: sends a line, prints what comes back (`RECV <eof>` when the peer closed).
const TCP_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
try:
    s.sendall(b"ping-e2e\n")
    data = s.recv(100)
    print("RECV " + (data.decode(errors="replace").strip() or "<eof>"))
except Exception as e:
    print("ERR " + type(e).__name__)
"#;

/// Raw TCP (neither TLS nor HTTP): the allowed echo port relays bytes, the blocked one is closed.
fn tcp_allowed_port_relays_blocked_port_closed(env: &mut Env) {
    env.need_daemon();
    for addr in [env.v4.clone(), env.v6.clone()] {
        let before = tcp_records(env, ECHO_ALLOWED);
        let (code, out, err) = env.exec_tagged(&[
            "python3",
            "-c",
            TCP_CLIENT,
            &addr,
            &ECHO_ALLOWED.to_string(),
        ]);
        assert_eq!(
            (code, out.trim()),
            (0, "RECV ping-e2e"),
            "allowed port {addr}: {err}"
        );
        assert_eq!(
            tcp_records(env, ECHO_ALLOWED),
            before + 1,
            "{addr}: one record"
        );
        let before = tcp_records(env, ECHO_BLOCKED);
        let (code, out, err) = env.exec_tagged(&[
            "python3",
            "-c",
            TCP_CLIENT,
            &addr,
            &ECHO_BLOCKED.to_string(),
        ]);
        assert!(
            code == 0
                && (out.trim() == "RECV <eof>" || out.trim().starts_with("ERR ConnectionReset")),
            "blocked port {addr}: code {code} out {out:?} err {err}"
        );
        assert_eq!(
            tcp_records(env, ECHO_BLOCKED),
            before + 1,
            "{addr}: one record"
        );
        // Untagged, the blocked port is a plain echo: it is the enforcer that closed it.
        let (code, out, _) = run(&[
            "python3",
            "-c",
            TCP_CLIENT,
            &addr,
            &ECHO_BLOCKED.to_string(),
        ]);
        assert_eq!((code, out.trim()), (0, "RECV ping-e2e"));
    }
}

/// Sends one datagram to argv[1] (IPv4, IPv6 or IPv4-mapped IPv6) port argv[2] with sendto(), then one with
/// connect() + send(); prints one `ok` or `eperm` per attempt.
const UDP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
out = []
for op in ("sendto", "connect"):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if op == "sendto":
            s.sendto(b"udp-e2e", (host, port))
        else:
            s.connect((host, port))
            s.send(b"udp-e2e")
        out.append("ok")
    except PermissionError:
        out.append("eperm")
print(" ".join(out))
"#;

/// UDP other than DNS never leaves a tagged cgroup (no datagram reaches the netns host), whatever the address
/// family; the same datagrams from an untagged process arrive.
fn udp_from_tagged_is_refused_untagged_arrives(env: &mut Env) {
    env.need_daemon();
    let port = UDP_SINK.to_string();
    let targets = [env.v4.clone(), env.v6.clone(), format!("::ffff:{}", env.v4)];
    let before = env.udp_count(UDP_SINK);
    for addr in &targets {
        let (code, out, err) = env.exec_tagged(&["python3", "-c", UDP_CLIENT, addr, &port]);
        assert_eq!(
            (code, out.trim()),
            (0, "eperm eperm"),
            "tagged {addr}: {err}"
        );
    }
    for addr in &targets {
        let (code, out, err) = run(&["python3", "-c", UDP_CLIENT, addr, &port]);
        assert_eq!((code, out.trim()), (0, "ok ok"), "untagged {addr}: {err}");
    }
    // Only the untagged datagrams (two per target) arrive; the tagged ones were sent first and never left.
    let want = before + 2 * targets.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.udp_count(UDP_SINK) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.udp_count(UDP_SINK), want, "datagrams received");
}

fn run(cmd: &[&str]) -> (i32, String, String) {
    match Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (-1, String::new(), e.to_string()),
    }
}

fn one_audit_record_per_request_and_verify_passes(env: &mut Env) {
    env.need_daemon();
    let resolve = env.resolve(API_HOST, 443, false);
    let allowed = unique("/allowed", "audit");
    let blocked = unique("/blocked", "audit");
    for (path, status) in [(&allowed, 200), (&blocked, 403)] {
        let out = env.curl_tagged(&["--resolve", &resolve, &format!("https://{API_HOST}{path}")]);
        assert_eq!(out.status, status, "{out:?}");
        let recs = records_for(env, path);
        assert_eq!(recs.len(), 1, "audit records for {path}: {recs:?}");
    }
    let rec = &records_for(env, &allowed)[0];
    assert_record(rec, "allow", Some("e2e-allow-api"), "forwarded");
    assert_eq!(rec["request"]["host"], API_HOST, "{rec}");
    // Recorded durably before forwarding, so the upstream's status is not part of the record.
    let rec = &records_for(env, &blocked)[0];
    assert_record(rec, "block", Some("e2e-block-path"), "blocked");
    assert_eq!(rec["outcome"]["status"], 403, "{rec}");
    env.assert_audit_verifies();
}

/// A daemon that dies without shutting down (SIGKILL, a crash, the OOM killer) leaves its programs attached through
/// their pinned links: a tagged agent's connection is still redirected, to a port nobody listens on, so it is
/// refused instead of going out unenforced. Untagged processes are not affected. `enforcer exec` starts no agent
/// while the daemon cannot register it. A restarted daemon replaces the held programs and enforces again.
fn a_killed_daemon_fails_closed_until_restarted(env: &mut Env) {
    env.need_daemon();
    env.kill_daemon().unwrap_or_else(|e| panic!("{e}"));

    let (code, out, err) = env.exec_tagged(&["echo", "the agent ran"]);
    assert_eq!(
        (code, out.as_str()),
        (2, ""),
        "enforcer exec started an agent the dead daemon could not register: {err}"
    );
    assert!(
        err.contains("the agent is not started") && err.contains("the daemon is not running"),
        "{err}"
    );

    // Processes already in the profile's cgroup (here started there directly, as an agent running when the daemon
    // died would be) are refused in the kernel.
    let path = unique("/allowed", "daemon-killed");
    let url = format!("https://{API_HOST}{path}");
    let resolve = env.resolve(API_HOST, 443, false);
    let (code, _, err) = kernel::as_root_in_tagged_cgroup(
        env,
        harness::PROFILE,
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--resolve",
            &resolve,
            &url,
        ],
        |_| {},
    );
    assert_eq!(code, 7, "not refused: {err}");
    assert_eq!(env.upstream_count(&path), 0, "an agent went out unenforced");
    // Untagged processes go where they connect, as always (-k: the upstream's own test certificate).
    let out = env.curl_untagged(&["-k", "--resolve", &resolve, &url]);
    assert_eq!((out.code, out.status), (0, 200), "{out:?}");
    // DNS too: a query to the responder's own address is still redirected, to a listener that is gone.
    let name = "killed.dns.e2e.test";
    let (_, out, err) = kernel::as_root_in_tagged_cgroup(
        env,
        harness::PROFILE,
        &["python3", "-c", DNS_CLIENT, &env.v4, name, "7", "connect"],
        |_| {},
    );
    assert!(
        out.contains("\"error\""),
        "a DNS answer without the daemon: {out} {err}"
    );
    assert_eq!(env.dns_count(name), 0, "DNS went out unenforced");

    let config = env.config.clone();
    env.restart_daemon(config)
        .unwrap_or_else(|e| panic!("restart: {e}"));
    let path = unique("/allowed", "daemon-restarted");
    let url = format!("https://{API_HOST}{path}");
    let out = env.curl_tagged(&["--resolve", &resolve, &url]);
    assert_eq!((out.code, out.status), (0, 200), "{out:?}");
    let recs = records_for(env, &path);
    assert_eq!(recs.len(), 1, "audit records {recs:?}");
    assert_record(&recs[0], "allow", Some("e2e-allow-api"), "forwarded");
    let name = "restarted.dns.e2e.test";
    let (_, out, err) =
        env.exec_tagged(&["python3", "-c", DNS_CLIENT, &env.v4, name, "8", "connect"]);
    assert!(
        out.contains("\"rcode\": 0"),
        "DNS after the restart: {out} {err}"
    );
    assert_eq!(env.dns_count(name), 1);
}

fn daemon_stops_cleanly_on_sigterm(env: &mut Env) {
    env.need_daemon();
    let code = env.stop_daemon().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, Some(0), "enforcer run did not exit 0 on SIGTERM");
    // With the daemon gone, the trail it left still verifies.
    let (ok, out) = env.audit_verify();
    assert!(ok, "enforcer audit verify failed after shutdown: {out}");
}
