//! Dropping declared LLM tools by name glob from the provider's declaration arrays: OpenAI `tools[]` (by
//! `function.name`, `custom.name`, `name`, `mcp:<server_label>`/`mcp:<server_url>` or built-in `type`; the tools
//! inside a Responses `namespace` one by one, the namespace too when none is left) and legacy `functions[]`,
//! Anthropic `tools[]` and `mcp_servers[]`, Gemini `tools[].functionDeclarations[]`. References to a dropped tool
//! (`tool_choice`, `function_call`, Gemini `allowedFunctionNames`) are cleaned up so the provider accepts the rest.

use serde_json::{Map, Value};

use crate::glob::NameGlob;
use crate::inspect::{gemini_json_name, namespaced_tools, tool_name};
use crate::model::Change;

fn matches_any(globs: &[NameGlob], names: &[String]) -> bool {
    names.iter().any(|n| globs.iter().any(|g| g.is_match(n)))
}

/// The names a tool declaration answers to (its name, plus the server URL for hosted MCP servers).
fn names_of(tool: &Value) -> Vec<String> {
    let mut names: Vec<String> = tool_name(tool).into_iter().collect();
    if let Some(url) = tool.get("server_url").and_then(Value::as_str) {
        names.push(format!("mcp:{url}"));
    }
    names
}

/// Drop every declared tool whose name matches one of `globs`, in the body and in each inline request of a Gemini
/// Batch API batch (`batch.inputConfig.requests.requests[].request`, or `inputConfig…` of a batch updated; either
/// spelling: the requests `llm.tools` reads,
/// `inspect::llm::gemini_requests`). Records one change per removed declaration.
pub(super) fn drop_tools(doc: &mut Value, globs: &[NameGlob], changes: &mut Vec<Change>) {
    drop_tools_in(doc, globs, changes);
    for (path, request) in batch_requests(doc) {
        let mut inner = Vec::new();
        drop_tools_in(request, globs, &mut inner);
        changes.extend(inner.into_iter().map(|c| Change {
            path: format!("$.{path}{}", c.path.trim_start_matches('$')),
            cause: c.cause,
        }));
    }
}

/// The inline requests of a Gemini batch body, each with its JSONPath (without the `$.`), as the members are spelt.
fn batch_requests(doc: &mut Value) -> Vec<(String, &mut Value)> {
    // The members of `v` read as the Gemini field `name` (proto3 JSON: either spelling), with their spelling.
    fn fields<'v>(
        v: &'v mut Value,
        name: &'v str,
    ) -> impl Iterator<Item = (String, &'v mut Value)> {
        v.as_object_mut()
            .into_iter()
            .flatten()
            .filter(move |(k, _)| gemini_json_name(k) == name)
            .map(|(k, v)| (k.clone(), v))
    }
    // A batch created (`{"batch": {"inputConfig": …}}`) or updated (the batch itself, `{"inputConfig": …}`).
    let mut configs = Vec::new();
    for (k, v) in doc.as_object_mut().into_iter().flatten() {
        match gemini_json_name(k).as_str() {
            "batch" => {
                configs.extend(fields(v, "inputConfig").map(|(c, v)| (format!("{k}.{c}"), v)))
            }
            "inputConfig" => configs.push((k.clone(), v)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (c, config) in configs {
        for (r, requests) in fields(config, "requests") {
            for (l, list) in fields(requests, "requests") {
                let Some(items) = list.as_array_mut() else {
                    continue;
                };
                for (i, item) in items.iter_mut().enumerate() {
                    for (q, request) in fields(item, "request") {
                        out.push((format!("{c}.{r}.{l}[{i}].{q}"), request));
                    }
                }
            }
        }
    }
    out
}

/// [`drop_tools`] in one request body: records one change per removed declaration, and cleans up the references to
/// the tools dropped (`tool_choice`, `allowedFunctionNames`).
fn drop_tools_in(doc: &mut Value, globs: &[NameGlob], changes: &mut Vec<Change>) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    let mut dropped: Vec<String> = Vec::new();

    if let Some(Value::Array(tools)) = root.get_mut("tools") {
        let mut kept = Vec::with_capacity(tools.len());
        for (i, mut tool) in std::mem::take(tools).into_iter().enumerate() {
            if let Some(gemini) = gemini_tool(&mut tool) {
                let dropped_before = dropped.len();
                drop_gemini(gemini, i, globs, &mut dropped, changes);
                // A tool object left with nothing (or an empty declaration list) goes too.
                let emptied = gemini
                    .values()
                    .all(|v| v.as_array().is_some_and(Vec::is_empty));
                if dropped.len() == dropped_before || !emptied {
                    kept.push(tool);
                }
                continue;
            }
            let names = names_of(&tool);
            if matches_any(globs, &names) {
                changes.push(change(format!("$.tools[{i}]")));
                dropped.extend(names);
                continue;
            }
            if namespaced_tools(&tool).next().is_some() {
                // A Responses namespace: its matching tools go, and the namespace with them when none is left.
                let inner = drop_namespaced(&mut tool, globs, &mut dropped);
                if inner.is_empty() {
                    kept.push(tool);
                } else if namespaced_tools(&tool).next().is_none() {
                    changes.push(change(format!("$.tools[{i}]")));
                    dropped.extend(names);
                } else {
                    changes.extend(
                        inner
                            .iter()
                            .map(|j| change(format!("$.tools[{i}].tools[{j}]"))),
                    );
                    kept.push(tool);
                }
                continue;
            }
            kept.push(tool);
        }
        *tools = kept;
    }

    drop_from_array(root, "functions", globs, &mut dropped, changes, |f| {
        f.get("name")
            .and_then(Value::as_str)
            .map(|n| vec![n.to_string()])
    });
    drop_from_array(root, "mcp_servers", globs, &mut dropped, changes, |s| {
        let mut names = Vec::new();
        if let Some(n) = s.get("name").and_then(Value::as_str) {
            names.push(format!("mcp:{n}"));
        }
        if let Some(u) = s.get("url").and_then(Value::as_str) {
            names.push(format!("mcp:{u}"));
        }
        Some(names)
    });

    if dropped.is_empty() {
        return;
    }
    clean_references(root, &dropped, changes);
}

/// Drop the tools of a Responses namespace `tool` that match `globs`, adding their names to `dropped`; returns
/// their indexes in the namespace's `tools`.
fn drop_namespaced(tool: &mut Value, globs: &[NameGlob], dropped: &mut Vec<String>) -> Vec<usize> {
    let Some(Value::Array(tools)) = tool.get_mut("tools") else {
        return Vec::new();
    };
    let mut gone = Vec::new();
    let mut kept = Vec::with_capacity(tools.len());
    for (j, inner) in std::mem::take(tools).into_iter().enumerate() {
        let names = names_of(&inner);
        if matches_any(globs, &names) {
            gone.push(j);
            dropped.extend(names);
        } else {
            kept.push(inner);
        }
    }
    *tools = kept;
    gone
}

fn change(path: String) -> Change {
    Change {
        path,
        cause: "drop_tools".into(),
    }
}

/// A Gemini tool object (`{"functionDeclarations": [...]}`, `{"googleSearch": {}}`, ...): one without the `type`,
/// `name` or `function` every OpenAI and Anthropic declaration has.
fn gemini_tool(tool: &mut Value) -> Option<&mut Map<String, Value>> {
    let obj = tool.as_object_mut()?;
    let declaration = ["type", "name", "function"]
        .iter()
        .any(|k| obj.contains_key(*k));
    (!declaration).then_some(obj)
}

/// Drop from the Gemini tool object `tools[i]` the function declarations and the built-in tools (its other keys)
/// whose names match `globs`. Keys are read by their JSON names (`inspect::gemini_json_name`), as `llm.tools`
/// names them: `function_declarations` and `google_search` are what Gemini reads as `functionDeclarations` and
/// `googleSearch`.
fn drop_gemini(
    tool: &mut Map<String, Value>,
    i: usize,
    globs: &[NameGlob],
    dropped: &mut Vec<String>,
    changes: &mut Vec<Change>,
) {
    tool.retain(|key, value| {
        let name = gemini_json_name(key);
        if name != "functionDeclarations" {
            if !matches_any(globs, std::slice::from_ref(&name)) {
                return true;
            }
            // The tool's place only: its key is the body's text.
            changes.push(change(format!("$.tools[{i}]")));
            dropped.push(name);
            return false;
        }
        if let Some(decls) = value.as_array_mut() {
            let mut j = 0;
            decls.retain(|decl| {
                let name = decl.get("name").and_then(Value::as_str).map(str::to_string);
                let keep = match name {
                    Some(n) if matches_any(globs, std::slice::from_ref(&n)) => {
                        changes.push(change(format!("$.tools[{i}].functionDeclarations[{j}]")));
                        dropped.push(n);
                        false
                    }
                    _ => true,
                };
                j += 1;
                keep
            });
        }
        true
    });
}

fn drop_from_array(
    root: &mut Map<String, Value>,
    key: &str,
    globs: &[NameGlob],
    dropped: &mut Vec<String>,
    changes: &mut Vec<Change>,
    names: impl Fn(&Value) -> Option<Vec<String>>,
) {
    let Some(Value::Array(items)) = root.get_mut(key) else {
        return;
    };
    let mut kept = Vec::with_capacity(items.len());
    for (i, item) in std::mem::take(items).into_iter().enumerate() {
        let n = names(&item).unwrap_or_default();
        if matches_any(globs, &n) {
            changes.push(change(format!("$.{key}[{i}]")));
            dropped.extend(n);
        } else {
            kept.push(item);
        }
    }
    *items = kept;
}

/// Remove what refers to dropped tools, and declaration arrays left empty (providers reject `tools: []`).
fn clean_references(root: &mut Map<String, Value>, dropped: &[String], changes: &mut Vec<Change>) {
    let is_dropped = |n: Option<&str>| n.is_some_and(|n| dropped.iter().any(|d| d == n));
    let mut remove = |root: &mut Map<String, Value>, key: &str| {
        if root.shift_remove(key).is_some() {
            changes.push(change(format!("$.{key}")));
        }
    };

    for key in ["tools", "functions", "mcp_servers"] {
        if root
            .get(key)
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
        {
            remove(root, key);
        }
    }
    let no_tools = !root.contains_key("tools") && !root.contains_key("functions");

    // OpenAI Chat {type: function, function: {name}}, Responses {type: function, name}, Anthropic {type: tool, name}.
    if let Some(choice) = root.get("tool_choice") {
        let named = choice
            .get("function")
            .and_then(|f| f.get("name"))
            .or_else(|| choice.get("name"))
            .and_then(Value::as_str);
        // Without any tool left, providers reject every tool_choice, even "auto".
        if is_dropped(named) || no_tools {
            remove(root, "tool_choice");
        }
    }
    if no_tools {
        remove(root, "parallel_tool_calls");
    }
    if let Some(call) = root.get("function_call") {
        if is_dropped(call.get("name").and_then(Value::as_str)) {
            remove(root, "function_call");
        }
    }
    // Gemini toolConfig.functionCallingConfig.allowedFunctionNames.
    if let Some(Value::Array(allowed)) = root
        .get_mut("toolConfig")
        .and_then(|c| c.get_mut("functionCallingConfig"))
        .and_then(|c| c.get_mut("allowedFunctionNames"))
    {
        let before = allowed.len();
        allowed.retain(|n| !is_dropped(n.as_str()));
        if allowed.len() != before {
            changes.push(change(
                "$.toolConfig.functionCallingConfig.allowedFunctionNames".into(),
            ));
        }
    }
}
