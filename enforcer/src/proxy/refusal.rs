//! The one error type of the request phases: a [`Refusal`] says why the enforcer answers an exchange itself instead
//! of forwarding it (or instead of passing the upstream's answer on). Every phase returns `Result<_, Refusal>`;
//! `record::ExchangeRecord::refuse` turns one into the client's answer and the exchange's record, in one place.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::http::{full, ProxyBody};
use crate::inspect::block_message;
use crate::model::{Decision, Reason};

/// Why the enforcer answers an exchange itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub reason: Reason,
    /// The HTTP status of the answer (a policy block's protocol-native answer may choose another: MCP answers a
    /// blocked tool call with 200 and a tool error).
    pub status: StatusCode,
    /// Shown to the client: the policy's words or the enforcer's, never request data.
    pub message: Cow<'static, str>,
}

impl Refusal {
    pub fn new(reason: Reason, status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            reason,
            status,
            message: message.into(),
        }
    }

    /// The policy blocked the exchange: answered in the protocol's own language from the decision.
    pub fn policy(decision: &Decision) -> Self {
        Refusal::new(
            decision.reason,
            StatusCode::FORBIDDEN,
            block_message(decision),
        )
    }

    /// The failure was the upstream's (unreachable, unverified), after the policy allowed the exchange: the
    /// record keeps the policy's decision and says what went wrong in its outcome.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self.reason,
            Reason::UpstreamTls | Reason::UpstreamUnreachable
        )
    }
}

/// A JSON error the enforcer answers itself, naming the reason (`{"error":{"type":"enforcer_error","reason":…,
/// "message":…}}`); never contains request data.
pub(crate) fn error_response(
    status: StatusCode,
    reason: Reason,
    message: &str,
) -> Response<ProxyBody> {
    let reason = serde_json::to_value(reason).unwrap_or(serde_json::Value::Null);
    let body = serde_json::json!({
        "error": {"type": "enforcer_error", "reason": reason, "message": message}
    });
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
