#!/usr/bin/env python3
"""An unmodified agent using the official `openai` or `anthropic` Python SDK (only base_url and the API key are set;
the SDK's default retries stay on). Run by the e2e tests through `enforcer exec` with a private /etc/hosts mapping
the test host names to the netns upstream.

usage: llm_client.py openai|anthropic BASE_URL RUN_ID

Prints one JSON line per step (`{"step": ..., ...}`), and `FIRST <stream id>` as soon as the first streamed text
delta arrives, so the test can release the rest of the stream only after the first delta reached the client.
Steps: `basic` (non-streaming, one tool declared → a tool call), `stream` (streaming with a tool: text deltas then the
tool call), `redact` (an API key pasted into the prompt and max_tokens above the policy's cap), `blocked` (a model
the policy blocks → the SDK's PermissionDeniedError); for openai also `responses` (the Responses API with a function
tool and a pasted key → a function call) and `responses_blocked` (a blocked model through the Responses API).
"""

import json
import sys
import traceback

PROVIDER, BASE_URL, RUN = sys.argv[1], sys.argv[2], sys.argv[3]
# A made-up key of each provider's shape, pasted into a prompt by a careless user.
PASTED = {
    "openai": "sk-proj-E2eFakeKey0123456789abcdefghijklmnop",
    "anthropic": "sk-ant-api03-E2eFakeKey0123456789abcdefghijklmnop",
}[PROVIDER]


# A shell tool the agent declares; the policy refuses the model's proposal to curl a key to an unlisted host with it.
SHELL_SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
SHELL_OPENAI = [{"type": "function", "function": {"name": "shell", "description": "Run a shell command", "parameters": SHELL_SCHEMA}}]
SHELL_ANTHROPIC = [{"name": "shell", "description": "Run a shell command", "input_schema": SHELL_SCHEMA}]


def out(obj):
    print(json.dumps(obj), flush=True)


def step(name, fn):
    try:
        result = fn()
        result["step"] = name
        result["ok"] = True
        out(result)
    except Exception as e:  # reported, the test decides
        out(
            {
                "step": name,
                "ok": False,
                "exception": type(e).__module__ + "." + type(e).__name__,
                "status": getattr(e, "status_code", None),
                "message": str(e),
                "body": getattr(e, "body", None),
                "should_retry": getattr(getattr(e, "response", None), "headers", {}).get("x-should-retry"),
                "trace": traceback.format_exc()[-600:],
            }
        )


def openai_steps():
    import openai

    client = openai.OpenAI(base_url=BASE_URL, api_key="e2e-not-a-real-key")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]

    def basic():
        r = client.chat.completions.create(
            model="e2e-model",
            messages=[{"role": "user", "content": "basic-%s: what is the weather in Paris?" % RUN}],
            tools=tools,
        )
        call = r.choices[0].message.tool_calls[0]
        return {"finish": r.choices[0].finish_reason, "tool": call.function.name, "args": json.loads(call.function.arguments)}

    def stream():
        sid = "openai-" + RUN
        s = client.chat.completions.create(
            model="e2e-model",
            messages=[{"role": "user", "content": "stream-%s: say something" % RUN}],
            tools=tools,
            stream=True,
            extra_headers={"X-E2E-Stream": sid},
        )
        text, args, name, finish, first = "", "", None, None, False
        for chunk in s:
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            if d.content:
                text += d.content
                if not first:
                    first = True
                    print("FIRST " + sid, flush=True)
            for tc in d.tool_calls or []:
                if tc.function and tc.function.name:
                    name = tc.function.name
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
            finish = chunk.choices[0].finish_reason or finish
        return {"text": text, "tool": name, "args": json.loads(args) if args else None, "finish": finish}

    def redact():
        r = client.chat.completions.create(
            model="e2e-model",
            max_tokens=5000,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "redact-%s: my key is %s, why does it fail?" % (RUN, PASTED)},
            ],
        )
        return {"content": r.choices[0].message.content}

    def blocked():
        client.chat.completions.create(
            model="e2e-blocked-model",
            messages=[{"role": "user", "content": "blocked-%s: hello" % RUN}],
        )
        return {"unexpected": "the blocked call succeeded"}

    def responses():
        r = client.responses.create(
            model="e2e-model",
            input="responses-%s: my key is %s, what is the weather in Paris?" % (RUN, PASTED),
            tools=[
                {
                    "type": "function",
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": tools[0]["function"]["parameters"],
                    "strict": False,
                }
            ],
        )
        call = [o for o in r.output if o.type == "function_call"][0]
        return {"tool": call.name, "args": json.loads(call.arguments)}

    def responses_blocked():
        client.responses.create(model="e2e-blocked-model", input="responses-blocked-%s: hello" % RUN)
        return {"unexpected": "the blocked call succeeded"}

    def proposal():
        with client.chat.completions.stream(
            model="e2e-model",
            messages=[{"role": "user", "content": "proposal-%s: upload my notes" % RUN}],
            tools=SHELL_OPENAI,
        ) as s:
            for _ in s:
                pass
            final = s.get_final_completion()
        m = final.choices[0].message
        return {
            "tool_calls": [tc.function.name for tc in m.tool_calls or []],
            "content": m.content,
            "finish": final.choices[0].finish_reason,
        }

    def websocket():
        def turn(conn):
            text, items = "", []
            for ev in conn:
                if ev.type == "response.output_text.delta":
                    text += ev.delta
                elif ev.type == "response.output_item.done":
                    items.append(ev.item.type)
                elif ev.type == "response.completed":
                    return {"text": text, "items": items, "final": [o.type for o in ev.response.output]}
                elif ev.type == "error":
                    return {"error": ev.to_dict()}
            return {"closed": True}

        out = {}
        with client.responses.connect() as conn:
            conn.response.create(model="e2e-model", input="wskey-%s: my key is %s" % (RUN, PASTED))
            out["redact"] = turn(conn)
            conn.response.create(model="e2e-blocked-model", input="wsdeny-%s: hello" % RUN)
            out["blocked"] = turn(conn)
            conn.response.create(
                model="e2e-model",
                input="wsproposal-%s: upload my notes" % RUN,
                tools=[dict(SHELL_OPENAI[0]["function"], type="function")],
            )
            out["proposal"] = turn(conn)
        return out

    return client.max_retries, [
        ("basic", basic),
        ("stream", stream),
        ("redact", redact),
        ("blocked", blocked),
        ("responses", responses),
        ("responses_blocked", responses_blocked),
        ("proposal", proposal),
        ("websocket", websocket),
    ]


def anthropic_steps():
    import anthropic

    client = anthropic.Anthropic(base_url=BASE_URL, api_key="e2e-not-a-real-key")
    tools = [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]

    def basic():
        r = client.messages.create(
            model="e2e-model",
            max_tokens=100,
            messages=[{"role": "user", "content": "basic-%s: what is the weather in Paris?" % RUN}],
            tools=tools,
        )
        use = [b for b in r.content if b.type == "tool_use"][0]
        return {"finish": r.stop_reason, "tool": use.name, "args": use.input}

    def stream():
        sid = "anthropic-" + RUN
        s = client.messages.create(
            model="e2e-model",
            max_tokens=100,
            messages=[{"role": "user", "content": "stream-%s: say something" % RUN}],
            tools=tools,
            stream=True,
            extra_headers={"X-E2E-Stream": sid},
        )
        text, args, name, finish, first = "", "", None, None, False
        for ev in s:
            if ev.type == "content_block_start" and ev.content_block.type == "tool_use":
                name = ev.content_block.name
            elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                text += ev.delta.text
                if not first:
                    first = True
                    print("FIRST " + sid, flush=True)
            elif ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                args += ev.delta.partial_json
            elif ev.type == "message_delta":
                finish = ev.delta.stop_reason
        return {"text": text, "tool": name, "args": json.loads(args) if args else None, "finish": finish}

    def redact():
        r = client.messages.create(
            model="e2e-model",
            max_tokens=5000,
            system="You are a helpful assistant.",
            messages=[{"role": "user", "content": "redact-%s: my key is %s, why does it fail?" % (RUN, PASTED)}],
        )
        return {"content": r.content[0].text}

    def blocked():
        client.messages.create(
            model="e2e-blocked-model",
            max_tokens=100,
            messages=[{"role": "user", "content": "blocked-%s: hello" % RUN}],
        )
        return {"unexpected": "the blocked call succeeded"}

    def proposal():
        with client.messages.stream(
            model="e2e-model",
            max_tokens=100,
            messages=[{"role": "user", "content": "proposal-%s: upload my notes" % RUN}],
            tools=SHELL_ANTHROPIC,
        ) as s:
            for _ in s:
                pass
            final = s.get_final_message()
        return {
            "tool_calls": [b.name for b in final.content if b.type == "tool_use"],
            "content": "".join(b.text for b in final.content if b.type == "text"),
            "finish": final.stop_reason,
        }

    return client.max_retries, [
        ("basic", basic),
        ("stream", stream),
        ("redact", redact),
        ("blocked", blocked),
        ("proposal", proposal),
    ]


def main():
    retries, steps = openai_steps() if PROVIDER == "openai" else anthropic_steps()
    out({"step": "client", "max_retries": retries, "pasted": PASTED})
    for name, fn in steps:
        step(name, fn)


if __name__ == "__main__":
    main()
