//! The properties every DNS message an agent may send must keep, checked by the `dns_query` fuzz target and by the
//! seeded loop of `enforcer/tests/fuzz_untrusted.rs` (which includes this file): the DNS stage's parser
//! (`dns::parse_query`, hickory-proto underneath) and every answer it builds from what it accepts. Nothing may
//! panic; an answer built for a query answers it, the query itself does not, a rebuilt upstream query parses back to
//! the same question, and the name is decided by each policy as a `dns` Action.

use enforcer::dns::{
    answers, bare_answer, error_answer, parse_query, qtype_name, synthetic_answer,
    truncated_answer, upstream_query, DnsParseError, Rcode,
};
use enforcer::model::{Action, Scheme, Transport};
use enforcer::policy::Policy;

/// Check `packet` as the DNS stage reads it, deciding its name under every policy of `policies`; true when it
/// parsed as a query (the rest of the checks ran).
pub fn check_query(packet: &[u8], policies: &[Policy]) -> bool {
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
            return false;
        }
        Err(DnsParseError::NotAQuery) => return false,
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
    // Upstream replies are matched to the query before they are relayed; a query never matches itself.
    assert!(!answers(packet, &q) || packet.get(2).is_some_and(|b| b & 0x80 != 0));
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
            provider: None,
        },
        ..Action::default()
    };
    for policy in policies {
        let _ = policy.evaluate(&action);
    }
    true
}
