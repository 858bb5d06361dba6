//! Request body decoding: undoes `Content-Encoding` (gzip, deflate as zlib or raw, br, zstd, and stacks of them) so
//! inspection sees what the upstream will see, with every decoding stage capped at the inspection limit so a
//! compression bomb stops at the limit instead of filling memory.

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
            Coding::Gzip => read_capped(
                flate2::read::MultiGzDecoder::new(&current[..]),
                coding,
                limit,
            )?,
            Coding::Deflate => {
                if looks_like_zlib(&current) {
                    read_capped(flate2::read::ZlibDecoder::new(&current[..]), coding, limit)?
                } else {
                    read_capped(
                        flate2::read::DeflateDecoder::new(&current[..]),
                        coding,
                        limit,
                    )?
                }
            }
            Coding::Brotli => read_capped(
                brotli_decompressor::Decompressor::new(&current[..], 64 * 1024),
                coding,
                limit,
            )?,
            Coding::Zstd => decode_zstd(&current, limit)?,
        };
    }
    if current.len() as u64 > limit {
        return Err(InspectError::TooLarge { limit });
    }
    Ok(current)
}

/// RFC 1950 header check: compression method 8 and a header checksum divisible by 31. HTTP `deflate` is meant to be
/// zlib, but some clients send raw deflate; this tells them apart.
fn looks_like_zlib(data: &[u8]) -> bool {
    match data {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
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
