#!/usr/bin/env python3
"""An unmodified MCP agent using the official MCP Python SDK's client over Streamable HTTP.

usage: mcp_client.py URL RUN_ID

Lists the tools, calls `read_file` (allowed by the policy), `delete_file` (blocked by it) and `list_records` (its
result capped and redacted on the way back), and prints one JSON line per step with what the SDK returned:
`is_error` (CallToolResult.isError), the text content, and for `records` the content items.
"""

import asyncio
import json
import sys
import traceback

from mcp import Client

URL, RUN = sys.argv[1], sys.argv[2]


def out(obj):
    print(json.dumps(obj), flush=True)


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    async with Client(URL) as client:
        tools = await client.list_tools()
        out({"step": "list", "tools": sorted(t.name for t in tools.tools)})
        for step, tool in [("allowed", "read_file"), ("blocked", "delete_file")]:
            try:
                r = await client.call_tool(tool, {"path": "notes-%s.txt" % RUN})
                out({"step": step, "ok": True, "is_error": r.is_error, "text": text_of(r)})
            except Exception as e:  # reported, the test decides
                out({"step": step, "ok": False, "exception": type(e).__name__, "message": str(e),
                     "trace": traceback.format_exc()[-800:]})
        try:
            r = await client.call_tool("list_records", {"run": RUN})
            out({"step": "records", "ok": True, "is_error": r.is_error,
                 "items": [getattr(c, "text", "") for c in r.content]})
        except Exception as e:  # reported, the test decides
            out({"step": "records", "ok": False, "exception": type(e).__name__, "message": str(e),
                 "trace": traceback.format_exc()[-800:]})


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:
        out({"step": "fatal", "exception": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-1500:]})
        sys.exit(1)
