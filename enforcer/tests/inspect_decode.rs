//! Request body decoding: every supported Content-Encoding, stacks of them, the size cap and refusals.

use std::io::Write;

use bytes::Bytes;
use enforcer::inspect::{decode_body, InspectError};

const BODY: &[u8] =
    br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello hello hello hello"}]}"#;
const LIMIT: u64 = 1 << 20;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn br(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(data).unwrap();
    }
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn decode(enc: Option<&str>, data: Vec<u8>) -> Result<Bytes, InspectError> {
    decode_body(enc, Bytes::from(data), LIMIT)
}

#[test]
fn identity_and_absent_pass_through() {
    assert_eq!(decode(None, BODY.to_vec()).unwrap(), BODY);
    assert_eq!(decode(Some("identity"), BODY.to_vec()).unwrap(), BODY);
}

#[test]
fn each_encoding_decodes() {
    assert_eq!(decode(Some("gzip"), gzip(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("x-gzip"), gzip(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("deflate"), zlib(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("deflate"), raw_deflate(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("br"), br(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("zstd"), zstd(BODY)).unwrap(), BODY);
    assert_eq!(decode(Some("GZIP"), gzip(BODY)).unwrap(), BODY);
}

#[test]
fn stacked_encodings_are_undone_in_reverse_order() {
    // Sender applied gzip first, then br: "Content-Encoding: gzip, br".
    let data = br(&gzip(BODY));
    assert_eq!(decode(Some("gzip, br"), data).unwrap(), BODY);
    let data = gzip(&zstd(&zlib(BODY)));
    assert_eq!(decode(Some("deflate,zstd , gzip"), data).unwrap(), BODY);
}

#[test]
fn multi_frame_zstd_decodes_every_frame() {
    let mut data = zstd(b"first,");
    data.extend(zstd(b"second"));
    assert_eq!(decode(Some("zstd"), data).unwrap(), &b"first,second"[..]);
}

#[test]
fn unknown_encoding_is_refused() {
    match decode(Some("compress"), BODY.to_vec()) {
        Err(InspectError::UnsupportedEncoding(e)) => assert_eq!(e, "compress"),
        other => panic!("expected UnsupportedEncoding, got {other:?}"),
    }
    assert!(matches!(
        decode(Some("gzip, snappy"), gzip(BODY)),
        Err(InspectError::UnsupportedEncoding(_))
    ));
}

#[test]
fn corrupt_bodies_are_errors() {
    for enc in ["gzip", "br", "zstd", "deflate"] {
        let r = decode(Some(enc), b"definitely not compressed data at all".to_vec());
        assert!(
            matches!(r, Err(InspectError::Corrupt { .. })),
            "{enc}: {r:?}"
        );
    }
}

#[test]
fn bombs_stop_at_the_limit() {
    let zeros = vec![0u8; 16 << 20];
    for (enc, data) in [
        ("gzip", gzip(&zeros)),
        ("br", br(&zeros)),
        ("zstd", zstd(&zeros)),
        ("deflate", zlib(&zeros)),
    ] {
        assert!(
            data.len() < (1 << 20),
            "{enc} bomb is small: {}",
            data.len()
        );
        match decode(Some(enc), data) {
            Err(InspectError::TooLarge { limit }) => assert_eq!(limit, LIMIT),
            other => panic!("{enc}: expected TooLarge, got {:?}", other.map(|b| b.len())),
        }
    }
}

#[test]
fn identity_over_the_limit_is_too_large() {
    let big = vec![b'a'; (LIMIT + 1) as usize];
    assert!(matches!(
        decode(None, big),
        Err(InspectError::TooLarge { .. })
    ));
    let exact = vec![b'a'; LIMIT as usize];
    assert_eq!(
        decode(Some("gzip"), gzip(&exact)).unwrap().len() as u64,
        LIMIT
    );
}

/// Inspection must see exactly the bytes that are forwarded: data after the end of a compressed stream (a secret
/// placed there) would be skipped by the decoder and forwarded as-is, so a body with trailing data after any
/// content-coding's end is corrupt, whatever the coding and wherever it sits in a stack.
#[test]
fn data_after_the_end_of_a_compressed_stream_is_refused() {
    let tail: &[u8] = b"AKIAIOSFODNN7EXAMPLE";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("gzip", gzip(BODY)),
        ("deflate", zlib(BODY)),
        ("deflate", raw_deflate(BODY)),
        ("br", br(BODY)),
        ("zstd", zstd(BODY)),
    ];
    for (enc, mut data) in cases {
        data.extend_from_slice(tail);
        assert!(
            matches!(decode(Some(enc), data), Err(InspectError::Corrupt { .. })),
            "{enc} with trailing data was decoded"
        );
    }
    // Inside a stack: the inner stream ends early, the outer one is whole.
    let mut inner = zlib(BODY);
    inner.extend_from_slice(tail);
    assert!(matches!(
        decode(Some("deflate, gzip"), gzip(&inner)),
        Err(InspectError::Corrupt { .. })
    ));
    // A compressed stream larger than the decoders' read buffers, with data after its end.
    let mut x: u32 = 0x9e37_79b9;
    let noise: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    for (enc, mut data) in [
        ("br", br(&noise)),
        ("deflate", zlib(&noise)),
        ("gzip", gzip(&noise)),
    ] {
        assert_eq!(decode(Some(enc), data.clone()).unwrap(), noise, "{enc}");
        data.extend_from_slice(tail);
        assert!(
            matches!(decode(Some(enc), data), Err(InspectError::Corrupt { .. })),
            "{enc}: a large stream with trailing data was decoded"
        );
    }
    // Whole streams still decode, including gzip members back to back.
    let mut two = gzip(b"first,");
    two.extend(gzip(b"second"));
    assert_eq!(decode(Some("gzip"), two).unwrap(), &b"first,second"[..]);
}
