//! The byte budget for everything the proxy holds whole before deciding it: request bodies, response bodies and
//! server-sent events read for a response or proposal rule, WebSocket messages. Each such buffer is bounded on its
//! own by the policy's `max_body_bytes`; the budget bounds them together, so many of them at once — a hundred HTTP/2
//! streams on one connection, each sending a large body slowly — cannot grow the daemon until the kernel kills it
//! (which would stop every agent on the host).
//!
//! Shares work like connection admission (`limits`, `dns::Admission`): every agent (its cgroup, else its profile,
//! then its process: `dns::agent_key`) may hold at most `proxy.max_buffered_bytes_per_agent` bytes, and all agents
//! together at most `proxy.max_buffered_bytes`. Bytes are reserved as a buffer grows — before its memory is
//! allocated, by its capacity, not only by a declared `Content-Length` — through a [`Reservation`], which gives them
//! back when it drops: when the exchange ends, on every error path, and when a client going away cancels the
//! exchange's task. A buffer that cannot grow within its agent's share or the total is refused ([`Exceeded`]); the
//! caller answers `503` with `Retry-After` and records reason `buffer_limit`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use crate::dns::agent_key;
use crate::model::Agent;

/// Idle agents' entries are swept once the table has this many.
const SWEEP_AT: usize = 256;

/// The process-wide byte budget and each agent's share of it.
#[derive(Debug)]
pub(crate) struct Budget {
    total: u64,
    per_agent: u64,
    used: AtomicU64,
    agents: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// Why a buffer could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Exceeded {
    /// The agent holds its share (`proxy.max_buffered_bytes_per_agent`).
    #[error("the agent's share of the proxy's buffer budget is in use; retry later")]
    Agent,
    /// All agents together hold the total (`proxy.max_buffered_bytes`).
    #[error("the proxy's buffer budget is in use; retry later")]
    Total,
}

/// Bytes of one buffer, held against its agent's share and the total until it drops.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    share: Arc<AtomicU64>,
    held: u64,
}

impl Budget {
    /// At most `total` bytes held at once, at most `per_agent` of them by any one agent.
    pub fn new(total: u64, per_agent: u64) -> Budget {
        Budget {
            total,
            per_agent: per_agent.min(total),
            used: AtomicU64::new(0),
            agents: Mutex::new(HashMap::new()),
        }
    }

    /// An empty reservation for a buffer of `agent`.
    pub fn reserve(self: &Arc<Self>, agent: &Agent) -> Reservation {
        let key = agent_key(Some(agent));
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if agents.len() >= SWEEP_AT && !agents.contains_key(&key) {
            // An entry no reservation refers to (only the table does) is idle.
            agents.retain(|_, share| Arc::strong_count(share) > 1);
        }
        let share = agents.entry(key).or_default().clone();
        Reservation {
            budget: self.clone(),
            share,
            held: 0,
        }
    }

    /// Bytes held now, over every agent.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Add `n` to `counter` if the sum stays within `cap`.
fn try_add(counter: &AtomicU64, n: u64, cap: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            cur.checked_add(n).filter(|&sum| sum <= cap)
        })
        .is_ok()
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Hold `n` more bytes; nothing changes when the agent's share or the total cannot take them.
    pub fn grow(&mut self, n: u64) -> Result<(), Exceeded> {
        if n == 0 {
            return Ok(());
        }
        if !try_add(&self.share, n, self.budget.per_agent) {
            return Err(Exceeded::Agent);
        }
        if !try_add(&self.budget.used, n, self.budget.total) {
            self.share.fetch_sub(n, Ordering::AcqRel);
            return Err(Exceeded::Total);
        }
        self.held += n;
        Ok(())
    }

    /// Hold at least `n` bytes in all.
    pub fn grow_to(&mut self, n: u64) -> Result<(), Exceeded> {
        self.grow(n.saturating_sub(self.held))
    }

    /// Hold at most `n` bytes in all, giving the rest back.
    pub fn shrink_to(&mut self, n: u64) {
        let back = self.held.saturating_sub(n);
        if back > 0 {
            self.share.fetch_sub(back, Ordering::AcqRel);
            self.budget.used.fetch_sub(back, Ordering::AcqRel);
            self.held -= back;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// Why a [`Buffer`] refused more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The buffer would exceed its own bound (the policy's `max_body_bytes`).
    TooLarge,
    /// The budget cannot take the buffer's growth.
    Budget(Exceeded),
}

/// How many times the proxy holds each byte of a body it reads whole for a decision: the buffer, and the text
/// inspection reads of it (the Action's body, `String::from_utf8_lossy`), held while the exchange is decided.
pub(crate) const INSPECTED_COPIES: u64 = 2;

/// Bytes of parsed JSON one structural character (`,` `:` `[` `{`) of a body's text can become, at most: a
/// `serde_json::Value` (80 bytes with `preserve_order`) in its array or object's storage, which grows by doubling,
/// plus an object member's name and index entry.
pub(crate) const JSON_BYTES_PER_ELEMENT: u64 = 160;

/// What parsing `text` as JSON can hold beyond the text, at most: [`JSON_BYTES_PER_ELEMENT`] per structural
/// character (strings are already counted as text); 0 for text that does not open an array or object (after
/// whitespace and a UTF-8 byte-order mark, which the proposal reader skips: `inspect::proposal::body_json`). Parsed
/// JSON takes several times the text's room, and `[0,0,0,…]` eighty times: a black-box attack made one agent's 4 MB
/// bodies hold about 2 GB while the budget counted only their text. The bound is reserved before the parse.
pub(crate) fn json_tree_bound(text: &[u8]) -> u64 {
    let opens = text
        .strip_prefix(b"\xef\xbb\xbf")
        .unwrap_or(text)
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'[' | b'{'));
    if !opens {
        return 0;
    }
    lines_tree_bound(text)
}

/// What parsing the JSON lines carried in `text` (a form holding a batch input file) can hold beyond the text, at
/// most: [`json_tree_bound`] of text wherever its JSON opens.
pub(crate) fn lines_tree_bound(text: &[u8]) -> u64 {
    structural_count(text).saturating_mul(JSON_BYTES_PER_ELEMENT)
}

/// How many of `text`'s bytes are `,` `:` `[` or `{`. Counted in runs of 255 bytes into a byte-wide sum, which the
/// compiler turns into wide vector compares: a byte-at-a-time count of a 32 KiB LLM call took about 5% of the proxy's
/// CPU for the call (`cargo xtask bench`, llm16, perf).
fn structural_count(text: &[u8]) -> u64 {
    text.chunks(255)
        .map(|run| {
            let hits = run.iter().fold(0u8, |n, &b| {
                n + u8::from((b == b',') | (b == b':') | (b == b'[') | (b == b'{'))
            });
            u64::from(hits)
        })
        .sum()
}

/// A byte buffer that grows only within its bound and its reservation: its capacity is reserved before it is
/// allocated (doubling, as a `Vec` grows, but never past the bound), `copies` times over (the buffer and the copies
/// made of it while it is decided), so what the budget counts is what is held.
#[derive(Debug)]
pub(crate) struct Buffer {
    buf: BytesMut,
    limit: u64,
    copies: u64,
    held: Reservation,
}

impl Buffer {
    /// An empty buffer of at most `limit` bytes, each reserved `copies` times (at least once) in `held`.
    pub fn new(limit: u64, copies: u64, held: Reservation) -> Buffer {
        Buffer {
            buf: BytesMut::new(),
            limit,
            copies: copies.max(1),
            held,
        }
    }

    /// Make room for `len` bytes in all at once (a declared length), reserving them.
    pub fn expect(&mut self, len: u64) -> Result<(), Overflow> {
        if len > self.limit {
            return Err(Overflow::TooLarge);
        }
        self.room_for(len)
    }

    /// Append `data`.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Overflow> {
        let needed = (self.buf.len() as u64).saturating_add(data.len() as u64);
        if needed > self.limit {
            return Err(Overflow::TooLarge);
        }
        self.room_for(needed)?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Bytes in the buffer.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The bound the buffer was made with.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The bytes, and the reservation that still holds them (drop it once they are no longer held).
    pub fn finish(self) -> (Bytes, Reservation) {
        (self.buf.freeze(), self.held)
    }

    /// A capacity of at least `needed` bytes, reserved first.
    fn room_for(&mut self, needed: u64) -> Result<(), Overflow> {
        let cap = self.buf.capacity() as u64;
        if needed <= cap {
            return Ok(());
        }
        let target = cap.saturating_mul(2).max(1024).min(self.limit).max(needed);
        self.held
            .grow_to(target.saturating_mul(self.copies))
            .map_err(Overflow::Budget)?;
        let Ok(target) = usize::try_from(target) else {
            return Err(Overflow::TooLarge);
        };
        // A new allocation of exactly `target` (`BytesMut::reserve` may double past it).
        let mut grown = BytesMut::with_capacity(target);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_bounded_by_its_structure_and_other_text_by_nothing() {
        assert_eq!(json_tree_bound(b"[0,0,0]"), 3 * JSON_BYTES_PER_ELEMENT);
        assert_eq!(
            json_tree_bound(br#" {"a": [1, {"b": "x,y"}]}"#),
            7 * JSON_BYTES_PER_ELEMENT
        );
        assert_eq!(
            json_tree_bound("\u{feff} [0,0]".as_bytes()),
            2 * JSON_BYTES_PER_ELEMENT
        );
        assert_eq!(json_tree_bound(b"a,b,c"), 0);
        assert_eq!(json_tree_bound(b""), 0);
    }

    #[test]
    fn structure_is_counted_across_runs_of_every_length() {
        // Every byte structural, past the 255-byte runs the count sums in a byte.
        for len in [0, 1, 254, 255, 256, 511, 4096, 70_000] {
            let text = vec![b'['; len];
            assert_eq!(structural_count(&text), len as u64, "{len} bytes");
        }
        let mixed: Vec<u8> = b"{\"a\":[1,2],\"b\":{}}".repeat(1000);
        let expected = mixed
            .iter()
            .filter(|b| matches!(b, b',' | b':' | b'[' | b'{'))
            .count() as u64;
        assert_eq!(structural_count(&mixed), expected);
        assert_eq!(expected, 7000);
    }

    fn agent(cgroup: &str) -> Agent {
        Agent {
            cgroup: Some(cgroup.into()),
            ..Agent::default()
        }
    }

    #[test]
    fn shares_and_total_are_kept_and_given_back_on_drop() {
        let budget = Arc::new(Budget::new(100, 60));
        let (a, b, c) = (agent("/a"), agent("/b"), agent("/c"));
        let mut a1 = budget.reserve(&a);
        a1.grow(40).unwrap();
        let mut a2 = budget.reserve(&a);
        assert_eq!(a2.grow(30), Err(Exceeded::Agent), "a's share is 60");
        assert_eq!(a2.held(), 0, "a refused growth holds nothing");
        a2.grow(20).unwrap();
        let mut b1 = budget.reserve(&b);
        b1.grow(40).unwrap();
        assert_eq!(budget.used(), 100);
        let mut c1 = budget.reserve(&c);
        assert_eq!(c1.grow(1), Err(Exceeded::Total));
        drop(a1);
        assert_eq!(budget.used(), 60);
        c1.grow(40).unwrap();
        a2.shrink_to(5);
        assert_eq!((a2.held(), budget.used()), (5, 85));
        a2.grow_to(3).unwrap();
        assert_eq!(a2.held(), 5, "grow_to never shrinks");
        drop((a2, b1, c1));
        assert_eq!(budget.used(), 0);
        // Every share is back: one agent may again take its whole share.
        let mut again = budget.reserve(&a);
        again.grow(60).unwrap();
    }

    #[test]
    fn a_buffer_reserves_its_capacity_before_it_grows() {
        let budget = Arc::new(Budget::new(10_000, 10_000));
        let mut buf = Buffer::new(5_000, 1, budget.reserve(&agent("/a")));
        buf.push(&[1; 10]).unwrap();
        assert_eq!(budget.used(), 1024, "the first allocation");
        buf.push(&[2; 1500]).unwrap();
        assert_eq!(budget.used(), 2048, "doubled");
        buf.push(&[3; 2000]).unwrap();
        assert_eq!(budget.used(), 4096);
        buf.push(&[4; 1000]).unwrap();
        assert_eq!(budget.used(), 5_000, "never past the bound");
        assert_eq!(buf.push(&[5; 491]), Err(Overflow::TooLarge));
        assert_eq!(buf.len(), 4510);
        let (bytes, held) = buf.finish();
        assert_eq!(bytes.len(), 4510);
        assert_eq!(held.held(), 5_000);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_buffer_over_the_budget_is_refused_and_holds_what_it_had() {
        let budget = Arc::new(Budget::new(3_000, 3_000));
        let other = {
            let mut r = budget.reserve(&agent("/b"));
            r.grow(1_000).unwrap();
            r
        };
        let mut buf = Buffer::new(10_000, 1, budget.reserve(&agent("/a")));
        buf.push(&[0; 1500]).unwrap();
        assert_eq!(buf.push(&[0; 1000]), Err(Overflow::Budget(Exceeded::Total)));
        assert_eq!(buf.len(), 1500);
        assert_eq!(
            budget.used(),
            2_500,
            "the other's 1000 and the buffer's 1500"
        );
        drop(buf);
        drop(other);
        assert_eq!(budget.used(), 0);
        // A declared length is reserved at once.
        let mut declared = Buffer::new(10_000, 1, budget.reserve(&agent("/a")));
        assert_eq!(
            declared.expect(3_001),
            Err(Overflow::Budget(Exceeded::Agent))
        );
        declared.expect(2_500).unwrap();
        assert_eq!(budget.used(), 2_500);
        assert_eq!(declared.expect(20_000), Err(Overflow::TooLarge));
        drop(declared);
        // Each byte of a body that is inspected is reserved for its copies too.
        let mut inspected = Buffer::new(10_000, INSPECTED_COPIES, budget.reserve(&agent("/a")));
        inspected.expect(1_500).unwrap();
        assert_eq!(budget.used(), 3_000);
        assert_eq!(
            inspected.push(&[0; 1_501]),
            Err(Overflow::Budget(Exceeded::Agent))
        );
    }

    #[test]
    fn idle_agents_are_swept() {
        let budget = Arc::new(Budget::new(10, 1));
        for i in 0..(SWEEP_AT * 3) {
            let mut r = budget.reserve(&agent(&format!("/{i}")));
            r.grow(1).unwrap();
        }
        let len = budget
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(len <= SWEEP_AT, "{len} entries kept");
        assert_eq!(budget.used(), 0);
    }
}
