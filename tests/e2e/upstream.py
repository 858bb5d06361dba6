#!/usr/bin/env python3
"""Upstream host for the end-to-end tests and the demo; runs inside a network namespace the harness creates.

Serves, on every address of the namespace (IPv4 and IPv6, dual-stack sockets):
  * HTTPS (--https-port, default 443) with the certificate the harness minted from its test CA,
  * plain HTTP (--http-port, default 80),
  * HTTPS with a certificate from an untrusted CA (--bad-port, default 8443), when --bad-cert is given,
  * a TCP echo on each --echo-port,
  * a UDP sink on each --udp-port that counts the datagrams it receives,
  * a DNS responder on --dns-port, UDP and TCP (RFC 7766 framing, several queries per connection), answering every
    A query with --dns-answer and every other type with no records, counting queries per (lower-case) name and
    transport. Two names answer differently: `big.e2e.test` (A) gets a CNAME chain of long names and BIG_A_RECORDS
    addresses, more than a 512-byte UDP reply holds, so over UDP without EDNS it is answered truncated (TC, question
    only) as a real resolver does; names under `silent.e2e.test` are never answered (upstream timeouts).
HTTP paths:
  * /_ctl/count?path=P     the number of requests seen for path P (control requests are never counted),
  * /_ctl/udp_count?port=N the number of datagrams the UDP sink on port N received,
  * /_ctl/dns_count?name=X the number of DNS queries the responder received for name X (`&transport=tcp`: over
                           TCP only),
  * /_ctl/release?id=X     lets stream X send its second event,
  * /sse?id=X              text/event-stream: event 1, then event 2 only after /_ctl/release?id=X,
  * any path with `Upgrade: websocket`: the RFC 6455 handshake, then every text frame echoed as "echo: <text>",
  * anything else          200 with a body naming method, path and Host (and echoing the start of any body).
Prints "UPSTREAM READY" on stdout once every listener is bound. Standard library only.
"""

import argparse
import json
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import wire

COUNTS = {}
COUNTS_LOCK = threading.Lock()
UDP_COUNTS = {}
DNS_COUNTS = {}
DNS_TCP_COUNTS = {}
RELEASES = {}
RELEASES_LOCK = threading.Lock()


def release_event(stream_id):
    with RELEASES_LOCK:
        return RELEASES.setdefault(stream_id, threading.Event())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2e-upstream"

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: %s %s\n" % (self.address_string(), fmt % args))

    def _reply(self, status, body, ctype="text/plain"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Upstream", "e2e")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/_ctl/count":
            path = query.get("path", [""])[0]
            with COUNTS_LOCK:
                n = COUNTS.get(path, 0)
            return self._reply(200, json.dumps({"path": path, "count": n}), "application/json")
        if url.path == "/_ctl/udp_count":
            port = int(query.get("port", ["0"])[0])
            with COUNTS_LOCK:
                n = UDP_COUNTS.get(port, 0)
            return self._reply(200, json.dumps({"port": port, "count": n}), "application/json")
        if url.path == "/_ctl/dns_count":
            name = query.get("name", [""])[0].lower()
            counts = DNS_TCP_COUNTS if query.get("transport", [""])[0] == "tcp" else DNS_COUNTS
            with COUNTS_LOCK:
                n = counts.get(name, 0)
            return self._reply(200, json.dumps({"name": name, "count": n}), "application/json")
        if url.path == "/_ctl/release":
            release_event(query.get("id", [""])[0]).set()
            return self._reply(200, "released\n")
        with COUNTS_LOCK:
            COUNTS[url.path] = COUNTS.get(url.path, 0) + 1
        if url.path == "/sse":
            return self._sse(query.get("id", [""])[0])
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        host = self.headers.get("Host", "")
        text = "upstream ok: %s %s host=%s\n" % (self.command, url.path, host)
        if body:
            # What arrived, so a demo can show a rewrite (redaction) made on the way.
            text += "received body: %s\n" % body[:300].decode(errors="replace")
        self._reply(200, text)

    def _websocket(self):
        wire.accept_upgrade(self)
        while True:
            _, opcode, data = wire.read_frame(self.rfile)
            if opcode is None:
                return
            if opcode == 8:  # close: answer it and stop
                wire.send_frame(self.wfile, b"", 8)
                return
            if opcode == 1:
                wire.send_frame(self.wfile, b"echo: " + data)

    def _sse(self, stream_id):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data):
            raw = data.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()

        chunk("id: 1\ndata: first\n\n")
        released = release_event(stream_id).wait(timeout=30)
        chunk("id: 2\ndata: %s\n\n" % ("second" if released else "timeout"))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True

    do_GET = _handle
    do_POST = _handle
    do_PUT = _handle
    do_DELETE = _handle
    do_HEAD = _handle


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    tls = None

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread so a slow client never stalls accept().
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as err:
                sys.stderr.write("upstream: handshake with %s failed: %s\n" % (client_address[0], err))
                return
        super().finish_request(request, client_address)


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_sink(port):
    """Count every datagram arriving on `port` (IPv4 and IPv6)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))

    def run():
        while True:
            sock.recvfrom(65536)
            with COUNTS_LOCK:
                UDP_COUNTS[port] = UDP_COUNTS.get(port, 0) + 1

    threading.Thread(target=run, daemon=True).start()


BIG_NAME = "big.e2e.test"
# Long enough, with the CNAME chain, that the answer cannot fit 512 bytes.
BIG_A_RECORDS = 40
SILENT_SUFFIX = ".silent.e2e.test"


def encode_name(name):
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def rr(owner, rtype, rdata, ttl=60):
    return owner + rtype.to_bytes(2, "big") + b"\x00\x01" + ttl.to_bytes(4, "big") + len(rdata).to_bytes(2, "big") + rdata


def big_answers():
    """The CNAME chain big.e2e.test -> edge-1... -> edge-3..., then BIG_A_RECORDS A records (198.51.100.0/24)."""
    chain = ["edge-%d-%s.cdn-%d.e2e.test" % (i, "x" * 40, i) for i in range(1, 4)]
    records, owner = [], b"\xc0\x0c"
    for target in chain:
        records.append(rr(owner, 5, encode_name(target)))
        owner = encode_name(target)
    for i in range(BIG_A_RECORDS):
        records.append(rr(owner, 1, bytes([198, 51, 100, i + 1])))
    return records


def dns_answer(packet, answer_ip, limit):
    """The response to one query (None for anything that is not a one-question query, and for silent names),
    truncated to header + question with TC set when it is longer than `limit` bytes."""
    if len(packet) < 12 or packet[2] & 0x80 or packet[4:6] != b"\x00\x01":
        return None
    at, labels = 12, []
    while at < len(packet) and packet[at]:
        n = packet[at]
        labels.append(packet[at + 1:at + 1 + n].decode(errors="replace"))
        at += 1 + n
    end = at + 5
    if end > len(packet):
        return None
    name = ".".join(labels).lower()
    qtype = int.from_bytes(packet[at + 1:at + 3], "big")
    if limit is None:
        with COUNTS_LOCK:
            DNS_TCP_COUNTS[name] = DNS_TCP_COUNTS.get(name, 0) + 1
            DNS_COUNTS[name] = DNS_COUNTS.get(name, 0) + 1
    else:
        with COUNTS_LOCK:
            DNS_COUNTS[name] = DNS_COUNTS.get(name, 0) + 1
        # EDNS: an OPT record right after the question raises the limit to its UDP payload size.
        if packet[end:end + 3] == b"\x00\x00\x29" and len(packet) >= end + 5:
            limit = max(512, int.from_bytes(packet[end + 3:end + 5], "big"))
    if name.endswith(SILENT_SUFFIX):
        return None
    answers = []
    if qtype == 1 and name == BIG_NAME:
        answers = big_answers()
    elif qtype == 1:
        answers = [b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(answer_ip)]
    flags = 0x8180 | (packet[2] << 8 & 0x0100)
    question = packet[12:end]
    reply = packet[:2] + flags.to_bytes(2, "big") + b"\x00\x01" + len(answers).to_bytes(2, "big") + b"\x00\x00\x00\x00"
    reply += question + b"".join(answers)
    if limit is not None and len(reply) > limit:
        flags |= 0x0200
        reply = packet[:2] + flags.to_bytes(2, "big") + b"\x00\x01" + b"\x00" * 6 + question
    return reply


class DnsTcpHandler(socketserver.BaseRequestHandler):
    """DNS over TCP: 2-byte length-prefixed messages, answered in order, until the client closes."""

    def handle(self):
        stream = self.request.makefile("rb")
        while True:
            head = stream.read(2)
            if len(head) < 2:
                return
            packet = stream.read(int.from_bytes(head, "big"))
            reply = dns_answer(packet, self.server.answer_ip, None)
            if reply is not None:
                self.request.sendall(len(reply).to_bytes(2, "big") + reply)


def dns_responder(port, answer_ip):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))

    def run():
        while True:
            packet, peer = sock.recvfrom(4096)
            reply = dns_answer(packet, answer_ip, 512)
            if reply is not None:
                sock.sendto(reply, peer)

    threading.Thread(target=run, daemon=True).start()
    tcp = DualStackTCPServer(("::", port), DnsTcpHandler)
    tcp.answer_ip = answer_ip
    serve(tcp)


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--bad-cert")
    ap.add_argument("--bad-key")
    ap.add_argument("--https-port", type=int, default=443)
    ap.add_argument("--http-port", type=int, default=80)
    ap.add_argument("--bad-port", type=int, default=8443)
    ap.add_argument("--echo-port", type=int, action="append", default=[])
    ap.add_argument("--udp-port", type=int, action="append", default=[])
    ap.add_argument("--dns-port", type=int)
    ap.add_argument("--dns-answer", default="192.0.2.7")
    args = ap.parse_args()

    DualStackHTTPServer.allow_reuse_address = True
    https = DualStackHTTPServer(("::", args.https_port), Handler)
    https.tls = tls_context(args.cert, args.key)
    serve(https)
    serve(DualStackHTTPServer(("::", args.http_port), Handler))
    if args.bad_cert:
        bad = DualStackHTTPServer(("::", args.bad_port), Handler)
        bad.tls = tls_context(args.bad_cert, args.bad_key)
        serve(bad)
    for port in args.echo_port:
        serve(DualStackTCPServer(("::", port), EchoHandler))
    for port in args.udp_port:
        udp_sink(port)
    if args.dns_port:
        dns_responder(args.dns_port, args.dns_answer)
    print("UPSTREAM READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
