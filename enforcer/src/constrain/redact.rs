//! Redaction: replaces what detectors find with a marker in every JSON string value (the document is re-serialised
//! by serde_json, so escaping stays right), in plain-text bodies, in URL query values and in header values. Records
//! where and by which detector, never what. A match inside a signed region is refused (the caller blocks).

use std::collections::BTreeSet;
use std::ops::Range;

use serde_json::Value;

use super::signed::{is_signed_key, is_signed_object, push_index, push_key};
use super::{ConstrainError, Detect};
use crate::encoding::percent_decode;
use crate::model::Change;

/// What one redaction pass needs: the detectors to run and how to write the marker.
pub(super) struct Redactor<'a> {
    pub detect: &'a dyn Detect,
    pub names: &'a [String],
    /// Marker template; `{detector}` is replaced by the detector's name.
    pub marker: &'a str,
}

impl Redactor<'_> {
    /// Redact `text`; returns the new text and the detectors that fired, or `None` when nothing fired.
    pub fn redact_str(&self, text: &str) -> Option<(String, BTreeSet<String>)> {
        let mut hits: Vec<(Range<usize>, &str)> = Vec::new();
        for name in self.names {
            hits.extend(
                self.detect
                    .find(name, text)
                    .into_iter()
                    .filter(|r| r.start < r.end && text.get(r.clone()).is_some())
                    .map(|r| (r, name.as_str())),
            );
        }
        if hits.is_empty() {
            return None;
        }
        hits.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
        let mut out = String::with_capacity(text.len());
        let mut fired = BTreeSet::new();
        let mut pos = 0;
        let mut i = 0;
        while let Some((range, name)) = hits.get(i) {
            // Merge every later hit that overlaps this one; the earliest-starting (then longest) names it.
            let mut end = range.end;
            i += 1;
            while let Some((next, _)) = hits.get(i) {
                if next.start >= end {
                    break;
                }
                end = end.max(next.end);
                i += 1;
            }
            out.push_str(text.get(pos..range.start).unwrap_or_default());
            out.push_str(&self.marker.replace("{detector}", name));
            fired.insert((*name).to_string());
            pos = end;
        }
        out.push_str(text.get(pos..).unwrap_or_default());
        Some((out, fired))
    }

    /// A change path safe to record: object keys and query names are attacker-chosen, so a secret in one is
    /// redacted in the path too.
    pub fn safe_path(&self, path: &str) -> String {
        match self.redact_str(path) {
            Some((clean, _)) => clean,
            None => path.to_string(),
        }
    }

    /// Redact every string value of a JSON document in place.
    pub fn redact_json(
        &self,
        doc: &mut Value,
        changes: &mut Vec<Change>,
    ) -> Result<(), ConstrainError> {
        let mut path = String::from("$");
        self.walk(doc, &mut path, false, changes)
    }

    fn walk(
        &self,
        v: &mut Value,
        path: &mut String,
        signed: bool,
        changes: &mut Vec<Change>,
    ) -> Result<(), ConstrainError> {
        match v {
            Value::String(s) => {
                if let Some((new, fired)) = self.redact_str(s) {
                    if signed {
                        return Err(ConstrainError::SignedField { path: path.clone() });
                    }
                    *s = new;
                    let shown = self.safe_path(path);
                    changes.extend(fired.into_iter().map(|d| Change {
                        path: shown.clone(),
                        cause: format!("redact:{d}"),
                    }));
                }
            }
            Value::Object(map) => {
                let signed = signed || is_signed_object(map);
                for (k, child) in map.iter_mut() {
                    let len = path.len();
                    push_key(path, k);
                    self.walk(child, path, signed || is_signed_key(k), changes)?;
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    let len = path.len();
                    push_index(path, i);
                    self.walk(child, path, signed, changes)?;
                    path.truncate(len);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
        Ok(())
    }

    /// Redact the values of a URL query string (`a=1&b=2`), decoding and re-encoding only the values that change.
    /// Returns the new query when anything changed.
    pub fn redact_query(&self, query: &str, changes: &mut Vec<Change>) -> Option<String> {
        let mut changed = false;
        let pieces: Vec<String> = query
            .split('&')
            .map(|piece| {
                let (name, value) = match piece.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (piece, None),
                };
                let Some(value) = value else {
                    return piece.to_string();
                };
                let decoded = percent_decode(value, true);
                match self.redact_str(&decoded) {
                    Some((new, fired)) => {
                        changed = true;
                        let shown = self.safe_path(&percent_decode(name, true));
                        changes.extend(fired.into_iter().map(|d| Change {
                            path: format!("query.{shown}"),
                            cause: format!("redact:{d}"),
                        }));
                        format!("{name}={}", percent_encode(&new))
                    }
                    None => piece.to_string(),
                }
            })
            .collect();
        changed.then(|| pieces.join("&"))
    }
}

/// Encode everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        assert_eq!(percent_decode("a%20b+c%zz", true), "a b c%zz");
        assert_eq!(percent_encode("[R:x] a&b"), "%5BR%3Ax%5D%20a%26b");
    }
}
