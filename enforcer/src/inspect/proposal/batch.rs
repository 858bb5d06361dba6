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
//! or another endpoint's. The SDKs hand the file to the agent as bytes (`client.files.content(…).text`), which it
//! splits as it likes (`str.splitlines()`), so that path's every file is read: a line that opens a JSON object must
//! be one, and one naming `response` (in any letter case) is an output line; any other line (a CSV row, a
//! fine-tuning example) carries no answer.
//!
//! Gemini Batch API results files (`GET /download/v1beta/files/{file}:download?alt=media` of a batch's
//! `dest.fileName`; Gemini API reference, "Batch API"): one `{"key": …, "response": {…a GenerateContentResponse…}}`
//! or `{"key": …, "error": {…}}` per request. That path serves every uploaded file, so such a file is read as an
//! OpenAI file is: a line naming `response` (in any letter case) is a results line.
//!
//! A line is read as the strictest of them: split at every end any of them splits at — `\n`, `\r\n`, `\r`, and the
//! others Python's `str.splitlines` splits at (`\v`, `\f`, `\x1c`, `\x1d`, `\x1e`, U+0085, U+2028, U+2029) — so no
//! reader finds a line this reader did not; around it, whatever `str.strip` or a JSON parser may skip (Unicode
//! whitespace, NUL, a byte-order mark) is skipped; one JSON object, with the wrappers' members spelt as the API
//! spells them (an agent on Go's `encoding/json` binds `"Result"` to `result`); a `message` is read wherever a result
//! carries one, whatever its `type` says; an output line's `body` by every reader whose members it carries.
//! Lines with nothing but whitespace carry nothing and are kept as they came.

use serde_json::Value;

use super::{event_json, Unreadable};
use crate::inspect::{LlmApi, Provider};

/// Which batch results a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Anthropic Message Batch results: each line's `result.message` is a Messages answer.
    MessageBatch,
    /// The content of an OpenAI file: each line naming `response` is a Batch output line, whose `response.body` is
    /// a Chat Completions or Responses answer ([`read_line`]).
    OpenAiOutput,
    /// A file downloaded from Gemini (`…/files/{file}:download`): each line naming `response` is a Batch API results
    /// line, whose `response` is a generateContent answer (Gemini API reference, "Batch API": one
    /// `{"key": …, "response": {…}}` or `{"key": …, "error": {…}}` per request).
    GeminiOutput,
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

/// The API of an OpenAI Batch output line's `body`: `chat.completion` with `choices`, `response` with `output`;
/// `None` for the other endpoints' answers, which propose no calls (`text_completion` with choices of text, an
/// embeddings `list`, a moderation without `object`).
///
/// # Errors
/// [`Unreadable`] for a body that carries members another reader than its `object`'s would read calls from: a Chat
/// reader `choices`, a Responses reader `output` or `response` (both, or under another `object`: the agent may read it
/// as either), or a `text_completion` choice with a `message` or `delta`.
fn output_api(body: &Value) -> Result<Option<LlmApi>, Unreadable> {
    let has = |m: &str| body.get(m).is_some();
    let (chat, responses) = (has("choices"), has("output") || has("response"));
    let object = body.get("object").and_then(Value::as_str);
    match (object, chat, responses) {
        (_, true, true) => Err(Unreadable),
        (Some("chat.completion"), _, false) => Ok(Some(LlmApi::ChatCompletions)),
        (Some("response"), false, _) => Ok(Some(LlmApi::Responses)),
        (Some("text_completion"), _, false) => {
            let choices = body["choices"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let chatty = |c: &Value| c.get("message").is_some() || c.get("delta").is_some();
            if choices.iter().any(chatty) || (chat && body["choices"].as_array().is_none()) {
                Err(Unreadable)
            } else {
                Ok(None)
            }
        }
        (_, false, false) => Ok(None),
        _ => Err(Unreadable),
    }
}

/// Whether `value` is an OpenAI Batch output line or a Gemini Batch results line — an object naming `response` in
/// any letter case (Go's `encoding/json` binds `Response` to it) — or an array holding one, at any depth of arrays.
fn holds_output(value: &Value) -> bool {
    match value {
        Value::Object(o) => o
            .keys()
            .any(|k| k == "response" || crate::inspect::keys::misspelt_name(k, &["response"])),
        Value::Array(items) => items.iter().any(holds_output),
        _ => false,
    }
}

/// Whether `c` is one of the characters Python's `str.splitlines` ends a line at (the Unicode line boundaries and
/// `\x1c`..`\x1e`): `\n`, `\r`, `\v`, `\f`, `\x1c`, `\x1d`, `\x1e`, U+0085, U+2028, U+2029.
fn ends_line(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}'..='\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Whether `c` may be skipped around a line by some reader: Unicode whitespace (Rust's and Python's `str.strip`,
/// which also skips `\x1c`..`\x1f`), NUL, a byte-order mark.
fn blank(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\0' | '\u{1c}'..='\u{1f}' | '\u{feff}')
}

/// A line's text as it is read ([`read_line`]): whatever some reader skips around it (Unicode whitespace, NUL, a
/// byte-order mark) cut off.
pub fn trimmed(text: &str) -> &str {
    text.trim_matches(blank)
}

/// One line of a JSON Lines body: its text, without its end, and its end as it came (`\n`, `\r\n`, `\r`, or empty
/// for a last line without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub text: &'a str,
    pub end: &'a str,
}

/// The lines of `body`, split at `\n`, `\r\n`, `\r` and every other end Python's `str.splitlines` splits at
/// ([`ends_line`]); `body` is their texts and ends joined.
pub fn lines(body: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some(at) = rest.find(ends_line) else {
            out.push(Line {
                text: rest,
                end: "",
            });
            break;
        };
        let len = if rest[at..].starts_with("\r\n") {
            2
        } else {
            rest[at..].chars().next().map_or(1, char::len_utf8)
        };
        out.push(Line {
            text: &rest[..at],
            end: &rest[at..at + len],
        });
        rest = &rest[at + len..];
    }
    out
}

/// The JSON of one line of `batch` results, whatever a reader may skip around it ([`blank`]) skipped; `None` for a
/// line of whitespace alone, and for a line of an OpenAI file that is no output line (it does not open an object, or
/// its object names no `response` in any letter case).
///
/// # Errors
/// [`Unreadable`] when the line is not one JSON object this reader and every SDK read alike (as an event's data is
/// read: `event_json`; a line of an OpenAI file that opens an object must be one, with no member named twice), or
/// when a member of its wrappers is spelt otherwise than the API spells it.
pub fn read_line(batch: Batch, text: &str) -> Result<Option<Value>, Unreadable> {
    let text = trimmed(text);
    let line = match batch {
        Batch::MessageBatch => event_json(text)?,
        Batch::OpenAiOutput | Batch::GeminiOutput if text.starts_with('{') => {
            let line = crate::inspect::read_json(text, crate::inspect::Twins::Folded)
                .ok()
                .flatten()
                .ok_or(Unreadable)?;
            if !holds_output(&line) {
                return Ok(None);
            }
            if super::misspelt(&line) {
                return Err(Unreadable);
            }
            Some(line)
        }
        // An array of output lines on one line (`[{…}]`): an agent may read its elements as lines.
        Batch::OpenAiOutput | Batch::GeminiOutput if text.starts_with('[') => {
            let array = crate::inspect::read_json(text, crate::inspect::Twins::Folded);
            if array.is_ok_and(|a| a.as_ref().is_some_and(holds_output)) {
                return Err(Unreadable);
            }
            None
        }
        Batch::OpenAiOutput | Batch::GeminiOutput => None,
    };
    let Some(line) = line else {
        return Ok(None);
    };
    let Some(obj) = line.as_object() else {
        return Err(Unreadable);
    };
    let misspelt = |v: Option<&Value>, members| {
        v.and_then(Value::as_object)
            .is_some_and(|o| crate::inspect::keys::misspelt(o, members))
    };
    // A wrapper or answer that is no object (nor null): JSON text in a string an agent may parse again.
    let odd = |v: Option<&Value>| v.is_some_and(|v| !v.is_object() && !v.is_null());
    match batch {
        Batch::MessageBatch => {
            let result = obj.get("result");
            if misspelt(Some(&line), LINE_MEMBERS)
                || misspelt(result, RESULT_MEMBERS)
                || odd(result)
                || odd(result.and_then(|r| r.get("message")))
            {
                return Err(Unreadable);
            }
        }
        Batch::OpenAiOutput => {
            let response = obj.get("response");
            let body = response.and_then(|r| r.get("body"));
            if odd(response) || odd(body) {
                return Err(Unreadable);
            }
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
            if misspelt(Some(&line), GEMINI_MEMBERS) || odd(obj.get("response")) {
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
        let body =
            "a\nb\r\nc\rd\n\ne\u{b}f\u{c}g\u{1c}h\u{1d}i\u{1e}j\u{85}k\u{2028}l\u{2029}m\u{1f}";
        let got = lines(body);
        let texts: Vec<_> = got.iter().map(|l| l.text).collect();
        assert_eq!(
            texts,
            ["a", "b", "c", "d", "", "e", "f", "g", "h", "i", "j", "k", "l", "m\u{1f}"]
        );
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
            r#"{"custom_id":"a","result":"{\"message\":{}}"}"#,
            r#"{"custom_id":"a","result":{"type":"succeeded","message":"{\"content\":[]}"}}"#,
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
    fn a_line_of_an_openai_file_is_output_when_it_names_response() {
        let batch = Batch::OpenAiOutput;
        let line = r#"{"id":"batch_req_1","custom_id":"a","response":null,"error":{"code":"x"}}"#;
        for told in [
            line.to_string(),
            format!("\u{feff}\u{a0}\u{3000}\0\u{1f} {line}\u{a0}\0"),
            line.replace("\"custom_id\"", "\"custom\""),
        ] {
            assert!(
                read_line(batch, &told).is_ok_and(|l| l.is_some()),
                "{told:?}"
            );
        }
        for other in [
            "",
            "\u{a0}\u{3000}\0",
            "\u{89}PNG",
            "step,train_loss",
            "[1]",
            "[1,",
            r#"[{"custom_id":"a"}]"#,
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#,
        ] {
            assert_eq!(read_line(batch, other), Ok(None), "{other:?}");
        }
        let array = format!("[{line}]");
        let nested = format!("[[1,{line}]]");
        let as_string = line.replace("null", r#""{\"body\":{}}""#);
        let body_string = line.replace("null", r#"{"body":"{\"object\":\"response\"}"}"#);
        for bad in [
            "{}x",
            "{",
            r#"{"custom_id":"x"} {}"#,
            r#"{"a":1,"A":2}"#,
            &line.replace("\"response\"", "\"Response\""),
            &line.replace("\"response\"", "\"RESPONSE\""),
            &array,
            &nested,
            &as_string,
            &body_string,
        ] {
            assert_eq!(read_line(batch, bad), Err(Unreadable), "{bad:?}");
        }
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
            (
                r#"{"object":"text_completion","choices":[{"index":0,"text":"x"}]}"#,
                None,
            ),
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
            r#"{"output":[]}"#,
            r#"{"object":"chat.completion","choices":[],"output":[]}"#,
            r#"{"object":"chat.completion","output":[]}"#,
            r#"{"object":"response","output":[],"choices":[]}"#,
            r#"{"object":"text_completion","choices":[{"text":"x","message":{}}]}"#,
            r#"{"object":"text_completion","choices":[{"text":"x"}],"output":[]}"#,
            r#"{"object":"moderation","results":[],"output":[]}"#,
            r#"{"object":"list","data":[],"output":[]}"#,
            r#"{"object":"chat.completion.chunk","choices":[]}"#,
            r#"{"Object":"chat.completion","choices":[]}"#,
        ] {
            assert_eq!(read_line(batch, &line(body)), Err(Unreadable), "{body}");
        }
        let otherwise = line("{}").replace("\"body\"", "\"Body\"");
        assert_eq!(read_line(batch, &otherwise), Err(Unreadable));
    }
}
