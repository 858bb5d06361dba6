//! The batch input files this daemon read: a batch runs only on a file uploaded through the proxy whose every line
//! was read (`inspect::batch_input`). A provider's Batch API runs the LLM calls of a file named by the id its
//! upload's answer gave; the proxy learns that id from the answer ([`Stored::note`]) and keeps it as read, for the
//! agent that uploaded it under the policy that decided the upload ([`ReadInputs`]). A batch create naming any other
//! file ([`look_up`], [`check_named`]) is refused as `unread_input`: a file uploaded elsewhere, in chunks, before the
//! daemon started, or before the policy last changed, holds calls no rule saw.
//!
//! An OpenAI file's lines name their model and were decided at the upload: its id is kept. A Gemini file's lines
//! name no model (the create's path does), so its bytes are kept beside its name, and the create that names it
//! carries them as its own calls ([`carry_named`]): decided with the create's model, as the same requests inline.
//!
//! A name stands for the bytes read only while nothing else can hold it: it is kept for the API whose lines it was
//! read as (a file read as Gemini's lines is not run as OpenAI's), only when the answer's File is the bytes sent
//! (Gemini's `sizeBytes` and `sha256Hash`: a resumable session may hold a chunk sent before), and on Gemini's host,
//! where a client may choose a free name, until the file expires and until a request may delete it
//! ([`note_touched`]).
//!
//! What is kept is in memory, up to [`CAPACITY`] files and [`KEPT_INPUT_BYTES`] bytes of Gemini files' lines (the
//! oldest forgotten first): a batch on a file forgotten, or read by a daemon since restarted, is refused, and the
//! agent uploads it again.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

use super::budget::Reservation;
use super::http::ProxyBody;
use super::readings::Readings;
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use crate::inspect::batch_input::{InputLines, NamedInput, StoredAs};
use crate::inspect::{Carried, Inspected};
use crate::model::{Agent, Mode, Reason, Verdict};

/// How many files are kept as read, at most.
pub const CAPACITY: usize = 65_536;

/// How many bytes of Gemini batch input files are kept for the creates that will name them, at most, over every
/// agent: each file's bytes as forwarded, held from its upload's answer until it is forgotten. The enforcer's
/// memory must not grow with what agents upload and never run; 32 MiB holds four files of google-genai's largest
/// single-request upload (its 8 MiB chunk) and many of the usual size. A file larger than this is never kept.
pub const KEPT_INPUT_BYTES: usize = 32 * 1024 * 1024;

/// The most of an upload's answer read for the file's name: a File object is a few hundred bytes.
const ANSWER_LIMIT: usize = 64 * 1024;

/// How long a file on Gemini's host is kept as read, at most: its files are deleted 48 hours after they are uploaded
/// (Gemini API reference, "Files"), after which the name is free to be given again.
const GEMINI_LIFETIME: Duration = Duration::from_secs(48 * 3600);

/// One file read: whose, under which policy, on which provider, and as which API's batch lines (`read_as`): a file
/// read as Gemini's `{"key", "request"}` lines was not read as OpenAI's `{"custom_id", "url", "body"}` lines (a line
/// may carry both, each reader ignoring the other's members), and Gemini's host runs both APIs' batches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    policy_hash: String,
    profile: Option<String>,
    user: Option<String>,
    uid: Option<u32>,
    provider: String,
    read_as: StoredAs,
    file: String,
}

impl Key {
    fn new(policy_hash: &str, agent: &Agent, provider: &str, read_as: StoredAs, file: &str) -> Key {
        Key {
            policy_hash: policy_hash.to_owned(),
            profile: agent.profile.clone(),
            user: agent.user.clone(),
            uid: agent.uid,
            provider: provider.to_owned(),
            read_as,
            file: file.to_owned(),
        }
    }
}

/// The files read, each until when it may be run and (a Gemini file) with its lines, oldest first.
#[derive(Debug, Default)]
pub struct ReadInputs {
    inner: Mutex<Kept>,
}

/// One file kept: until when it may be run (`None`: for as long as it is remembered), its content when its lines are
/// decided at the create (Gemini's), and when it was kept (its place in [`Kept::order`]).
#[derive(Debug)]
struct Entry {
    until: Option<SystemTime>,
    lines: Option<Bytes>,
    seq: u64,
}

impl Entry {
    fn live(&self, now: SystemTime) -> bool {
        self.until.is_none_or(|t| now < t)
    }

    fn size(&self) -> usize {
        self.lines.as_ref().map_or(0, Bytes::len)
    }
}

/// Each file kept; the files in the order they were kept (an entry whose `seq` is no longer its file's was
/// forgotten, or kept again since); the bytes of lines kept, and the next `seq`.
#[derive(Debug, Default)]
struct Kept {
    files: HashMap<Key, Entry>,
    order: VecDeque<(u64, Key)>,
    bytes: usize,
    next: u64,
}

impl Kept {
    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.files.remove(key) {
            self.bytes -= old.size();
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Key, &Entry) -> bool) {
        let mut freed = 0;
        self.files.retain(|key, entry| {
            let kept = keep(key, entry);
            if !kept {
                freed += entry.size();
            }
            kept
        });
        self.bytes -= freed;
    }
}

impl ReadInputs {
    /// Keep `key` as read until `until`, with its `lines` (a Gemini file's content); what was kept by that key
    /// before is replaced (the answer says the name holds these bytes now). The oldest files are forgotten while more
    /// than [`CAPACITY`] or [`KEPT_INPUT_BYTES`] are kept; a file whose lines alone exceed the bound is not kept.
    fn insert(&self, key: Key, until: Option<SystemTime>, lines: Option<Bytes>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = &mut *inner;
        kept.remove(&key);
        let size = lines.as_ref().map_or(0, Bytes::len);
        if size > KEPT_INPUT_BYTES {
            tracing::info!("a batch input file is larger than the room kept for files: not kept");
            return;
        }
        let seq = kept.next;
        kept.next += 1;
        kept.files.insert(key.clone(), Entry { until, lines, seq });
        kept.order.push_back((seq, key));
        kept.bytes += size;
        if kept.bytes > KEPT_INPUT_BYTES {
            // Files past their time go before any that may still run.
            let now = SystemTime::now();
            kept.retain(|_, entry| entry.live(now));
        }
        while kept.order.len() > CAPACITY || kept.bytes > KEPT_INPUT_BYTES {
            let Some((seq, old)) = kept.order.pop_front() else {
                break;
            };
            if kept.files.get(&old).is_some_and(|e| e.seq == seq) {
                kept.remove(&old);
            }
        }
    }

    /// The file `key` kept as read and not expired: `Some` of its lines (`None` for a file whose lines were decided
    /// at its upload), `None` for a file not kept.
    fn get(&self, key: &Key) -> Option<Option<Bytes>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .files
            .get(key)
            .filter(|entry| entry.live(SystemTime::now()))
            .map(|entry| entry.lines.clone())
    }

    #[cfg(test)]
    fn contains(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// Forget every file on `provider` whose name's last segment is `id` (`files/abc` for `abc`), for every agent
    /// and policy: the name may be given to another file.
    fn forget(&self, provider: &str, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.retain(|key, _| key.provider != provider || key.file.rsplit('/').next() != Some(id));
    }
}

/// A request to a host of `provider` that may delete the file `id` names (`inspect::batch_input::touched_file`): on
/// Gemini's host, where a client may choose a new file's name once no file holds it, every file kept by that name is
/// forgotten before the request goes on, whether or not it succeeds.
pub(crate) fn note_touched(read: &ReadInputs, provider: Option<&str>, id: Option<&str>) {
    if let (Some(provider @ "gemini"), Some(id)) = (provider, id) {
        tracing::debug!("a request may delete a batch input file: forgetting it");
        read.forget(provider, id);
    }
}

/// [`note_touched`] for a request that goes on, `action` being its first Action: only Gemini's host lets a client
/// choose a file's name, so other requests are not looked at.
pub(crate) fn forget_touched(
    rec: &ExchangeRecord,
    provider: Option<&str>,
    action: Option<&crate::model::Action>,
) {
    if provider != Some("gemini") || !rec.will_forward() {
        return;
    }
    let touched = action.and_then(|a| crate::inspect::touched_file(a, &rec.ctx().inspect));
    note_touched(&rec.ctx().batch_inputs, provider, touched.as_deref());
}

/// The input files a batch create names, as this daemon kept them ([`look_up`]): plain data for the phases that
/// carry their lines ([`carry_named`]) and check that each was read ([`check_named`]).
#[derive(Debug, Default)]
pub(crate) struct Named {
    /// A file named was not kept as read for this agent under this policy.
    pub unread: bool,
    /// The content of each Gemini file named and kept: its lines, the create's calls.
    pub lines: Vec<Bytes>,
}

/// The input files `inputs` a request to a host of `provider` names (a batch create's, `inspect::Inspected::inputs`),
/// looked up once among those kept as read for `agent` under the policy deciding the exchange.
pub(crate) fn look_up(
    rec: &ExchangeRecord,
    agent: &Agent,
    provider: Option<&str>,
    inputs: &[NamedInput],
) -> Named {
    let mut named = Named::default();
    let Some(provider) = provider else {
        named.unread = !inputs.is_empty();
        return named;
    };
    let policy_hash = rec.policy().hash();
    for input in inputs {
        let key = Key::new(policy_hash, agent, provider, input.read_as, &input.file);
        match rec.ctx().batch_inputs.get(&key) {
            None => named.unread = true,
            Some(Some(lines)) => named.lines.push(lines),
            Some(None) => {}
        }
    }
    named
}

/// The phase after classify for a batch create naming Gemini input files kept since their upload (`named`): each
/// file's lines become the create's calls, with its model, as the same requests inline in it would be
/// (`inspect::batch_input::InputLines`), in every reading of the request; decided, then, with the create. What
/// reading them holds (their parse, and the text detectors read: the create's body and the files') is reserved in
/// the exchange's buffer budget (`held`) first. A line naming another model than the create's is refused as an
/// inline one is (400, `unparseable`); so is a file that no longer reads as batch lines.
pub(crate) fn carry_named(
    rec: &mut ExchangeRecord,
    named: &Named,
    (inspected, readings): (&mut Inspected, &mut Readings),
    held: &mut Reservation,
) -> Result<(), Refusal> {
    if named.lines.is_empty() {
        return Ok(());
    }
    let body = inspected
        .actions
        .first()
        .and_then(|a| a.http.as_ref())
        .map_or(0, |h| h.body.len() as u64);
    let room = named.lines.iter().fold(body, |room, l| {
        // The parse, the file's text and its strings with escapes undone.
        let text = 2 * l.len() as u64;
        room.saturating_add(super::budget::lines_tree_bound(l).saturating_add(text))
    });
    held.grow(room).map_err(Refusal::over_budget)?;
    let carried = InputLines::read(named.lines.iter().map(|l| &l[..])).and_then(|lines| {
        lines.carry(&mut inspected.actions)?;
        readings
            .actions
            .iter_mut()
            .try_for_each(|actions| lines.carry(actions))
    });
    if let Err(e) = carried {
        // Refused in the create's own shape, recorded as its call, as an inline request refused so is.
        rec.note_protocol(inspected.protocol.clone());
        rec.note_llm_provider(Some(crate::inspect::Provider::Gemini));
        return Err(super::body::refusal(&e));
    }
    inspected.carried = inspected.carried.or(Some(Carried::InputLines));
    Ok(())
}

/// The check phase of a batch create: each input file it names must have been read by this daemon, for this agent,
/// under the policy deciding the exchange (`named`, looked up before the decision). A file that was not turns the
/// decision into a block (`unread_input`); refused unless the policy runs in shadow mode.
pub(crate) fn check_named(rec: &mut ExchangeRecord, named: &Named) -> Result<(), Refusal> {
    if !named.unread || !rec.will_forward() || rec.decision().is_none() {
        return Ok(());
    }
    tracing::info!("batch names an input file not read: blocking");
    let message =
        "the batch's input file was not read by the enforcer when it was uploaded: upload it \
                   through the enforcer in one request, then create the batch"
            .to_owned();
    match rec.block_instead(Reason::UnreadInput, Some(message)) {
        Some(d) if d.mode == Mode::Enforce => Err(Refusal::policy(d)),
        _ => Ok(()),
    }
}

/// An upload of a batch input file whose lines were read and that went on: its answer names the file to keep.
pub(crate) struct Stored {
    key: Key,
    stored_as: StoredAs,
    /// What was sent: its length in bytes and its SHA-256.
    sent: (u64, [u8; 32]),
    /// A Gemini file's content as sent, kept with its name for the create that decides its lines.
    lines: Option<Bytes>,
}

impl Stored {
    /// The upload `rec` decided, when it uploads a batch input file (`stored_as`) to a host of `provider` and its
    /// decision lets the file run (not blocked, in shadow mode too: an OpenAI file's lines are its Actions);
    /// `sent` is the body as it goes upstream, held (shared, not copied) until the answer is read.
    pub fn after(
        rec: &ExchangeRecord,
        agent: &Agent,
        provider: Option<&str>,
        stored_as: StoredAs,
        sent: &Bytes,
    ) -> Option<Stored> {
        let decision = rec.decision()?;
        let provider = provider?;
        (rec.will_forward() && decision.verdict != Verdict::Block).then(|| Stored {
            key: Key::new(&decision.policy_hash, agent, provider, stored_as, ""),
            stored_as,
            sent: (sent.len() as u64, Sha256::digest(sent).into()),
            lines: (stored_as == StoredAs::FileName).then(|| sent.clone()),
        })
    }

    /// Keep the file the upstream's successful `answer` names as read, and pass the answer on as it came. An answer
    /// that is not a success, too long to be a file's, or unreadable names nothing: it is passed on unread as far
    /// as it was not read.
    pub async fn note(
        mut self,
        read: &ReadInputs,
        answer: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        if !answer.status().is_success() {
            return answer;
        }
        let (parts, mut body) = answer.into_parts();
        let mut seen = BytesMut::new();
        let mut failed = None;
        while let Some(frame) = body.frame().await {
            match frame.map(Frame::into_data) {
                Ok(Ok(data)) => {
                    seen.extend_from_slice(&data);
                    if seen.len() > ANSWER_LIMIT {
                        break;
                    }
                }
                Ok(Err(_trailers)) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let whole = failed.is_none() && body.is_end_stream();
        let seen = seen.freeze();
        if whole {
            if let Some(file) = stored_name(self.stored_as, &seen, self.sent) {
                let until = (self.key.provider == "gemini")
                    .then(|| gemini_expiry(&seen, SystemTime::now()));
                self.key.file = file;
                // Copied to a buffer of its own length: the body's may be larger, and what is kept is counted.
                let lines = self.lines.take().map(|l| Bytes::copy_from_slice(&l));
                read.insert(self.key, until, lines);
            }
        }
        let body = Prefixed {
            seen: (!seen.is_empty()).then_some(seen),
            failed,
            rest: body,
        };
        Response::from_parts(parts, body.boxed())
    }
}

/// The file a successful upload answer names: OpenAI's File object `id` (with `object: file`), Gemini's
/// `file.name` when the File resource says it holds what was `sent` (its length and SHA-256): its `sizeBytes` (an
/// int64, a string in proto3 JSON) and `sha256Hash` (Gemini API reference, "Files": "SHA-256 hash of the uploaded
/// bytes", base64; Google gives the base64 of the hex digest, and the base64 of the digest itself is taken too). A
/// resumable upload's last request is read whole, but its session may hold bytes sent before (a chunk forwarded
/// unread): a file whose answer does not name what was read, or names no hash, is not kept.
fn stored_name(stored_as: StoredAs, answer: &[u8], sent: (u64, [u8; 32])) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let name = match stored_as {
        StoredAs::FileId => json
            .get("object")
            .filter(|o| o.as_str() == Some("file"))
            .and(json.get("id")),
        StoredAs::FileName => {
            let file = json.get("file")?;
            let size = file.get("sizeBytes")?;
            let size = size
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .or_else(|| size.as_u64());
            let hash = file
                .get("sha256Hash")
                .and_then(serde_json::Value::as_str)
                .and_then(base64_decode)?;
            let (length, digest) = sent;
            let same = hash == digest || hash.eq_ignore_ascii_case(hex::encode(digest).as_bytes());
            (size == Some(length) && same).then(|| file.get("name"))?
        }
    };
    name.and_then(serde_json::Value::as_str).map(str::to_owned)
}

/// When a file on Gemini's host stops being kept as read: its `expirationTime` (RFC 3339; a File object's, or an
/// OpenAI File object's `expires_at` in Unix seconds, as Gemini's OpenAI-compatible API may give it), and at most
/// [`GEMINI_LIFETIME`] after `now`.
fn gemini_expiry(answer: &[u8], now: SystemTime) -> SystemTime {
    let latest = now + GEMINI_LIFETIME;
    let json: serde_json::Value = serde_json::from_slice(answer).unwrap_or_default();
    let rfc3339 = json["file"]["expirationTime"].as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let stated = rfc3339
        .map(SystemTime::from)
        .or_else(|| {
            json["expires_at"]
                .as_u64()
                .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        })
        .unwrap_or(latest);
    stated.min(latest)
}

/// The bytes of base64 text (RFC 4648 §4, or the URL-safe alphabet of §5), padded or not; `None` for anything else.
/// Decoded by the `base64` crate (already in the build through `pem` and the YAML parser).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::{alphabet, Engine};
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [alphabet::STANDARD, alphabet::URL_SAFE]
        .iter()
        .find_map(|a| GeneralPurpose::new(a, config).decode(text).ok())
}

/// A body of which `seen` was already read: it, then what the read stopped at (`failed`), then the rest.
struct Prefixed {
    seen: Option<Bytes>,
    failed: Option<super::upstream::HttpError>,
    rest: ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = super::upstream::HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(seen) = self.seen.take() {
            return Poll::Ready(Some(Ok(Frame::data(seen))));
        }
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.seen.is_none() && self.failed.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let seen = self.seen.as_ref().map_or(0, |s| s.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + seen);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + seen);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_file_stored() {
        let content = b"{\"key\": \"k\", \"request\": {}}\n";
        let sent = (content.len() as u64, Sha256::digest(content).into());
        let openai = br#"{"id": "file-abc", "object": "file", "purpose": "batch"}"#;
        assert_eq!(
            stored_name(StoredAs::FileId, openai, sent).as_deref(),
            Some("file-abc")
        );
        // `sha256Hash` as Google gives it (base64 of the hex digest), and as the base64 of the digest itself.
        let hex_b64 = "ZWMyMWFjNTMxYmQ5MTg2NmI3ZmNhZGNjNDIxMWYyNTQyNjYzMWFkNDE1ZWM0OWFmZDBiNmIyNWQxM2RlZTllYQ==";
        let raw_b64 = "7CGsUxvZGGa3/K3MQhHyVCZjGtQV7Emv0LayXRPe6eo=";
        for hash in [hex_b64, raw_b64, raw_b64.trim_end_matches('=')] {
            let gemini = format!(
                r#"{{"file": {{"name": "files/xyz", "sizeBytes": "{}", "sha256Hash": "{hash}"}}}}"#,
                content.len()
            );
            assert_eq!(
                stored_name(StoredAs::FileName, gemini.as_bytes(), sent).as_deref(),
                Some("files/xyz"),
                "{hash}"
            );
        }
        // A file that is not what was sent (longer: a session that held bytes before; another hash), or whose answer
        // does not say: not kept.
        for other in [
            format!(
                r#"{{"file": {{"name": "files/xyz", "sizeBytes": "999", "sha256Hash": "{hex_b64}"}}}}"#
            ),
            format!(
                r#"{{"file": {{"name": "files/xyz", "sizeBytes": "{}", "sha256Hash": "AAAA"}}}}"#,
                content.len()
            ),
            format!(
                r#"{{"file": {{"name": "files/xyz", "sizeBytes": "{}"}}}}"#,
                content.len()
            ),
            r#"{"file": {"name": "files/xyz", "mimeType": "application/jsonl"}}"#.to_string(),
        ] {
            assert_eq!(
                stored_name(StoredAs::FileName, other.as_bytes(), sent),
                None,
                "{other}"
            );
        }
        assert_eq!(
            stored_name(
                StoredAs::FileId,
                br#"{"id": "batch_1", "object": "batch"}"#,
                sent
            ),
            None
        );
        assert_eq!(stored_name(StoredAs::FileName, openai, sent), None);
        assert_eq!(stored_name(StoredAs::FileId, b"not json", sent), None);
    }

    #[test]
    fn a_gemini_file_is_kept_until_it_expires_and_48_hours_at_most() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let soon = br#"{"file": {"name": "files/a", "expirationTime": "2023-11-14T23:13:20.5Z"}}"#;
        assert_eq!(
            gemini_expiry(soon, now),
            now + Duration::from_millis(3_600_500)
        );
        for late in [
            &br#"{"file": {"name": "files/a", "expirationTime": "2099-01-01T00:00:00Z"}}"#[..],
            br#"{"file": {"name": "files/a"}}"#,
            br#"{"id": "files/a", "object": "file"}"#,
        ] {
            assert_eq!(gemini_expiry(late, now), now + GEMINI_LIFETIME);
        }
        let openai = br#"{"id": "files/a", "object": "file", "expires_at": 1700000060}"#;
        assert_eq!(gemini_expiry(openai, now), now + Duration::from_secs(60));
        // A time past any the clock can hold is no time: at most the lifetime, and no panic.
        let never = br#"{"id": "files/a", "object": "file", "expires_at": 18446744073709551615}"#;
        assert_eq!(gemini_expiry(never, now), now + GEMINI_LIFETIME);
    }

    #[test]
    fn the_oldest_files_are_forgotten_first() {
        let read = ReadInputs::default();
        let agent = Agent::default();
        let key = |i: usize| {
            Key::new(
                "p1",
                &agent,
                "openai",
                StoredAs::FileId,
                &format!("file-{i}"),
            )
        };
        for i in 0..=CAPACITY {
            read.insert(key(i), None, None);
        }
        assert!(!read.contains(&key(0)));
        assert!(read.contains(&key(1)) && read.contains(&key(CAPACITY)));
        // Another policy, agent or provider: not the same file read.
        assert!(!read.contains(&Key::new(
            "p2",
            &agent,
            "openai",
            StoredAs::FileId,
            "file-1"
        )));
        let other = Agent {
            user: Some("mallory".into()),
            ..Agent::default()
        };
        assert!(!read.contains(&Key::new(
            "p1",
            &other,
            "openai",
            StoredAs::FileId,
            "file-1"
        )));
        assert!(!read.contains(&Key::new(
            "p1",
            &agent,
            "gemini",
            StoredAs::FileId,
            "file-1"
        )));
        // A file kept until a time past, or forgotten by its id: not read.
        let later = Key::new("p1", &agent, "gemini", StoredAs::FileName, "files/abc");
        read.insert(
            later.clone(),
            Some(SystemTime::now() - Duration::from_secs(1)),
            None,
        );
        assert!(!read.contains(&later));
        read.insert(
            later.clone(),
            Some(SystemTime::now() + Duration::from_secs(60)),
            None,
        );
        assert!(read.contains(&later));
        note_touched(&read, Some("gemini"), Some("abc"));
        assert!(!read.contains(&later) && read.contains(&key(CAPACITY)));
        note_touched(&read, Some("openai"), Some(&format!("file-{CAPACITY}")));
        assert!(read.contains(&key(CAPACITY)));
        // The same file read as the other API's batch lines: not read as these.
        assert!(!read.contains(&Key::new(
            "p1",
            &agent,
            "openai",
            StoredAs::FileName,
            "file-1"
        )));
    }

    /// Gemini files' lines are kept up to [`KEPT_INPUT_BYTES`] in all: the oldest go first to make room, a file
    /// forgotten or kept again gives its bytes back, and a file larger than the bound is not kept at all.
    #[test]
    fn the_oldest_lines_are_forgotten_for_room() {
        let read = ReadInputs::default();
        let agent = Agent::default();
        let key = |name: &str| Key::new("p1", &agent, "gemini", StoredAs::FileName, name);
        let quarter = KEPT_INPUT_BYTES / 4;
        let lines = |n: usize| Some(Bytes::from(vec![b'x'; n]));
        for name in ["files/a", "files/b", "files/c", "files/d"] {
            read.insert(key(name), None, lines(quarter));
        }
        assert_eq!(read.get(&key("files/a")), Some(lines(quarter)));
        // One byte more than the bound: the oldest file goes, the rest stay.
        read.insert(key("files/e"), None, lines(1));
        assert_eq!(read.get(&key("files/a")), None);
        assert_eq!(read.get(&key("files/b")), Some(lines(quarter)));
        assert_eq!(read.inner.lock().unwrap().bytes, 3 * quarter + 1);
        // Kept again with other lines: its bytes are the new ones'.
        read.insert(key("files/b"), None, lines(2));
        assert_eq!(read.get(&key("files/b")), Some(lines(2)));
        assert_eq!(read.inner.lock().unwrap().bytes, 2 * quarter + 3);
        // Forgotten by its id: its bytes are given back.
        note_touched(&read, Some("gemini"), Some("c"));
        assert_eq!(read.get(&key("files/c")), None);
        assert_eq!(read.inner.lock().unwrap().bytes, quarter + 3);
        // Larger than the bound: not kept, and what its name held before is forgotten.
        read.insert(key("files/d"), None, lines(KEPT_INPUT_BYTES + 1));
        assert_eq!(read.get(&key("files/d")), None);
        assert_eq!(read.inner.lock().unwrap().bytes, 3);
        // An expired file makes room before a live one is forgotten.
        read.insert(
            key("files/old"),
            Some(SystemTime::now() - Duration::from_secs(1)),
            lines(quarter),
        );
        read.insert(key("files/f"), None, lines(quarter));
        read.insert(key("files/g"), None, lines(quarter));
        read.insert(key("files/h"), None, lines(quarter));
        assert_eq!(read.get(&key("files/e")), Some(lines(1)));
        assert_eq!(read.inner.lock().unwrap().bytes, 3 * quarter + 3);
    }
}
