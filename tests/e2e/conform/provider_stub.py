#!/usr/bin/env python3
"""A stand-in for the three LLM providers' APIs, for the conformance tests (tests/e2e/conform.rs): HTTPS on
--addr:443 with a certificate for api.openai.com, api.anthropic.com and generativelanguage.googleapis.com (the test
CA, which the daemon trusts as an upstream root). It answers every request at once with the provider's own error
shape and a status the provider's clients do not retry (OpenAI 400, Anthropic 451, Gemini 403), so an agent CLI
run against it sends its first real request and stops. Every request (method, path, Host, SHA-256 and size of the
body as it arrived) is appended as a JSON line to RECORD_DIR/provider-requests.jsonl. While RECORD_DIR/script.json
exists it plays scripted model turns instead (scripted.py: a text and a proposed shell command, then a final text),
over HTTP and over the Responses API's WebSocket mode. Prints "STUB READY" once listening. Standard library only.
"""

import argparse
import hashlib
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import scripted

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wire  # noqa: E402  (tests/e2e/wire.py)

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
        body = wire.read_body(self.rfile, self.headers)
        host = (self.headers.get("Host") or "").split(":")[0]
        script = scripted.load(ARGS.record_dir)
        if script is not None:
            return self._scripted(script, host, body)
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

    # ---- scripted turns (scripted.py) ----

    def _scripted(self, script, host, raw):
        path = self.path
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket(script, host)
        text = raw.decode("utf-8", errors="replace")
        scripted.record(ARGS.record_dir, {"host": host, "method": self.command, "path": path, "transport": "http", "body": text})
        try:
            body = json.loads(text) if text else {}
        except ValueError:
            body = {}
        route = path.split("?", 1)[0]
        answer = None
        if self.command == "POST" and host == "api.anthropic.com" and route.endswith("/v1/messages"):
            answer = scripted.anthropic(script, body, text)
        elif self.command == "POST" and host == "generativelanguage.googleapis.com" and "/models/" in route:
            answer = scripted.gemini(script, body, text, route)
        elif self.command == "POST" and host == "api.openai.com" and route.endswith("/v1/responses"):
            answer = scripted.responses_sse(script, body, text)
        if answer is None:
            return self._json(404, {"error": {"message": "not scripted", "type": "invalid_request_error"}})
        ctype, data = answer
        if isinstance(data, bytes):
            return self._json(200, None, data)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in data:
            piece = chunk.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _json(self, status, obj, data=None):
        data = data if data is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _websocket(self, script, host):
        """The Responses API's WebSocket mode (RFC 6455 by hand: no extension negotiated, fragments joined): each
        `response.create` message is answered with the turn's events, one text message each."""
        wire.accept_upgrade(self)
        message, first = b"", 0
        while True:
            fin, opcode, data = wire.read_frame(self.rfile)
            if opcode is None:
                return
            if opcode == 8:
                wire.send_frame(self.wfile, data[:2], 8)
                return
            if opcode == 9:
                wire.send_frame(self.wfile, data, 10)
                continue
            if opcode in (1, 2):
                message, first = data, opcode
            elif opcode == 0:
                message += data
            else:
                continue
            if not fin or first != 1:
                continue
            text = message.decode("utf-8", errors="replace")
            scripted.record(ARGS.record_dir, {"host": host, "method": "WS", "path": self.path, "transport": "websocket", "body": text})
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if event.get("type") == "response.create":
                for e in scripted.responses_events(script, event, text):
                    wire.send_frame(self.wfile, json.dumps(e).encode())


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
