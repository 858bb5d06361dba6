//! A DNS message as the DNS stage receives it from an agent (UDP datagram or one DNS-over-TCP message), checked by
//! `enforcer_fuzz::dns::check_query` (the stage's parser and every answer it builds) under every shipped policy.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|packet: &[u8]| {
    enforcer_fuzz::dns::check_query(packet, enforcer_fuzz::policies());
});
