//! The enforce phase: carry the decision out on the request. An enforced block is a refusal (answered in the
//! protocol's own language); a constrain applies the decision's compiled rewrites with the constrain stage, and a
//! rewrite that cannot be applied (a signed field, a secret redaction cannot reach, a JSON rewrite on a body that is
//! not JSON) turns the decision into a block. Shadow mode forwards the request unmodified whatever the verdict.

use bytes::Bytes;

use super::body::Body;
use super::head::Head;
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use crate::constrain::ConstrainError;
use crate::inspect::Carried;
use crate::model::{Change, Mode, Relay, Rewrite, Verdict};

/// The refusal's message for a constrain whose rewrites read one call's body ([`request_wide`]) on a request that
/// carries many calls: an Anthropic Message Batch create (`POST /v1/messages/batches`), a batch input file, a Gemini
/// batch create whose requests are in such a file.
fn carried_unrewritable(carried: Carried) -> &'static str {
    match carried {
        Carried::MessageBatch => {
            "a constrain rule matched a message batch, whose requests it cannot rewrite: send them to /v1/messages"
        }
        Carried::Eval => {
            "a constrain rule matched an eval, whose model calls it cannot rewrite: send them to their endpoint"
        }
        Carried::InputFile(_) => {
            "a constrain rule matched a batch input file, whose requests it cannot rewrite: send them to their endpoint"
        }
        Carried::InputLines => {
            "a constrain rule matched a batch whose requests are in an input file, which it cannot rewrite: send them inline"
        }
    }
}

/// The request as it is to be forwarded.
pub(crate) struct Outgoing {
    pub parts: http::request::Parts,
    /// The body as inspected (decoded) and, under a constrain, rewritten.
    pub body: Bytes,
    /// The body goes out other than it came in (a content-coding undone, or rewritten): without
    /// `Content-Encoding`, framed by its new length.
    pub body_changed: bool,
}

/// Carry the decision out on the request; `provider` is the LLM provider whose API the request goes to (its own
/// key in a credential header is not redacted), `carried` what carries the calls of a request that carries many
/// (`inspect::Inspected::carried`); `parsed` is the body's JSON as the classify phase parsed it (when
/// it is that of the UTF-8 body as it will be rewritten), which a constrain rewrites instead of parsing the body
/// again. A constrain whose rewrites change nothing is recorded as what was done: forwarded as received
/// (`ExchangeRecord::note_unchanged`).
pub(crate) fn enforce(
    rec: &mut ExchangeRecord,
    head: &Head,
    (provider, carried): (Option<&str>, Option<Carried>),
    mut parts: http::request::Parts,
    (body, parsed): (Body, Option<serde_json::Value>),
) -> Result<Outgoing, Refusal> {
    admit_upgrade(rec, head, &mut parts);
    let unchanged = |parts| Outgoing {
        parts,
        body: body.decoded.clone(),
        body_changed: body.was_coded(),
    };
    let Some(decision) = rec.decision() else {
        return Ok(unchanged(parts));
    };
    if decision.mode == Mode::Shadow {
        return Ok(unchanged(parts));
    }
    match decision.verdict {
        Verdict::Block => return Err(Refusal::policy(decision)),
        Verdict::Allow | Verdict::Log => return Ok(unchanged(parts)),
        // A review forwards, once approved, what the matching constrain rules make of it (see `hold`).
        Verdict::Review if decision.rewrites.is_empty() => return Ok(unchanged(parts)),
        Verdict::Constrain | Verdict::Review => {}
    }
    if let Some(carried) =
        carried.filter(|c| !decision.rewrites.iter().all(|p| reaches(*c, &p.rewrite)))
    {
        // A message batch or a batch input file carries many calls; JSON paths and dropped tools are written for
        // one call's body and would miss the elements', so the request is refused instead (fail closed).
        tracing::info!("constrain on a request carrying many calls: blocking");
        let blocked = rec.block_instead(
            crate::model::Reason::Unrewritable,
            Some(carried_unrewritable(carried).to_owned()),
        );
        return Err(blocked.map_or_else(
            || {
                Refusal::new(
                    crate::model::Reason::Unrewritable,
                    http::StatusCode::FORBIDDEN,
                    "blocked by policy",
                )
            },
            Refusal::policy,
        ));
    }
    let mut rewritten = body.decoded.clone();
    let rewrites = decision.rewrites.clone();
    let applied = match parsed {
        Some(json) => crate::constrain::apply_parsed(
            &rewrites,
            rec.policy(),
            provider,
            &mut parts,
            &mut rewritten,
            json,
        ),
        None => crate::constrain::apply(
            &rewrites,
            rec.policy(),
            provider,
            &mut parts,
            &mut rewritten,
        ),
    };
    match applied {
        Ok(changes) if changes.is_empty() => {
            rec.note_unchanged();
            Ok(unchanged(parts))
        }
        Ok(changes) => {
            rec.note_changes(changes);
            let body_changed = body.was_coded() || rewritten != body.decoded;
            Ok(Outgoing {
                parts,
                body: rewritten,
                body_changed,
            })
        }
        Err(e) => {
            let reason = e.reason();
            // Names only the detector and where: policy words, no request data.
            let message = matches!(e, ConstrainError::Unredactable { .. }).then(|| e.to_string());
            // Not the error itself: its JSON path is made of the body's (attacker-chosen) keys.
            tracing::info!(reason = ?reason, "constrain could not be applied: blocking");
            let blocked = rec.block_instead(reason, message);
            Err(blocked.map_or_else(
                || Refusal::new(reason, http::StatusCode::FORBIDDEN, "blocked by policy"),
                Refusal::policy,
            ))
        }
    }
}

/// Whether `rewrite` reaches every call a request that carries many (`carried`) carries: one that is
/// [`request_wide`], but for an input file (its upload, a form or a file's bytes; or a batch whose requests are in
/// such a file the upstream holds), which only a header rewrite leaves as it means: a redaction cannot reach lines
/// inside a form part or a stored file (the rewrite would replace the upload with one line's JSON).
fn reaches(carried: Carried, rewrite: &Rewrite) -> bool {
    match carried {
        Carried::InputLines | Carried::InputFile(_) => matches!(
            rewrite,
            Rewrite::HeaderSet { .. } | Rewrite::HeaderRemove { .. }
        ),
        Carried::MessageBatch | Carried::Eval => request_wide(rewrite),
    }
}

/// Whether `rewrite` does to a request what it means whatever the body's shape: a redaction (every string of the
/// body, its head) or a header set or removed. JSON paths and `drop_tools` read one call's body.
fn request_wide(rewrite: &Rewrite) -> bool {
    match rewrite {
        Rewrite::Redact { .. } | Rewrite::HeaderSet { .. } | Rewrite::HeaderRemove { .. } => true,
        Rewrite::JsonSet { .. }
        | Rewrite::JsonRemove { .. }
        | Rewrite::JsonCap { .. }
        | Rewrite::JsonTruncate { .. }
        | Rewrite::DropTools { .. } => false,
    }
}

/// An upgraded connection is relayed only where it can be read or a rule lets it through unread: a WebSocket is
/// kept (its messages go through the answer phases), any other `Upgrade` (h2c above all: a whole HTTP/2 session
/// after the 101 would skip every decision) is removed unless the deciding rule relays `opaque`. Without its
/// `Upgrade` the request goes on as a plain request (RFC 9110 §7.8: a server may ignore it).
fn admit_upgrade(rec: &mut ExchangeRecord, head: &Head, parts: &mut http::request::Parts) {
    let Some(tokens) = head.upgrade.as_deref() else {
        return;
    };
    let websocket = tokens.split(',').map(str::trim).all(|t| t == "websocket");
    let opaque = rec
        .decision()
        .is_some_and(|d| rec.policy().relay(d) == Relay::Opaque);
    if opaque {
        return;
    }
    if websocket {
        // Every message is read as sent: no compression is negotiated (RFC 7692 needs the client's offer).
        parts.headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
        return;
    }
    parts.headers.remove(http::header::UPGRADE);
    parts.headers.remove("http2-settings");
    rec.note_changes(vec![Change {
        path: "header.upgrade".into(),
        cause: "upgrade_removed".into(),
    }]);
}
