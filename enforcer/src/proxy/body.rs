//! The request-body phase: read the whole body, bounded by the policy's `max_body_bytes` (declared and actual
//! length), by the agent's share of the buffer budget (`budget`: reserved as the body grows, given back when the
//! exchange lets go of it) and by the idle timeout between its frames, then decode its content-coding for inspection. A body that
//! is too large, stalls, cannot be read, decoded or (for JSON) is not UTF-8 is refused — never passed uninspected.
//! A body whose text the receiver decodes otherwise (a charset, a multipart part's own coding: `inspect::multipart`)
//! is refused too. The decoded body is what the policy decides on and what is forwarded (without its
//! `Content-Encoding`), so the upstream's decoder can never read anything other than what was inspected.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};

use super::budget::{Buffer, Overflow, Reservation, INSPECTED_COPIES};
use super::http2::RecvBody;
use super::refusal::Refusal;
use crate::inspect::{self, InspectError};
use crate::model::Reason;

/// A request body as the client sends it: hyper's for HTTP/1.1 (which sends `100 Continue` when it is first read),
/// an HTTP/2 stream's (which does the same, see `http2`).
#[derive(Debug)]
pub(crate) enum ClientBody {
    Http1(Incoming),
    Http2(RecvBody),
}

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    Http2(#[from] h2::Error),
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            ClientBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Http1(b) => b.is_end_stream(),
            ClientBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Http1(b) => b.size_hint(),
            ClientBody::Http2(b) => b.size_hint(),
        }
    }
}

/// A request body as received and as inspection reads it.
#[derive(Debug, Clone)]
pub(crate) struct Body {
    /// The bytes as the agent sent them (still content-coded).
    pub raw: Bytes,
    /// `raw` with its content-coding undone (the same bytes when there is none): what is inspected, and so what is
    /// forwarded.
    pub decoded: Bytes,
}

impl Body {
    /// Whether a content-coding was undone (the decoded bytes are not the received ones).
    pub fn was_coded(&self) -> bool {
        self.raw.as_ptr() != self.decoded.as_ptr() || self.raw.len() != self.decoded.len()
    }
}

/// Decode `raw`, the body of a request with `headers`, for inspection.
pub(crate) fn decode(raw: Bytes, headers: &HeaderMap, limit: u64) -> Result<Body, Refusal> {
    let encoding = inspect::content_coding(headers);
    let decoded =
        inspect::decode_body(encoding.as_deref(), raw.clone(), limit).map_err(|e| refusal(&e))?;
    inspect::check_json_charset(&decoded).map_err(|e| refusal(&e))?;
    let content_types: Vec<&[u8]> = headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect();
    inspect::check_body_encodings(&content_types, &decoded)
        .map_err(|e| refusal(&InspectError::from(e)))?;
    Ok(Body { raw, decoded })
}

/// The refusal for a body inspection cannot read.
pub(crate) fn refusal(e: &InspectError) -> Refusal {
    let (reason, status) = match e {
        InspectError::TooLarge { .. } => (Reason::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
        InspectError::UnsupportedEncoding(_)
        | InspectError::NotUtf8Json
        | InspectError::Encoded(_) => (Reason::Unparseable, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        InspectError::BadJson { .. }
        | InspectError::Corrupt { .. }
        | InspectError::TwinMembers
        | InspectError::BatchInput(_) => (Reason::Unparseable, StatusCode::BAD_REQUEST),
        InspectError::MethodOverride | InspectError::Readings(_) => {
            (Reason::BadRequest, StatusCode::BAD_REQUEST)
        }
    };
    Refusal::new(reason, status, e.to_string())
}

/// Read the whole body of a request with `headers`, as sent, into a buffer reserved in `held` as it grows (a
/// declared `Content-Length` at once, a body without one frame by frame; twice over, for inspection's text of it): the caller keeps the reservation for as
/// long as it holds the bytes. Refused: 413 beyond `limit`, 503 with `Retry-After` beyond the agent's share of the
/// buffer budget or the total (`budget`), 408 when it stalls, 400 when it cannot be read.
pub(crate) async fn read(
    mut body: ClientBody,
    headers: &HeaderMap,
    limit: u64,
    held: Reservation,
) -> Result<(Bytes, Reservation), Refusal> {
    let overflow = |o: Overflow| match o {
        Overflow::TooLarge => Refusal::new(
            Reason::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body exceeds the inspection limit",
        ),
        Overflow::Budget(e) => Refusal::over_budget(e),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Each byte counts for the buffer and for the text inspection reads of it (`budget::INSPECTED_COPIES`).
    let mut buf = Buffer::new(limit, INSPECTED_COPIES, held);
    if let Some(len) = declared {
        buf.expect(len).map_err(overflow)?;
    }
    let idle = super::limits::limits().body_idle_timeout;
    loop {
        let Ok(next) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(Refusal::new(
                Reason::BadRequest,
                StatusCode::REQUEST_TIMEOUT,
                "the request body stalled",
            ));
        };
        let Some(frame) = next else {
            break;
        };
        let frame = frame.map_err(|e| {
            let reason = if client_left(&e) {
                Reason::ClientClosed
            } else {
                Reason::BadRequest
            };
            Refusal::new(
                reason,
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            )
        })?;
        if let Ok(data) = frame.into_data() {
            buf.push(&data).map_err(overflow)?;
        }
    }
    Ok(buf.finish())
}

/// Whether a body read failed because the client went away (closed or reset the connection, or the stream) rather
/// than because it sent something malformed.
fn client_left(e: &BodyError) -> bool {
    use std::error::Error as _;
    let e = match e {
        BodyError::Http2(h2) => {
            return h2.is_io() || h2.is_go_away() || (h2.is_reset() && h2.is_remote())
        }
        BodyError::Http1(e) => e,
    };
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_reset() || h2.is_io();
        }
        source = s.source();
    }
    false
}
