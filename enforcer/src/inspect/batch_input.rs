//! Batch input files: the LLM calls an agent uploads in a JSON Lines file for a provider's Batch API to run later,
//! and the batch creates that name such a file. Each line is an LLM call the agent asks for as surely as one sent to
//! the endpoint itself, so it is decided as that call is; a batch create names its input by the id the upstream gave
//! the file, which only the upload's answer tells (`proxy::batch_input` keeps those). An OpenAI line names its
//! model, so it is decided at the upload (one Action per line). A Gemini line names none: the create does
//! (`…/models/{model}:batchGenerateContent`), so the upload is decided as the request it is, its lines only read
//! (an unreadable one refuses it), and the lines are decided at the create, with its model, as the same requests
//! sent inline in it are ([`InputLines`]).
//!
//! - **OpenAI Batch** (and Gemini's OpenAI-compatible Batch under `/v1beta/openai/`): the file is uploaded with
//!   `POST /v1/files`, `multipart/form-data` with a `purpose` field `batch` and a `file` part (OpenAI API reference,
//!   "Files": "Upload file"; "The request input object"): one `{"custom_id", "method": "POST", "url":
//!   "/v1/chat/completions" | "/v1/responses" | "/v1/embeddings" | "/v1/completions" | …, "body": {…}}` per line.
//!   The answer is a File object whose `id` a create names: `POST /v1/batches` `{"input_file_id": …}`.
//! - **Gemini Batch API**: the file is uploaded with Google's resumable upload protocol (`POST
//!   /upload/v1beta/files`, `X-Goog-Upload-Protocol: resumable`; google-genai `files.upload` sends it in one
//!   `upload, finalize` request at offset 0 when it is smaller than its 8 MiB chunk), one `{"key", "request":
//!   {…a GenerateContentRequest…}}` per line (Gemini API reference, "Batch API", input file). The answer is
//!   `{"file": {"name": "files/…"}}`, which a create names as `batch.inputConfig.fileName`
//!   (`models.batchGenerateContent`, `models.asyncBatchEmbedContent`, and their updates). That path serves every
//!   upload, so a file is read as batch input when a line names `request`.
//!
//! A file is read as its lines are read by the strictest reader: split at `\n` (a JSON line holds no raw line end
//! outside its strings, so any other split of a line that parses leaves pieces that do not), each line with what a
//! reader may skip around it skipped (`proposal::batch::trimmed`) one JSON object naming no member twice, its members
//! spelt as the API spells them. A file read so whose lines cannot all be read is refused. Where the upload cannot
//! be read one way (a form with a preamble, a chunked upload), nothing is read and the file is not known as read: a
//! batch naming it is refused (`proxy::batch_input`).

use serde_json::Value;

use super::keys::{misspelt, read_json, Twins};
use super::proposal::batch::trimmed;
use super::{llm, multipart, InspectError, LlmApi, Provider};
use crate::model::{Action, HttpRequest, LlmCall, Shared};

/// How the upstream's answer to an upload names the file it stored: what a batch create names as its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredAs {
    /// An OpenAI File object: `{"id": "file-…", "object": "file", …}`.
    FileId,
    /// A Gemini `media.upload` answer: `{"file": {"name": "files/…", …}}`.
    FileName,
}

/// One line of a batch input file: the endpoint path the call goes to (`/v1/chat/completions`; the upload's own for
/// Gemini, whose lines name none), the API it calls, and its body.
#[derive(Debug, Clone)]
pub struct InputCall {
    pub path: String,
    pub api: LlmApi,
    pub body: Value,
}

/// A batch input file as uploaded: its calls, and how the answer names it.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub calls: Vec<InputCall>,
    pub stored_as: StoredAs,
}

/// The members of an OpenAI batch input line, and of a Gemini one.
const OPENAI_LINE: &[&str] = &["custom_id", "method", "url", "body"];
const GEMINI_LINE: &[&str] = &["key", "request", "metadata"];

/// The batch input file `http` uploads to a host of `provider` (its `path` routed: `routed`), if it is one.
///
/// # Errors
/// [`InspectError::BatchInput`] for an upload read as batch input (an OpenAI form whose `purpose` is `batch`, a
/// Gemini file a line of which names `request`) whose lines cannot all be read as calls: not one JSON object, a
/// member spelt otherwise, a method other than `POST`, an endpoint that is not an LLM call's.
pub fn upload(
    provider: Provider,
    http: &HttpRequest,
    routed: &str,
) -> Result<Option<InputFile>, InspectError> {
    if !http.method.eq_ignore_ascii_case("POST") || provider == Provider::Anthropic {
        return Ok(None);
    }
    let lower = llm::lenient_lower(routed);
    let Some(collection) = lower.strip_suffix("/files") else {
        return Ok(None);
    };
    if provider == Provider::Gemini && collection.ends_with("/upload/v1beta") {
        return match resumable_content(http) {
            Some(content) => gemini_lines(content),
            None => Ok(None),
        };
    }
    let Some(parts) = http
        .content_type
        .as_deref()
        .and_then(|ct| multipart::form_parts(ct, &http.body))
    else {
        return Ok(None);
    };
    let one = |name: &str| {
        let mut named = parts.iter().filter(|p| p.name == name);
        named.next().filter(|_| named.next().is_none())
    };
    let batch = one("purpose").is_some_and(|p| p.data.trim().eq_ignore_ascii_case("batch"));
    if !batch {
        return Ok(None);
    }
    let file = one("file").ok_or(unreadable("the upload has no one `file` part"))?;
    openai_lines(file.data).map(Some)
}

/// Whether `http` (its path routed: `routed`) sends a file's bytes to Gemini's upload endpoint (`POST
/// …/upload/v1beta/files` naming `upload` in `X-Goog-Upload-Command`): the upstream stores them, it reads no request
/// in them. Read as batch input when they are ([`upload`]); otherwise they are data, whatever text they hold.
pub fn gemini_media(http: &HttpRequest, routed: &str) -> bool {
    http.method.eq_ignore_ascii_case("POST")
        && llm::lenient_lower(routed)
            .strip_suffix("/files")
            .is_some_and(|c| c.ends_with("/upload/v1beta"))
        && http.headers.get_all("x-goog-upload-command").any(|c| {
            c.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upload"))
        })
}

/// The file's content in a Gemini resumable upload request that sends it whole: the one request that both uploads
/// and finalizes (`X-Goog-Upload-Command: upload, finalize`) from offset 0, in the session the start request opened
/// (`upload_id`). `None` for the start request, a chunk, or a request naming its protocol more than one way.
fn resumable_content(http: &HttpRequest) -> Option<&str> {
    fn one<'a>(http: &'a HttpRequest, name: &'a str) -> Option<&'a str> {
        let mut values = http.headers.get_all(name);
        values.next().filter(|_| values.next().is_none())
    }
    let one = |name| one(http, name);
    let protocol = one("x-goog-upload-protocol")?;
    let command: Vec<String> = one("x-goog-upload-command")?
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let whole = protocol.trim().eq_ignore_ascii_case("resumable")
        && command.len() == 2
        && command.iter().any(|c| c == "upload")
        && command.iter().any(|c| c == "finalize")
        && one("x-goog-upload-offset")?.trim() == "0"
        && http.query.get_all("upload_id").count() == 1
        && http.query.get_all("uploadType").count() == 0;
    whole.then_some(http.body.as_str())
}

/// The non-blank lines of a file, each read as one JSON object (see the module documentation); `None` for a line
/// that does not open an object.
fn json_lines(content: &str) -> impl Iterator<Item = Option<Result<Value, InspectError>>> + '_ {
    content
        .split('\n')
        .map(trimmed)
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.starts_with('{').then(|| {
                read_json(line, Twins::Folded)
                    .ok()
                    .flatten()
                    .ok_or(unreadable("a line is not one JSON object"))
            })
        })
}

/// An OpenAI batch input file's calls: every line one.
fn openai_lines(content: &str) -> Result<InputFile, InspectError> {
    let mut calls = Vec::new();
    for line in json_lines(content) {
        let line = line.ok_or(unreadable("a line is not one JSON object"))??;
        let object = line
            .as_object()
            .ok_or(unreadable("a line is not an object"))?;
        if misspelt(object, OPENAI_LINE) {
            return Err(unreadable("a line spells a member otherwise"));
        }
        let method = object.get("method").and_then(Value::as_str);
        if !method.is_some_and(|m| m.eq_ignore_ascii_case("POST")) {
            return Err(unreadable("a line's method is not POST"));
        }
        let url = object
            .get("url")
            .and_then(Value::as_str)
            .ok_or(unreadable("a line names no url"))?;
        let path = super::canonical_path(url.split('?').next().unwrap_or_default());
        let api = llm::endpoint("POST", &path).ok_or(unreadable(
            "a line's url is not an LLM endpoint the enforcer reads",
        ))?;
        let body = object
            .get("body")
            .filter(|b| b.is_object())
            .ok_or(unreadable("a line's body is not an object"))?;
        if llm::misread(body) {
            return Err(unreadable("a line's body spells a member otherwise"));
        }
        calls.push(InputCall {
            path,
            api,
            body: body.clone(),
        });
    }
    Ok(InputFile {
        calls,
        stored_as: StoredAs::FileId,
    })
}

/// A file uploaded to Gemini, read as batch input when any line names `request` (in either proto3 JSON spelling):
/// then every line must be one; `None` otherwise.
fn gemini_lines(content: &str) -> Result<Option<InputFile>, InspectError> {
    let names_request = |v: &Value| llm::fields(v, "request").next().is_some();
    let lines: Vec<_> = json_lines(content).collect();
    let input = lines
        .iter()
        .any(|l| matches!(l, Some(Ok(v)) if names_request(v)));
    if !input {
        return Ok(None);
    }
    let mut calls = Vec::with_capacity(lines.len());
    for line in lines {
        let line = line.ok_or(unreadable("a line is not one JSON object"))??;
        let object = line
            .as_object()
            .ok_or(unreadable("a line is not an object"))?;
        let requests: Vec<&Value> = llm::fields(&line, "request").collect();
        let [request] = requests[..] else {
            return Err(unreadable("a line names no one request"));
        };
        if misspelt(object, GEMINI_LINE) || !request.is_object() {
            return Err(unreadable("a line's request is not an object"));
        }
        calls.push(InputCall {
            path: String::new(),
            api: LlmApi::GenerateContent,
            body: request.clone(),
        });
    }
    Ok(Some(InputFile {
        calls,
        stored_as: StoredAs::FileName,
    }))
}

/// The lines of the Gemini batch input files a batch create names, as they were uploaded and kept: what the create
/// carries as its calls ([`InputLines::carry`]).
#[derive(Debug, Default)]
pub struct InputLines {
    /// Each line's `request`, every file's, in order.
    requests: Vec<Value>,
    /// The files' text as detectors read it: each file as uploaded, and its strings with JSON escapes undone when
    /// it holds any.
    text: String,
}

impl InputLines {
    /// Read `contents` (each a kept file's bytes as forwarded) as at the upload ([`upload`]).
    ///
    /// # Errors
    /// [`InspectError::BatchInput`] for content that is not UTF-8, holds no line naming a `request`, or a line that
    /// cannot be read so: what was kept was read at its upload, so this is a file that cannot run.
    pub fn read<'a>(
        contents: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<InputLines, InspectError> {
        let mut lines = InputLines::default();
        for content in contents {
            let content =
                std::str::from_utf8(content).map_err(|_| unreadable("the file is not UTF-8"))?;
            let file =
                gemini_lines(content)?.ok_or(unreadable("the file holds no batch requests"))?;
            lines.text.push_str(content);
            lines.text.push('\n');
            let escaped = crate::encoding::json_escapes(content);
            for call in file.calls {
                if escaped {
                    crate::encoding::collect_strings(&call.body, &mut lines.text);
                }
                lines.requests.push(call.body);
            }
        }
        Ok(lines)
    }

    /// Carry the lines into the `actions` of the create (or of one reading of it) as the same requests sent inline
    /// (`batch.inputConfig.requests.requests[].request`) are read: their declared tools and tool results join each
    /// Action's `llm`, whose model is the create's, and the text detectors read is the create's body followed by the
    /// files' ([`InputLines::read`]). An Action that is no LLM call (a batch update, whose model the request does
    /// not name) gets a Gemini call naming no model, so a rule on the model cannot pass it by. The Actions' JSON is
    /// the create's own: what the upstream receives.
    ///
    /// # Errors
    /// [`InspectError::BadJson`] (Gemini's) for a request naming another model than the create's, as an inline
    /// request doing so is refused.
    pub fn carry(&self, actions: &mut [Action]) -> Result<(), InspectError> {
        // The Actions of a request share its body: the text with the files' is made once for them.
        let mut made: Option<(Shared<String>, Shared<String>)> = None;
        for action in actions {
            let call = action.llm.get_or_insert_with(|| LlmCall {
                provider: Provider::Gemini.as_str().to_string(),
                ..LlmCall::default()
            });
            if self
                .requests
                .iter()
                .any(|r| llm::gemini_names_other_model(call.model.as_deref(), r))
            {
                return Err(InspectError::BadJson {
                    protocol: Provider::Gemini.as_str(),
                });
            }
            llm::add_gemini_requests(call, &self.requests);
            let Some(http) = action.http.as_mut() else {
                continue;
            };
            let body = match &made {
                Some((own, with_lines)) if Shared::same(own, &http.body) => with_lines.clone(),
                _ => {
                    let with_lines = Shared::new(format!("{}\n{}", http.body.as_str(), self.text));
                    made = Some((http.body.clone(), with_lines.clone()));
                    with_lines
                }
            };
            http.body = body;
        }
        Ok(())
    }
}

/// One input file a batch create names: the file as the create names it, and which upload API's reading of its
/// lines the create runs them by (an `input_file_id` is run as OpenAI batch lines, a Gemini `fileName` as Gemini's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedInput {
    pub read_as: StoredAs,
    pub file: String,
}

/// The files a batch create sent to a host of `provider` names as its input: OpenAI's `input_file_id` (`POST
/// …/batches`, OpenAI API reference, "Create batch"; on Gemini's host, whose OpenAI-compatible API may read proto3
/// JSON, `inputFileId` too), Gemini's `batch.inputConfig.fileName` (or the `inputConfig` of a batch update: any
/// request to Gemini's host is read so, in either proto3 JSON spelling). Empty for any other request.
///
/// # Errors
/// [`InspectError::BatchInput`] for a create whose input is not a string, whose member is spelt otherwise, or (`POST
/// …/batches`) whose body is not a JSON object: what it names cannot be known, so it is not run.
pub fn named_inputs(
    provider: Provider,
    method: &str,
    routed: &str,
    body: Option<&Value>,
) -> Result<Vec<NamedInput>, InspectError> {
    // Asked of every request to a provider's host: the path is looked at only for a `POST`, and not copied.
    let create = provider != Provider::Anthropic
        && method.eq_ignore_ascii_case("POST")
        && llm::lenient_ends_with(routed, "/batches");
    if create && !body.is_some_and(Value::is_object) {
        return Err(unreadable("the batch create is not a JSON object"));
    }
    let Some(body) = body.filter(|_| create || provider == Provider::Gemini) else {
        return Ok(Vec::new());
    };
    let mut named: Vec<(StoredAs, &Value)> = Vec::new();
    if let Some(object) = body.as_object().filter(|_| create) {
        if misspelt(object, &["input_file_id", "inputFileId"]) {
            return Err(unreadable("the batch spells input_file_id otherwise"));
        }
        // `input_file_id`, and the spellings a proto3 JSON reader binds to it (`inputFileId`).
        named.extend(llm::fields(body, "inputFileId").map(|v| (StoredAs::FileId, v)));
    }
    if provider == Provider::Gemini {
        let configs = llm::fields(body, "batch")
            .flat_map(|b| llm::fields(b, "inputConfig"))
            .chain(llm::fields(body, "inputConfig"));
        named.extend(
            configs
                .flat_map(|c| llm::fields(c, "fileName"))
                .map(|v| (StoredAs::FileName, v)),
        );
    }
    named
        .into_iter()
        .map(|(read_as, v)| {
            v.as_str()
                .map(|file| NamedInput {
                    read_as,
                    file: file.to_owned(),
                })
                .ok_or(unreadable("the batch's input file is not a string"))
        })
        .collect()
}

fn unreadable(what: &'static str) -> InspectError {
    InspectError::BatchInput(what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pairs;
    use serde_json::json;

    fn request(method: &str, path: &str, content_type: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            content_type: Some(content_type.into()),
            body: body.to_string().into(),
            ..HttpRequest::default()
        }
    }

    fn form(purpose: &str, file: &str) -> String {
        format!(
            "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--b\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\r\n--b--\r\n"
        )
    }

    fn line(url: &str, model: &str) -> String {
        json!({"custom_id": "r1", "method": "POST", "url": url,
               "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    }

    #[test]
    fn an_openai_batch_upload_is_read_line_by_line() {
        let file = format!(
            "{}\n\n{}\r\n",
            line("/v1/chat/completions", "a"),
            line("/v1/responses", "b")
        );
        let http = request(
            "POST",
            "/v1/files",
            "multipart/form-data; boundary=b",
            &form("batch", &file),
        );
        let input = upload(Provider::OpenAi, &http, "/v1/files")
            .unwrap()
            .unwrap();
        assert_eq!(input.stored_as, StoredAs::FileId);
        let got: Vec<_> = input
            .calls
            .iter()
            .map(|c| (c.path.as_str(), c.api, c.body["model"].as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("/v1/chat/completions", LlmApi::ChatCompletions, Some("a")),
                ("/v1/responses", LlmApi::Responses, Some("b"))
            ]
        );
        // Another purpose, or a form that reads more than one way: not read.
        let other = request(
            "POST",
            "/v1/files",
            "multipart/form-data; boundary=b",
            &form("fine-tune", &file),
        );
        assert!(upload(Provider::OpenAi, &other, "/v1/files")
            .unwrap()
            .is_none());
        // The file's headers ended by a bare LF line (where Go's `mime/multipart` starts its data): not read.
        let bare_lf = form("batch", &file).replace(
            "application/octet-stream\r\n\r\n",
            &format!(
                "application/octet-stream\r\n\n{}\n\r\n\r\n",
                line("/v1/chat/completions", "evil")
            ),
        );
        let odd = request(
            "POST",
            "/v1/files",
            "multipart/form-data; boundary=b",
            &bare_lf,
        );
        assert!(upload(Provider::OpenAi, &odd, "/v1/files")
            .unwrap()
            .is_none());
        let preamble = format!("x\r\n{}", form("batch", &file));
        let odd = request(
            "POST",
            "/v1/files",
            "multipart/form-data; boundary=b",
            &preamble,
        );
        assert!(upload(Provider::OpenAi, &odd, "/v1/files")
            .unwrap()
            .is_none());
    }

    /// The forms the official SDKs send (`client.files.create(file=…, purpose="batch")`), captured byte for byte
    /// from openai-python 3.51.0 (httpx) and openai-node 7.59.0 (undici's `FormData`, `file` before `purpose`):
    /// each is read, its line a call.
    #[test]
    fn the_official_sdks_uploads_are_read() {
        for (body, boundary) in [
            (
                &include_bytes!("../../../tests/fixtures/batch_input/openai-python-3.51.0.form")[..],
                "b45daa394edf29b8d1623d543c8425d7",
            ),
            (
                &include_bytes!("../../../tests/fixtures/batch_input/openai-node-7.59.0.form")[..],
                "----formdata-undici-089649890638",
            ),
        ] {
            let content_type = format!("multipart/form-data; boundary={boundary}");
            let http = request(
                "POST",
                "/v1/files",
                &content_type,
                std::str::from_utf8(body).unwrap(),
            );
            let input = upload(Provider::OpenAi, &http, "/v1/files")
                .unwrap()
                .expect(boundary);
            assert_eq!(input.calls.len(), 1, "{boundary}");
            assert_eq!(input.calls[0].api, LlmApi::ChatCompletions);
            assert_eq!(input.calls[0].body["model"], "gpt-x");
        }
    }

    #[test]
    fn an_openai_batch_line_that_cannot_be_read_refuses_the_upload() {
        let ok = line("/v1/chat/completions", "a");
        for bad in [
            "not json".to_string(),
            format!("{ok} {ok}"),
            ok.replace("\"method\":\"POST\"", "\"method\":\"GET\""),
            ok.replace("/v1/chat/completions", "/v1/moderations"),
            ok.replace("\"body\"", "\"Body\""),
            ok.replace("\"model\"", "\"Model\""),
            ok.replace(
                "\"custom_id\":\"r1\"",
                "\"custom_id\":\"r1\",\"url\":\"/v1/embeddings\"",
            ),
            "[1]".to_string(),
        ] {
            let body = form("batch", &format!("{ok}\n{bad}\n"));
            let http = request(
                "POST",
                "/v1/files",
                "multipart/form-data; boundary=b",
                &body,
            );
            assert!(
                matches!(
                    upload(Provider::OpenAi, &http, "/v1/files"),
                    Err(InspectError::BatchInput(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_gemini_upload_sent_whole_is_read_when_a_line_names_a_request() {
        let lines = "{\"key\": \"k1\", \"request\": {\"contents\": [], \"tools\": [{\"functionDeclarations\": [{\"name\": \"rm\"}]}]}}\n";
        let mut http = request("POST", "/upload/v1beta/files", "application/jsonl", lines);
        http.query = Pairs(vec![("upload_id".into(), "u1".into())]);
        http.headers = Pairs(vec![
            ("x-goog-upload-protocol".into(), "resumable".into()),
            ("x-goog-upload-command".into(), "upload, finalize".into()),
            ("x-goog-upload-offset".into(), "0".into()),
        ]);
        let input = upload(Provider::Gemini, &http, "/upload/v1beta/files")
            .unwrap()
            .unwrap();
        assert_eq!(input.stored_as, StoredAs::FileName);
        assert_eq!(input.calls.len(), 1);
        // A chunk, another offset, or a file of other lines: not read.
        let mut chunk = http.clone();
        chunk.headers.0[1].1 = "upload".into();
        assert!(upload(Provider::Gemini, &chunk, "/upload/v1beta/files")
            .unwrap()
            .is_none());
        let mut later = http.clone();
        later.headers.0[2].1 = "10".into();
        assert!(upload(Provider::Gemini, &later, "/upload/v1beta/files")
            .unwrap()
            .is_none());
        let mut data = http.clone();
        data.body = "{\"a\": 1}\nplain text\n".to_string().into();
        assert!(upload(Provider::Gemini, &data, "/upload/v1beta/files")
            .unwrap()
            .is_none());
        // A line among requests that is none: refused.
        let mut mixed = http;
        mixed.body = format!("{lines}{{\"key\": \"k2\"}}\n").into();
        assert!(upload(Provider::Gemini, &mixed, "/upload/v1beta/files").is_err());
    }

    /// What a create names, as (API read as, file).
    fn named(
        provider: Provider,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<(StoredAs, String)>, InspectError> {
        named_inputs(provider, method, path, body)
            .map(|n| n.into_iter().map(|n| (n.read_as, n.file)).collect())
    }

    #[test]
    fn batch_creates_name_their_input_files() {
        let id = |f: &str| (StoredAs::FileId, f.to_string());
        let name = |f: &str| (StoredAs::FileName, f.to_string());
        let openai = json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"});
        assert_eq!(
            named(Provider::OpenAi, "POST", "/v1/batches", Some(&openai)).unwrap(),
            [id("file-1")]
        );
        assert_eq!(
            named(
                Provider::Gemini,
                "POST",
                "/v1beta/openai/batches/",
                Some(&openai)
            )
            .unwrap(),
            [id("file-1")]
        );
        let misspelt = json!({"Input_File_Id": "file-2", "input_file_id": "file-1"});
        assert!(named_inputs(Provider::OpenAi, "POST", "/v1/batches", Some(&misspelt)).is_err());
        let gemini =
            json!({"batch": {"model": "models/m", "input_config": {"file_name": "files/f1"}}});
        assert_eq!(
            named(
                Provider::Gemini,
                "POST",
                "/v1beta/models/m:batchGenerateContent",
                Some(&gemini)
            )
            .unwrap(),
            [name("files/f1")]
        );
        let update = json!({"inputConfig": {"fileName": "files/f2"}});
        assert_eq!(
            named(
                Provider::Gemini,
                "PATCH",
                "/v1beta/batches/b:updateGenerateContentBatch",
                Some(&update)
            )
            .unwrap(),
            [name("files/f2")]
        );
        assert!(named_inputs(
            Provider::OpenAi,
            "POST",
            "/v1/chat/completions",
            Some(&openai)
        )
        .unwrap()
        .is_empty());
    }

    /// A create whose body names its file where a reader of the other spelling finds it (proto3 JSON's `inputFileId`
    /// beside `input_file_id`), or whose body is not a JSON object (a form, an array, none), cannot be known to run
    /// a file read: the first names every file so spelt, the second is refused.
    #[test]
    fn a_batch_create_is_read_every_way_or_refused() {
        let twin = json!({"input_file_id": "file-ok", "inputFileId": "files/other"});
        assert_eq!(
            named(
                Provider::Gemini,
                "POST",
                "/v1beta/openai/batches",
                Some(&twin)
            )
            .unwrap(),
            [
                (StoredAs::FileId, "file-ok".to_string()),
                (StoredAs::FileId, "files/other".to_string())
            ]
        );
        for body in [
            None,
            Some(json!([{"input_file_id": "file-1"}])),
            Some(json!("x")),
        ] {
            assert!(
                matches!(
                    named_inputs(Provider::OpenAi, "POST", "/V1/Batches/", body.as_ref()),
                    Err(InspectError::BatchInput(_))
                ),
                "{body:?}"
            );
        }
        // Listing batches, and Anthropic's host (whose batches carry their calls): nothing named.
        assert!(named_inputs(Provider::OpenAi, "GET", "/v1/batches", None)
            .unwrap()
            .is_empty());
        assert!(
            named_inputs(Provider::Anthropic, "POST", "/v1/batches", None)
                .unwrap()
                .is_empty()
        );
    }

    /// A kept Gemini file's lines join the create's call as inline requests do: their tools and tool results, the
    /// create's model; the text detectors read gains the file (its escapes undone); a line naming another model, or
    /// any model where the request names none, is refused.
    #[test]
    fn a_gemini_file_s_lines_are_carried_into_the_create_s_call() {
        let file = concat!(
            "{\"key\": \"k1\", \"request\": {\"contents\": [{\"parts\": [{\"text\": \"\\u0041KIA\"}]}], ",
            "\"tools\": [{\"functionDeclarations\": [{\"name\": \"rm\"}]}]}}\n",
            "{\"key\": \"k2\", \"request\": {\"model\": \"models/m\", \"contents\": [{\"parts\": ",
            "[{\"functionResponse\": {\"name\": \"rm\"}}]}], \"tools\": [{\"google_search\": {}}]}}\n"
        );
        let lines = InputLines::read([file.as_bytes()]).unwrap();
        let create = |llm: Option<LlmCall>| Action {
            llm,
            http: Some(
                HttpRequest {
                    body: "{\"batch\": {}}".into(),
                    ..HttpRequest::default()
                }
                .into(),
            ),
            ..Action::default()
        };
        let call = LlmCall {
            provider: "gemini".into(),
            model: Some("m".into()),
            tools: vec!["ls".into()],
            ..LlmCall::default()
        };
        let first = create(Some(call));
        let mut actions = vec![first.clone(), first];
        lines.carry(&mut actions).unwrap();
        let got = actions[0].llm.as_ref().unwrap();
        assert_eq!(got.model.as_deref(), Some("m"));
        assert_eq!(got.tools, ["ls", "rm", "googleSearch"]);
        assert!(got.has_tool_results);
        let text = actions[0].http.as_ref().unwrap().body.as_str();
        assert!(text.starts_with("{\"batch\": {}}\n"), "{text}");
        assert!(text.contains(file) && text.contains("\nAKIA\n"), "{text}");
        // Every Action of the request holds the one text.
        let second = &actions[1].http.as_ref().unwrap().body;
        assert!(Shared::same(
            &actions[0].http.as_ref().unwrap().body,
            second
        ));

        let mut other = vec![create(Some(LlmCall {
            provider: "gemini".into(),
            model: Some("n".into()),
            ..LlmCall::default()
        }))];
        assert!(matches!(
            lines.carry(&mut other),
            Err(InspectError::BadJson { protocol: "gemini" })
        ));
        let mut update = vec![create(None)];
        assert!(lines.carry(&mut update).is_err());
        let plain = InputLines::read([&file.as_bytes()[..file.find('\n').unwrap() + 1]]).unwrap();
        plain.carry(&mut update).unwrap();
        let got = update[0].llm.as_ref().unwrap();
        assert_eq!(
            (got.provider.as_str(), got.model.as_deref()),
            ("gemini", None)
        );
        assert_eq!(got.tools, ["rm"]);
        // Content that no longer reads as batch lines: refused.
        assert!(InputLines::read([&b"{\"a\": 1}\n"[..]]).is_err());
        assert!(InputLines::read([&b"\xff"[..]]).is_err());
    }
}
