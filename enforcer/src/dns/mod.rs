//! The DNS stage: serves the UDP listener (127.0.0.1 and ::1 at `dns.port`) that the kernel programs redirect
//! tagged processes' DNS datagrams to, and DNS over TCP port 53, which the proxy's accept path hands over
//! ([`serve_tcp`]). It owns the DNS wire format (`wire`, over hickory-proto: header, one question and an OPT record
//! are read; nothing else is trusted or kept), the per-query decision ([`Policy::evaluate`] on an [`Action`] with
//! scheme `dns`), the audit record (one per query, written before anything leaves the host; a detector hit in the
//! name is redacted as for every host), how a refused name is answered (the policy's `dns.refused_answer`), the
//! forwarding of allowed queries to one upstream resolver (`upstream`), and the per-agent shares of queries in
//! flight (`admission`). It does not own which names may resolve (policy) nor who sent the query (capture, through
//! an [`OriginLookup`] keyed by the datagram's source, or the proxy's for a TCP connection).
//!
//! What goes upstream is rebuilt from the parsed question (id, RD/CD flags, the question as sent, and an EDNS OPT
//! record without options when the client sent one), so no other byte of the client's message leaves the host.
//! A refused name is answered locally (NXDOMAIN, REFUSED, or a synthetic answer pointing at a stand-in address the
//! proxy refuses: [`is_synthetic`], [`stand_in_decision`]), malformed queries get FORMERR, other opcodes NOTIMP,
//! upstream failures SERVFAIL; responses sent to the listener and messages too short to carry an id are dropped.
//! A UDP answer larger than the client takes is replaced by a truncated one (TC), and the client's retry over TCP
//! is forwarded over TCP, so large answers arrive whole. Bounded: each agent (cgroup) has a share of at most
//! `max_in_flight_per_agent` queries in flight, all agents together `max_in_flight` (UDP datagrams beyond it are
//! dropped and clients retry; a TCP connection waits), and `timeout` per upstream exchange. Operational logs never
//! carry the queried name.
//!
//! [`Policy::evaluate`]: crate::policy::Policy::evaluate

#![forbid(unsafe_code)]

mod admission;
mod tcp;
mod upstream;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::model::{
    Action, Agent, AuditEvent, Decision, Disposition, Mode, OriginLookup, Outcome, Reason,
    RequestSummary, Scheme, Transport, Verdict,
};
use crate::policy::{Policy, RefusedAnswer};
use crate::proxy::ProxyContext;

pub(crate) use admission::agent_key;
pub use admission::{Admission, Place};
pub use tcp::serve_tcp;
pub use wire::{
    answers, bare_answer, error_answer, parse_query, qtype_name, synthetic_answer,
    truncated_answer, upstream_query, DnsParseError, DnsQuery, QueryType, Rcode, EDNS_PAYLOAD,
    MAX_QUERY, SYNTHETIC_V4, SYNTHETIC_V6,
};

/// The DNS port (RFC 1035 §4.2): TCP connections to it are DNS, served by [`serve_tcp`].
pub const PORT: u16 = 53;
/// How often, at most, dropped datagrams are reported in the operational log.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(5);

/// Bytes of kernel receive buffer the UDP listener asks for (`SO_RCVBUFFORCE`, socket(7)): room for thousands of
/// queries. With the default (`net.core.rmem_default`, 208 KiB: about 270 small datagrams) one agent's burst filled
/// the buffer whenever the daemon fell behind, and the kernel dropped the next datagrams — another agent's queries
/// among them — before admission could give each agent its own share.
pub const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Everything the DNS listener and DNS-over-TCP connections share (the proxy's context, for the policy in force
/// and the audit trail, is passed beside it).
pub struct DnsStage {
    /// Who sent a datagram and to which resolver, by its source address.
    origins: Arc<dyn OriginLookup>,
    /// Where allowed queries go; `None` answers them SERVFAIL (and audits a block).
    upstream: Option<SocketAddr>,
    timeout: Duration,
    admission: Admission,
}

impl DnsStage {
    /// The stage for `config` (`dns:` in the daemon's configuration), forwarding to `upstream`, learning who sent a
    /// datagram from `origins`.
    pub fn new(
        config: &crate::config::DnsConfig,
        upstream: Option<SocketAddr>,
        origins: Arc<dyn OriginLookup>,
    ) -> DnsStage {
        DnsStage {
            origins,
            upstream,
            timeout: Duration::from_millis(config.timeout_ms),
            admission: Admission::new(config.max_in_flight, config.max_in_flight_per_agent),
        }
    }
}

/// How the client asked, which is how the query is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Udp,
    Tcp,
}

/// The default upstream: the first usable `nameserver` of a resolv.conf (port 53).
pub fn resolv_conf_nameserver(path: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, PORT))
    })
}

/// Serve one listener socket until `shutdown` fires. A datagram is admitted only when its sender's share (and the
/// total) has a place; otherwise it is dropped, and the drops are reported at most every few seconds.
pub async fn serve_udp(
    socket: UdpSocket,
    ctx: Arc<ProxyContext>,
    stage: Arc<DnsStage>,
    shutdown: CancellationToken,
) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_QUERY + 1];
    let (mut dropped, mut reported) = (0u64, Instant::now());
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: receive failed");
                    continue;
                }
            },
        };
        let origin = stage.origins.lookup(peer);
        let Some(place) = stage.admission.try_admit(origin.as_ref().map(|o| &o.agent)) else {
            dropped += 1;
            if reported.elapsed() >= DROP_REPORT_EVERY {
                tracing::warn!(
                    dropped,
                    "dns: datagrams dropped: their agent's share of queries in flight was in use"
                );
                (dropped, reported) = (0, Instant::now());
            }
            continue;
        };
        let packet = buf[..len].to_vec();
        let (ctx, stage, socket, shutdown) =
            (ctx.clone(), stage.clone(), socket.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _place = place;
            let (mut agent, resolver) = match origin {
                Some(o) => (o.agent, Some(o.dst.ip())),
                None => (Agent::default(), None),
            };
            ctx.sessions.identify(&mut agent);
            let reply = async {
                match parse_query(&packet) {
                    Ok(query) => {
                        Some(resolve(&ctx, &stage, &query, &agent, resolver, Via::Udp).await)
                    }
                    Err(e) => unparsed(&packet, e),
                }
            };
            let reply = tokio::select! {
                reply = reply => reply,
                _ = shutdown.cancelled() => None,
            };
            if let Some(reply) = reply {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    tracing::debug!(client = %peer, error = %e, "dns: reply not sent");
                }
            }
        });
    }
}

/// The reply to a message that is not a query this stage serves: FORMERR / NOTIMP with its id, or nothing (a
/// response, or too short to carry an id). Answered locally and not recorded: nothing of it leaves the host.
fn unparsed(packet: &[u8], error: DnsParseError) -> Option<Vec<u8>> {
    match error {
        DnsParseError::NotAQuery => None,
        DnsParseError::Answer(rcode) => {
            tracing::debug!(?rcode, "dns: query answered unparsed");
            bare_answer(packet, rcode)
        }
    }
}

/// Decide, record and answer one query from `agent` to `resolver`: refused names are answered as the policy says,
/// allowed ones forwarded (after their record is written) over the transport the client used.
async fn resolve(
    ctx: &ProxyContext,
    stage: &DnsStage,
    query: &DnsQuery,
    agent: &Agent,
    resolver: Option<IpAddr>,
    via: Via,
) -> Vec<u8> {
    // One snapshot of the policy in force decides and answers this query (a reload applies to later queries).
    let policy = ctx.policy.current();
    let action = dns_action(agent, &query.name, resolver);
    let summary = RequestSummary {
        scheme: Some(Scheme::Dns),
        // Redacted where a policy detector fires in it, by `ProxyContext::record`.
        host: Some(query.name.clone()),
        ip: resolver,
        port: PORT,
        method: Some(qtype_name(query.qtype())),
        ..RequestSummary::default()
    };
    let decision = policy.evaluate(&action);
    // Nothing in a query can be rewritten: constrain is carried out as a block, as for raw TCP.
    if decision.mode == Mode::Enforce && decision.verdict >= Verdict::Constrain {
        // Answered locally whether or not the record could be written: nothing leaves the host.
        record(
            (ctx, &policy),
            decision,
            agent,
            summary,
            Disposition::Blocked,
            None,
        )
        .await;
        return match policy.dns_refused_answer() {
            RefusedAnswer::Synthetic => synthetic_answer(query),
            RefusedAnswer::Nxdomain => error_answer(query, Rcode::NXDomain),
            RefusedAnswer::Refused => error_answer(query, Rcode::Refused),
        };
    }
    let Some(upstream) = stage.upstream else {
        let d = crate::proxy::enforcer_decision(
            &policy,
            Reason::UpstreamUnreachable,
            "no DNS upstream configured",
        );
        let error = Some(Reason::UpstreamUnreachable);
        record(
            (ctx, &policy),
            d,
            agent,
            summary,
            Disposition::Blocked,
            error,
        )
        .await;
        return error_answer(query, Rcode::ServFail);
    };
    // In the trail before the query leaves the host (an audit failure means it does not leave), durable before the
    // agent gets the answer: the fdatasync runs while the upstream resolves.
    let outcome = Outcome {
        disposition: Disposition::Forwarded,
        status: None,
        error: None,
    };
    let event = AuditEvent::new(decision, agent.clone(), summary, outcome);
    let appended = match ctx.append(&policy, event) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "audit write failed for a DNS query");
            return error_answer(query, Rcode::ServFail);
        }
    };
    let exchange = async {
        match via {
            Via::Udp => upstream::udp(upstream, query, stage.timeout).await,
            Via::Tcp => upstream::tcp(upstream, query, stage.timeout).await,
        }
    };
    // The record's fdatasync runs meanwhile; awaited after the exchange, a record already durable costs no wake-up.
    let exchanged = exchange.await;
    let durable = crate::metrics::global().durable(appended).await;
    if let Err(e) = durable {
        tracing::error!(error = %e, "a DNS query's record is not durable: withholding the answer");
        return error_answer(query, Rcode::ServFail);
    }
    match exchanged {
        // The upstream was offered at most the client's size; an answer over it is not passed on whole.
        Ok(reply) if via == Via::Udp && reply.len() > query.udp_limit() => truncated_answer(query),
        Ok(reply) => reply,
        Err(e) => {
            tracing::debug!(upstream = %upstream, ?via, error = %e, "dns: upstream exchange failed");
            error_answer(query, Rcode::ServFail)
        }
    }
}

/// A DNS query as the policy sees it: scheme `dns`, host = the name, the resolver the agent named, port 53.
fn dns_action(agent: &Agent, name: &str, resolver: Option<IpAddr>) -> Action {
    Action {
        agent: agent.clone().into(),
        transport: Transport {
            scheme: Scheme::Dns,
            host: Some(name.to_string()),
            ip: resolver,
            port: PORT,
            provider: None,
        },
        ..Action::default()
    }
}

/// Write one record; false (and an error log) when the audit trail did not take it.
async fn record(
    (ctx, policy): (&ProxyContext, &Policy),
    decision: Decision,
    agent: &Agent,
    request: RequestSummary,
    disposition: Disposition,
    error: Option<Reason>,
) -> bool {
    let outcome = Outcome {
        disposition,
        status: None,
        error,
    };
    let event = AuditEvent::new(decision, agent.clone(), request, outcome);
    match ctx.record(policy, event).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "audit write failed for a DNS query");
            false
        }
    }
}

/// Whether `ip` is one of the stand-in addresses synthetic answers point at ([`SYNTHETIC_V4`], [`SYNTHETIC_V6`];
/// IPv4-mapped IPv6 counts as IPv4).
pub fn is_synthetic(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4 == SYNTHETIC_V4,
        IpAddr::V6(v6) => v6 == SYNTHETIC_V6,
    }
}

/// The decision for a request or connection whose destination is a stand-in address ([`is_synthetic`]): it is
/// never forwarded, as nothing is there. `decision` is the request's own: kept when it is an enforced block (its
/// rule and message). Otherwise the DNS decision for `host` (the SNI or Host the client named) decides when it
/// refuses the name, so the client sees the rule that refused it; else (no host, or the name resolves again after
/// a policy change) the proxy blocks with a message saying to resolve the name again.
pub fn stand_in_decision(
    policy: &Policy,
    agent: &Agent,
    host: Option<&str>,
    decision: Decision,
) -> Decision {
    let enforced_block = |d: &Decision| d.mode == Mode::Enforce && d.verdict >= Verdict::Constrain;
    if enforced_block(&decision) && decision.verdict == Verdict::Block {
        return decision;
    }
    if let Some(host) = host {
        let dns = policy.evaluate(&dns_action(agent, host, None));
        if enforced_block(&dns) {
            return Decision {
                verdict: Verdict::Block,
                rewrites: Vec::new(),
                ..dns
            };
        }
    }
    crate::proxy::enforcer_decision(
        policy,
        Reason::UpstreamUnreachable,
        "this address stands in for a name the DNS policy refused; nothing is there (resolve the name again)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_first_nameserver() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "# c\nsearch x\nnameserver fe80::1%eth0\nnameserver 10.0.0.53\nnameserver 1.1.1.1\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_nameserver(&path),
            Some(SocketAddr::from(([10, 0, 0, 53], 53)))
        );
        assert_eq!(resolv_conf_nameserver(&dir.path().join("none")), None);
    }

    #[test]
    fn stand_in_addresses() {
        assert!(is_synthetic(IpAddr::V4(SYNTHETIC_V4)));
        assert!(is_synthetic(IpAddr::V6(SYNTHETIC_V4.to_ipv6_mapped())));
        assert!(is_synthetic(IpAddr::V6(SYNTHETIC_V6)));
        assert!(!is_synthetic("192.0.2.7".parse().unwrap()));
        assert!(!is_synthetic("2001:db8::2".parse().unwrap()));
    }

    fn policy(src: &str) -> Policy {
        Policy::from_yaml(src, "test.yaml").expect("policy compiles")
    }

    #[test]
    fn a_stand_in_destination_is_never_forwarded() {
        let p = policy(
            r#"version: 1
default: block
rules:
  - id: http-ok
    when: { host: "*.test" }
    verdict: allow
  - id: dns-no
    when: { scheme: dns, host: "x.test" }
    verdict: block
    message: x.test does not resolve
  - id: hard-no
    when: { host: "y.test" }
    verdict: block
    message: y.test is blocked
"#,
        );
        let agent = Agent::default();
        let request = |host: &str| {
            let mut a = dns_action(&agent, host, Some(IpAddr::V4(SYNTHETIC_V4)));
            a.transport.scheme = Scheme::Https;
            a.transport.port = 443;
            p.evaluate(&a)
        };
        // The request's own block stands.
        let d = stand_in_decision(&p, &agent, Some("y.test"), request("y.test"));
        assert_eq!(
            (d.verdict, d.deciding_rule.as_deref(), d.message.as_deref()),
            (Verdict::Block, Some("hard-no"), Some("y.test is blocked"))
        );
        // Allowed as a request, refused as a name: the DNS rule decides, with its message.
        let allowed = request("x.test");
        assert_eq!(allowed.verdict, Verdict::Allow);
        let d = stand_in_decision(&p, &agent, Some("x.test"), allowed);
        assert_eq!(
            (d.verdict, d.deciding_rule.as_deref(), d.message.as_deref()),
            (
                Verdict::Block,
                Some("dns-no"),
                Some("x.test does not resolve")
            )
        );
        // A name that resolves (now), or no name at all: the proxy's own block.
        for host in [Some("ok.test"), None] {
            let d = stand_in_decision(&p, &agent, host, request("ok.test"));
            assert_eq!(
                (d.verdict, d.reason),
                (Verdict::Block, Reason::UpstreamUnreachable)
            );
            assert_eq!(d.mode, Mode::Enforce);
        }
    }
}
