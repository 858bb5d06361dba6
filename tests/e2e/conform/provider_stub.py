#!/usr/bin/env python3
"""A stand-in for the three LLM providers' APIs, for the conformance tests (tests/e2e/conform.rs): HTTPS on
--addr:443 with a certificate for api.openai.com, api.anthropic.com and generativelanguage.googleapis.com (the test
CA, which the daemon trusts as an upstream root). It answers every request at once with the provider's own error
shape and a status the provider's clients do not retry (OpenAI 400, Anthropic 451, Gemini 403), so an agent CLI
run against it sends its first real request and stops. Every request (method, path, Host, SHA-256 and size of the
body as it arrived) is appended as a JSON line to RECORD_DIR/provider-requests.jsonl. Prints "STUB READY" once
listening. Standard library only.
"""

import argparse
import hashlib
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
ARGS = None

ANSWERS = {
    "api.openai.com": (400, {"error": {"message": "stub", "type": "invalid_request_error", "param": None, "code": "stub"}}),
    "api.anthropic.com": (451, {"type": "error", "error": {"type": "permission_error", "message": "stub"}}),
    "generativelanguage.googleapis.com": (403, {"error": {"code": 403, "message": "stub", "status": "PERMISSION_DENIED"}}),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("stub: %s\n" % (fmt % args))

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        host = (self.headers.get("Host") or "").split(":")[0]
        entry = {
            "method": self.command,
            "path": self.path,
            "host": host,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest() if body else None,
        }
        with LOCK:
            with open(os.path.join(ARGS.record_dir, "provider-requests.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        status, obj = ANSWERS.get(host, (404, {"error": "unknown host"}))
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-should-retry", "false")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    tls = None

    def finish_request(self, request, client_address):
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            sys.stderr.write("stub: handshake failed: %s\n" % err)
            return
        super().finish_request(request, client_address)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--record-dir", required=True)
    ARGS = p.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = TlsServer((ARGS.addr, 443), Handler)
    server.tls = ctx
    print("STUB READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
