//! The Realtime API reader's cost per server event (`inspect::proposal`, `Proposals::realtime`): a 24 KiB
//! `response.output_audio.delta` (base64 PCM, as the GA interface streams a model's speech) and a small
//! `response.output_text.delta`, each pushed through the reader and released, against `serde_json::from_str` into a
//! `Value` alone on the same text, and against reading only its `type` (a serde struct, every other member
//! skipped as `IgnoredAny`: still a pass over the whole text, the least any reader that validates the event can do).
//! Prints microseconds per event (median of rounds). Run:
//! `cargo bench -p enforcer --bench realtime` (`ENFORCER_BENCH_SHORT=1`: fewer rounds).

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use enforcer::inspect::proposal::{Event, Proposals};
use serde_json::json;

/// The allocator the daemon ships with (`src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The audio delta's size before base64: 18 KiB of PCM16 is 24 KiB of base64 (about 375 ms of 24 kHz mono).
const PCM_BYTES: usize = 18 * 1024;

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
        for _ in chunk.len()..3 {
            out.push('=');
        }
    }
    out
}

fn audio_delta() -> String {
    let pcm: Vec<u8> = (0..PCM_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    json!({"type": "response.output_audio.delta", "event_id": "event_bench_1", "response_id": "resp_bench",
        "item_id": "item_bench", "output_index": 0, "content_index": 0, "delta": base64(&pcm)})
    .to_string()
}

fn text_delta() -> String {
    json!({"type": "response.output_text.delta", "event_id": "event_bench_2", "response_id": "resp_bench",
        "item_id": "item_bench", "output_index": 0, "content_index": 0, "delta": "Hello there, "})
    .to_string()
}

/// Median microseconds per call of `f` over `rounds` rounds of `per_round` calls.
fn per_call(rounds: usize, per_round: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / per_round as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter.
    let short = std::env::var_os("ENFORCER_BENCH_SHORT").is_some();
    let (rounds, per_round) = if short { (5, 200) } else { (21, 1000) };
    for (name, text) in [("audio delta", audio_delta()), ("text delta", text_delta())] {
        let raw = Bytes::from(text.clone());
        let value = per_call(rounds, per_round, || {
            let v: serde_json::Value = serde_json::from_str(black_box(&text)).unwrap_or_default();
            black_box(v);
        });
        /// The event's `type`, the rest skipped (and validated) as `IgnoredAny`; a duplicate `type` is an error.
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[serde(borrow, rename = "type")]
            _ty: std::borrow::Cow<'a, str>,
        }
        let head = per_call(rounds, per_round, || {
            let h: Option<Head> = serde_json::from_str(black_box(&text)).ok();
            black_box(h);
        });
        let mut reader = Proposals::realtime(false);
        let read = per_call(rounds, per_round, || {
            let calls = reader.push(Event {
                name: None,
                data: text.clone(),
                raw: raw.clone(),
            });
            assert_eq!(calls.as_ref().map(Vec::len), Ok(0), "{name}");
            black_box(reader.release(&[]));
        });
        println!(
            "realtime {name} ({} bytes): reader push+release {read:.2} µs/event; serde_json::Value parse alone \
             {value:.2} µs/event; `type` read alone (serde struct, the rest ignored) {head:.2} µs/event",
            text.len()
        );
    }
}
