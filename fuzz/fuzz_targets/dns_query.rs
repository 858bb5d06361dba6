//! A DNS message as the DNS stage receives it from an agent (UDP datagram or one DNS-over-TCP message): the stage's
//! parser (`dns::parse_query`, hickory-proto underneath) and every answer it builds from what it accepts. Nothing may
//! panic; an answer built for a query answers it, a rebuilt upstream query parses back to the same question, and
//! the name is decided by every shipped policy as a `dns` Action.

#![no_main]

use enforcer::dns::{
    answers, bare_answer, error_answer, parse_query, qtype_name, synthetic_answer,
    truncated_answer, upstream_query, DnsParseError, Rcode,
};
use enforcer::model::{Action, Scheme, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|packet: &[u8]| {
    let q = match parse_query(packet) {
        Ok(q) => q,
        Err(DnsParseError::Answer(rcode)) => {
            if let Some(reply) = bare_answer(packet, rcode) {
                assert_eq!(
                    &reply[..2],
                    &packet[..2],
                    "an error answer keeps the query's id"
                );
            }
            return;
        }
        Err(DnsParseError::NotAQuery) => return,
    };
    for reply in [
        error_answer(&q, Rcode::Refused),
        error_answer(&q, Rcode::NXDomain),
        synthetic_answer(&q),
        truncated_answer(&q),
    ] {
        assert!(
            answers(&reply, &q),
            "an answer built for the query answers it"
        );
    }
    let up = upstream_query(&q);
    let again = parse_query(&up).expect("a rebuilt query parses");
    assert_eq!(
        (again.id, &again.name, again.qtype()),
        (q.id, &q.name, q.qtype())
    );
    let _ = (qtype_name(q.qtype()), q.udp_limit());
    let action = Action {
        transport: Transport {
            scheme: Scheme::Dns,
            host: Some(q.name.clone()),
            ip: None,
            port: 53,
        },
        ..Action::default()
    };
    for policy in enforcer_fuzz::policies() {
        let _ = policy.evaluate(&action);
    }
});
