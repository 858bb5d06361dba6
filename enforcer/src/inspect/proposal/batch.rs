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
//! OpenAI Batch output and error files (`GET /v1/files/{file_id}/content` of a batch's `output_file_id` or
//! `error_file_id`; OpenAI API reference, "The request output object"): one
//! `{"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id", "body": {…}}, "error": …}` per
//! request, the `body` a Chat Completions (`"object": "chat.completion"`) or Responses (`"object": "response"`) answer
//! or another endpoint's. That path serves every file, so such a file is told by its first line with anything but
//! whitespace ([`first_line`]): OpenAI writes that line, and a model's words sit only inside its JSON strings.
//!
//! Gemini Batch API results files (`GET /download/v1beta/files/{file}:download?alt=media` of a batch's
//! `dest.fileName`; Gemini API reference, "Batch API"): one `{"key": …, "response": {…a GenerateContentResponse…}}`
//! or `{"key": …, "error": {…}}` per request. That path serves every uploaded file, so such a file is told by its
//! first line as an OpenAI file is.
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
    /// The content of an OpenAI file, batch output when its first line says so ([`first_line`]): each line's
    /// `response.body` is a Chat Completions or Responses answer, by its `object`.
    OpenAiOutput,
    /// A file downloaded from Gemini (`…/files/{file}:download`), a Batch API results file when its first line says
    /// so ([`first_line`]): each line's `response` is a generateContent answer (Gemini API reference, "Batch API":
    /// one `{"key": …, "response": {…}}` or `{"key": …, "error": {…}}` per request).
    GeminiOutput,
}

impl Batch {
    /// Whether a body fetched from the path is told to be batch results by its first line ([`first_line`]) rather
    /// than by the path alone.
    pub fn by_first_line(self) -> bool {
        self != Batch::MessageBatch
    }
}

/// The members of a Message Batch result line and of its `result`, as the API spells them.
const LINE_MEMBERS: &[&str] = &["custom_id", "result"];
const RESULT_MEMBERS: &[&str] = &["type", "message", "error"];
/// The members of an OpenAI Batch output line, of its `response`, and the `object` of its `body`.
const OUTPUT_MEMBERS: &[&str] = &["id", "custom_id", "response", "error"];
const RESPONSE_MEMBERS: &[&str] = &["status_code", "request_id", "body"];
const BODY_MEMBERS: &[&str] = &["object"];
/// The members of a Gemini Batch results line.
const GEMINI_MEMBERS: &[&str] = &["key", "response", "error"];

/// Whether the start of a body fetched for `batch` results holds them: `Some` once it can tell, `None` while it needs
/// more of the body (`whole`: `start` is all of it). A Message Batch's results always (the path says so). An OpenAI
/// file's content when its first line with anything but whitespace (a byte-order mark and blank lines skipped) is an
/// OpenAI Batch output or error line: a JSON object naming `custom_id` and `response`, in any letter case (as Go's
/// `encoding/json` reads them). Told as soon as that line does not open an object (a binary or text file), or once
/// it has ended.
pub fn first_line(batch: Batch, start: &[u8], whole: bool) -> Option<bool> {
    if batch == Batch::MessageBatch {
        return Some(true);
    }
    let start = start.strip_prefix("\u{feff}".as_bytes()).unwrap_or(start);
    let Some(at) = start.iter().position(|b| !b.is_ascii_whitespace()) else {
        return whole.then_some(false);
    };
    let rest = &start[at..];
    if rest[0] != b'{' {
        return Some(false);
    }
    let line = match rest.iter().position(|b| matches!(b, b'\n' | b'\r')) {
        Some(end) => &rest[..end],
        None if whole => rest,
        None => return None,
    };
    let names = |obj: &serde_json::Map<String, Value>, name: &str| {
        obj.keys()
            .any(|k| k == name || crate::inspect::keys::misspelt_name(k, &[name]))
    };
    let line = serde_json::from_slice::<Value>(line).ok();
    Some(line.as_ref().and_then(Value::as_object).is_some_and(|o| {
        if batch == Batch::GeminiOutput {
            // A Gemini results line answers with a `response` or an `error`, its `key` optional.
            names(o, "response") || names(o, "error")
        } else {
            names(o, "custom_id") && names(o, "response")
        }
    }))
}

/// Whether the start of a body opens a JSON object: its first byte that is not whitespace (after a byte-order mark)
/// is `{`. A body whose first line is too long to be told by [`first_line`] may be batch results only then.
pub fn opens_object(start: &[u8]) -> bool {
    let start = start.strip_prefix("\u{feff}".as_bytes()).unwrap_or(start);
    start.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The API of an OpenAI Batch output line's `body`, by its `object`: `chat.completion`, `response`; `None` for the
/// other endpoints' answers, which propose no calls (`text_completion`, an embeddings `list`, a moderation without
/// `object`).
///
/// # Errors
/// [`Unreadable`] for a body of another `object` that has members a Chat or Responses reader would read calls from
/// (`choices`, `output`, `response`): the agent may read it as either.
fn output_api(body: &Value) -> Result<Option<LlmApi>, Unreadable> {
    match body.get("object").and_then(Value::as_str) {
        Some("chat.completion") => Ok(Some(LlmApi::ChatCompletions)),
        Some("response") => Ok(Some(LlmApi::Responses)),
        _ if ["choices", "output", "response"]
            .iter()
            .any(|m| body.get(m).is_some())
            && body.get("object").and_then(Value::as_str) != Some("text_completion") =>
        {
            Err(Unreadable)
        }
        _ => Ok(None),
    }
}

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
    let misspelt = |v: Option<&Value>, members| {
        v.and_then(Value::as_object)
            .is_some_and(|o| crate::inspect::keys::misspelt(o, members))
    };
    match batch {
        Batch::MessageBatch => {
            if misspelt(Some(&line), LINE_MEMBERS) || misspelt(obj.get("result"), RESULT_MEMBERS) {
                return Err(Unreadable);
            }
        }
        Batch::OpenAiOutput => {
            let response = obj.get("response");
            let body = response.and_then(|r| r.get("body"));
            if misspelt(Some(&line), OUTPUT_MEMBERS)
                || misspelt(response, RESPONSE_MEMBERS)
                || misspelt(body, BODY_MEMBERS)
            {
                return Err(Unreadable);
            }
            if let Some(body) = body {
                output_api(body)?;
            }
        }
        Batch::GeminiOutput => {
            if misspelt(Some(&line), GEMINI_MEMBERS) {
                return Err(Unreadable);
            }
        }
    }
    Ok(Some(line))
}

/// The answer one line of `batch` results carries, with the provider and API whose answer it is: a Message Batch
/// result's `message` (whatever the result's `type`), an OpenAI Batch output line's `response.body` when it is a
/// Chat Completions or Responses answer; `None` when the line carries none.
pub fn answer_mut(batch: Batch, line: &mut Value) -> Option<(Provider, LlmApi, &mut Value)> {
    match batch {
        Batch::MessageBatch => {
            let message = line.get_mut("result")?.get_mut("message")?;
            Some((Provider::Anthropic, LlmApi::Messages, message))
        }
        Batch::OpenAiOutput => {
            let body = line.get_mut("response")?.get_mut("body")?;
            let api = output_api(body).ok()??;
            Some((Provider::OpenAi, api, body))
        }
        Batch::GeminiOutput => {
            let response = line.get_mut("response")?;
            Some((Provider::Gemini, LlmApi::GenerateContent, response))
        }
    }
}

/// The `custom_id` of one line of batch results (Anthropic's and OpenAI's spell it so, Gemini's `key`): the caller's name for the request the line
/// answers; `None` when it is not a string.
pub fn custom_id(line: &Value) -> Option<&str> {
    line.get("custom_id").or_else(|| line.get("key"))?.as_str()
}

/// The model that gave one line's answer ([`answer_mut`]): its `model`, as a Messages, Chat Completions or Responses
/// answer names it, or a Gemini answer's `modelVersion`; `None` when it names none.
pub fn answer_model(answer: &Value) -> Option<&str> {
    answer
        .get("model")
        .or_else(|| answer.get("modelVersion"))?
        .as_str()
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

    #[test]
    fn an_openai_file_is_batch_output_when_its_first_line_says_so() {
        let batch = Batch::OpenAiOutput;
        let line = r#"{"id":"batch_req_1","custom_id":"a","response":null,"error":{"code":"x"}}"#;
        for (start, whole, told) in [
            (format!("{line}\n{{"), false, Some(true)),
            (format!("\u{feff}\n  \r\n{line}"), true, Some(true)),
            (line.replace("custom_id", "Custom_ID"), true, Some(true)),
            (line[..20].to_string(), false, None),
            (line[..20].to_string(), true, Some(false)),
            ("   ".into(), false, None),
            ("   ".into(), true, Some(false)),
            ("\u{89}PNG".into(), false, Some(false)),
            ("step,train_loss\n".into(), false, Some(false)),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#
                    .into(),
                true,
                Some(false),
            ),
        ] {
            assert_eq!(
                first_line(batch, start.as_bytes(), whole),
                told,
                "{start:?}"
            );
        }
        assert_eq!(first_line(Batch::MessageBatch, b"x", false), Some(true));
    }

    #[test]
    fn an_output_line_s_body_is_read_by_its_object() {
        let batch = Batch::OpenAiOutput;
        let line = |body: &str| {
            format!(
                r#"{{"id":"batch_req_1","custom_id":"a","response":{{"status_code":200,"request_id":"r","body":{body}}},"error":null}}"#
            )
        };
        for (body, api) in [
            (
                r#"{"object":"chat.completion","choices":[]}"#,
                Some(LlmApi::ChatCompletions),
            ),
            (
                r#"{"object":"response","output":[]}"#,
                Some(LlmApi::Responses),
            ),
            (r#"{"object":"text_completion","choices":[]}"#, None),
            (r#"{"object":"list","data":[]}"#, None),
        ] {
            let mut json = read_line(batch, &line(body)).unwrap().unwrap();
            assert_eq!(
                answer_mut(batch, &mut json).map(|(_, a, _)| a),
                api,
                "{body}"
            );
        }
        for body in [
            r#"{"choices":[]}"#,
            r#"{"object":"chat.completion.chunk","choices":[]}"#,
            r#"{"Object":"chat.completion","choices":[]}"#,
        ] {
            assert_eq!(read_line(batch, &line(body)), Err(Unreadable), "{body}");
        }
        let otherwise = line("{}").replace("\"body\"", "\"Body\"");
        assert_eq!(read_line(batch, &otherwise), Err(Unreadable));
    }
}
