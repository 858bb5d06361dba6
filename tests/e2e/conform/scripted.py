"""Scripted model turns for the provider stand-in (provider_stub.py), used while RECORD_DIR/script.json exists.

The script names a task marker, a step marker, a done marker and a shell command. An LLM call that declares the
agent's shell tool (Claude Code's `Bash`, Gemini CLI's `run_shell_command`, Codex's code-mode `exec` — a
JavaScript script calling its nested `exec_command` — or a `shell`/`shell_command`/`exec_command` function), carries the task marker and not yet the step marker is a first turn: it is answered with a text
(the step marker) and then a call of that tool proposing the command, in the provider's own streamed wire format:
  * Anthropic Messages: server-sent events, a `text` block then a `tool_use` block (arguments in `input_json_delta`
    pieces), `stop_reason: tool_use`;
  * Gemini `streamGenerateContent?alt=sse`: a chunk with a text part, then one with a `functionCall` part;
  * OpenAI Responses over server-sent events or the WebSocket mode (`response.create`): a `message` item, then a
    `custom_tool_call` (input in `response.custom_tool_call_input.delta` pieces) or `function_call` item (arguments
    in `response.function_call_arguments.delta` pieces), `response.completed`.
Any later call carrying the step marker or continuing that response (`previous_response_id`): the agent sends
back the tool's result, or the enforcer's refusal text the model reads in its own turn) is answered with a final text: the done marker. Every other call (titles, token
counts, Codex's WebSocket prewarm) gets a short plain answer of the right shape. Every request in scripted mode is
appended whole (host, path, transport, body text) to RECORD_DIR/scripted-requests.jsonl. Standard library only.
"""

import json
import os
import threading
import time

LOCK = threading.Lock()
SHELL_TOOLS = ("Bash", "run_shell_command", "shell", "shell_command", "exec_command")


def load(record_dir):
    try:
        with open(os.path.join(record_dir, "script.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record(record_dir, entry):
    with LOCK:
        with open(os.path.join(record_dir, "scripted-requests.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def pieces(text, size=11):
    return [text[i : i + size] for i in range(0, len(text), size)]


def declared_tools(body):
    """Every tool the request declares, any provider's shape: Anthropic and Responses `tools`, Gemini
    `functionDeclarations`, and the Responses `additional_tools` input items (Codex) with their namespaces."""
    found = []

    def walk(tools):
        for t in tools or []:
            if not isinstance(t, dict):
                continue
            walk(t.get("functionDeclarations") or t.get("function_declarations"))
            if t.get("type") == "namespace":
                walk(t.get("tools"))
            elif t.get("name"):
                found.append(t.get("function") if isinstance(t.get("function"), dict) else t)

    walk(body.get("tools"))
    for item in body.get("input") or [] if isinstance(body.get("input"), list) else []:
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            walk(item.get("tools"))
    return found


def shell_call(body, command):
    """(tool name, arguments) proposing `command` with the request's shell tool, in the shape its schema asks for.
    Codex's code mode declares one free-form tool, `exec`, whose input is a JavaScript script calling the nested
    `exec_command` tool: the arguments are then that script (a string)."""
    for t in declared_tools(body):
        name = t.get("name")
        if name == "exec" and t.get("type") == "custom":
            return name, "const r = await tools.exec_command({cmd: %s});\ntext(r);" % json.dumps(command)
        if name not in SHELL_TOOLS:
            continue
        schema = t.get("parametersJsonSchema") or t.get("parameters") or t.get("input_schema") or {}
        props = schema.get("properties") or {}
        if "cmd" in props:
            return name, {"cmd": command}
        if (props.get("command") or {}).get("type") == "array":
            return name, {"command": ["bash", "-lc", command]}
        args = {"command": command}
        if "description" in props:
            args["description"] = "Check connectivity"
        return name, args
    return None


# Responses ids answered with a call: a request continuing one (`previous_response_id`, Codex's WebSocket mode
# sends only the new input) is the turn after the call.
CALLED = set()


def turn(script, body, text):
    """What to answer: ("call", tool, args), ("final", text) or ("plain", text)."""
    if script["step"] in text or body.get("previous_response_id") in CALLED:
        return ("final", script["done"])
    if script["task"] in text:
        call = shell_call(body, script["command"])
        if call:
            return ("call",) + call
    return ("plain", "ok")


# ---- Anthropic Messages ----

def anthropic(script, body, text):
    """(content type, body bytes or a list of SSE chunks)."""
    model = body.get("model", "")
    what = turn(script, body, text)
    if not body.get("stream"):
        msg = {"id": "msg_e2e", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": what[-1] if what[0] != "call" else "ok"}],
               "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}}
        return "application/json", json.dumps(msg).encode()
    out = []

    def ev(name, data):
        data["type"] = name
        out.append("event: %s\ndata: %s\n\n" % (name, json.dumps(data)))

    ev("message_start", {"message": {"id": "msg_e2e_%d" % time.time_ns(), "type": "message", "role": "assistant",
                                     "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                                     "usage": {"input_tokens": 10, "output_tokens": 1}}})
    first = script["step"] if what[0] == "call" else what[1]
    ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": first}})
    ev("content_block_stop", {"index": 0})
    stop = "end_turn"
    if what[0] == "call":
        _, tool, args = what
        ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_e2e_%d" % time.time_ns(),
                                                                   "name": tool, "input": {}}})
        for p in pieces(json.dumps(args)):
            ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
        ev("content_block_stop", {"index": 1})
        stop = "tool_use"
    ev("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 20}})
    ev("message_stop", {})
    return "text/event-stream", out


# ---- Gemini ----

def instance(schema):
    """A value of a response JSON schema (Gemini CLI's model router and other side calls ask for one): every
    property filled, numbers high (the router then keeps the default, larger model)."""
    ty = str(schema.get("type", "object")).lower()
    if ty == "object":
        return {k: instance(v) for k, v in (schema.get("properties") or {}).items()}
    if ty == "array":
        return []
    if ty in ("integer", "number"):
        return 90
    if ty == "boolean":
        return False
    return (schema.get("enum") or ["e2e"])[0]


def gemini(script, body, text, path):
    model = path.split("/models/", 1)[-1].split(":", 1)[0]
    if ":countTokens" in path:
        return "application/json", json.dumps({"totalTokens": 10}).encode()
    what = turn(script, body, text)
    usage = {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}

    def chunk(parts, finish=None):
        cand = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        return {"candidates": [cand], "usageMetadata": usage, "modelVersion": model}

    if ":streamGenerateContent" not in path:
        cfg = body.get("generationConfig") or {}
        answer = what[-1] if what[0] != "call" else "ok"
        schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
        if cfg.get("responseMimeType") == "application/json" and schema:
            answer = json.dumps(instance(schema))
        return "application/json", json.dumps(chunk([{"text": answer}], "STOP")).encode()
    if what[0] == "call":
        _, tool, args = what
        chunks = [chunk([{"text": script["step"]}]), chunk([{"functionCall": {"name": tool, "args": args}}], "STOP")]
    else:
        chunks = [chunk([{"text": what[1]}]), chunk([{"text": ""}], "STOP")]
    return "text/event-stream", ["data: %s\r\n\r\n" % json.dumps(c) for c in chunks]


# ---- OpenAI Responses (server-sent events and the WebSocket mode) ----

def responses_events(script, body, text):
    """The Responses stream events of one turn, as JSON objects."""
    rid = "resp_e2e_%d" % time.time_ns()
    model = body.get("model", "")
    if body.get("generate") is False:  # Codex's WebSocket prewarm: no output
        return [{"type": "response.created", "response": {"id": rid, "object": "response", "status": "in_progress", "model": model, "output": []}},
                {"type": "response.completed", "response": {"id": rid, "object": "response", "status": "completed", "model": model, "output": [],
                                                             "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}}]
    what = turn(script, body, text)
    events, output = [], []
    events.append({"type": "response.created", "response": {"id": rid, "object": "response", "status": "in_progress", "model": model, "output": []}})
    say = script["step"] if what[0] == "call" else what[1]
    msg = {"id": "msg_" + rid, "type": "message", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": say, "annotations": []}]}
    events.append({"type": "response.output_item.added", "output_index": 0, "item": dict(msg, status="in_progress", content=[])})
    events.append({"type": "response.output_text.delta", "item_id": msg["id"], "output_index": 0, "content_index": 0, "delta": say, "logprobs": []})
    events.append({"type": "response.output_text.done", "item_id": msg["id"], "output_index": 0, "content_index": 0, "text": say, "logprobs": []})
    events.append({"type": "response.output_item.done", "output_index": 0, "item": msg})
    output.append(msg)
    if what[0] == "call":
        CALLED.add(rid)
        _, tool, args = what
        events += call_events(rid, tool, args)
        output.append(events[-1]["item"])
    events.append({"type": "response.completed", "response": {"id": rid, "object": "response", "status": "completed", "model": model,
                                                             "output": output, "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}}})
    for i, e in enumerate(events):
        e["sequence_number"] = i
    return events


def call_events(rid, tool, args):
    """The events of a proposed call at output index 1: a `custom_tool_call` when `args` is free-form text (its
    `input`), a `function_call` otherwise (its `arguments`, JSON text)."""
    custom = isinstance(args, str)
    ty, field, delta = ("custom_tool_call", "input", "response.custom_tool_call_input") if custom else \
        ("function_call", "arguments", "response.function_call_arguments")
    text = args if custom else json.dumps(args)
    call = {"id": "fc_" + rid, "type": ty, "call_id": "call_" + rid, "name": tool, field: "", "status": "in_progress"}
    events = [{"type": "response.output_item.added", "output_index": 1, "item": call}]
    for p in pieces(text):
        events.append({"type": delta + ".delta", "item_id": call["id"], "output_index": 1, "delta": p})
    events.append({"type": delta + ".done", "item_id": call["id"], "output_index": 1, field: text})
    events.append({"type": "response.output_item.done", "output_index": 1, "item": dict(call, status="completed", **{field: text})})
    return events


def responses_sse(script, body, text):
    return "text/event-stream", ["event: %s\ndata: %s\n\n" % (e["type"], json.dumps(e)) for e in responses_events(script, body, text)]
