//! Dropping declared LLM tools by name glob from the provider's declaration arrays: OpenAI `tools[]` (by
//! `function.name`, `name`, `mcp:<server_label>`/`mcp:<server_url>` or built-in `type`) and legacy `functions[]`,
//! Anthropic `tools[]` and `mcp_servers[]`, Gemini `tools[].functionDeclarations[]`. References to a dropped tool
//! (`tool_choice`, `function_call`, Gemini `allowedFunctionNames`) are cleaned up so the provider accepts the rest.

use serde_json::{Map, Value};

use crate::glob::NameGlob;
use crate::inspect::tool_name;
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

/// Drop every declared tool whose name matches one of `globs`. Returns the names dropped (for tool_choice
/// clean-up) and records one change per removed declaration.
pub(super) fn drop_tools(doc: &mut Value, globs: &[NameGlob], changes: &mut Vec<Change>) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    let mut dropped: Vec<String> = Vec::new();

    if let Some(Value::Array(tools)) = root.get_mut("tools") {
        let mut kept = Vec::with_capacity(tools.len());
        for (i, mut tool) in std::mem::take(tools).into_iter().enumerate() {
            if let Some(decls) = gemini_declarations(&mut tool) {
                let mut kept_decls = Vec::with_capacity(decls.len());
                for (j, decl) in std::mem::take(decls).into_iter().enumerate() {
                    let name = decl.get("name").and_then(Value::as_str).map(str::to_string);
                    match name {
                        Some(n) if matches_any(globs, std::slice::from_ref(&n)) => {
                            changes.push(change(format!("$.tools[{i}].functionDeclarations[{j}]")));
                            dropped.push(n);
                        }
                        _ => kept_decls.push(decl),
                    }
                }
                let now_empty = kept_decls.is_empty();
                *decls = kept_decls;
                // A tool object left with nothing but an empty declaration list goes too.
                if now_empty && tool.as_object().is_some_and(|o| o.len() == 1) {
                    continue;
                }
                kept.push(tool);
                continue;
            }
            let names = names_of(&tool);
            if matches_any(globs, &names) {
                changes.push(change(format!("$.tools[{i}]")));
                dropped.extend(names);
            } else {
                kept.push(tool);
            }
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

fn change(path: String) -> Change {
    Change {
        path,
        cause: "drop_tools".into(),
    }
}

/// The `functionDeclarations` array of a Gemini tool object.
fn gemini_declarations(tool: &mut Value) -> Option<&mut Vec<Value>> {
    let obj = tool.as_object_mut()?;
    let key = if obj.contains_key("functionDeclarations") {
        "functionDeclarations"
    } else {
        "function_declarations"
    };
    obj.get_mut(key)?.as_array_mut()
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
