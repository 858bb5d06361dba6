//! Batch results: a JSON Lines file holding one LLM answer per line, each read for its tool calls as a whole answer
//! of its API is ([`super::body_calls`], [`super::apply_to_body`]): no reader of its own.
//!
//! Anthropic Message Batches (`GET /v1/messages/batches/{message_batch_id}/results`, the batch's `results_url`;
//! Anthropic API reference, "Retrieve Message Batch Results"; anthropic-sdk-python
//! `types/messages/message_batch_individual_response.py`): `application/x-jsonl`, one
//! `{"custom_id": …, "result": {"type": "succeeded", "message": {…a Message…}}}` per request, or a result of type
//! `errored` (with an `error`), `canceled` or `expired`. The SDKs split the body into lines at `\n`, `\r\n` and `\r`
//! (anthropic-sdk-python `JSONLDecoder`, anthropic-sdk-typescript `LineDecoder`) and parse each line as JSON.
//!
//! A line is read as the strictest of them: split at every one of those ends, so no SDK reads a line this reader did
//! not; one JSON object, with the wrappers' members spelt as the API spells them (an agent on Go's `encoding/json`
//! binds `"Result"` to `result`); a `message` is read wherever a result carries one, whatever its `type` says.
//! Lines with nothing but whitespace carry nothing and are kept as they came.

use serde_json::Value;

use super::{event_json, Unreadable};
use crate::inspect::{LlmApi, Provider};

/// Which batch results a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Anthropic Message Batch results: each line's `result.message` is a Messages answer.
    MessageBatch,
}

/// The members of a Message Batch result line and of its `result`, as the API spells them.
const LINE_MEMBERS: &[&str] = &["custom_id", "result"];
const RESULT_MEMBERS: &[&str] = &["type", "message", "error"];

/// One line of a JSON Lines body: its text, without its end, and its end as it came (`\n`, `\r\n`, `\r`, or empty
/// for a last line without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub text: &'a str,
    pub end: &'a str,
}

/// The lines of `body`, split at `\n`, `\r\n` and `\r`; `body` is their texts and ends joined.
pub fn lines(body: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some(at) = rest.find(['\n', '\r']) else {
            out.push(Line {
                text: rest,
                end: "",
            });
            break;
        };
        let len = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        out.push(Line {
            text: &rest[..at],
            end: &rest[at..at + len],
        });
        rest = &rest[at + len..];
    }
    out
}

/// The JSON of one line of `batch` results; `None` for a line of whitespace alone (a UTF-8 byte-order mark before the
/// first line's text is ignored, as the SDKs' parsers ignore it).
///
/// # Errors
/// [`Unreadable`] when the line is not one JSON object this reader and every SDK read alike (as an event's data is
/// read: `event_json`), or when a member of its wrappers is spelt otherwise than the API spells it.
pub fn read_line(batch: Batch, text: &str) -> Result<Option<Value>, Unreadable> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(line) = event_json(text)? else {
        return Ok(None);
    };
    let Some(obj) = line.as_object() else {
        return Err(Unreadable);
    };
    match batch {
        Batch::MessageBatch => {
            let result = obj.get("result").and_then(Value::as_object);
            if crate::inspect::keys::misspelt(obj, LINE_MEMBERS)
                || result.is_some_and(|r| crate::inspect::keys::misspelt(r, RESULT_MEMBERS))
            {
                return Err(Unreadable);
            }
        }
    }
    Ok(Some(line))
}

/// The answer one line of `batch` results carries, with the provider and API whose answer it is: a Message Batch
/// result's `message` (whatever the result's `type`); `None` when the line carries none.
pub fn answer_mut(batch: Batch, line: &mut Value) -> Option<(Provider, LlmApi, &mut Value)> {
    match batch {
        Batch::MessageBatch => {
            let message = line.get_mut("result")?.get_mut("message")?;
            Some((Provider::Anthropic, LlmApi::Messages, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_every_end_an_sdk_splits_at_and_join_back() {
        let body = "a\nb\r\nc\rd\n\ne";
        let got = lines(body);
        let texts: Vec<_> = got.iter().map(|l| l.text).collect();
        assert_eq!(texts, ["a", "b", "c", "d", "", "e"]);
        let joined: String = got.iter().flat_map(|l| [l.text, l.end]).collect();
        assert_eq!(joined, body);
        assert!(lines("").is_empty());
        assert_eq!(
            lines("x\n"),
            [Line {
                text: "x",
                end: "\n"
            }]
        );
    }

    #[test]
    fn a_line_is_one_object_with_its_wrappers_spelt_as_the_api_spells_them() {
        let batch = Batch::MessageBatch;
        assert_eq!(read_line(batch, "  "), Ok(None));
        let ok = r#"{"custom_id":"a","result":{"type":"succeeded","message":{"content":[]}}}"#;
        assert!(read_line(batch, ok).is_ok_and(|l| l.is_some()));
        assert!(read_line(batch, &format!("\u{feff}{ok}")).is_ok_and(|l| l.is_some()));
        for bad in [
            "[1]",
            "\"x\"",
            "{\"custom_id\":\"a\"} {}",
            r#"{"custom_id":"a","Result":{"type":"succeeded","message":{}}}"#,
            r#"{"custom_id":"a","result":{"type":"succeeded","Message":{}}}"#,
            r#"{"Custom_id":"a","result":{}}"#,
            r#"{"custom_id":"a","result":{"type":"succeeded","message":{},"message":{}}}"#,
        ] {
            assert_eq!(read_line(batch, bad), Err(Unreadable), "{bad}");
        }
        let mut errored: Value =
            serde_json::from_str(r#"{"result":{"type":"errored","message":{"content":[]}}}"#)
                .unwrap();
        assert!(answer_mut(batch, &mut errored).is_some());
        let mut expired: Value = serde_json::from_str(r#"{"result":{"type":"expired"}}"#).unwrap();
        assert!(answer_mut(batch, &mut expired).is_none());
    }
}
