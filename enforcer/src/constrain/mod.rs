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

/// Secret detectors as the redaction needs them (the policy's `Detectors` implements this).
pub trait Detect {
    /// Whether a detector of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// Byte ranges of `text` where detector `name` fires.
    fn find(&self, name: &str, text: &str) -> Vec<Range<usize>>;
}

/// How redaction writes and where it looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstrainOptions {
    /// Replacement for a detected secret; `{detector}` is replaced by the detector's name.
    pub marker: String,
    /// Header names (lower case) whose values redaction leaves alone: the credentials a client sends to its own
    /// provider, which a content redaction must not break.
    pub redact_skip_headers: Vec<String>,
}

impl Default for ConstrainOptions {
    fn default() -> Self {
        ConstrainOptions {
            marker: crate::policy::DEFAULT_REDACTION_MARKER.into(),
            redact_skip_headers: [
                "authorization",
                "proxy-authorization",
                "x-api-key",
                "x-goog-api-key",
                "api-key",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

impl Detect for crate::policy::detect::Detectors {
    fn contains(&self, name: &str) -> bool {
        crate::policy::detect::Detectors::contains(self, name)
    }
    fn find(&self, name: &str, text: &str) -> Vec<Range<usize>> {
        crate::policy::detect::Detectors::find(self, name, text)
    }
}

/// Apply `rewrites` (in order) to the request head and body with the policy's detectors and default options.
/// On success returns what changed; on error nothing must be forwarded (the caller blocks).
pub fn apply(
    rewrites: &[PlannedRewrite],
    policy: &Policy,
    parts: &mut http::request::Parts,
    body: &mut Bytes,
) -> Result<Vec<Change>, ConstrainError> {
    let options = ConstrainOptions {
        marker: policy.redaction_marker().to_string(),
        ..ConstrainOptions::default()
    };
    apply_with(rewrites, policy.detectors(), &options, parts, body)
}

/// A request's host and path as an audit record may show them: as sent, unless one of the policy's detectors fires
/// in one (also behind percent-escapes, or upper-cased: host names arrive lower-cased); then that one is decoded (and
/// upper-cased when only that spelling fired), with every hit replaced by the policy's marker.
pub fn scrub_for_record<'a>(policy: &Policy, texts: impl IntoIterator<Item = &'a mut String>) {
    let detect = policy.detectors();
    let names: Vec<String> = detect.names().map(String::from).collect();
    let redactor = Redactor {
        detect,
        names: &names,
        marker: policy.redaction_marker(),
    };
    for text in texts {
        let decoded = percent_decode(text, false);
        if let Some((redacted, _)) = redactor
            .redact_str(&decoded)
            .or_else(|| redactor.redact_str(&decoded.to_ascii_uppercase()))
        {
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
    let mut changes = Vec::new();
    let mut headers = parts.headers.clone();
    let mut uri = parts.uri.clone();
    let mut doc = Doc::Unparsed;
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
/// error and the caller blocks. Headers redaction deliberately leaves alone (the client's own credentials) are
/// skipped here too.
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
    let header_values: Vec<String> = headers
        .iter()
        .filter(|(name, _)| {
            !options
                .redact_skip_headers
                .iter()
                .any(|s| s == name.as_str())
        })
        .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
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
        } else if header_values.iter().any(|v| fires(v)) {
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
    let options = ConstrainOptions {
        marker: policy.redaction_marker().to_string(),
        ..ConstrainOptions::default()
    };
    let detect = policy.detectors();
    let mut candidate = value.clone();
    let mut changes = Vec::new();
    for planned in rewrites {
        match &planned.rewrite {
            Rewrite::Redact { detectors } => {
                let redactor = Redactor {
                    detect,
                    names: detectors,
                    marker: &options.marker,
                };
                redactor.redact_json(&mut candidate, &mut changes)?;
            }
            Rewrite::DropTools { globs } => tools::drop_tools(&mut candidate, globs, &mut changes),
            rewrite => {
                json_rewrite(rewrite, &mut candidate, &mut changes)?;
            }
        }
    }
    let text = candidate.to_string();
    let decoded = decoded_body(&text, Some(&candidate), Some("application/json"));
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
    *value = candidate;
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

/// Run a JSON rewrite on a copy of the document and keep the result only if every signed region survived it
/// unchanged. Returns how many locations changed.
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
    let mut candidate = doc.clone();
    let paths = op(&mut candidate);
    if let Some(path) = signed::first_touched(&before, &candidate) {
        return Err(ConstrainError::SignedField { path });
    }
    *doc = candidate;
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

/// Redact header values (except the credential headers in `options`) and URL query values.
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
        if name == http::header::HOST
            || options
                .redact_skip_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name.as_str()))
        {
            continue;
        }
        let Ok(text) = value.to_str() else {
            continue;
        };
        if let Some((new, fired)) = redactor.redact_str(text) {
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
