//! Request body decoding: undoes `Content-Encoding` (gzip, deflate as zlib or raw, br, zstd, and stacks of them) so
//! inspection sees what the upstream will see, with every decoding stage capped at the inspection limit so a
//! compression bomb stops at the limit instead of filling memory. A body with anything after the end of a coding's
//! stream is corrupt: inspection sees exactly the bytes that are forwarded.

use std::io::Read;

use bytes::Bytes;

use super::InspectError;

/// One coding named in a `Content-Encoding` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    fn parse(token: &str) -> Result<Coding, InspectError> {
        match token.to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Coding::Identity),
            "gzip" | "x-gzip" => Ok(Coding::Gzip),
            "deflate" => Ok(Coding::Deflate),
            "br" => Ok(Coding::Brotli),
            "zstd" => Ok(Coding::Zstd),
            other => Err(InspectError::UnsupportedEncoding(other.to_string())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// The `Content-Encoding` of a message with `headers`, as one list ([`field_list`]): `identity` on one line and
/// `gzip` on the next is a gzip body, and an upstream that combines the lines decodes it. A line that is not ASCII
/// names no coding ([`decode_body`] then refuses it). `None` when the field is absent.
pub fn content_coding(headers: &http::HeaderMap) -> Option<String> {
    field_list(headers, http::header::CONTENT_ENCODING)
}

/// Every field line of `name` in `headers`, in order, as the one list they make, joined with `, ` (RFC 9110 §5.3: a
/// recipient may combine a field's lines, so the policy reads them as the upstream may). Bytes that are not ASCII
/// become U+FFFD. `None` when the field is absent.
pub fn field_list(headers: &http::HeaderMap, name: http::header::HeaderName) -> Option<String> {
    let mut lines = headers.get_all(name).iter();
    let mut list = String::from_utf8_lossy(lines.next()?.as_bytes()).into_owned();
    for line in lines {
        list.push_str(", ");
        list.push_str(&String::from_utf8_lossy(line.as_bytes()));
    }
    Some(list)
}

/// Decode `body` according to the `Content-Encoding` header value `encoding` (a comma-separated list, applied in
/// order by the sender, so undone in reverse). Every stage's output is capped at `limit` bytes.
pub fn decode_body(encoding: Option<&str>, body: Bytes, limit: u64) -> Result<Bytes, InspectError> {
    let codings = match encoding {
        None => Vec::new(),
        Some(value) => value
            .split(',')
            .map(|t| Coding::parse(t.trim()))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut current = body;
    for coding in codings.into_iter().rev() {
        current = match coding {
            Coding::Identity => current,
            Coding::Gzip => {
                let mut decoder = flate2::bufread::MultiGzDecoder::new(&current[..]);
                let out = read_capped(&mut decoder, coding, limit)?;
                whole(decoder.into_inner(), coding)?;
                out
            }
            Coding::Deflate if looks_like_zlib(&current) => {
                let mut decoder = flate2::bufread::ZlibDecoder::new(&current[..]);
                let out = read_capped(&mut decoder, coding, limit)?;
                whole(decoder.into_inner(), coding)?;
                out
            }
            Coding::Deflate => {
                let mut decoder = flate2::bufread::DeflateDecoder::new(&current[..]);
                let out = read_capped(&mut decoder, coding, limit)?;
                whole(decoder.into_inner(), coding)?;
                out
            }
            Coding::Brotli => {
                let mut decoder = brotli_decompressor::Decompressor::new(&current[..], 64 * 1024);
                let out = read_capped(&mut decoder, coding, limit)?;
                // Once the stream has ended, one more read fails if input is left in the decoder's buffer.
                let buffered_rest = decoder.read(&mut [0u8; 1]).map_or(true, |n| n != 0);
                if buffered_rest {
                    return Err(InspectError::Corrupt {
                        encoding: coding.name(),
                    });
                }
                whole(decoder.into_inner(), coding)?;
                out
            }
            Coding::Zstd => decode_zstd(&current, limit)?,
        };
    }
    if current.len() as u64 > limit {
        return Err(InspectError::TooLarge { limit });
    }
    Ok(current)
}

/// Refuse a body that is JSON in an encoding other than plain UTF-8: UTF-16 or UTF-32 (with or without a BOM) or
/// UTF-8 behind a BOM. Servers that sniff the charset (Python's `json.loads(bytes)`, used by the official MCP SDK)
/// would act on it while inspection saw no JSON at all, so such a body is never forwarded. Bodies that are not
/// JSON in any of these encodings pass.
pub fn check_json_charset(body: &[u8]) -> Result<(), InspectError> {
    let text = match body {
        [0xef, 0xbb, 0xbf, rest @ ..] => std::str::from_utf8(rest).ok().map(str::to_string),
        [0, 0, 0xfe, 0xff, rest @ ..] => utf32(rest, u32::from_be_bytes),
        [0xff, 0xfe, 0, 0, rest @ ..] => utf32(rest, u32::from_le_bytes),
        [0xfe, 0xff, rest @ ..] => utf16(rest, u16::from_be_bytes),
        [0xff, 0xfe, rest @ ..] => utf16(rest, u16::from_le_bytes),
        // RFC 4627 section 3: the first two characters of JSON text are ASCII, so the NUL pattern tells the
        // encoding of a BOM-less body.
        [0, 0, 0, a, ..] if *a != 0 => utf32(body, u32::from_be_bytes),
        [a, 0, 0, 0, ..] if *a != 0 => utf32(body, u32::from_le_bytes),
        [0, a, 0, b, ..] if *a != 0 && *b != 0 => utf16(body, u16::from_be_bytes),
        [a, 0, b, 0, ..] if *a != 0 && *b != 0 => utf16(body, u16::from_le_bytes),
        _ => None,
    };
    match text {
        Some(t) if serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok() => {
            Err(InspectError::NotUtf8Json)
        }
        _ => Ok(()),
    }
}

fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Option<String> {
    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| unit([c[0], c[1]])).collect();
    String::from_utf16(&units).ok()
}

fn utf32(bytes: &[u8], unit: fn([u8; 4]) -> u32) -> Option<String> {
    bytes
        .chunks_exact(4)
        .map(|c| char::from_u32(unit([c[0], c[1], c[2], c[3]])))
        .collect()
}

/// RFC 1950 header check: compression method 8 and a header checksum divisible by 31. HTTP `deflate` is meant to be
/// zlib, but some clients send raw deflate; this tells them apart.
fn looks_like_zlib(data: &[u8]) -> bool {
    match data {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

/// The input a decoder left unread once its stream ended must be empty: bytes after the end of a compressed stream
/// would be forwarded without ever being inspected.
fn whole(rest: &[u8], coding: Coding) -> Result<(), InspectError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(InspectError::Corrupt {
            encoding: coding.name(),
        })
    }
}

/// Read a decoder to its end, but never more than `limit` bytes of output.
fn read_capped<R: Read>(reader: R, coding: Coding, limit: u64) -> Result<Bytes, InspectError> {
    let mut out = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|_| InspectError::Corrupt {
            encoding: coding.name(),
        })?;
    if out.len() as u64 > limit {
        return Err(InspectError::TooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// zstd bodies may hold several frames back to back; each one is decoded in turn within the same cap.
fn decode_zstd(data: &[u8], limit: u64) -> Result<Bytes, InspectError> {
    let corrupt = || InspectError::Corrupt { encoding: "zstd" };
    let mut input = data;
    let mut out = Vec::new();
    if input.is_empty() {
        return Err(corrupt());
    }
    while !input.is_empty() {
        let remaining = limit.saturating_add(1).saturating_sub(out.len() as u64);
        let decoder = ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|_| corrupt())?;
        decoder
            .take(remaining)
            .read_to_end(&mut out)
            .map_err(|_| corrupt())?;
        if out.len() as u64 > limit {
            return Err(InspectError::TooLarge { limit });
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str, bom: bool) -> Vec<u8> {
        let mut out = if bom { vec![0xff, 0xfe] } else { Vec::new() };
        out.extend(s.encode_utf16().flat_map(u16::to_le_bytes));
        out
    }

    #[test]
    fn json_in_other_charsets_is_refused_everything_else_passes() {
        let json =
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}}"#;
        assert!(check_json_charset(json.as_bytes()).is_ok());
        for body in [
            utf16le(json, false),
            utf16le(json, true),
            json.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            json.chars()
                .flat_map(|c| u32::from(c).to_le_bytes())
                .collect(),
            json.chars()
                .flat_map(|c| u32::from(c).to_be_bytes())
                .collect(),
            [&[0xef, 0xbb, 0xbf][..], json.as_bytes()].concat(),
        ] {
            assert!(
                matches!(check_json_charset(&body), Err(InspectError::NotUtf8Json)),
                "{body:?}"
            );
        }
        // Binary that merely looks like UTF-16, and text that is not JSON, pass.
        assert!(check_json_charset(&[b'B', 0, b'M', 0, 0xff, 0xd8]).is_ok());
        assert!(check_json_charset(&utf16le("hello there", false)).is_ok());
        assert!(check_json_charset(b"").is_ok());
        assert!(check_json_charset(&[0xff, 0xfe]).is_ok());
    }
}
