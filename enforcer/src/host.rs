//! Host names and authorities, spelt one way everywhere: the TLS server name, the `Host`/`:authority` a request
//! names, a provider's configured host, the name a certificate is minted for and the host a policy rule matches are
//! all compared in the form [`normalise`] gives. Pure functions; no I/O, no name resolution.
//!
//! Host names are case-insensitive and a trailing dot names the same (fully qualified) host (RFC 3986 §3.2.2,
//! RFC 1034 §3.1); an authority is `host[:port]` with IPv6 literals in brackets (RFC 3986 §3.2).

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::net::IpAddr;

/// The comparable form of a host name: surrounding whitespace and trailing dots removed, ASCII lower-cased.
/// Borrows when the name is already in that form (the common case on the request path).
pub fn normalise(host: &str) -> Cow<'_, str> {
    let trimmed = host.trim().trim_end_matches('.');
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

/// The host a request or a proxy target names, as the policy and the host binding see it: [`normalise`]d, and an
/// IP literal in its one canonical spelling, so that a rule naming an address matches however the client spelt it
/// (else `[::ffff:10.0.0.7]`, `[FD00:0::7]` or `167772167` would reach 10.0.0.7 / fd00::7 decided on a host no rule
/// names). IPv6 is written compressed in lower case (RFC 5952 §4), an IPv4-mapped IPv6 address and an address in
/// the NAT64 well-known prefix `64:ff9b::/96` (RFC 6052 §2.1: a NAT64 gateway carries it to the IPv4 address in its
/// last 32 bits, so `[64:ff9b::a00:7]` reaches 10.0.0.7) as its IPv4 address, and the numeric IPv4 forms `inet_aton(3)` (hence `getaddrinfo`) and the WHATWG URL host parser read — one to
/// four parts, each decimal, octal with a leading `0` or hexadecimal with `0x`, the last filling the remaining bytes
/// (`2130706433`, `0x7f.1`, `0177.0.0.1`) — in dotted decimal. Anything else is returned as `normalise` gives it.
pub fn request_host(host: &str) -> Cow<'_, str> {
    let name = normalise(host);
    match ip_literal(&name) {
        Some(ip) => Cow::Owned(ip.to_string()),
        None => name,
    }
}

/// The address a normalised host spells, in any of the forms [`request_host`] reads, canonical ([`canonical_ip`]);
/// `None` for a name.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    // Most hosts are names with a letter past `f`: not an address in any form.
    if !host
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'x'))
    {
        return None;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    // The numeric forms, as the WHATWG URL host parser reads them (the `url` crate): "ends in a number", then 1-4
    // parts, the last filling the remaining bytes.
    match url::Host::parse(host) {
        Ok(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        _ => None,
    }
}

/// The address `ip` reaches, as the policy names it: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) and an address
/// in the NAT64 well-known prefix (`64:ff9b::a.b.c.d`, RFC 6052 §2.1) are the IPv4 address they embed.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => match v6.octets() {
            [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d] => {
                IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
            }
            _ => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `ip` is in the NAT64 local-use prefix `64:ff9b:1::/48` (RFC 8215): a network may embed an IPv4 address
/// in it behind any prefix length from /48 to /96 (RFC 6052 §2.2), so which IPv4 address it reaches cannot be read
/// from the address alone. A request naming one is refused rather than decided on a spelling no rule names.
pub fn nat64_local_use(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[..3] == [0x64, 0xff9b, 1])
}

/// Whether the last label of a normalised host is a number (decimal, or hexadecimal with `0x`): the hosts a
/// resolver may read as an IPv4 address rather than look up (no top-level domain is numeric; WHATWG URL
/// "ends in a number"). Such a host is never handed to a resolver.
pub fn ends_in_a_number(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Split `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address into the host (without brackets) and the
/// port, when one is given and valid.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        };
    }
    match authority.rsplit_once(':') {
        // One colon: host:port. More than one: a bare IPv6 address.
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// The host part of an authority, without port or IPv6 brackets.
pub fn authority_host(authority: &str) -> &str {
    split_host_port(authority).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_in_one_form() {
        assert_eq!(normalise("API.OpenAI.com."), "api.openai.com");
        assert_eq!(normalise(" example.com "), "example.com");
        assert_eq!(normalise("example.com.."), "example.com");
        assert!(matches!(normalise("example.com"), Cow::Borrowed(_)));
    }

    /// Every spelling of an address a resolver or a URL parser reads as that address is written one way.
    #[test]
    fn ip_literals_are_spelt_one_way() {
        for (spelt, canonical) in [
            ("10.0.0.7", "10.0.0.7"),
            ("::ffff:10.0.0.7", "10.0.0.7"),
            ("::FFFF:a00:7", "10.0.0.7"),
            ("0:0:0:0:0:ffff:10.0.0.7", "10.0.0.7"),
            ("167772167", "10.0.0.7"),
            ("0xa000007", "10.0.0.7"),
            ("0xA.0.0.7", "10.0.0.7"),
            ("012.0.0.07", "10.0.0.7"),
            ("10.7", "10.0.0.7"),
            ("10.0.7", "10.0.0.7"),
            ("10.0.0.7.", "10.0.0.7"),
            ("127.1", "127.0.0.1"),
            ("FD00:0:0::7", "fd00::7"),
            ("64:ff9b::a00:7", "10.0.0.7"),
            ("64:FF9B::10.0.0.7", "10.0.0.7"),
            ("0064:ff9b:0000:0000:0000:0000:0a00:0007", "10.0.0.7"),
            ("64:ff9b:0:0:1::a00:7", "64:ff9b::1:0:a00:7"),
            ("64:ff9b:1::a00:7", "64:ff9b:1::a00:7"),
            ("fd00:0000:0000:0000:0000:0000:0000:0007", "fd00::7"),
            ("api.example.com", "api.example.com"),
            ("API.Example.com.", "api.example.com"),
            ("1.2.3.example", "1.2.3.example"),
            ("08.0.0.1", "08.0.0.1"),
            ("256.0.0.1", "256.0.0.1"),
            ("4294967296", "4294967296"),
            ("0x", "0.0.0.0"),
        ] {
            assert_eq!(request_host(spelt), canonical, "{spelt}");
        }
        assert!(nat64_local_use("64:ff9b:1::a00:7".parse().unwrap()));
        assert!(nat64_local_use("64:ff9b:1:ffff::".parse().unwrap()));
        assert!(!nat64_local_use("64:ff9b::a00:7".parse().unwrap()));
        assert!(!nat64_local_use("64:ff9b:2::".parse().unwrap()));
        assert!(ends_in_a_number("08.0.0.1"));
        assert!(ends_in_a_number("4294967296"));
        assert!(ends_in_a_number("example.0x1f"));
        assert!(!ends_in_a_number("api.example.com"));
        assert!(!ends_in_a_number("1.2.3.example"));
        assert!(!ends_in_a_number("example.0xg"));
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_host_port("api.openai.com"), ("api.openai.com", None));
        assert_eq!(split_host_port("127.0.0.1:8443"), ("127.0.0.1", Some(8443)));
        assert_eq!(split_host_port("[fd77::2]:443"), ("fd77::2", Some(443)));
        assert_eq!(split_host_port("[fd77::2]"), ("fd77::2", None));
        assert_eq!(split_host_port("fd77::2"), ("fd77::2", None));
        assert_eq!(split_host_port("host:notaport"), ("host:notaport", None));
        assert_eq!(authority_host("example.com:443"), "example.com");
        assert_eq!(authority_host("[::1]:8443"), "::1");
    }
}
