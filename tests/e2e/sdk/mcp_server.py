#!/usr/bin/env python3
"""A real MCP server for the SDK end-to-end tests, built with the official MCP Python SDK (`MCPServer`, called
FastMCP before mcp 2) and served over Streamable HTTP with TLS (uvicorn) on --port inside the harness's netns.

Tools: `read_file(path)` answers with the file's (made-up) contents; `delete_file(path)` would delete it;
`list_records(run)` answers with 150 text items, each carrying an AWS key (a result the policy caps and redacts
on its way back). Every tool call the server actually executes is appended as one JSON line to RECORD_DIR/mcp-calls.jsonl, so the harness can
tell that a blocked call never reached the server. Prints "MCP READY" once listening.
"""

import argparse
import json
import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

ARGS = None
server = MCPServer("e2e-files")


def record(tool, path):
    with open(os.path.join(ARGS.record_dir, "mcp-calls.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "path": path}) + "\n")


@server.tool()
def read_file(path: str) -> str:
    """Read a file from the e2e workspace."""
    record("read_file", path)
    return "contents of %s: hello from the MCP server" % path


@server.tool()
def delete_file(path: str) -> str:
    """Delete a file from the e2e workspace."""
    record("delete_file", path)
    return "deleted %s" % path


@server.tool(structured_output=False)
def list_records(run: str) -> list[str]:
    """List the records of the e2e database (one content item each)."""
    record("list_records", run)
    return ["record %d of %s: key AKIAIOSFODNN7EXAMPLE" % (i, run) for i in range(150)]


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--record-dir", required=True)
    ARGS = p.parse_args()
    app = server.streamable_http_app(
        host="0.0.0.0",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", ARGS.port))
    sock.listen(64)
    config = uvicorn.Config(
        app,
        ssl_certfile=ARGS.cert,
        ssl_keyfile=ARGS.key,
        log_level="warning",
        lifespan="on",
    )
    srv = uvicorn.Server(config)
    print("MCP READY", flush=True)
    sys.stdout.flush()
    srv.run(sockets=[sock])


if __name__ == "__main__":
    main()
