//! DNS messages as the DNS stage reads and writes them (RFC 1035 §4, EDNS RFC 6891), over hickory-proto's decoder
//! and encoder. A query is read as a header, exactly one question and the additional section (only for an OPT
//! record); nothing else of it is kept. Everything that leaves the host or goes back to the client is built here
//! from those parsed parts: the query sent upstream, locally decided answers (errors, NXDOMAIN, NODATA, the
//! synthetic stand-in address, a truncated reply). Upstream answers are relayed as received once [`answers`] has
//! matched them to the query. Pure functions, no I/O.

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable};

pub use hickory_proto::op::ResponseCode as Rcode;
pub use hickory_proto::rr::RecordType as QueryType;

/// The largest query accepted, over UDP and TCP alike: a question is at most 255 + 4 bytes, which leaves room for
/// an OPT record with options. Longer queries are answered FORMERR.
pub const MAX_QUERY: usize = 512;
/// The largest UDP reply for a client that sent no EDNS (RFC 1035 §4.2.1).
pub const MAX_UDP_REPLY: usize = 512;
/// The EDNS UDP payload size offered upstream at most (the DNS flag day 2020 value); a client's smaller size is
/// passed on instead.
pub const EDNS_PAYLOAD: u16 = 1232;
/// The IPv4 address a synthetic answer points at (TEST-NET-1, RFC 5737: never routed). Tagged connections to it
/// reach the proxy, which refuses them; untagged ones go nowhere.
pub const SYNTHETIC_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The IPv6 address a synthetic answer points at (the documentation prefix, RFC 3849: never routed).
pub const SYNTHETIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// TTL of a synthetic record: 0, so no cache keeps it past a policy change (RFC 1035 §3.2.1).
const SYNTHETIC_TTL: u32 = 0;

/// Why a message is not a query this stage serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsParseError {
    /// Shorter than an id, or a response (QR set): dropped without an answer.
    #[error("not a DNS query")]
    NotAQuery,
    /// A query this stage cannot serve: answered with this code (FORMERR, or NOTIMP for an opcode other than
    /// QUERY) by [`bare_answer`].
    #[error("malformed or unsupported query ({0:?})")]
    Answer(Rcode),
}

/// One parsed query: only what is decided on and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    pub id: u16,
    /// RD (recursion desired) and CD (checking disabled): the only header flags forwarded and echoed.
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question as sent (the name keeps the case the client chose: echoed in answers and forwarded).
    pub question: Query,
    /// The queried name in presentation form, as the policy sees it: lower-case, no trailing dot, `\DDD` escapes
    /// for bytes outside letters, digits, `-` and `_`; empty for the root.
    pub name: String,
    /// The client's EDNS UDP payload size (at least 512) when it sent an OPT record.
    pub edns: Option<u16>,
}

impl DnsQuery {
    pub fn qtype(&self) -> QueryType {
        self.question.query_type()
    }

    /// The largest UDP reply this client takes: its EDNS payload size, else 512 bytes.
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(MAX_UDP_REPLY, usize::from)
    }
}

/// Parse one query: a header with QR clear, opcode QUERY, exactly one question and no answer or authority records,
/// at most [`MAX_QUERY`] bytes; the additional section is read only for an OPT record (two are FORMERR, RFC 6891
/// §6.1.1). Bytes after the last record are ignored.
pub fn parse_query(packet: &[u8]) -> Result<DnsQuery, DnsParseError> {
    let formerr = DnsParseError::Answer(Rcode::FormErr);
    if packet.len() < 2 || packet.get(2).is_some_and(|b| b & 0x80 != 0) {
        return Err(DnsParseError::NotAQuery);
    }
    if packet.len() > MAX_QUERY {
        return Err(formerr);
    }
    let mut decoder = BinDecoder::new(packet);
    let header = Header::read(&mut decoder).map_err(|_| formerr)?;
    if header.metadata.message_type != MessageType::Query {
        return Err(DnsParseError::NotAQuery);
    }
    if header.metadata.op_code != OpCode::Query {
        return Err(DnsParseError::Answer(Rcode::NotImp));
    }
    let counts = header.counts;
    if (counts.queries, counts.answers, counts.authorities) != (1, 0, 0) {
        return Err(formerr);
    }
    let question = Query::read(&mut decoder).map_err(|_| formerr)?;
    let additionals = usize::from(counts.additionals);
    let (_, edns, _) = Message::read_records(&mut decoder, additionals, true, OpCode::Query)
        .map_err(|_| formerr)?;
    Ok(DnsQuery {
        id: header.metadata.id,
        recursion_desired: header.metadata.recursion_desired,
        checking_disabled: header.metadata.checking_disabled,
        name: presentation(question.name().iter()),
        question,
        edns: edns.map(|e| e.max_payload().max(512)),
    })
}

/// Labels in presentation form, lower-case (see [`DnsQuery::name`]).
fn presentation<'a>(labels: impl Iterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for (i, label) in labels.enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(char::from(b.to_ascii_lowercase()));
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
    }
    out
}

/// The name of a query type as the audit record shows it (`A`, `AAAA`, …; `TYPE<n>` for types without a mnemonic,
/// RFC 3597 §5).
pub fn qtype_name(qtype: QueryType) -> String {
    match qtype {
        RecordType::Unknown(n) => format!("TYPE{n}"),
        known => known.to_string(),
    }
}

/// A response to `query` with `rcode` and `answers`: its id, RD and CD echoed, RA set, the question echoed, and an
/// OPT record (no options) when the client sent one.
fn response(query: &DnsQuery, rcode: Rcode, answers: Vec<Record>, truncated: bool) -> Vec<u8> {
    let mut message = Message::response(query.id, OpCode::Query);
    message.metadata.recursion_desired = query.recursion_desired;
    message.metadata.checking_disabled = query.checking_disabled;
    message.metadata.recursion_available = true;
    message.metadata.truncation = truncated;
    message.metadata.response_code = rcode;
    message.add_query(query.question.clone());
    message.add_answers(answers);
    if query.edns.is_some() {
        message.set_edns(opt(EDNS_PAYLOAD));
    }
    // Encoding a parsed question and a few fixed records cannot fail; if it ever did, the client still gets a
    // well-formed SERVFAIL rather than nothing.
    message
        .to_vec()
        .unwrap_or_else(|_| header_only(query.id, Rcode::ServFail))
}

/// An answer without records: `rcode`, the query's id, flags and question (REFUSED, NXDOMAIN, SERVFAIL, NODATA
/// with NOERROR).
pub fn error_answer(query: &DnsQuery, rcode: Rcode) -> Vec<u8> {
    response(query, rcode, Vec::new(), false)
}

/// The reply to a query too large for the client's UDP limit: header and question only, TC set, so the client
/// asks again over TCP (RFC 1035 §4.2.1, RFC 7766 §5).
pub fn truncated_answer(query: &DnsQuery) -> Vec<u8> {
    response(query, Rcode::NoError, Vec::new(), true)
}

/// The synthetic answer for a refused name: A → [`SYNTHETIC_V4`], AAAA → [`SYNTHETIC_V6`] (TTL 0), any other type
/// NODATA (NOERROR, no records: the name exists, nothing of that type).
pub fn synthetic_answer(query: &DnsQuery) -> Vec<u8> {
    let name = query.question.name().clone();
    let record = match query.qtype() {
        RecordType::A => Some(RData::A(A(SYNTHETIC_V4))),
        RecordType::AAAA => Some(RData::AAAA(AAAA(SYNTHETIC_V6))),
        _ => None,
    };
    let answers = record
        .map(|data| Record::from_rdata(name, SYNTHETIC_TTL, data))
        .into_iter()
        .collect();
    response(query, Rcode::NoError, answers, false)
}

/// FORMERR / NOTIMP for a message that did not parse: its id, no question. `None` when it has no id.
pub fn bare_answer(packet: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*packet.first()?, *packet.get(1)?]);
    Some(header_only(id, rcode))
}

/// A 12-byte response header with `id` and `rcode`, every count zero.
fn header_only(id: u16, rcode: Rcode) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    // QR set, opcode QUERY, RA set; the low four bits of the response code (RFC 1035 §4.1.1).
    out.extend_from_slice(&[0x80, 0x80 | (rcode.low() & 0x0f)]);
    out.extend_from_slice(&[0; 8]);
    out
}

/// An OPT record: UDP payload size `payload`, version 0, no flags (DO clear), no options.
fn opt(payload: u16) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    edns
}

/// The query as it goes upstream, rebuilt from the parsed parts only: id, RD and CD, the question as sent, and —
/// when the client sent EDNS — an OPT record without options offering the client's payload size, at most
/// [`EDNS_PAYLOAD`] (so the upstream's answer fits what the client takes).
pub fn upstream_query(query: &DnsQuery) -> Vec<u8> {
    let mut message = Message::new(query.id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = query.recursion_desired;
    message.metadata.checking_disabled = query.checking_disabled;
    message.add_query(query.question.clone());
    if let Some(payload) = query.edns {
        message.set_edns(opt(payload.min(EDNS_PAYLOAD)));
    }
    message
        .to_vec()
        .unwrap_or_else(|_| header_only(query.id, Rcode::ServFail))
}

/// Whether `reply` answers `query`: the same id, QR set, one question, and that question byte for byte (case
/// included, RFC 5452 §9.1) — the question a resolver echoes is never compressed.
pub fn answers(reply: &[u8], query: &DnsQuery) -> bool {
    let Ok(question) = query.question.to_bytes() else {
        return false;
    };
    reply.len() >= 12 + question.len()
        && reply[..2] == query.id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[4..6] == [0, 1]
        && reply[12..12 + question.len()] == question[..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` (dot-separated, no trailing dot) of `qtype`, RD set, optionally with an OPT record
    /// (payload 4096) carrying a 4-byte option.
    pub fn query_bytes(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [id, 0x0100, 1, 0, 0, u16::from(edns)] {
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
            out.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 8, 0, 10, 0, 4]);
            out.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).expect("a well-formed message")
    }

    #[test]
    fn parses_a_query_and_normalises_the_name() {
        let q = parse_query(&query_bytes(0x1234, "API.Example.COM", 28, false)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "api.example.com");
        assert_eq!(qtype_name(q.qtype()), "AAAA");
        assert_eq!(qtype_name(RecordType::from(65280)), "TYPE65280");
        assert!(q.recursion_desired);
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
        let root = parse_query(&query_bytes(1, "", 2, false)).unwrap();
        assert_eq!(root.name, "");
        let odd = {
            let mut p = query_bytes(1, "ab", 1, false);
            p[13] = b'.';
            p
        };
        assert_eq!(parse_query(&odd).unwrap().name, "\\046b");
        let q = parse_query(&query_bytes(1, "a.test", 1, true)).unwrap();
        assert_eq!((q.edns, q.udp_limit()), (Some(4096), 4096));
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
        let mut answer = good.clone();
        answer[7] = 1;
        assert_eq!(parse_query(&answer), formerr);
        // A compression pointer must point before the name: this one points at itself.
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        pointer[13] = 12;
        assert_eq!(parse_query(&pointer), formerr);
        let long = query_bytes(7, &"a".repeat(64), 1, false);
        assert_eq!(parse_query(&long), formerr);
        let name = vec!["a".repeat(63); 4].join(".");
        assert_eq!(parse_query(&query_bytes(7, &name, 1, false)), formerr);
        let mut padded = good.clone();
        padded.resize(MAX_QUERY + 1, 0);
        assert_eq!(parse_query(&padded), formerr);
        let mut two_opts = query_bytes(7, "a.test", 1, true);
        two_opts[11] = 2;
        two_opts.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_query(&two_opts), formerr);
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
        assert_eq!(
            bare_answer(&[0xab, 0xcd, 1], Rcode::FormErr),
            Some(vec![0xab, 0xcd, 0x80, 0x81, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(bare_answer(&[1], Rcode::FormErr), None);
    }

    #[test]
    fn error_answers_echo_id_flags_and_question() {
        let packet = query_bytes(0xbeef, "X.Exfil.test", 1, true);
        let q = parse_query(&packet).unwrap();
        for rcode in [Rcode::Refused, Rcode::NXDomain, Rcode::ServFail] {
            let a = error_answer(&q, rcode);
            assert!(answers(&a, &q));
            let m = decode(&a);
            assert_eq!(m.metadata.id, 0xbeef);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.metadata.response_code, rcode);
            assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
            assert_eq!(m.queries, vec![q.question.clone()]);
            assert_eq!(m.queries[0].name().to_ascii(), "X.Exfil.test.");
            assert!(m.answers.is_empty());
            assert!(m.edns.is_some(), "an OPT record answers the client's");
        }
        let plain = parse_query(&query_bytes(1, "a.test", 1, false)).unwrap();
        assert!(decode(&error_answer(&plain, Rcode::Refused)).edns.is_none());
        let t = decode(&truncated_answer(&plain));
        assert!(t.metadata.truncation && t.answers.is_empty());
    }

    #[test]
    fn synthetic_answers_point_at_the_stand_in_addresses() {
        let a = parse_query(&query_bytes(5, "Blocked.Test", 1, false)).unwrap();
        let m = decode(&synthetic_answer(&a));
        assert_eq!(m.metadata.response_code, Rcode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(SYNTHETIC_V4)));
        assert_eq!(m.answers[0].ttl, 0);
        assert_eq!(m.answers[0].name.to_ascii(), "Blocked.Test.");
        let aaaa = parse_query(&query_bytes(5, "blocked.test", 28, false)).unwrap();
        let m = decode(&synthetic_answer(&aaaa));
        assert_eq!(m.answers[0].data, RData::AAAA(AAAA(SYNTHETIC_V6)));
        // HTTPS (65), TXT, MX, …: NODATA.
        for qtype in [65, 16, 15] {
            let other = parse_query(&query_bytes(5, "blocked.test", qtype, false)).unwrap();
            let m = decode(&synthetic_answer(&other));
            assert_eq!(
                (m.metadata.response_code, m.answers.len()),
                (Rcode::NoError, 0)
            );
        }
    }

    #[test]
    fn upstream_gets_the_question_and_a_bare_opt_only() {
        let packet = query_bytes(9, "A.test", 1, true);
        let q = parse_query(&packet).unwrap();
        let up = upstream_query(&q);
        assert!(
            !up.windows(4).any(|w| w == [0xde, 0xad, 0xbe, 0xef]),
            "EDNS option data is not forwarded"
        );
        let m = decode(&up);
        assert_eq!(m.metadata.id, 9);
        assert_eq!(m.queries, vec![q.question.clone()]);
        assert_eq!(m.queries[0].name().to_ascii(), "A.test.");
        let edns = m.edns.expect("an OPT record");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert!(edns.options().as_ref().is_empty() && !edns.flags().dnssec_ok);
        assert!(m.additionals.is_empty() && m.answers.is_empty());
        // A client's smaller payload size is what the upstream is offered.
        // The OPT record is the last 19 bytes (11 + an option with 4 bytes of data); its class is the payload size.
        let mut small = packet.clone();
        let class = small.len() - 19 + 3;
        small[class..class + 2].copy_from_slice(&600u16.to_be_bytes());
        let q = parse_query(&small).unwrap();
        assert_eq!(decode(&upstream_query(&q)).max_payload(), 600);
        let plain = upstream_query(&parse_query(&query_bytes(9, "a.test", 1, false)).unwrap());
        assert_eq!(&plain[10..12], &[0, 0]);
    }

    #[test]
    fn a_reply_must_echo_the_question_exactly() {
        let q = parse_query(&query_bytes(3, "Mixed.Case.test", 1, false)).unwrap();
        let good = error_answer(&q, Rcode::NoError);
        assert!(answers(&good, &q));
        let other_id = parse_query(&query_bytes(4, "Mixed.Case.test", 1, false)).unwrap();
        assert!(!answers(&good, &other_id));
        let other_case = parse_query(&query_bytes(3, "mixed.case.test", 1, false)).unwrap();
        assert!(!answers(&good, &other_case));
        assert!(!answers(&query_bytes(3, "Mixed.Case.test", 1, false), &q));
        assert!(!answers(&good[..good.len() - 1], &q));
    }
}
