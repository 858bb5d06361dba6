//! Host names and authorities, spelt one way everywhere: the TLS server name, the `Host`/`:authority` a request
//! names, a provider's configured host, the name a certificate is minted for and the host a policy rule matches are
//! all compared in the form [`normalise`] gives. Pure functions; no I/O, no name resolution.
//!
//! Host names are case-insensitive and a trailing dot names the same (fully qualified) host (RFC 3986 §3.2.2,
//! RFC 1034 §3.1); an authority is `host[:port]` with IPv6 literals in brackets (RFC 3986 §3.2).

#![forbid(unsafe_code)]

use std::borrow::Cow;

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
