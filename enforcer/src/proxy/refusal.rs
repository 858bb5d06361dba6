//! The one error type of the request phases: a [`Refusal`] says why the enforcer answers an exchange itself instead
//! of forwarding it (or instead of passing the upstream's answer on). Every phase returns `Result<_, Refusal>`;
//! `record::ExchangeRecord::refuse` turns one into the client's answer and the exchange's record, in one place.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::http::{full, ProxyBody};
use crate::inspect::{self, block_message, BlockResponse, Protocol};
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
    /// How long the client should wait before it tries again, sent as `Retry-After` in whole seconds (RFC 9110
    /// §10.2.3): a refusal for a bound that frees itself (a `503`, RFC 9110 §15.6.4).
    pub retry_after: Option<std::time::Duration>,
}

impl Refusal {
    pub fn new(reason: Reason, status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            reason,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The refusal of a buffer the budget could not take (`budget`): 503 with `Retry-After`, reason
    /// `buffer_limit`.
    pub fn over_budget(e: super::budget::Exceeded) -> Self {
        Refusal {
            retry_after: Some(super::limits::limits().buffer_retry_after),
            ..Refusal::new(
                Reason::BufferLimit,
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
            )
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

/// `resp` with `Retry-After: <seconds>` (RFC 9110 §10.2.3), at least 1.
pub(crate) fn with_retry_after(
    mut resp: Response<ProxyBody>,
    after: std::time::Duration,
) -> Response<ProxyBody> {
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(after.as_secs().max(1)),
    );
    resp
}

/// The enforcer's own JSON error (`{"error":{"type":"enforcer_error","reason":…,"message":…}}`), for a refusal
/// whose protocol is not known; never contains request data.
pub(crate) fn error_response(
    status: StatusCode,
    reason: Reason,
    message: &str,
) -> Response<ProxyBody> {
    shaped_response(&Protocol::Http, status, reason, message)
}

/// A refusal answered in `protocol`'s own error shape (see `inspect::refusal_response`).
pub(crate) fn shaped_response(
    protocol: &Protocol,
    status: StatusCode,
    reason: Reason,
    message: &str,
) -> Response<ProxyBody> {
    into_response(inspect::refusal_response(
        protocol,
        status.as_u16(),
        reason,
        message,
    ))
}

/// An answer inspect shaped, as a response.
pub(crate) fn into_response(answer: BlockResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(answer.body)));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    for (k, v) in answer.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}
