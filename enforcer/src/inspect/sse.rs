//! Server-sent events (HTML Living Standard §9.2, "Server-sent events": the `text/event-stream` format), read
//! incrementally from a body that arrives in chunks of any size, and written again. Each event is handed over with its
//! exact bytes (`raw`: every line through the blank line that dispatches it), so whatever is not rewritten is passed
//! on byte for byte; its `event` name and `data` are parsed as the standard says (lines end in CRLF, LF or CR; a
//! line starting with `:` is a comment; one space after the colon is dropped; `data` lines are joined with LF; a
//! byte-order mark at the very start is ignored). Our own small reader rather than a crate: the stream crates
//! (`eventsource-stream`, `sse-stream`) hand out parsed events only, and the proxy must re-emit the bytes it does not
//! rewrite exactly as they came.

use bytes::{Bytes, BytesMut};

/// One event: its bytes as received and its parsed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Every byte of the event, through its terminating blank line.
    pub raw: Bytes,
    /// The `event:` field (the last one), when present.
    pub event: Option<String>,
    /// The `data:` fields joined with LF; `None` when the event has no `data` field (a comment, a keep-alive).
    pub data: Option<String>,
    /// Some line named a field the standard does not define (not `event`, `data`, `id` or `retry`): ignored by an
    /// event-stream reader, but a sign the body may be read as something else (a JSON object's first line is one).
    pub unknown_field: bool,
}

/// Reads events from a byte stream fed chunk by chunk.
#[derive(Debug, Default)]
pub struct SseReader {
    buf: BytesMut,
    /// How far lines of the current event have been read.
    pos: usize,
    event: Option<String>,
    data: Option<String>,
    /// A line of the current event named a field the standard does not define.
    unknown_field: bool,
    /// Whether the stream's first bytes were checked for a byte-order mark.
    started: bool,
}

impl SseReader {
    pub fn new() -> SseReader {
        SseReader::default()
    }

    /// Add `chunk`; returns every event it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(event) = self.next_event(false) {
            out.push(event);
        }
        out
    }

    /// The end of the stream: the events still in the buffer, the last one possibly never dispatched by a blank
    /// line (the standard discards it; some clients do not, so it is handed over, parsed, like any other).
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(event) = self.next_event(true) {
            out.push(event);
        }
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&self.buf[self.pos..]).into_owned();
            if !line.is_empty() {
                self.field(&line);
            }
            self.pos = 0;
            out.push(SseEvent {
                raw: self.buf.split().freeze(),
                event: self.event.take(),
                data: self.data.take().map(|mut d| {
                    d.pop();
                    d
                }),
                unknown_field: std::mem::take(&mut self.unknown_field),
            });
        }
        out
    }

    /// Bytes held for an event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Read lines from `pos` until one is blank (the event is complete) or the buffer ends. `at_end`: a CR at the
    /// very end of the buffer ends its line (no LF can follow any more).
    fn next_event(&mut self, at_end: bool) -> Option<SseEvent> {
        if !self.started {
            if self.buf.len() < 3 && !at_end {
                return None;
            }
            self.started = true;
            if self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.pos = 3;
            }
        }
        loop {
            let rest = &self.buf[self.pos..];
            let end = memchr::memchr2(b'\n', b'\r', rest)?;
            let next = match rest[end] {
                b'\r' if end + 1 == rest.len() && !at_end => return None,
                b'\r' if rest.get(end + 1) == Some(&b'\n') => end + 2,
                _ => end + 1,
            };
            let (start, line_end) = (self.pos, self.pos + end);
            self.pos += next;
            if line_end == start {
                let raw = self.buf.split_to(self.pos).freeze();
                self.pos = 0;
                return Some(SseEvent {
                    raw,
                    event: self.event.take(),
                    data: self.data.take().map(|mut d| {
                        d.pop();
                        d
                    }),
                    unknown_field: std::mem::take(&mut self.unknown_field),
                });
            }
            let line = String::from_utf8_lossy(&self.buf[start..line_end]).into_owned();
            self.field(&line);
        }
    }

    fn field(&mut self, line: &str) {
        if line.starts_with(':') {
            return;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "event" => self.event = Some(value.to_string()),
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                data.push_str(value);
                data.push('\n');
            }
            "id" | "retry" => {}
            _ => self.unknown_field = true,
        }
    }
}

/// One event as `text/event-stream` bytes: `event: NAME` when named, one `data:` line per line of `data`, and the
/// blank line that dispatches it.
pub fn encode(event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(name) = event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> (Vec<SseEvent>, Vec<SseEvent>) {
        let mut r = SseReader::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.push(c));
        }
        let rest = r.finish();
        (out, rest)
    }

    const STREAM: &[u8] =
        b"\xEF\xBB\xBFevent: a\r\ndata: one\r\ndata:  two\r\n\r\n: comment\n\ndata\nid: 7\n\n\
event: b\rdata: x\r\rdata: tail";

    #[test]
    fn every_split_gives_the_same_events_and_bytes() {
        let (whole, rest) = all(&[STREAM]);
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[0].event.as_deref(), Some("a"));
        assert_eq!(whole[0].data.as_deref(), Some("one\n two"));
        assert_eq!(whole[1].data, None);
        assert_eq!(whole[2].data.as_deref(), Some(""));
        assert_eq!(whole[3].event.as_deref(), Some("b"));
        assert_eq!(whole[3].data.as_deref(), Some("x"));
        assert_eq!(rest.len(), 1);
        assert_eq!(&rest[0].raw[..], b"data: tail");
        assert_eq!(rest[0].data.as_deref(), Some("tail"));
        let joined: Vec<u8> = whole
            .iter()
            .chain(&rest)
            .flat_map(|e| e.raw.to_vec())
            .collect();
        assert_eq!(joined, STREAM);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let (events, tail) = all(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(events, whole, "split at {i}, {j}");
                assert_eq!(tail, rest, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn a_cr_at_the_end_waits_for_a_possible_lf() {
        let mut r = SseReader::new();
        assert!(r.push(b"data: a\r\n\r").is_empty());
        let e = r.push(b"\ndata: b\n\n");
        assert_eq!(e.len(), 2);
        assert_eq!(&e[0].raw[..], b"data: a\r\n\r\n");
        let mut r = SseReader::new();
        assert!(r.push(b"data: a\r\r").is_empty());
        let last = r.finish();
        assert_eq!(last.len(), 1);
        assert_eq!(&last[0].raw[..], b"data: a\r\r");
        assert_eq!(last[0].data.as_deref(), Some("a"));
    }

    #[test]
    fn a_field_the_standard_does_not_define_is_noted() {
        let (events, rest) = all(&[b"id: 1\nretry: 5\n: c\ndata: x\n\n{\"a\":1}\n\nevent: e\n\n"]);
        assert!(rest.is_empty());
        let unknown: Vec<bool> = events.iter().map(|e| e.unknown_field).collect();
        assert_eq!(unknown, [false, true, false]);
        let (_, rest) = all(&[b"data: x\n\n  \"a\": 1"]);
        assert!(rest[0].unknown_field);
    }

    #[test]
    fn encoded_events_read_back() {
        let bytes = encode(Some("message_delta"), "{\"a\":1}\nsecond");
        let (events, rest) = all(&[&bytes]);
        assert!(rest.is_empty());
        assert_eq!(events[0].event.as_deref(), Some("message_delta"));
        assert_eq!(events[0].data.as_deref(), Some("{\"a\":1}\nsecond"));
    }
}
