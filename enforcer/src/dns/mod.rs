//! The DNS stage: serves the UDP listener (127.0.0.1 and ::1 at `dns.port`) that the kernel programs redirect
//! tagged processes' DNS datagrams to. It owns DNS wire parsing (by hand: header and one question, nothing else is
//! trusted or kept), the per-query decision ([`Policy::evaluate`] on an [`Action`] with scheme `dns`), the audit
//! record (one per query, written before anything leaves the host; a detector hit in the name is redacted as for
//! every host) and the forwarding of allowed queries to one
//! upstream resolver. It does not own which names may resolve (policy) nor who sent the query (capture, through an
//! [`OriginLookup`] keyed by the datagram's source).
//!
//! What goes upstream is rebuilt from the parsed question (id, RD/CD flags, the question as sent, and an EDNS OPT
//! record without options when the client sent one), so no other byte of the client's packet leaves the host.
//! Blocked queries get REFUSED, malformed ones FORMERR, upstream failures SERVFAIL; responses sent to the listener
//! and datagrams too short to carry an id are dropped. Bounded: at most `max_in_flight` queries at once (more are
//! dropped; clients retry) and `timeout` per upstream exchange. Operational logs never carry the queried name.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::model::{
    Action, Agent, AuditEvent, Decision, Disposition, Mode, OriginLookup, Outcome, Reason,
    RequestSummary, Scheme, Transport, Verdict,
};

/// The largest query accepted (a question is at most 255 + 4 bytes; room for an OPT record).
const MAX_QUERY: usize = 512;
/// The EDNS UDP payload size offered upstream when the client asked for EDNS (the DNS flag day value).
const EDNS_PAYLOAD: u16 = 1232;
/// Receive buffer for upstream answers.
const MAX_ANSWER: usize = 4096;

const HEADER: usize = 12;
const QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const CD: u16 = 0x0010;
const TYPE_OPT: u16 = 41;

/// Response codes this stage answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    FormErr = 1,
    ServFail = 2,
    NotImp = 4,
    Refused = 5,
}

/// Why a datagram is not a query this stage serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsParseError {
    /// Shorter than an id, or a response (QR set): dropped without an answer.
    #[error("not a DNS query")]
    NotAQuery,
    /// A query this stage cannot serve: answered with this code.
    #[error("malformed or unsupported query ({0:?})")]
    Answer(Rcode),
}

/// One parsed query: only what is decided on and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    pub id: u16,
    /// The header flags of the query (RD and CD are forwarded).
    pub flags: u16,
    /// The queried name in presentation form: lower-case, no trailing dot, `\DDD` escapes for bytes outside
    /// letters, digits, `-` and `_`; empty for the root.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as sent (echoed in answers and forwarded, so the case the client chose survives).
    pub question: Vec<u8>,
    /// Whether the client sent an EDNS OPT record (then one without options goes upstream).
    pub edns: bool,
}

/// Parse one query: a 12-byte header with QR clear, opcode QUERY, exactly one question, no answer or authority
/// records; the question's name as uncompressed labels (1–63 bytes each, 255 bytes in all). Additional records are
/// only looked at for an OPT record; nothing else of them is kept.
pub fn parse_query(packet: &[u8]) -> Result<DnsQuery, DnsParseError> {
    let formerr = DnsParseError::Answer(Rcode::FormErr);
    if packet.len() < 2 {
        return Err(DnsParseError::NotAQuery);
    }
    let word = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]))
    };
    let id = word(0).ok_or(DnsParseError::NotAQuery)?;
    let Some(flags) = word(2) else {
        return Err(formerr);
    };
    if flags & QR != 0 {
        return Err(DnsParseError::NotAQuery);
    }
    if packet.len() < HEADER || packet.len() > MAX_QUERY {
        return Err(formerr);
    }
    if flags & OPCODE_MASK != 0 {
        return Err(DnsParseError::Answer(Rcode::NotImp));
    }
    let (qd, an, ns, ar) = (word(4), word(6), word(8), word(10));
    if (qd, an, ns) != (Some(1), Some(0), Some(0)) {
        return Err(formerr);
    }
    let mut at = HEADER;
    let mut labels: Vec<&[u8]> = Vec::new();
    let mut wire_len = 0usize;
    loop {
        let len = usize::from(*packet.get(at).ok_or(formerr)?);
        at += 1;
        wire_len += 1 + len;
        if len == 0 {
            break;
        }
        // Compression pointers (and the reserved 0x40/0x80 label types) have no place in a question.
        if len > 63 || wire_len > 255 {
            return Err(formerr);
        }
        labels.push(packet.get(at..at + len).ok_or(formerr)?);
        at += len;
    }
    let qtype = word(at).ok_or(formerr)?;
    let qclass = word(at + 2).ok_or(formerr)?;
    let question = packet.get(HEADER..at + 4).ok_or(formerr)?.to_vec();
    at += 4;
    let edns = ar.unwrap_or(0) > 0 && packet.get(at) == Some(&0) && word(at + 1) == Some(TYPE_OPT);
    Ok(DnsQuery {
        id,
        flags,
        name: presentation(&labels).to_ascii_lowercase(),
        qtype,
        qclass,
        question,
        edns,
    })
}

fn presentation(labels: &[&[u8]]) -> String {
    let mut out = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in *label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
    }
    out
}

/// The name of a query type as the audit record shows it (`A`, `AAAA`, …, else `TYPE<n>`).
pub fn qtype_name(qtype: u16) -> String {
    let known = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        46 => "RRSIG",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        257 => "CAA",
        _ => return format!("TYPE{qtype}"),
    };
    known.to_string()
}

/// An answer without records: `rcode`, the query's id and RD, the question echoed.
pub fn error_answer(query: &DnsQuery, rcode: Rcode) -> Vec<u8> {
    let flags = QR | (query.flags & RD) | RA | rcode as u16;
    let mut out = Vec::with_capacity(HEADER + query.question.len());
    for w in [query.id, flags, 1, 0, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(&query.question);
    out
}

/// FORMERR / NOTIMP for a packet that did not parse: its id, no question.
fn bare_answer(packet: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    let id = packet.get(..2)?;
    let mut out = id.to_vec();
    out.extend_from_slice(&(QR | rcode as u16).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// The query as it goes upstream: rebuilt from the parsed parts only.
pub fn upstream_query(query: &DnsQuery) -> Vec<u8> {
    let flags = query.flags & (RD | CD);
    let mut out = Vec::with_capacity(HEADER + query.question.len() + 11);
    for w in [query.id, flags, 1, 0, 0, u16::from(query.edns)] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(&query.question);
    if query.edns {
        // Root name, type OPT, class = UDP payload size, TTL 0 (no DO bit), no options.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

/// Whether `answer` answers `query`: same id, QR set, the same question (case included).
fn answers(answer: &[u8], query: &DnsQuery) -> bool {
    answer.len() >= HEADER + query.question.len()
        && answer[..2] == query.id.to_be_bytes()
        && answer[2] & 0x80 != 0
        && answer[4..6] == [0, 1]
        && answer[HEADER..HEADER + query.question.len()] == query.question[..]
}

/// Everything the DNS listener shares.
pub struct DnsContext {
    /// The proxy's context, for the policy in force and the audit trail (shared with every other request).
    pub proxy: Arc<crate::proxy::ProxyContext>,
    /// Who sent a datagram and to which resolver, by its source address.
    pub origins: Arc<dyn OriginLookup>,
    /// Where allowed queries go; `None` answers them SERVFAIL (and audits a block).
    pub upstream: Option<SocketAddr>,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

/// The default upstream: the first usable `nameserver` of a resolv.conf (port 53).
pub fn resolv_conf_nameserver(path: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// Serve one listener socket until `shutdown` fires.
pub async fn serve_dns(socket: UdpSocket, ctx: Arc<DnsContext>, shutdown: CancellationToken) {
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(ctx.max_in_flight.max(1)));
    let mut buf = vec![0u8; MAX_QUERY + 1];
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "dns: too many queries in flight; datagram dropped");
            continue;
        };
        let packet = buf[..len].to_vec();
        let (ctx, socket, shutdown) = (ctx.clone(), socket.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = tokio::select! {
                reply = answer(&ctx, &packet, peer) => reply,
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

/// Decide, record and (when allowed) forward one datagram; the reply for the client, if any.
async fn answer(ctx: &DnsContext, packet: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
    let query = match parse_query(packet) {
        Ok(q) => q,
        Err(DnsParseError::NotAQuery) => return None,
        Err(DnsParseError::Answer(rcode)) => {
            tracing::debug!(client = %peer, ?rcode, "dns: query refused unparsed");
            return bare_answer(packet, rcode);
        }
    };
    // One snapshot of the policy in force decides and names this query (a reload applies to later queries).
    let policy = ctx.proxy.policy.current();
    let origin = ctx.origins.lookup(peer);
    let (agent, resolver) = match origin {
        Some(o) => (o.agent, Some(o.dst.ip())),
        None => (Agent::default(), None),
    };
    let action = Action {
        agent: agent.clone(),
        transport: Transport {
            scheme: Scheme::Dns,
            host: Some(query.name.clone()),
            ip: resolver,
            port: 53,
        },
        ..Action::default()
    };
    let summary = RequestSummary {
        scheme: Some(Scheme::Dns),
        // Redacted where a policy detector fires in it, by `ProxyContext::record`.
        host: Some(query.name.clone()),
        ip: resolver,
        port: 53,
        method: Some(qtype_name(query.qtype)),
        ..RequestSummary::default()
    };
    let decision = policy.evaluate(&action);
    // Nothing in a query can be rewritten: constrain is carried out as a block, as for raw TCP.
    if decision.mode == Mode::Enforce && decision.verdict >= Verdict::Constrain {
        record(
            (ctx, &policy),
            decision,
            agent,
            summary,
            Disposition::Blocked,
            None,
        )
        .await;
        return Some(error_answer(&query, Rcode::Refused));
    }
    let Some(upstream) = ctx.upstream else {
        let d = crate::proxy::enforcer_decision(
            &policy,
            Reason::UpstreamUnreachable,
            "no DNS upstream configured",
        );
        record(
            (ctx, &policy),
            d,
            agent,
            summary,
            Disposition::Blocked,
            Some(Reason::UpstreamUnreachable),
        )
        .await;
        return Some(error_answer(&query, Rcode::ServFail));
    };
    // Recorded before the query leaves the host; an audit failure means it does not leave.
    if !record(
        (ctx, &policy),
        decision,
        agent,
        summary,
        Disposition::Forwarded,
        None,
    )
    .await
    {
        return Some(error_answer(&query, Rcode::ServFail));
    }
    match exchange(upstream, &query, ctx.timeout).await {
        Ok(reply) => Some(reply),
        Err(e) => {
            tracing::debug!(upstream = %upstream, error = %e, "dns: upstream exchange failed");
            Some(error_answer(&query, Rcode::ServFail))
        }
    }
}

/// Write one record; false (and an error log) when the audit trail did not take it.
async fn record(
    (ctx, policy): (&DnsContext, &crate::policy::Policy),
    decision: Decision,
    agent: Agent,
    request: RequestSummary,
    disposition: Disposition,
    error: Option<Reason>,
) -> bool {
    let event = AuditEvent {
        decision,
        agent,
        request,
        outcome: Outcome {
            disposition,
            status: None,
            error,
        },
    };
    match ctx.proxy.record(policy, event).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "audit write failed for a DNS query");
            false
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer in time")]
    Timeout,
}

/// Send the rebuilt query to `upstream` from a fresh socket and wait for the datagram that answers it.
async fn exchange(
    upstream: SocketAddr,
    query: &DnsQuery,
    timeout: Duration,
) -> Result<Vec<u8>, ExchangeError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(&upstream_query(query)).await?;
    let mut buf = vec![0u8; MAX_ANSWER];
    tokio::time::timeout(timeout, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            if answers(&buf[..n], query) {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| ExchangeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` (dot-separated, no trailing dot) of `qtype`, RD set, optionally with an OPT record.
    pub fn query_bytes(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [id, RD, 1, 0, 0, u16::from(edns)] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            out.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]);
        }
        out
    }

    #[test]
    fn parses_a_query_and_normalises_the_name() {
        let q = parse_query(&query_bytes(0x1234, "API.Example.COM", 28, false)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "api.example.com");
        assert_eq!(qtype_name(q.qtype), "AAAA");
        assert!(!q.edns);
        let root = parse_query(&query_bytes(1, "", 2, false)).unwrap();
        assert_eq!(root.name, "");
        let odd = {
            let mut p = query_bytes(1, "ab", 1, false);
            p[13] = b'.';
            p
        };
        assert_eq!(parse_query(&odd).unwrap().name, "\\046b");
    }

    #[test]
    fn refuses_malformed_queries() {
        let formerr = Err(DnsParseError::Answer(Rcode::FormErr));
        let good = query_bytes(7, "a.test", 1, false);
        assert_eq!(parse_query(&good[..11]), formerr);
        assert_eq!(parse_query(&good[..good.len() - 1]), formerr);
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two), formerr);
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert_eq!(parse_query(&pointer), formerr);
        let long = query_bytes(7, &"a".repeat(64), 1, false);
        assert_eq!(parse_query(&long), formerr);
        let name = vec!["a".repeat(63); 4].join(".");
        assert_eq!(parse_query(&query_bytes(7, &name, 1, false)), formerr);
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(DnsParseError::NotAQuery));
        assert_eq!(parse_query(&[1]), Err(DnsParseError::NotAQuery));
        let mut notify = good;
        notify[2] |= 0x20;
        assert_eq!(
            parse_query(&notify),
            Err(DnsParseError::Answer(Rcode::NotImp))
        );
    }

    #[test]
    fn refused_answer_echoes_id_and_question() {
        let packet = query_bytes(0xbeef, "x.exfil.test", 1, true);
        let q = parse_query(&packet).unwrap();
        let a = error_answer(&q, Rcode::Refused);
        assert_eq!(&a[..2], &[0xbe, 0xef]);
        assert_eq!(a[3] & 0x0f, 5);
        assert!(answers(&a, &q));
    }

    #[test]
    fn upstream_gets_the_question_and_a_bare_opt_only() {
        let packet = query_bytes(9, "a.test", 1, true);
        let q = parse_query(&packet).unwrap();
        assert!(q.edns);
        let up = upstream_query(&q);
        assert!(
            !up.windows(4).any(|w| w == [0xde, 0xad, 0xbe, 0xef]),
            "EDNS option data is not forwarded"
        );
        let again = parse_query(&up).unwrap();
        assert_eq!(
            (again.id, again.question, again.edns),
            (9, q.question.clone(), true)
        );
        let plain = upstream_query(&parse_query(&query_bytes(9, "a.test", 1, false)).unwrap());
        assert_eq!(&plain[10..12], &[0, 0]);
    }

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
}
