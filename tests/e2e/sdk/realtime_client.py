#!/usr/bin/env python3
"""An unmodified agent on the official `openai` Python SDK's Realtime API, GA interface
(`client.realtime.connect(model=...)`, over the SDK's `websockets` dependency; only base_url and the API key are set).
Run by the e2e tests through `enforcer exec` with a private /etc/hosts mapping the test host names to the netns
upstream (sdk/llm_server.py, which answers each `response.create` with an audio message and a function call).

usage: realtime_client.py BASE_URL RUN_ID

Declares a `shell` and a `read_file` tool (`session.update`), then runs two turns (`conversation.item.create` of a
user text, `response.create`), reading the SDK's event iterator until `response.done`; prints one JSON line:
`{"step": "realtime", "ok": ..., "session": <session.updated's tools>, "blocked": TURN, "allowed": TURN}`, each TURN
saying what the iterator yielded (event types in order, every item's type, name, arguments and text, the text
deltas joined, the audio deltas' length, the types `response.done` listed).
"""

import base64
import json
import sys
import traceback

BASE_URL, RUN = sys.argv[1], sys.argv[2]
MODEL = "e2e-realtime-model"
TOOLS = [
    {"type": "function", "name": "shell", "description": "Run a shell command",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
    {"type": "function", "name": "read_file", "description": "Read a file",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
]


def item_view(item):
    view = {"id": item.id, "type": item.type}
    if item.type == "function_call":
        view.update(name=item.name, call_id=item.call_id, arguments=item.arguments)
    elif item.type == "message":
        view.update(role=item.role, text="".join(getattr(c, "text", None) or "" for c in item.content or []))
    return view


def turn(conn, text):
    conn.conversation.item.create(item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    conn.response.create()
    out = {"types": [], "items": [], "text": "", "args": "", "audio_bytes": 0}
    for ev in conn:
        out["types"].append(ev.type)
        if ev.type in ("response.output_item.done", "conversation.item.done"):
            out["items"].append(dict(item_view(ev.item), event=ev.type))
        elif ev.type == "response.output_text.delta":
            out["text"] += ev.delta
        elif ev.type == "response.function_call_arguments.delta":
            out["args"] += ev.delta
        elif ev.type == "response.output_audio.delta":
            out["audio_bytes"] += len(base64.b64decode(ev.delta, validate=True))
        elif ev.type == "error":
            out["error"] = ev.to_dict()
            return out
        elif ev.type == "response.done":
            out["final"] = [item_view(o) for o in ev.response.output or []]
            return out
    out["closed"] = True
    return out


def main():
    import openai

    client = openai.OpenAI(base_url=BASE_URL, api_key="e2e-not-a-real-key")
    result = {"step": "realtime"}
    try:
        with client.realtime.connect(model=MODEL) as conn:
            conn.session.update(session={"type": "realtime", "model": MODEL, "output_modalities": ["audio"], "tools": TOOLS})
            for ev in conn:
                if ev.type == "session.updated":
                    result["session"] = [t.name for t in ev.session.tools or []]
                    break
            result["blocked"] = turn(conn, "rtproposal-%s: upload my notes" % RUN)
            result["allowed"] = turn(conn, "rtallowed-%s: what does the readme say?" % RUN)
        result["ok"] = True
    except Exception as e:  # reported, the test decides
        result.update(ok=False, exception=type(e).__module__ + "." + type(e).__name__, message=str(e),
                      trace=traceback.format_exc()[-800:])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
