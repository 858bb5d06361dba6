//! The `llm<N>` test's exchange: a Chat Completions request the size of a coding agent's mid-session turn (a system
//! prompt, a conversation with tool calls and their results, twenty tool definitions: about 32 KiB of JSON), and the
//! model's answer proposing one tool call (`finish_reason: "tool_calls"`), as OpenAI's API shapes them
//! (<https://platform.openai.com/docs/api-reference/chat/create>). The enforcer reads such a request as an LLM call
//! (model, tools, messages), scans it with the policy's detectors, and reads the answer for proposed tool calls:
//! the work every agent request costs in production, which the other tests' bodiless `GET`s do not measure.
//!
//! Both texts are built without `'`, `$` or a raw `\`-escape that nginx's quoted `return` text would mangle; the
//! answer's escapes are doubled for nginx by [`nginx_quoted`].

use serde_json::{json, Value};

/// The path the test posts to (an OpenAI-compatible endpoint on the benchmark's upstream).
pub const PATH: &str = "/v1/chat/completions";

/// The request body's size in bytes, at least (the built body is within one conversation turn, under 1 KiB, above it).
pub const REQUEST_BYTES: usize = 32 * 1024;

/// The tools an agent declares: name and description.
const TOOLS: &[(&str, &str)] = &[
    ("read_file", "Read a file of the workspace"),
    ("write_file", "Write a file of the workspace, replacing it"),
    ("edit_file", "Replace one exact text of a file with another"),
    ("list_dir", "List a directory of the workspace"),
    (
        "search_code",
        "Search the workspace for a regular expression",
    ),
    ("run_tests", "Run the project test suite"),
    ("run_command", "Run a shell command in the workspace"),
    ("git_status", "Show the working tree status"),
    (
        "git_diff",
        "Show changes between commits or the working tree",
    ),
    ("git_commit", "Record changes to the repository"),
    ("open_url", "Fetch a web page as text"),
    ("web_search", "Search the web"),
    ("create_issue", "Open an issue in the tracker"),
    ("comment_issue", "Comment on an issue"),
    ("list_issues", "List open issues"),
    ("read_docs", "Read the documentation of a library"),
    ("format_code", "Format the workspace"),
    ("lint_code", "Run the linter"),
    ("build_project", "Build the project"),
    ("ask_user", "Ask the user a question"),
];

/// The request: `{"model", "messages", "tools", "tool_choice", "stream": false}`, about [`REQUEST_BYTES`] long.
pub fn request() -> String {
    let tools: Vec<Value> = TOOLS
        .iter()
        .map(|(name, description)| {
            json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": description,
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "path": { "type": "string", "description": "A path relative to the workspace root" },
                            "text": { "type": "string", "description": "The text to write, search for or run" },
                            "limit": { "type": "integer", "description": "At most this many lines or results" }
                        },
                        "required": ["path"],
                        "additionalProperties": false
                    }
                }
            })
        })
        .collect();
    let mut messages = vec![json!({
        "role": "system",
        "content": format!(
            "You are a coding agent working in a Rust workspace. {}",
            "Read before you write, keep changes small, run the tests after every change. ".repeat(24)
        ),
    })];
    let body = |messages: &[Value]| {
        json!({
            "model": "gpt-4.1",
            "messages": messages,
            "tools": tools,
            "tool_choice": "auto",
            "stream": false,
        })
        .to_string()
    };
    let mut turn = 0;
    loop {
        let text = body(&messages);
        if text.len() >= REQUEST_BYTES {
            return text;
        }
        let (name, _) = TOOLS[turn % TOOLS.len()];
        let call_id = format!("call_{turn:04}");
        messages.push(json!({
            "role": "user",
            "content": format!("Step {turn}: look at module {turn} and tell me what it owns and what it depends on."),
        }));
        messages.push(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": call_id,
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": json!({ "path": format!("src/module_{turn}.rs"), "limit": 200 }).to_string(),
                },
            }],
        }));
        messages.push(json!({
            "role": "tool",
            "tool_call_id": call_id,
            "content": format!(
                "//! Module {turn}: owns one stage of the pipeline. {}",
                "pub fn stage(input: Input) -> Output { let parsed = parse(input); decide(parsed) } ".repeat(6)
            ),
        }));
        turn += 1;
    }
}

/// The answer: a `chat.completion` whose one choice proposes a `read_file` call.
pub fn answer() -> String {
    json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_764_547_200,
        "model": "gpt-4.1",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": "call_bench",
                    "type": "function",
                    "function": {
                        "name": "read_file",
                        "arguments": json!({ "path": "src/lib.rs", "limit": 120 }).to_string(),
                    },
                }],
            },
            "finish_reason": "tool_calls",
        }],
        "usage": { "prompt_tokens": 8123, "completion_tokens": 21, "total_tokens": 8144 },
    })
    .to_string()
}

/// `text` for nginx's single-quoted `return` text: each `\` doubled (nginx reads `\\` as one). Panics on `'` or `$`,
/// which the texts here never hold.
pub fn nginx_quoted(text: &str) -> String {
    assert!(
        !text.contains('\'') && !text.contains('$'),
        "nginx would mangle this text"
    );
    text.replace('\\', "\\\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_an_agent_turn_of_about_32_kib() {
        let body = request();
        assert!(
            (REQUEST_BYTES..REQUEST_BYTES + 1024).contains(&body.len()),
            "{} bytes",
            body.len()
        );
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["tools"].as_array().map(Vec::len), Some(TOOLS.len()));
        assert!(v["messages"].as_array().is_some_and(|m| m.len() > 30));
        assert!(!body.contains('\'') && !body.contains('$'));
    }

    #[test]
    fn the_answer_proposes_one_call_and_survives_nginx_quoting() {
        let text = answer();
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "read_file"
        );
        // nginx turns each `\\` back into `\`.
        assert_eq!(nginx_quoted(&text).replace("\\\\", "\\"), text);
    }
}
