//! The constrain stage on arbitrary bodies: the first byte chooses which of the rewrites a constrain rule can plan
//! are applied (redaction with every built-in detector, JSON caps, sets and removals, header edits, dropping tools),
//! the rest is the decoded body. `constrain::apply` either rewrites or refuses (the proxy then blocks); it never
//! panics, and a changed body goes out identity-encoded with its exact `Content-Length`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mask, body)) = data.split_first() else {
        return;
    };
    let chosen: Vec<_> = enforcer_fuzz::rewrites()
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, r)| r.clone())
        .collect();
    let (mut parts, ()) = http::Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("content-encoding", "gzip")
        .header("cookie", "session=AKIAIOSFODNN7EXAMPLE")
        .body(())
        .expect("request")
        .into_parts();
    let original = Bytes::copy_from_slice(body);
    let mut out = original.clone();
    let policy = &enforcer_fuzz::policies()[0];
    // Both ways of a request: to the provider whose own credential header is no finding, and to anyone else.
    let provider = (body.len() % 2 == 0).then_some("anthropic");
    let Ok(changes) = enforcer::constrain::apply(&chosen, policy, provider, &mut parts, &mut out)
    else {
        return;
    };
    if out != original {
        assert!(!changes.is_empty(), "a rewritten body names its changes");
        assert!(parts.headers.get("content-encoding").is_none());
        assert_eq!(
            parts.headers["content-length"].to_str().ok(),
            Some(out.len().to_string().as_str())
        );
    }
});
