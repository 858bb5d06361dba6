//! Telling an answer by its first line: an OpenAI file's content (`GET /v1/files/{file_id}/content`) is a Batch's
//! output, whose lines hold tool calls to decide, only when its first line says so
//! (`inspect::proposal::batch::first_line`). Its start is read until that line can be told — within the policy's
//! `max_body_bytes`, the hold time and the agent's share of the buffer budget, as a body read whole is — and then
//! either the whole body is read (`response::whole`), or the bytes read so far are sent and the rest streams through
//! as it comes ([`Prefixed`]): any other file is neither held whole nor bounded.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use super::budget::Buffer;
use super::response::{overflow, TOO_SLOW};
use super::upstream::{HttpError, UpstreamBody};
use crate::inspect::proposal::batch::{self, Batch};
use crate::model::Reason;

/// What the start of an answer told.
pub(crate) enum Told {
    /// It holds batch results: read the rest into the buffer, and its lines.
    Batch,
    /// It does not: these bytes (read so far), then the rest as it comes.
    Other(Bytes),
}

/// Read the start of `body` into `buf` until [`batch::first_line`] tells whether it holds `batch` results, by
/// `deadline`. A first line that opens a JSON object but does not end within the buffer's bound is refused as too
/// large (it may be batch results); one that does not open an object is told at once.
///
/// # Errors
/// The reason and message of the refusal: the upstream's answer broke off, did not come by the deadline, or is beyond
/// the buffer's bound or the budget while it may be batch results.
pub(crate) async fn first_line(
    body: &mut UpstreamBody,
    buf: &mut Buffer,
    batch: Batch,
    deadline: tokio::time::Instant,
) -> Result<Told, (Reason, &'static str)> {
    let read = async {
        // Whether the bytes read since the last look may tell: a line left open is told only by a line end, so a long
        // first line is not scanned again for each piece of it.
        let mut look = true;
        loop {
            if look {
                match batch::first_line(batch, buf.bytes(), false) {
                    Some(true) => return Ok(Told::Batch),
                    Some(false) => return Ok(Told::Other(Bytes::copy_from_slice(buf.bytes()))),
                    None => {}
                }
            }
            let Some(frame) = body.frame().await else {
                return Ok(match batch::first_line(batch, buf.bytes(), true) {
                    Some(true) => Told::Batch,
                    _ => Told::Other(Bytes::copy_from_slice(buf.bytes())),
                });
            };
            let Ok(frame) = frame else {
                return Err((
                    Reason::UpstreamUnreachable,
                    "the upstream's answer broke off",
                ));
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if let Err(o) = buf.push(data) {
                let mut read = buf.bytes().to_vec();
                read.extend_from_slice(data);
                if batch::opens_object(&read) || !matches!(o, super::budget::Overflow::TooLarge) {
                    return Err(overflow(o));
                }
                // A first line beyond the bound that opens no object is no batch results: passed on as it comes.
                return Ok(Told::Other(Bytes::from(read)));
            }
            look = !batch::opens_object(buf.bytes())
                || data.iter().any(|b| matches!(b, b'\n' | b'\r'));
        }
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| (Reason::HoldTimeout, TOO_SLOW))?
}

/// A body whose start (`prefix`) has been read: sent first, then the rest as the upstream sends it.
pub(crate) struct Prefixed {
    pub prefix: Option<Bytes>,
    pub rest: UpstreamBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(Bytes::is_empty) && self.rest.is_end_stream()
    }
}
