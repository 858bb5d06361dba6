//! Protocol classification against golden requests per provider (tests/fixtures/protocols/*.json): what ends up in
//! the `llm` and `mcp` parts of each Action, and which requests are refused or left as plain HTTP.

use enforcer::inspect::{
    classify, InspectConfig, InspectError, LlmApi, Protocol, Provider, ProviderOverride,
};
use enforcer::model::{Action, HttpRequest, LlmCall, McpCall, Pairs, Transport};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/protocols/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn pairs(v: Option<&Value>) -> Pairs {
    v.map(|v| serde_json::from_value(v.clone()).unwrap())
        .unwrap_or_default()
}

/// An Action as the proxy builds it: the body as text, `json` left for the classifier to parse when `parsed` is false.
fn action_from(req: &Value, parsed: bool) -> Action {
    let body = req["body"].to_string();
    Action {
        transport: Transport {
            host: req["host"].as_str().map(str::to_string),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: req["method"].as_str().unwrap().to_string(),
                path: req["path"].as_str().unwrap().to_string(),
                query: pairs(req.get("query")),
                headers: pairs(req.get("headers")),
                content_type: Some("application/json".into()),
                body_size: body.len() as u64,
                json: parsed.then(|| req["body"].clone().into()),
                body: body.into(),
                upgrade: None,
            }
            .into(),
        ),
        ..Action::default()
    }
}

fn check_golden(name: &str) {
    let fx = fixture(name);
    for parsed in [true, false] {
        let out = classify(
            action_from(&fx["request"], parsed),
            &InspectConfig::default(),
        )
        .unwrap();
        let expect = &fx["expect"];
        match expect["protocol"].as_str().unwrap() {
            "llm" => {
                assert!(
                    matches!(out.protocol, Protocol::Llm { .. }),
                    "{name}: {:?}",
                    out.protocol
                );
                assert_eq!(out.actions.len(), 1);
                let want: LlmCall = serde_json::from_value(expect["llm"].clone()).unwrap();
                assert_eq!(out.actions[0].llm.as_ref(), Some(&want), "{name}");
                assert!(out.actions[0].mcp.is_none());
            }
            "mcp" => {
                let Protocol::Mcp { batch, messages } = &out.protocol else {
                    panic!("{name}: {:?}", out.protocol);
                };
                assert_eq!(*batch, expect["batch"].as_bool().unwrap(), "{name}");
                let ids: Vec<Value> = messages
                    .iter()
                    .map(|m| m.id.clone().unwrap_or(Value::Null))
                    .collect();
                assert_eq!(Value::from(ids), expect["ids"], "{name}");
                let want: Vec<McpCall> = serde_json::from_value(expect["mcp"].clone()).unwrap();
                let got: Vec<McpCall> =
                    out.actions.iter().map(|a| a.mcp.clone().unwrap()).collect();
                assert_eq!(got, want, "{name}");
                for (m, a) in messages.iter().zip(&out.actions) {
                    assert_eq!(a.mcp.as_ref().unwrap().method, m.method);
                    assert!(a.llm.is_none());
                }
            }
            other => panic!("unknown protocol {other}"),
        }
        // The classifier never loses the request: the parsed body is what the fixture sent.
        for a in &out.actions {
            assert_eq!(
                a.http.as_ref().unwrap().json.as_deref(),
                Some(&fx["request"]["body"])
            );
        }
    }
}

#[test]
fn openai_chat_completions() {
    check_golden("openai_chat");
}

#[test]
fn openai_responses_with_hosted_mcp() {
    check_golden("openai_responses");
}

#[test]
fn anthropic_messages_with_mcp_connector() {
    check_golden("anthropic_messages");
}

#[test]
fn gemini_stream_generate_content() {
    check_golden("gemini_generate");
}

#[test]
fn mcp_tools_call_keeps_session() {
    check_golden("mcp_tools_call");
}

#[test]
fn mcp_batch_every_element() {
    check_golden("mcp_batch");
}

#[test]
fn mcp_legacy_http_sse_post() {
    check_golden("mcp_legacy_sse_post");
}

fn simple(host: &str, method: &str, path: &str, body: Value) -> Action {
    action_from(
        &json!({"host": host, "method": method, "path": path, "body": body}),
        false,
    )
}

#[test]
fn gemini_generate_content_without_sse_is_not_streaming() {
    let a = simple(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        json!({"contents": [{"parts": [{"text": "hi"}]}]}),
    );
    let out = classify(a, &InspectConfig::default()).unwrap();
    assert_eq!(
        out.protocol,
        Protocol::Llm {
            provider: Provider::Gemini,
            api: LlmApi::GenerateContent
        }
    );
    let llm = out.actions[0].llm.clone().unwrap();
    assert_eq!(llm.model.as_deref(), Some("gemini-2.0-flash"));
    assert!(!llm.stream);
    assert!(!llm.has_tool_results);
}

/// OpenAI's paths in another letter case are LLM calls (a gateway may route them case-insensitively): read as the
/// API they name, so a rule on `llm.tools` is not dodged by `/V1/Responses`.
#[test]
fn llm_paths_in_another_letter_case_are_llm_calls() {
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let responses = json!({"model": "m", "input": "hi"});
    let cases = [
        ("/V1/Responses", responses.clone(), LlmApi::Responses),
        ("/v1/RESPONSES/", responses, LlmApi::Responses),
        ("/v1/Chat/Completions", chat, LlmApi::ChatCompletions),
    ];
    for (path, body, api) in cases {
        let out = classify(
            simple("api.openai.com", "POST", path, body),
            &InspectConfig::default(),
        )
        .unwrap();
        let want = Protocol::Llm {
            provider: Provider::OpenAi,
            api,
        };
        assert_eq!(out.protocol, want, "{path}");
        assert_eq!(
            out.actions[0].llm.as_ref().unwrap().model.as_deref(),
            Some("m"),
            "{path}"
        );
    }
}

/// Anthropic and Gemini also serve OpenAI's Chat Completions (`https://api.anthropic.com/v1/chat/completions`,
/// Gemini's `/v1beta/openai/chat/completions`), which the OpenAI SDK calls with a `base_url`: the API is read from the
/// path's shape on any provider's host, so `llm.*` rules and proposal rules apply, and the block answer and the
/// proposals are read in OpenAI's shape. `llm.provider` stays the host's provider.
#[test]
fn openai_compatible_chat_on_other_providers_hosts_is_chat_completions() {
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "forbidden_tool"}}]
    });
    let cases = [
        ("api.anthropic.com", "/v1/chat/completions", "anthropic"),
        (
            "generativelanguage.googleapis.com",
            "/v1beta/openai/chat/completions",
            "gemini",
        ),
    ];
    for (host, path, provider) in cases {
        let out = classify(
            simple(host, "POST", path, body.clone()),
            &InspectConfig::default(),
        )
        .unwrap();
        assert_eq!(
            out.protocol,
            Protocol::Llm {
                provider: Provider::OpenAi,
                api: LlmApi::ChatCompletions
            },
            "{host}{path}"
        );
        let llm = out.actions[0].llm.clone().unwrap();
        assert_eq!(llm.provider, provider);
        assert_eq!(llm.model.as_deref(), Some("m"));
        assert_eq!(llm.tools, ["forbidden_tool"]);
    }
    // Gemini's OpenAI-compatible embeddings are a call too (model only).
    let out = classify(
        simple(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/openai/embeddings",
            json!({"model": "text-embedding-004", "input": "hi"}),
        ),
        &InspectConfig::default(),
    )
    .unwrap();
    assert_eq!(
        out.actions[0].llm.as_ref().and_then(|l| l.model.as_deref()),
        Some("text-embedding-004")
    );
}

/// Every tool declaration shape of the OpenAI SDK has its name in `llm.tools`: a Chat custom tool
/// (`{"type":"custom","custom":{"name":…}}`, `ChatCompletionCustomToolParam`) by its name, not `custom`; a Responses
/// `namespace` tool (`NamespaceToolParam`) by its name and by the name of each function or custom tool inside it.
#[test]
fn custom_and_namespaced_openai_tools_are_named() {
    let chat = simple(
        "api.openai.com",
        "POST",
        "/v1/chat/completions",
        json!({
            "model": "gpt-5",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "custom", "custom": {"name": "forbidden_tool", "description": "x"}},
                {"type": "function", "function": {"name": "get_weather"}}
            ]
        }),
    );
    let out = classify(chat, &InspectConfig::default()).unwrap();
    let llm = out.actions[0].llm.clone().unwrap();
    assert_eq!(llm.tools, ["forbidden_tool", "get_weather"]);

    let responses = simple(
        "api.openai.com",
        "POST",
        "/v1/responses",
        json!({
            "model": "gpt-5",
            "input": "hi",
            "tools": [
                {"type": "namespace", "name": "crm", "description": "CRM", "tools": [
                    {"type": "function", "name": "forbidden_tool"},
                    {"type": "custom", "name": "lookup"}
                ]},
                {"type": "custom", "name": "shell_exec"}
            ]
        }),
    );
    let out = classify(responses, &InspectConfig::default()).unwrap();
    let llm = out.actions[0].llm.clone().unwrap();
    assert_eq!(llm.tools, ["crm", "forbidden_tool", "lookup", "shell_exec"]);
}

/// Gemini reads request bodies as proto3 JSON, which takes a field's proto name (`google_search`) for its JSON name
/// (`googleSearch`): a built-in tool has one name in `llm.tools` however the body spells it, so a rule on
/// `googleSearch` cannot be dodged by writing `google_search`.
#[test]
fn gemini_builtin_tools_have_one_name_however_spelt() {
    let a = simple(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        json!({
            "contents": [{"parts": [{"text": "hi"}]}],
            "tools": [
                {"google_search": {}},
                {"code_execution": {}, "url_context": {}},
                {"function_declarations": [{"name": "set_light"}]},
                {"googleSearchRetrieval": {}}
            ]
        }),
    );
    let out = classify(a, &InspectConfig::default()).unwrap();
    let llm = out.actions[0].llm.clone().unwrap();
    assert_eq!(
        llm.tools,
        [
            "googleSearch",
            "codeExecution",
            "urlContext",
            "set_light",
            "googleSearchRetrieval"
        ]
    );
}

#[test]
fn legacy_embedding_and_tuned_model_calls_are_llm_calls() {
    let cases = [
        (
            "api.openai.com",
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": true}),
            Provider::OpenAi,
            "gpt-3.5-turbo-instruct",
            true,
        ),
        (
            "api.openai.com",
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hi"}),
            Provider::OpenAi,
            "text-embedding-3-small",
            false,
        ),
        (
            "api.anthropic.com",
            "/v1/complete",
            json!({"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:"}),
            Provider::Anthropic,
            "claude-2.1",
            false,
        ),
        (
            "generativelanguage.googleapis.com",
            "/v1beta/models/text-embedding-004:embedContent",
            json!({"content": {"parts": [{"text": "hi"}]}}),
            Provider::Gemini,
            "text-embedding-004",
            false,
        ),
    ];
    for (host, path, body, provider, model, stream) in cases {
        let out = classify(simple(host, "POST", path, body), &InspectConfig::default()).unwrap();
        assert_eq!(
            out.protocol,
            Protocol::Llm {
                provider,
                api: LlmApi::Other
            },
            "{path}"
        );
        let llm = out.actions[0].llm.clone().unwrap();
        assert_eq!(llm.model.as_deref(), Some(model), "{path}");
        assert_eq!(llm.stream, stream, "{path}");
        assert!(llm.tools.is_empty());
    }
    // A tuned Gemini model generates content like a base model.
    let out = classify(
        simple(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/tunedModels/my-tuned-7:streamGenerateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        ),
        &InspectConfig::default(),
    )
    .unwrap();
    let llm = out.actions[0].llm.clone().unwrap();
    assert_eq!(llm.model.as_deref(), Some("my-tuned-7"));
    assert!(llm.stream);
}

#[test]
fn unparseable_json_on_llm_endpoint_is_an_error() {
    let mut a = simple("api.anthropic.com", "POST", "/v1/messages", json!(null));
    a.http.as_mut().unwrap().body = "{\"model\": \"claude\", ".into();
    match classify(a, &InspectConfig::default()) {
        Err(InspectError::BadJson { protocol }) => assert_eq!(protocol, "anthropic"),
        other => panic!("expected BadJson, got {other:?}"),
    }
    let mut a = simple(
        "api.openai.com",
        "POST",
        "/v1/chat/completions",
        json!(null),
    );
    a.http.as_mut().unwrap().body = String::new().into();
    assert!(matches!(
        classify(a, &InspectConfig::default()),
        Err(InspectError::BadJson { .. })
    ));
}

#[test]
fn unparseable_body_from_an_mcp_client_is_an_error() {
    for header in ["mcp-session-id", "MCP-Protocol-Version"] {
        let mut a = simple("tools.example.test", "POST", "/mcp", json!(null));
        let http = a.http.as_mut().unwrap();
        http.body = "{\"jsonrpc\":\"2.0\",\"method\":\"tools/call\",".into();
        http.headers = Pairs(vec![(header.to_ascii_lowercase(), "x".into())]);
        match classify(a, &InspectConfig::default()) {
            Err(InspectError::BadJson { protocol }) => assert_eq!(protocol, "MCP"),
            other => panic!("{header}: expected BadJson, got {other:?}"),
        }
    }
    // Without an MCP header the same bytes still claim JSON by their shape: refused too, never decided as plain
    // HTTP (a stateless MCP server needs no headers, and parses leniently).
    let mut a = simple("tools.example.test", "POST", "/mcp", json!(null));
    a.http.as_mut().unwrap().body = "{\"jsonrpc\":".into();
    assert!(matches!(
        classify(a, &InspectConfig::default()),
        Err(InspectError::BadJson { protocol: "JSON" })
    ));
    // A body that does not claim JSON is plain HTTP, decided on host and path.
    let mut a = simple("tools.example.test", "POST", "/upload", json!(null));
    let http = a.http.as_mut().unwrap();
    http.body = "name=value&jsonrpc=2.0".into();
    http.content_type = Some("application/x-www-form-urlencoded".into());
    assert_eq!(
        classify(a, &InspectConfig::default()).unwrap().protocol,
        Protocol::Http
    );
}

#[test]
fn other_paths_on_provider_hosts_are_provider_http() {
    let a = simple("api.openai.com", "GET", "/v1/models", json!(null));
    let out = classify(a, &InspectConfig::default()).unwrap();
    assert_eq!(out.protocol, Protocol::Provider(Provider::OpenAi));
    assert!(out.actions[0].llm.is_none());
    // A GET to the messages path is not a call either.
    let a = simple("api.anthropic.com", "GET", "/v1/messages", json!(null));
    assert_eq!(
        classify(a, &InspectConfig::default()).unwrap().protocol,
        Protocol::Provider(Provider::Anthropic)
    );
}

#[test]
fn provider_paths_on_other_hosts_are_plain_http() {
    let body = json!({"model": "gpt-4o", "messages": []});
    let a = simple("llm.example.test", "POST", "/v1/chat/completions", body);
    let out = classify(a, &InspectConfig::default()).unwrap();
    assert_eq!(out.protocol, Protocol::Http);
    assert!(out.actions[0].llm.is_none());
}

#[test]
fn host_lists_and_overrides_recognise_test_servers() {
    let body = json!({"model": "claude-x", "max_tokens": 5, "messages": [], "stream": true});
    let cfg = InspectConfig {
        provider_overrides: vec![ProviderOverride {
            host: "10.77.0.2:8443".into(),
            provider: Provider::Anthropic,
        }],
        ..InspectConfig::default()
    };
    let mut a = simple("10.77.0.2", "POST", "/v1/messages", body.clone());
    a.transport.port = 8443;
    let out = classify(a.clone(), &cfg).unwrap();
    assert_eq!(
        out.protocol,
        Protocol::Llm {
            provider: Provider::Anthropic,
            api: LlmApi::Messages
        }
    );
    assert!(out.actions[0].llm.as_ref().unwrap().stream);
    // The override names a port: another port is not the test server.
    a.transport.port = 443;
    assert_eq!(classify(a, &cfg).unwrap().protocol, Protocol::Http);

    // Host lists compare case-insensitively and ignore a trailing dot.
    let cfg = InspectConfig {
        openai_hosts: vec!["Fake-OpenAI.test".into()],
        ..InspectConfig::default()
    };
    let a = simple(
        "fake-openai.test.",
        "POST",
        "/v1/chat/completions",
        json!({"model": "m"}),
    );
    assert!(matches!(
        classify(a, &cfg).unwrap().protocol,
        Protocol::Llm {
            provider: Provider::OpenAi,
            ..
        }
    ));
    // With the list replaced, the public host is no longer OpenAI.
    let a = simple(
        "api.openai.com",
        "POST",
        "/v1/chat/completions",
        json!({"model": "m"}),
    );
    assert_eq!(classify(a, &cfg).unwrap().protocol, Protocol::Http);
}

#[test]
fn host_header_is_used_when_transport_has_none() {
    let mut a = simple("x", "POST", "/v1/messages", json!({"model": "claude"}));
    a.transport.host = None;
    a.http.as_mut().unwrap().headers = Pairs(vec![("host".into(), "api.anthropic.com:443".into())]);
    let out = classify(a, &InspectConfig::default()).unwrap();
    assert!(matches!(
        out.protocol,
        Protocol::Llm {
            provider: Provider::Anthropic,
            ..
        }
    ));
}

#[test]
fn json_that_is_not_json_rpc_is_plain_http() {
    for body in [
        json!({"jsonrpc": "1.0", "method": "x"}),
        json!({"method": "tools/call"}),
        json!([]),
        json!([1, 2]),
    ] {
        let a = simple("mcp.test", "POST", "/mcp", body);
        assert_eq!(
            classify(a, &InspectConfig::default()).unwrap().protocol,
            Protocol::Http
        );
    }
    // JSON-RPC shape on GET is not an MCP message (a GET opens the SSE stream).
    let a = simple(
        "mcp.test",
        "GET",
        "/mcp",
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
    );
    assert_eq!(
        classify(a, &InspectConfig::default()).unwrap().protocol,
        Protocol::Http
    );
}

#[test]
fn mcp_on_a_provider_host_is_still_mcp() {
    let a = simple(
        "api.openai.com",
        "POST",
        "/mcp",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    );
    let out = classify(a, &InspectConfig::default()).unwrap();
    assert!(matches!(out.protocol, Protocol::Mcp { batch: false, .. }));
    assert_eq!(out.actions[0].mcp.as_ref().unwrap().method, "tools/list");
}

#[test]
fn config_deserialises_with_defaults() {
    let cfg: InspectConfig = serde_json::from_value(json!({
        "provider_overrides": [{"host": "127.0.0.1:9000", "provider": "openai"}]
    }))
    .unwrap();
    assert_eq!(cfg.anthropic_hosts, vec!["api.anthropic.com".to_string()]);
    assert_eq!(cfg.provider_for("127.0.0.1", 9000), Some(Provider::OpenAi));
    assert_eq!(cfg.provider_for("127.0.0.1", 9001), None);
    assert_eq!(
        cfg.provider_for("GENERATIVELANGUAGE.googleapis.com", 443),
        Some(Provider::Gemini)
    );
}

/// Found by a black-box attack: a Gemini Batch API batch (`:batchGenerateContent`, `:asyncBatchEmbedContent`) and a
/// cached content (`POST /v1beta/cachedContents`, `PATCH /v1beta/cachedContents/{id}`) were plain provider requests,
/// so a blocked model or a tool declared in the batch's inline requests or the cache was never decided. Each is an LLM
/// call now: its model from the path (a cache's from its body, `models/` dropped), the tools of every inline request
/// or of the cache, and a body naming another model, or none readable, refused.
#[test]
fn gemini_batches_and_cached_contents_are_llm_calls() {
    let host = "generativelanguage.googleapis.com";
    let request = |tool: &str| {
        json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
               "tools": [{"functionDeclarations": [{"name": tool}]}]})
    };
    let batch = json!({"batch": {"display_name": "x", "input_config": {"requests": {"requests": [
        {"request": request("read_file"), "metadata": {"key": "r1"}},
        {"request": {"contents": [{"parts": [{"functionResponse": {"name": "read_file", "response": {}}}]}],
                     "model": "models/evil-x", "tools": [{"google_search": {}}]}, "metadata": {"key": "r2"}},
        {"request": request("delete_everything")}]}}}});
    let camel = json!({"batch": {"model": "models/evil-x", "displayName": "x", "inputConfig": {"requests": {"requests": [
        {"request": request("delete_everything")}]}}}});
    let mut cache = request("delete_everything");
    cache["model"] = json!("models/evil-x");
    for (method, path, body, api, tools, results) in [
        (
            "POST",
            "/v1beta/models/evil-x:batchGenerateContent",
            batch.clone(),
            LlmApi::GenerateContent,
            &["read_file", "googleSearch", "delete_everything"][..],
            true,
        ),
        (
            "POST",
            "/V1BETA/Models/evil-x:BatchGenerateContent/",
            camel.clone(),
            LlmApi::GenerateContent,
            &["delete_everything"],
            false,
        ),
        (
            "POST",
            "/v1beta/models/evil-x:asyncBatchEmbedContent",
            json!({"batch": {"inputConfig": {"requests": {"requests": [
                {"request": {"model": "models/evil-x", "content": {"parts": [{"text": "hi"}]}}}]}}}}),
            LlmApi::Other,
            &[],
            false,
        ),
        (
            "POST",
            "/v1beta/cachedContents",
            cache.clone(),
            LlmApi::GenerateContent,
            &["delete_everything"],
            false,
        ),
        (
            "PATCH",
            "/v1beta/cachedContents/abc",
            cache.clone(),
            LlmApi::GenerateContent,
            &["delete_everything"],
            false,
        ),
        (
            "PATCH",
            "/v1beta/batches/123:updateGenerateContentBatch",
            camel["batch"].clone(),
            LlmApi::GenerateContent,
            &["delete_everything"],
            false,
        ),
    ] {
        let out = classify(simple(host, method, path, body), &InspectConfig::default())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            out.protocol,
            Protocol::Llm {
                provider: Provider::Gemini,
                api
            },
            "{path}"
        );
        let llm = out.actions[0].llm.clone().unwrap();
        assert_eq!(llm.provider, "gemini", "{path}");
        assert_eq!(llm.model.as_deref(), Some("evil-x"), "{path}");
        assert_eq!(llm.tools, tools, "{path}");
        assert_eq!(llm.has_tool_results, results, "{path}");
        assert!(!llm.stream, "{path}");
    }
    // A body naming another model than the call's (its batch's, an inline request's), a model that is not a string, or a body that is not an object: `llm.model` names one, so it
    // is refused as unreadable.
    for (method, path, body) in [
        (
            "POST",
            "/v1beta/models/good:batchGenerateContent",
            camel.clone(),
        ),
        ("POST", "/v1beta/models/good:batchGenerateContent", batch),
        (
            "POST",
            "/v1beta/models/good:asyncBatchEmbedContent",
            json!({"batch": {"input_config": {"requests": {"requests": [{"request": {"model": "models/evil-x"}}]}}}}),
        ),
        (
            "POST",
            "/v1beta/models/good:batchEmbedContents",
            json!({"requests": [{"model": "models/evil-x", "content": {"parts": []}}]}),
        ),
        (
            "POST",
            "/v1beta/models/good:generateContent",
            json!({"model": "models/evil-x", "contents": []}),
        ),
        ("POST", "/v1beta/cachedContents", json!({"model": 7})),
        (
            "POST",
            "/v1beta/models/good:generateContent",
            json!([{"contents": []}]),
        ),
        ("POST", "/v1beta/cachedContents", json!("not an object")),
    ] {
        let got = classify(
            simple(host, method, path, body.clone()),
            &InspectConfig::default(),
        );
        assert!(
            matches!(got, Err(InspectError::BadJson { protocol: "gemini" })),
            "{path} {body}: {:?}",
            got.map(|o| o.actions[0].llm.clone())
        );
    }
    // Not JSON at all: refused as every LLM call's body is.
    let mut a = simple(host, "POST", "/v1beta/cachedContents", json!(null));
    a.http.as_mut().unwrap().body = "not json".into();
    assert!(matches!(
        classify(a, &InspectConfig::default()),
        Err(InspectError::BadJson { protocol: "gemini" })
    ));
    // Listing or fetching caches carries no model or tools: not an LLM call.
    for (method, path) in [
        ("GET", "/v1beta/cachedContents"),
        ("GET", "/v1beta/cachedContents/abc"),
        ("DELETE", "/v1beta/cachedContents/abc"),
    ] {
        let out = classify(
            simple(host, method, path, json!(null)),
            &InspectConfig::default(),
        )
        .unwrap();
        assert_eq!(
            out.protocol,
            Protocol::Provider(Provider::Gemini),
            "{method} {path}"
        );
    }
}
