#!/usr/bin/env python3
"""An unmodified agent using the official `anthropic` Python SDK whose streamed tool call a `review` rule holds: it
declares a `deploy_service` tool, streams one answer with `client.messages.stream()` (the SDK's own accumulation) and
prints the final message as one JSON line: its tool calls, its text and its stop reason. The SDK's default timeout
(10 minutes) stays on; the enforcer keeps the stream alive with SSE comment lines while the call waits.

usage: review_client.py BASE_URL PROMPT
"""

import json
import sys

import anthropic

BASE_URL, PROMPT = sys.argv[1], sys.argv[2]

DEPLOY = [
    {
        "name": "deploy_service",
        "description": "Deploy a service",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def main():
    client = anthropic.Anthropic(base_url=BASE_URL, api_key="e2e-not-a-real-key")
    try:
        with client.messages.stream(
            model="e2e-model",
            max_tokens=100,
            messages=[{"role": "user", "content": PROMPT}],
            tools=DEPLOY,
        ) as s:
            for _ in s:
                pass
            final = s.get_final_message()
    except Exception as e:  # reported, the test decides
        print(json.dumps({"ok": False, "exception": type(e).__name__, "message": str(e)}), flush=True)
        return
    print(
        json.dumps(
            {
                "ok": True,
                "tool_calls": [{"id": b.id, "name": b.name, "input": b.input} for b in final.content if b.type == "tool_use"],
                "content": "".join(b.text for b in final.content if b.type == "text"),
                "finish": final.stop_reason,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
