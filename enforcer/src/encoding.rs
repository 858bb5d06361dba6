//! Encodings of request text that an upstream undoes before it acts on the text: URL percent-escapes, the form
//! encoding's `+`, and JSON string escapes. Every stage that must see what the upstream will see (the policy's path
//! and detectors, redaction and its final check) undoes them here, the same way. Pure functions; no I/O.

#![forbid(unsafe_code)]

use serde_json::Value;

/// `bytes` as text, each sequence that is not UTF-8 replaced by U+FFFD, as `String::from_utf8_lossy` gives it. Text
/// that is UTF-8 (nearly every body) is checked by `str::from_utf8`, which reads ASCII a word at a time; the lossy
/// reader goes byte by byte, and took about 3% of the proxy's CPU for a 32 KiB LLM call (`cargo xtask bench`, llm16).
pub fn lossy_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Decode `%XX` escapes once (and `+` as a space when `plus_is_space`, as in query strings and form bodies).
/// Invalid escapes are kept as written; bytes that are not UTF-8 after decoding become U+FFFD.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = (b == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(if b == b'+' && plus_is_space { b' ' } else { b });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a media type (parameters allowed, any case) is the HTML form encoding.
pub fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// The body as the upstream reads it, when that differs from its bytes: a JSON body's strings (object keys and
/// string values, one per line) when the text holds `\u` or `\/` escapes that could spell a secret the bytes do not
/// show, and a body labelled as a form percent-decoded — also when its text happens to be JSON too (`"k=%41…"` is a
/// JSON string, and a form whose field `k` the upstream's form parser decodes), and a multipart body's part headers
/// with their RFC 2231 extended parameters percent-decoded (`inspect::multipart_params`). Every reading that
/// applies, one after the other. `None` when the bytes already are what the upstream reads.
pub fn decoded_body(
    body: &str,
    json: Option<&Value>,
    content_type: Option<&str>,
) -> Option<String> {
    let strings = json.filter(|_| json_escapes(body)).map(|json| {
        let mut out = String::with_capacity(body.len());
        collect_strings(json, &mut out);
        out
    });
    let form = (is_form(content_type) && body.bytes().any(|b| b == b'%' || b == b'+'))
        .then(|| percent_decode(body, true));
    let multipart = crate::inspect::multipart_params(content_type, body);
    [strings, form, multipart]
        .into_iter()
        .flatten()
        .reduce(|mut all, more| {
            all.push_str(&more);
            all
        })
}

/// Whether JSON text holds `\u` or `\/` escapes: the ones [`decoded_body`] undoes, so that only then does it need
/// the text's parsed JSON.
pub fn json_escapes(body: &str) -> bool {
    body.contains("\\u") || body.contains("\\/")
}

/// Every string of `value` (object members' names too), each followed by `\n`, appended to `out`: JSON text as a
/// reader sees it once its escapes are undone.
pub fn collect_strings(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push_str(k);
                out.push('\n');
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_are_decoded_once() {
        assert_eq!(percent_decode("/%61dmin", false), "/admin");
        assert_eq!(percent_decode("/%2561", false), "/%61");
        assert_eq!(percent_decode("a+b%2Bc", true), "a b+c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
        assert_eq!(percent_decode("%", true), "%");
        assert_eq!(percent_decode("%ff", false), "\u{fffd}");
    }

    #[test]
    fn lossy_text_is_what_the_lossy_reader_gives() {
        for bytes in [
            &b"{\"model\":\"gpt\"}"[..],
            "h\u{e9}llo \u{1f600}".as_bytes(),
            b"a\xffb\xc3",
            b"\xe2\x82",
            b"",
        ] {
            assert_eq!(lossy_text(bytes), String::from_utf8_lossy(bytes));
        }
        assert_eq!(lossy_text(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn json_escapes_are_undone_only_when_present() {
        let body = r#"{"m":"\u0041KIA","k\/ey":[1,"x"]}"#;
        let json: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            decoded_body(body, Some(&json), None).as_deref(),
            Some("m\nAKIA\nk/ey\nx\n")
        );
        let plain = r#"{"m":"line\nnext"}"#;
        let json: Value = serde_json::from_str(plain).unwrap();
        assert_eq!(decoded_body(plain, Some(&json), None), None);
    }

    #[test]
    fn form_bodies_are_decoded() {
        let ct = Some("Application/X-WWW-Form-Urlencoded; charset=utf-8");
        assert_eq!(
            decoded_body("k=%41KIA+x", None, ct).as_deref(),
            Some("k=AKIA x")
        );
        assert_eq!(decoded_body("k=%41", None, Some("text/plain")), None);
        assert_eq!(decoded_body("k=v", None, ct), None);
    }

    #[test]
    fn a_form_body_that_is_also_json_is_read_as_the_form_it_is_labelled() {
        let ct = Some("application/x-www-form-urlencoded");
        for body in [r#""k=%41KIA""#, r#"["&k=%41KIA&"]"#] {
            let json: Value = serde_json::from_str(body).unwrap();
            let decoded = decoded_body(body, Some(&json), ct).unwrap_or_default();
            assert!(decoded.contains("k=AKIA"), "{body}: {decoded}");
        }
        // Both readings when both apply.
        let body = r#""\u0041&k=%42""#;
        let json: Value = serde_json::from_str(body).unwrap();
        let decoded = decoded_body(body, Some(&json), ct).unwrap_or_default();
        assert!(decoded.starts_with("A&k=%42\n"), "{decoded}");
        assert!(decoded.contains("k=B"), "{decoded}");
    }
}
