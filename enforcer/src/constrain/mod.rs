//! Constrain: carries out the rewrites of a CONSTRAIN decision on a request (redaction, JSON and header changes,
//! dropping declared tools) and reports what changed by location only. Pure functions over plain data; no I/O.
//!
//! SCAFFOLD: the seam the proxy calls; the rewrite engine replaces the body.

use bytes::Bytes;

use crate::model::{Change, PlannedRewrite, Rewrite};
use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    /// The rewrite would modify an opaque signed field: the request must be blocked instead.
    #[error("a rewrite would modify the signed field at {path}")]
    SignedField { path: String },
    #[error("the body is not JSON, so the JSON rewrite of rule {rule} cannot apply")]
    NotJson { rule: String },
    #[error("rewrite {op} of rule {rule} is not supported")]
    Unsupported { rule: String, op: &'static str },
}

/// Apply `rewrites` (in order) to the request head and body. On success returns what changed; the caller re-frames
/// the body (Content-Length) when it changed.
pub fn apply(
    rewrites: &[PlannedRewrite],
    _policy: &Policy,
    parts: &mut http::request::Parts,
    _body: &mut Bytes,
) -> Result<Vec<Change>, ConstrainError> {
    let mut changes = Vec::new();
    for planned in rewrites {
        match &planned.rewrite {
            Rewrite::HeaderSet { name, value } => {
                let (Ok(name), Ok(value)) = (
                    http::HeaderName::try_from(name.as_str()),
                    http::HeaderValue::try_from(value.as_str()),
                ) else {
                    continue;
                };
                changes.push(Change {
                    path: format!("header.{name}"),
                    cause: "header_set".into(),
                });
                parts.headers.insert(name, value);
            }
            Rewrite::HeaderRemove { name } => {
                if parts.headers.remove(name.as_str()).is_some() {
                    changes.push(Change {
                        path: format!("header.{name}"),
                        cause: "header_remove".into(),
                    });
                }
            }
            _ => {
                return Err(ConstrainError::Unsupported {
                    rule: planned.rule.clone(),
                    op: "json",
                })
            }
        }
    }
    Ok(changes)
}
