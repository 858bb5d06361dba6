//! Constrain: carries out the rewrites of a CONSTRAIN decision on a request (redaction by detectors, JSON set,
//! remove and cap, header set and remove, dropping declared LLM tools) and reports what changed by location and
//! cause only, never values. Opaque signed fields are never modified: a rewrite that would touch one fails with
//! [`ConstrainError::SignedField`] and the proxy blocks instead. Unknown fields are always preserved (serde_json
//! keeps key order). Pure functions over plain data; no I/O. It does not decide (policy) or frame bodies (proxy).
//!
//! The body given to [`apply`] is the decoded body (see `inspect::decode_body`); when a rewrite changes it, the new
//! body is identity-encoded, so `content-encoding` is removed and `content-length` (if present) updated.

#![forbid(unsafe_code)]

mod redact;
mod signed;
mod tools;

pub use signed::is_signed_object;

use std::ops::Range;

use bytes::Bytes;
use serde_json::Value;

use crate::encoding::{decoded_body, percent_decode};
use crate::jsonpath::JsonPath;
use crate::model::{Change, PlannedRewrite, Rewrite};
use crate::policy::Policy;

use redact::Redactor;

#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    /// The rewrite would modify an opaque signed field: the request must be blocked instead.
    #[error("a rewrite would modify the signed field at {path}")]
    SignedField { path: String },
    /// A detector a redaction named still fires in the rewritten request (a secret in the host, the URL path, an
    /// object key, a query name or a binary body, which redaction does not rewrite): the request must be blocked.
    #[error("a secret found by {detector} could not be redacted from the request {location}")]
    Unredactable {
        rule: String,
        detector: String,
        location: &'static str,
    },
    #[error("the body is not JSON, so the JSON rewrite of rule {rule} cannot apply")]
    NotJson { rule: String },
    #[error("rewrite {op} of rule {rule} is not supported")]
    Unsupported { rule: String, op: &'static str },
    #[error("rule {rule} names the unknown detector {detector:?}")]
    UnknownDetector { rule: String, detector: String },
}

impl ConstrainError {
    /// The reason a decision that could not be carried out records: a signed field, an unredactable secret, or
    /// anything else a rewrite could not apply to (`unparseable`).
    pub fn reason(&self) -> crate::model::Reason {
        match self {
            ConstrainError::SignedField { .. } => crate::model::Reason::SignedField,
            ConstrainError::Unredactable { .. } => crate::model::Reason::Unredactable,
            _ => crate::model::Reason::Unparseable,
        }
    }
}

/// Secret detectors as the redaction needs them (the policy's `Detectors` implements this).
pub trait Detect {
    /// Whether a detector of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// Byte ranges of `text` where detector `name` fires.
    fn find(&self, name: &str, text: &str) -> Vec<Range<usize>>;
    /// Whether what detector `name` finds in request header `header` is the client's own credential for
    /// `provider`, the provider the request goes to (see `policy::detect::Detectors::own_credential`).
    fn own_credential(&self, _name: &str, _header: &str, _provider: Option<&str>) -> bool {
        false
    }
}

/// How redaction writes and where it looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstrainOptions {
    /// Replacement for a detected secret; `{detector}` is replaced by the detector's name.
    pub marker: String,
    /// The LLM provider the request goes to, if its host is one (`openai`, `anthropic`, `gemini`): that provider's
    /// key in a credential header is the client authenticating, which redaction leaves alone (and which does not
    /// make the request unredactable). Any other provider's key there is redacted like a secret anywhere else.
    pub credential_provider: Option<String>,
}

impl Default for ConstrainOptions {
    fn default() -> Self {
        ConstrainOptions {
            marker: crate::policy::DEFAULT_REDACTION_MARKER.into(),
            credential_provider: None,
        }
    }
}

impl ConstrainOptions {
    /// The detectors of `names` that redaction runs on header `header`: all but those finding the client's own
    /// credential there.
    fn for_header(&self, detect: &dyn Detect, names: &[String], header: &str) -> Vec<String> {
        let provider = self.credential_provider.as_deref();
        names
            .iter()
            .filter(|n| !detect.own_credential(n, header, provider))
            .cloned()
            .collect()
    }
}

impl Detect for crate::policy::detect::Detectors {
    fn contains(&self, name: &str) -> bool {
        crate::policy::detect::Detectors::contains(self, name)
    }
    fn find(&self, name: &str, text: &str) -> Vec<Range<usize>> {
        crate::policy::detect::Detectors::find(self, name, text)
    }
    fn own_credential(&self, name: &str, header: &str, provider: Option<&str>) -> bool {
        self.index(name).is_some_and(|i| {
            crate::policy::detect::Detectors::own_credential(self, i, header, provider)
        })
    }
}

/// Apply `rewrites` (in order) to the request head and body with the policy's detectors and marker, for a request
/// to `provider`'s API (see [`ConstrainOptions::credential_provider`]). On success returns what changed; on error
/// nothing must be forwarded (the caller blocks).
pub fn apply(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    provider: Option<&str>,
    parts: &mut http::request::Parts,
    body: &mut Bytes,
) -> Result<Vec<Change>, ConstrainError> {
    let options = ConstrainOptions {
        marker: policy.redaction_marker().to_string(),
        credential_provider: provider.map(str::to_string),
    };
    apply_with(rewrites, policy.detectors(), &options, parts, body)
}

/// [`apply`] to a body already parsed: `parsed` is `body` as `serde_json::from_slice` reads it (the classify phase's
/// parse of a UTF-8 body), taken and rewritten where it lies rather than parsed a second time, so a request holds one
/// parse of its body (the one the buffer budget reserved room for).
pub fn apply_parsed(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    provider: Option<&str>,
    parts: &mut http::request::Parts,
    body: &mut Bytes,
    parsed: Value,
) -> Result<Vec<Change>, ConstrainError> {
    let options = ConstrainOptions {
        marker: policy.redaction_marker().to_string(),
        credential_provider: provider.map(str::to_string),
    };
    let doc = Doc::Json(parsed);
    apply_doc(rewrites, policy.detectors(), &options, parts, body, doc)
}

/// A request's host and path as an audit record may show them: as sent, unless one of the policy's detectors fires
/// in one (also behind percent-escapes, or upper-cased: host names arrive lower-cased); then that one is decoded (and
/// upper-cased when only that spelling fired), with every hit replaced by the policy's marker.
pub fn scrub_for_record<'a>(policy: &Policy, texts: impl IntoIterator<Item = &'a mut String>) {
    let redactor = Redactor {
        detect: policy.detectors(),
        names: policy.detector_names(),
        marker: policy.redaction_marker(),
    };
    for text in texts {
        let decoded = percent_decode(text, false);
        // Upper-cased only when that changes it: the same text would fire the same (none).
        let upper = || {
            decoded
                .bytes()
                .any(|b| b.is_ascii_lowercase())
                .then(|| redactor.redact_str(&decoded.to_ascii_uppercase()))
                .flatten()
        };
        if let Some((redacted, _)) = redactor.redact_str(&decoded).or_else(upper) {
            *text = redacted;
        }
    }
}

/// The body as the rewrites see it: parsed once, on first need.
enum Doc {
    Unparsed,
    Json(Value),
    NotJson,
}

/// [`apply`] with explicit detectors and options. `parts` and `body` are only modified when every rewrite succeeds.
pub fn apply_with(
    rewrites: &[PlannedRewrite],
    detect: &dyn Detect,
    options: &ConstrainOptions,
    parts: &mut http::request::Parts,
    body: &mut Bytes,
) -> Result<Vec<Change>, ConstrainError> {
    apply_doc(rewrites, detect, options, parts, body, Doc::Unparsed)
}

/// [`apply_with`] on `body` as `doc` says it parses (parsed on first need when [`Doc::Unparsed`]).
fn apply_doc(
    rewrites: &[PlannedRewrite],
    detect: &dyn Detect,
    options: &ConstrainOptions,
    parts: &mut http::request::Parts,
    body: &mut Bytes,
    mut doc: Doc,
) -> Result<Vec<Change>, ConstrainError> {
    let mut changes = Vec::new();
    let mut headers = parts.headers.clone();
    let mut uri = parts.uri.clone();
    let mut text: Option<String> = None;
    let mut body_changed = false;

    for planned in rewrites {
        let rule = &planned.rule;
        match &planned.rewrite {
            Rewrite::HeaderSet { name, value } => {
                changes.push(Change {
                    path: format!("header.{name}"),
                    cause: "header_set".into(),
                });
                headers.insert(name.clone(), value.clone());
            }
            Rewrite::HeaderRemove { name } => {
                if headers.remove(name).is_some() {
                    changes.push(Change {
                        path: format!("header.{name}"),
                        cause: "header_remove".into(),
                    });
                }
            }
            Rewrite::Redact { detectors } => {
                if let Some(unknown) = detectors.iter().find(|d| !detect.contains(d)) {
                    return Err(ConstrainError::UnknownDetector {
                        rule: rule.clone(),
                        detector: unknown.clone(),
                    });
                }
                let redactor = Redactor {
                    detect,
                    names: detectors,
                    marker: &options.marker,
                };
                redact_head(&redactor, options, &mut headers, &mut uri, &mut changes);
                match parse(&mut doc, body) {
                    Some(value) => {
                        let before = changes.len();
                        redactor.redact_json(value, &mut changes)?;
                        body_changed |= changes.len() > before;
                    }
                    None => {
                        // A text body that is not JSON is redacted as text; binary bodies are left alone.
                        let current = match text.take() {
                            Some(t) => Some(t),
                            None => std::str::from_utf8(body).ok().map(str::to_string),
                        };
                        if let Some(current) = current {
                            match redactor.redact_str(&current) {
                                Some((new, fired)) => {
                                    changes.extend(fired.into_iter().map(|d| Change {
                                        path: "body".into(),
                                        cause: format!("redact:{d}"),
                                    }));
                                    text = Some(new);
                                    body_changed = true;
                                }
                                None => text = Some(current),
                            }
                        }
                    }
                }
            }
            rewrite @ (Rewrite::JsonSet { .. }
            | Rewrite::JsonRemove { .. }
            | Rewrite::JsonCap { .. }
            | Rewrite::JsonTruncate { .. }) => {
                // Setting needs a document to set in; removing, capping or truncating an empty body is a no-op.
                let empty_ok = !matches!(rewrite, Rewrite::JsonSet { .. });
                let Some(value_doc) = json_for(&mut doc, body, rule, empty_ok)? else {
                    continue;
                };
                body_changed |= json_rewrite(rewrite, value_doc, &mut changes)? > 0;
            }
            Rewrite::DropTools { globs } => {
                if let Some(value) = parse(&mut doc, body) {
                    let before = changes.len();
                    tools::drop_tools(value, globs, &mut changes);
                    body_changed |= changes.len() > before;
                }
            }
        }
    }

    if body_changed {
        let new_body = match (&doc, text) {
            (Doc::Json(value), _) => {
                // Sized for the original plus some markers, so a large body is not re-grown while writing.
                let mut out = Vec::with_capacity(body.len() + body.len() / 8 + 64);
                serde_json::to_writer(&mut out, value).map_err(|_| ConstrainError::NotJson {
                    rule: String::new(),
                })?;
                Bytes::from(out)
            }
            (_, Some(text)) => Bytes::from(text),
            _ => body.clone(),
        };
        headers.remove(http::header::CONTENT_ENCODING);
        if headers.contains_key(http::header::CONTENT_LENGTH) {
            headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(new_body.len()),
            );
        }
        check_redacted(rewrites, detect, options, &uri, &headers, &new_body, &doc)?;
        *body = new_body;
    } else {
        check_redacted(rewrites, detect, options, &uri, &headers, body, &doc)?;
    }
    parts.headers = headers;
    parts.uri = uri;
    Ok(changes)
}

/// Redaction rewrites JSON string values, query values and header values. A secret anywhere else (the host, the URL
/// path, an object key, a query name, a body that is not text) would be forwarded as it is, so the request as it will leave
/// is scanned once more, the way the policy's `detect` scans it, with every detector a redaction named; a hit is an
/// error and the caller blocks. The client's own credential, which redaction deliberately leaves alone, is skipped
/// here too.
fn check_redacted(
    rewrites: &[PlannedRewrite],
    detect: &dyn Detect,
    options: &ConstrainOptions,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: &Bytes,
    doc: &Doc,
) -> Result<(), ConstrainError> {
    let named: Vec<(&str, &str)> = rewrites
        .iter()
        .filter_map(|p| match &p.rewrite {
            Rewrite::Redact { detectors } => Some((p.rule.as_str(), detectors)),
            _ => None,
        })
        .flat_map(|(rule, ds)| ds.iter().map(move |d| (rule, d.as_str())))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    // Host names are case-insensitive (and arrive lower-cased): checked in upper case too.
    let host = [
        uri.host().unwrap_or_default(),
        headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    ]
    .join("\n");
    let host = format!("{host}\n{}", host.to_ascii_uppercase());
    let path = percent_decode(uri.path(), false);
    let query = percent_decode(uri.query().unwrap_or_default(), true);
    let header_values: Vec<(&str, String)> = headers
        .iter()
        .map(|(name, v)| {
            (
                name.as_str(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let provider = options.credential_provider.as_deref();
    let text = String::from_utf8_lossy(body);
    let json = match doc {
        Doc::Json(v) => Some(v),
        _ => None,
    };
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let decoded = decoded_body(&text, json, content_type);
    for (rule, detector) in named {
        let fires = |s: &str| !detect.find(detector, s).is_empty();
        let location = if fires(&host) {
            "host"
        } else if fires(&path) {
            "path"
        } else if fires(&query) {
            "query"
        } else if header_values
            .iter()
            .any(|(h, v)| !detect.own_credential(detector, h, provider) && fires(v))
        {
            "headers"
        } else if fires(&text) || decoded.as_deref().is_some_and(fires) {
            "body"
        } else {
            continue;
        };
        return Err(ConstrainError::Unredactable {
            rule: rule.to_string(),
            detector: detector.to_string(),
            location,
        });
    }
    Ok(())
}

/// The parsed body, parsing it on first use; `None` when it is not JSON.
fn parse<'a>(doc: &'a mut Doc, body: &Bytes) -> Option<&'a mut Value> {
    if matches!(doc, Doc::Unparsed) {
        *doc = match serde_json::from_slice(body) {
            Ok(v) => Doc::Json(v),
            Err(_) => Doc::NotJson,
        };
    }
    match doc {
        Doc::Json(v) => Some(v),
        _ => None,
    }
}

/// The JSON body for a JSON rewrite. An empty body has nothing to remove or cap (`Ok(None)` when `empty_ok`);
/// anything else that is not JSON is an error.
fn json_for<'a>(
    doc: &'a mut Doc,
    body: &Bytes,
    rule: &str,
    empty_ok: bool,
) -> Result<Option<&'a mut Value>, ConstrainError> {
    let empty = body.iter().all(u8::is_ascii_whitespace);
    match parse(doc, body) {
        Some(v) => Ok(Some(v)),
        None if empty && empty_ok => Ok(None),
        None => Err(ConstrainError::NotJson {
            rule: rule.to_string(),
        }),
    }
}

/// Carry out one JSON rewrite (`json_set`, `json_remove`, `json_cap`, `json_truncate`) on `doc`, never touching a
/// signed region; returns how many locations changed. Any other rewrite changes nothing here.
fn json_rewrite(
    rewrite: &Rewrite,
    doc: &mut Value,
    changes: &mut Vec<Change>,
) -> Result<usize, ConstrainError> {
    match rewrite {
        Rewrite::JsonSet { path, value } => {
            guarded(doc, |d| path.set(d, value.clone()), "json_set", changes)
        }
        Rewrite::JsonRemove { path } => guarded(doc, |d| path.remove(d), "json_remove", changes),
        Rewrite::JsonCap { path, max } => guarded(doc, |d| cap(path, d, *max), "json_cap", changes),
        Rewrite::JsonTruncate { path, max } => {
            guarded(doc, |d| truncate(path, d, *max), "json_truncate", changes)
        }
        _ => Ok(0),
    }
}

/// Apply `rewrites` (in order) to one JSON value that is not a request body: a WebSocket message, a proposed tool
/// call's arguments, a response body or one of its events. Redaction rewrites the value's strings; the JSON
/// rewrites and `drop_tools` apply as to a body; header rewrites change nothing. Signed regions are never touched.
/// Afterwards the value is scanned again with every detector a redaction named (escapes undone): a secret that
/// redaction cannot reach (an object key) is [`ConstrainError::Unredactable`]. On error `value` is unchanged and
/// nothing may be passed on (the caller blocks).
pub fn apply_to_json(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    value: &mut Value,
) -> Result<Vec<Change>, ConstrainError> {
    let mut candidate = value.clone();
    let (_, changes) = rewrite_json(rewrites, policy, &mut candidate)?;
    *value = candidate;
    Ok(changes)
}

/// [`apply_to_json`] on the value itself (the parsed JSON of a response body or event, held once while it is
/// decided): rewritten where it lies, never copied; the rewritten value's JSON text and what changed. On error the
/// value may be rewritten in part and must not be passed on (the caller blocks).
pub fn rewrite_json(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    candidate: &mut Value,
) -> Result<(String, Vec<Change>), ConstrainError> {
    let options = ConstrainOptions {
        marker: policy.redaction_marker().to_string(),
        ..ConstrainOptions::default()
    };
    let detect = policy.detectors();
    let mut changes = Vec::new();
    for planned in rewrites {
        match &planned.rewrite {
            Rewrite::Redact { detectors } => {
                let redactor = Redactor {
                    detect,
                    names: detectors,
                    marker: &options.marker,
                };
                redactor.redact_json(candidate, &mut changes)?;
            }
            Rewrite::DropTools { globs } => tools::drop_tools(candidate, globs, &mut changes),
            rewrite => {
                json_rewrite(rewrite, candidate, &mut changes)?;
            }
        }
    }
    let text = candidate.to_string();
    let decoded = decoded_body(&text, Some(candidate), Some("application/json"));
    for planned in rewrites {
        let Rewrite::Redact { detectors } = &planned.rewrite else {
            continue;
        };
        for detector in detectors {
            let fires = |s: &str| !Detect::find(detect, detector, s).is_empty();
            if fires(&text) || decoded.as_deref().is_some_and(fires) {
                return Err(ConstrainError::Unredactable {
                    rule: planned.rule.clone(),
                    detector: detector.clone(),
                    location: "body",
                });
            }
        }
    }
    Ok((text, changes))
}

/// Apply `rewrites` to a text that is not JSON (a response body, one server-sent event's data): redaction rewrites
/// it as text (`path: body`); a JSON rewrite cannot apply ([`ConstrainError::NotJson`]); header rewrites and
/// `drop_tools` change nothing. On error `text` is unchanged and nothing may be passed on (the caller blocks).
pub fn apply_to_text(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    text: &mut String,
) -> Result<Vec<Change>, ConstrainError> {
    let detect = policy.detectors();
    let mut candidate: Option<String> = None;
    let mut changes = Vec::new();
    for planned in rewrites {
        match &planned.rewrite {
            Rewrite::Redact { detectors } => {
                let redactor = Redactor {
                    detect,
                    names: detectors,
                    marker: policy.redaction_marker(),
                };
                let current = candidate.as_deref().unwrap_or(text);
                if let Some((new, fired)) = redactor.redact_str(current) {
                    changes.extend(fired.into_iter().map(|d| Change {
                        path: "body".into(),
                        cause: format!("redact:{d}"),
                    }));
                    candidate = Some(new);
                }
            }
            Rewrite::JsonSet { .. }
            | Rewrite::JsonRemove { .. }
            | Rewrite::JsonCap { .. }
            | Rewrite::JsonTruncate { .. } => {
                return Err(ConstrainError::NotJson {
                    rule: planned.rule.clone(),
                })
            }
            _ => {}
        }
    }
    if let Some(new) = candidate {
        *text = new;
    }
    Ok(changes)
}

/// Arrays at `path` longer than `max` keep their first `max` elements; returns the paths truncated.
fn truncate(path: &JsonPath, doc: &mut Value, max: usize) -> Vec<String> {
    let mut truncated = Vec::new();
    path.for_each_mut(doc, &mut |p, v| {
        if let Value::Array(items) = v {
            if items.len() > max {
                items.truncate(max);
                truncated.push(p.to_string());
            }
        }
    });
    truncated
}

/// Run a JSON rewrite on the document and fail if a signed region did not survive it unchanged (the signed regions
/// alone are copied to compare, never the whole document: the buffer budget counts one parse of a body). Returns how
/// many locations changed. On error the document is rewritten in part and must not be passed on: every caller's
/// document is its own working value (a request body's parse, a copy, a value given up), and the error blocks.
fn guarded(
    doc: &mut Value,
    op: impl FnOnce(&mut Value) -> Vec<String>,
    cause: &str,
    changes: &mut Vec<Change>,
) -> Result<usize, ConstrainError> {
    let before: Vec<(String, Value)> = signed::regions(doc)
        .into_iter()
        .map(|(p, v)| (p, v.clone()))
        .collect();
    let paths = op(doc);
    if let Some(path) = signed::first_touched(&before, doc) {
        return Err(ConstrainError::SignedField { path });
    }
    let n = paths.len();
    changes.extend(paths.into_iter().map(|path| Change {
        path,
        cause: cause.to_string(),
    }));
    Ok(n)
}

/// Numbers above `max` at `path` become `max` (an integer when `max` is whole); returns the paths capped.
fn cap(path: &JsonPath, doc: &mut Value, max: f64) -> Vec<String> {
    let mut capped = Vec::new();
    path.for_each_mut(doc, &mut |p, v| {
        let Some(n) = v.as_f64() else {
            return;
        };
        if n > max {
            *v = capped_number(max);
            capped.push(p.to_string());
        }
    });
    capped
}

fn capped_number(max: f64) -> Value {
    if max.fract() == 0.0 && max.abs() < 9.0e15 {
        // Whole and exactly representable: write it as an integer, as the APIs expect for token limits.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "max is whole and below 2^53"
        )]
        let whole = max as i64;
        Value::from(whole)
    } else {
        serde_json::Number::from_f64(max).map_or(Value::Null, Value::Number)
    }
}

/// Redact header values (but the client's own credential, see [`ConstrainOptions::credential_provider`]) and URL
/// query values.
fn redact_head(
    redactor: &Redactor<'_>,
    options: &ConstrainOptions,
    headers: &mut http::HeaderMap,
    uri: &mut http::Uri,
    changes: &mut Vec<Change>,
) {
    let mut replaced = Vec::new();
    for (name, value) in headers.iter() {
        // The host routes the request (and is the TLS name upstream): never rewritten, only checked afterwards.
        if name == http::header::HOST {
            continue;
        }
        let Ok(text) = value.to_str() else {
            continue;
        };
        let names = options.for_header(redactor.detect, redactor.names, name.as_str());
        let for_header = Redactor {
            names: &names,
            ..*redactor
        };
        if let Some((new, fired)) = for_header.redact_str(text) {
            let shown = redactor.safe_path(&format!("header.{name}"));
            changes.extend(fired.into_iter().map(|d| Change {
                path: shown.clone(),
                cause: format!("redact:{d}"),
            }));
            replaced.push((name.clone(), value.clone(), new));
        }
    }
    for (name, old, new) in replaced {
        if let Ok(new) = http::HeaderValue::try_from(new) {
            // Replace only the value that matched, keeping other values of a repeated header.
            let values: Vec<http::HeaderValue> = headers
                .get_all(&name)
                .iter()
                .map(|v| if *v == old { new.clone() } else { v.clone() })
                .collect();
            headers.remove(&name);
            for v in values {
                headers.append(name.clone(), v);
            }
        }
    }

    let Some(pq) = uri.path_and_query() else {
        return;
    };
    let Some(query) = pq.query() else {
        return;
    };
    let Some(new_query) = redactor.redact_query(query, changes) else {
        return;
    };
    let new_pq = format!("{}?{new_query}", pq.path());
    let mut uri_parts = uri.clone().into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(new_pq) {
        uri_parts.path_and_query = Some(pq);
        if let Ok(new_uri) = http::Uri::from_parts(uri_parts) {
            *uri = new_uri;
        }
    }
}
