//! Request bodies whose text a receiver decodes before it acts on it, beyond `Content-Encoding`: the charset a
//! `Content-Type` names, and the parts of a `multipart/*` body (RFC 2046 §5.1, `multipart/form-data` RFC 7578).
//!
//! A part may carry its own `Content-Transfer-Encoding` (`base64`, `quoted-printable`): RFC 7578 §4.7 deprecates it
//! for form data and knows no sender that uses it, yet python-multipart, Django and Go's `mime/multipart` (for
//! quoted-printable) decode it, so a secret sent base64-encoded would reach the application while the detectors
//! read only its encoding. Such a part is refused, not decoded: nothing legitimate sends it, and a rewrite
//! (redaction) could not be put back in the encoding anyway. Likewise a part with its own `Content-Encoding` (no
//! standard defines one inside form data), and text in a charset that does not spell ASCII as ASCII (UTF-16,
//! UTF-32, UTF-7, EBCDIC, ...) — in the body's or in a part's `Content-Type` — which a receiver decodes and the
//! detectors cannot read.
//!
//! The parts are found by a reader of our own rather than a parser library (`multer`, the one axum uses, is async
//! over a stream and strict: it reads one boundary one way). Parsers differ on where a delimiter may stand (after
//! CRLF, LF, or anywhere), on transport padding and on a closing delimiter; this reader is deliberately the most
//! liberal of them: every occurrence of `--boundary` anywhere in the body is read as the start of a part whose
//! header lines follow. A header that any parser could read is therefore read here (a legitimate body never holds
//! its boundary inside a part: RFC 2046 §5.1.1). The boundary itself must be readable one way only: one `boundary`
//! parameter, of the characters RFC 2046 allows (so quoted and unquoted readings agree), and one `Content-Type`.
//!
//! Names given as RFC 2231 extended parameters (`filename*=UTF-8''%41KIA…`) are percent-decoded by receivers: they
//! are data, and [`decoded_params`] gives them to the detectors as receivers read them.

use memchr::memmem;

use super::InspectError;

/// What is wrong with a body's encodings, as far as inspection can read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    #[error("the request carries more than one Content-Type")]
    ContentTypes,
    #[error("the multipart boundary can be read more than one way")]
    Boundary,
    #[error("a multipart part carries a Content-Transfer-Encoding other than 7bit, 8bit or binary (RFC 7578 §4.7)")]
    TransferEncoding,
    #[error("a multipart part carries its own Content-Encoding")]
    PartEncoding,
    #[error("the body or a part declares a charset that does not spell ASCII as ASCII")]
    Charset,
}

impl From<Undecodable> for InspectError {
    fn from(u: Undecodable) -> InspectError {
        InspectError::Encoded(u)
    }
}

/// Check a request body against the `Content-Type` lines it came with (`content_types`, every line in order): the
/// body's charset, and for a `multipart/*` body every part's headers, as described in the module documentation.
pub fn check(content_types: &[&[u8]], body: &[u8]) -> Result<(), Undecodable> {
    let content_type = match content_types {
        [] => return Ok(()),
        [one] => String::from_utf8_lossy(one),
        _ => return Err(Undecodable::ContentTypes),
    };
    let (media, params) = split_params(&content_type);
    check_charset(&params)?;
    if !media.to_ascii_lowercase().starts_with("multipart/") {
        return Ok(());
    }
    let Some(boundary) = boundary(&params)? else {
        // No boundary: no receiver can find a part.
        return Ok(());
    };
    for block in header_blocks(body, boundary.as_bytes()) {
        for (name, value) in header_lines(block) {
            check_part_header(&name, &value)?;
        }
    }
    Ok(())
}

/// The header blocks of a multipart body as receivers may read them, percent-decoded, when any names an RFC 2231
/// extended parameter (`name*=charset'lang'%XX…`): the text receivers take for a field or file name. `None` when
/// the body is not multipart or has no such parameter.
pub fn decoded_params(content_type: Option<&str>, body: &str) -> Option<String> {
    let (media, params) = split_params(content_type?);
    if !media.to_ascii_lowercase().starts_with("multipart/") {
        return None;
    }
    let boundary = boundary(&params).ok()??;
    let mut out = String::new();
    for block in header_blocks(body.as_bytes(), boundary.as_bytes()) {
        let text = String::from_utf8_lossy(block);
        if text.contains("*=") {
            out.push_str(&crate::encoding::percent_decode(&text, false));
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Whether a part of the multipart `body` is named `name` (`Content-Disposition: form-data; name="…"`, RFC 7578
/// §4.2), looking only at the parts' header blocks, never at their data (an uploaded file may hold any text). A
/// body whose boundary cannot be read is searched whole (such a body is refused anyway, see [`check`]).
pub fn names_part(content_type: &str, body: &str, name: &str) -> bool {
    let (quoted, bare) = (format!("name=\"{name}\""), format!("name={name}"));
    let names = |text: &str| text.contains(&quoted) || text.contains(&bare);
    let (_, params) = split_params(content_type);
    match boundary(&params) {
        Ok(Some(boundary)) => header_blocks(body.as_bytes(), boundary.as_bytes())
            .any(|block| names(&String::from_utf8_lossy(block))),
        _ => names(body),
    }
}

/// One part of a `multipart/form-data` body read by [`form_parts`]: its field name (RFC 7578 §4.2), its file name if
/// it has one, and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormPart<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub data: &'a str,
}

/// The parts of a `multipart/form-data` body (RFC 7578; delimiters as RFC 2046 §5.1.1 writes them), when it reads
/// one way only, for a reading that must see exactly what the receiver stores: the body opens with the first
/// delimiter (no preamble), every `--boundary` in it starts a line ending in CRLF, none is followed by transport
/// padding, the last closes the body (`--boundary--`, then at most a CRLF), and each part has one
/// `Content-Disposition: form-data` naming it once, in plain parameters (no RFC 2231 `name*` forms), and its
/// headers are fields (`name: value`, RFC 9110 §5.1 token names) on lines ended by CRLF, up to an empty CRLF line. `None` for any other body: the liberal reader ([`check`]) still reads its
/// headers, but its data may be cut more than one way.
pub fn form_parts<'a>(content_type: &str, body: &'a str) -> Option<Vec<FormPart<'a>>> {
    let (media, params) = split_params(content_type);
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let delimiter = format!("--{}", boundary(&params).ok()??);
    let found: Vec<usize> = memmem::find_iter(body.as_bytes(), delimiter.as_bytes()).collect();
    let (&close, opens) = found.split_last()?;
    let epilogue = body.get(close + delimiter.len()..)?.strip_prefix("--")?;
    if opens.first() != Some(&0) || !matches!(epilogue, "" | "\r\n") {
        return None;
    }
    let mut parts = Vec::with_capacity(opens.len());
    for (i, &at) in opens.iter().enumerate() {
        let next = found[i + 1];
        let part = body
            .get(at + delimiter.len()..next)?
            .strip_prefix("\r\n")?
            .strip_suffix("\r\n")?;
        let (head, data) = part.split_once("\r\n\r\n")?;
        // Every header line a field (`token ":" value`), ended by CRLF only: a bare LF ends a line (or the headers,
        // as an empty line) for a reader that accepts it (Go's `net/textproto`), which would start the data
        // elsewhere.
        let field = |line: &str| {
            line.split_once(':').is_some_and(|(name, value)| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                    && !value.contains(['\r', '\n', '\0'])
            })
        };
        if !head.split("\r\n").all(field) {
            return None;
        }
        let mut disposition = head
            .split("\r\n")
            .map(|line| line.split_once(':'))
            .filter(|field| {
                field.is_none_or(|(n, _)| n.trim().eq_ignore_ascii_case("content-disposition"))
            });
        let (_, value) = disposition.next()??;
        if disposition.next().is_some() {
            return None;
        }
        let (kind, params) = split_params(value.trim());
        let one = |n: &str| {
            let mut named = params.iter().filter(|(k, _)| k.trim_end_matches('*') == n);
            let first = named.next();
            match (first, named.next()) {
                (Some((k, v)), None) if k == n => Ok(Some(v.clone())),
                (None, _) => Ok(None),
                _ => Err(()),
            }
        };
        let (Ok(Some(name)), Ok(filename)) = (one("name"), one("filename")) else {
            return None;
        };
        if !kind.eq_ignore_ascii_case("form-data") {
            return None;
        }
        parts.push(FormPart {
            name,
            filename,
            data,
        });
    }
    Some(parts)
}

/// A media type and its parameters (`name=value`, names lower-cased, values unquoted); RFC 9110 §5.6.6.
fn split_params(content_type: &str) -> (&str, Vec<(String, String)>) {
    let mut pieces = content_type.split(';');
    let media = pieces.next().unwrap_or_default().trim();
    let params = pieces
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Some((name.trim().to_ascii_lowercase(), value.to_string()))
        })
        .collect();
    (media, params)
}

/// The boundary, when it reads one way only: a single `boundary` parameter (no RFC 2231 `boundary*` forms beside
/// it), 1–70 characters of RFC 2046 §5.1.1 `bchars` not ending in a space. `None` when there is none.
fn boundary(params: &[(String, String)]) -> Result<Option<String>, Undecodable> {
    let mut named = params.iter().filter(|(n, _)| n.starts_with("boundary"));
    let Some((name, value)) = named.next() else {
        return Ok(None);
    };
    let bchar = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    let readable = name == "boundary"
        && named.next().is_none()
        && (1..=70).contains(&value.len())
        && value.chars().all(bchar)
        && !value.ends_with(' ');
    if readable {
        Ok(Some(value.clone()))
    } else {
        Err(Undecodable::Boundary)
    }
}

/// The charsets whose text spells every ASCII character as that ASCII byte: a secret written in them is the same
/// bytes the detectors look for. The multi-byte East Asian ones (Shift_JIS, EUC, GBK, GB 18030, Big5) are among
/// them: a decoder reads an ASCII character only from its own byte, so a byte scanner sees at least what it reads
/// (the WHATWG Encoding Standard's decoders). Anything else named by a `charset` parameter (UTF-16/32, UTF-7,
/// ISO-2022, EBCDIC) is refused.
fn ascii_compatible(charset: &str) -> bool {
    let c = charset.trim().to_ascii_lowercase();
    matches!(
        c.as_str(),
        "utf-8"
            | "utf8"
            | "us-ascii"
            | "ascii"
            | "latin1"
            | "latin-1"
            | "iso-8859-1"
            | "koi8-r"
            | "koi8-u"
            | "shift_jis"
            | "sjis"
            | "windows-31j"
            | "euc-jp"
            | "euc-kr"
            | "gbk"
            | "gb2312"
            | "gb18030"
            | "big5"
    ) || c
        .strip_prefix("cp125")
        .is_some_and(|n| n.parse::<u8>().is_ok_and(|n| n <= 8))
        || c.strip_prefix("iso-8859-")
            .is_some_and(|n| n.parse::<u8>().is_ok())
        || c.strip_prefix("windows-125")
            .is_some_and(|n| n.parse::<u8>().is_ok_and(|n| n <= 8))
}

fn check_charset(params: &[(String, String)]) -> Result<(), Undecodable> {
    let mut charsets = params.iter().filter(|(n, _)| n.starts_with("charset"));
    match charsets.next() {
        None => Ok(()),
        Some((name, value))
            if name == "charset" && charsets.next().is_none() && ascii_compatible(value) =>
        {
            Ok(())
        }
        Some(_) => Err(Undecodable::Charset),
    }
}

fn check_part_header(name: &str, value: &str) -> Result<(), Undecodable> {
    let name = name.trim().to_ascii_lowercase();
    let token = value.trim().trim_matches('"').to_ascii_lowercase();
    match name.as_str() {
        "content-transfer-encoding" if !matches!(token.as_str(), "7bit" | "8bit" | "binary") => {
            Err(Undecodable::TransferEncoding)
        }
        "content-encoding" if !matches!(token.as_str(), "" | "identity") => {
            Err(Undecodable::PartEncoding)
        }
        "content-type" => check_charset(&split_params(value).1),
        _ => Ok(()),
    }
}

/// The header block after every occurrence of `--boundary` in `body`: from the end of the delimiter's line to the
/// first empty line (CRLF or LF), or to the end of the body.
fn header_blocks<'a>(body: &'a [u8], boundary: &[u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let delimiter = [b"--", boundary].concat();
    let finder = memmem::Finder::new(&delimiter).into_owned();
    let mut at = 0;
    std::iter::from_fn(move || {
        let found = at + finder.find(body.get(at..)?)?;
        let after = found + finder.needle().len();
        at = after;
        let rest = body.get(after..)?;
        // The rest of the delimiter line (transport padding, or `--` for the close delimiter).
        let start = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let rest = rest.get(start..)?;
        let end = blank_line(rest).unwrap_or(rest.len());
        Some(&rest[..end])
    })
}

/// Where the first empty line of `text` starts (the text itself starting with one counts).
fn blank_line(text: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    loop {
        let line = text.get(line_start..)?;
        if line.starts_with(b"\r\n") || line.starts_with(b"\n") {
            return Some(line_start);
        }
        line_start += memchr::memchr(b'\n', line)? + 1;
    }
}

/// The header fields of a block, both ways a folded line (RFC 5322 §2.2.3: one starting with a space) may be read:
/// joined to the field it continues, and as a field of its own (a parser that does not unfold).
fn header_lines(block: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(block);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut last: Option<usize> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = last.and_then(|i| fields.get_mut(i)) {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else {
            last = Some(fields.len());
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.push((name.to_string(), value.to_string()));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

    fn part(headers: &str, data: &str) -> String {
        format!("--XyZ\r\nContent-Disposition: form-data; name=\"f\"\r\n{headers}\r\n{data}\r\n--XyZ--\r\n")
    }

    #[test]
    fn encoded_parts_are_refused_however_hidden() {
        let (te, ce, cs) = (
            Undecodable::TransferEncoding,
            Undecodable::PartEncoding,
            Undecodable::Charset,
        );
        let cases = [
            (
                part("Content-Transfer-Encoding: base64\r\n", "QUtJQQ=="),
                te,
            ),
            (
                part("content-transfer-encoding:  Quoted-Printable \r\n", "=41"),
                te,
            ),
            // Folded under another field, and with a space before the colon.
            (
                part("X-A: 1\r\n Content-Transfer-Encoding: base64\r\n", "x"),
                te,
            ),
            (part("Content-Transfer-Encoding\t: base64\r\n", "x"), te),
            (part("Content-Encoding: gzip\r\n", "x"), ce),
            (
                part("Content-Type: text/plain; charset=utf-16le\r\n", "x"),
                cs,
            ),
            (
                part("Content-Type: text/plain; charset=\"UTF-7\"\r\n", "x"),
                cs,
            ),
            // LF-only lines, and a delimiter with no line break before it (lenient parsers find both).
            (
                "--XyZ\nContent-Transfer-Encoding: base64\n\nQQ==\n--XyZ--".into(),
                te,
            ),
            (
                "pre--XyZ\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==".into(),
                te,
            ),
            // After the close delimiter (a parser that reads on).
            (
                format!(
                    "{}--XyZ\r\nContent-Transfer-Encoding: base64\r\n\r\n",
                    part("", "x")
                ),
                te,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(check(&[CT], body.as_bytes()), Err(want), "{body}");
        }
    }

    #[test]
    fn the_boundary_and_the_body_charset_must_read_one_way() {
        let body = part("", "x");
        for ct in [
            &b"multipart/form-data; boundary=XyZ; boundary=other"[..],
            b"multipart/form-data; boundary=XyZ; boundary*=other",
            b"multipart/form-data; boundary=\"Xy\\Z\"",
            b"multipart/form-data; boundary=\"XyZ \"",
        ] {
            assert_eq!(
                check(&[ct], body.as_bytes()),
                Err(Undecodable::Boundary),
                "{ct:?}"
            );
        }
        assert_eq!(
            check(&[CT, CT], body.as_bytes()),
            Err(Undecodable::ContentTypes)
        );
        assert_eq!(
            check(&[b"text/plain; charset=utf-16"], b"x"),
            Err(Undecodable::Charset)
        );
        assert_eq!(
            check(&[b"text/plain; charset=cp037"], b"x"),
            Err(Undecodable::Charset)
        );
        assert_eq!(
            check(&[b"text/plain; charset=iso-2022-jp"], b"x"),
            Err(Undecodable::Charset)
        );
        for ascii in ["cp1252", "KOI8-R", "Shift_JIS", "gb18030", "big5", "euc-kr"] {
            let ct = format!("text/plain; charset={ascii}");
            assert_eq!(check(&[ct.as_bytes()], b"x"), Ok(()), "{ascii}");
        }
    }

    #[test]
    fn ordinary_bodies_pass() {
        let body = part(
            "Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: binary\r\n",
            "x",
        );
        assert_eq!(check(&[CT], body.as_bytes()), Ok(()));
        assert_eq!(
            check(&[b"multipart/form-data; boundary=\"XyZ\""], body.as_bytes()),
            Ok(())
        );
        // The data of a part is not read as headers.
        let body = part("", "\r\nContent-Transfer-Encoding: base64");
        assert_eq!(check(&[CT], body.as_bytes()), Ok(()));
        assert_eq!(check(&[], b"anything"), Ok(()));
        assert_eq!(check(&[b"application/json; charset=utf-8"], b"{}"), Ok(()));
        assert_eq!(check(&[b"text/plain; charset=windows-1252"], b"x"), Ok(()));
    }

    /// A header block that a reader accepting bare LF line ends (Go's `net/textproto`) ends earlier: the data it
    /// reads starts where the proxy's does not, so the form does not read one way.
    #[test]
    fn a_form_whose_headers_read_more_than_one_way_has_no_parts() {
        let ct = "multipart/form-data; boundary=XyZ";
        let form = |head: &str| {
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"f\"\r\n{head}\r\n\r\nbenign\r\n--XyZ--\r\n")
        };
        let ok = form("Content-Type: text/plain");
        assert_eq!(form_parts(ct, &ok).map(|p| p[0].data), Some("benign"));
        for head in [
            "Content-Type: text/plain\r\n\n{\"evil\": 1}\n",
            "Content-Type: text/plain\nX: 1",
            "Content-Type : text/plain",
            " folded: x",
            "no colon",
        ] {
            assert_eq!(form_parts(ct, &form(head)), None, "{head:?}");
        }
    }

    #[test]
    fn extended_parameters_are_given_decoded() {
        let body = part("", "x").replace("name=\"f\"", "name=\"f\"; filename*=UTF-8''%41KIA");
        let ct = std::str::from_utf8(CT).ok();
        let decoded = decoded_params(ct, &body).unwrap_or_default();
        assert!(decoded.contains("filename*=UTF-8''AKIA"), "{decoded}");
        assert_eq!(decoded_params(ct, &part("", "%41")), None);
        assert_eq!(decoded_params(Some("text/plain"), &body), None);
    }
}
