#!/usr/bin/env python3
"""A minimal WebSocket client for the end-to-end tests (standard library only): connects to ADDRESS:443 with TLS
for HOST (trusting the default store, which `enforcer exec` points at its CA bundle), asks for an upgrade on PATH,
and, once upgraded, sends each MESSAGE as a masked text frame and prints the text of the frame that answers it.

Prints "STATUS <code>" for the handshake answer, then "RECV <text>" per reply. Usage:
    ws_client.py ADDRESS HOST PATH MESSAGE...
"""

import base64
import os
import socket
import ssl
import sys


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def main():
    address, host, path, messages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection((address, 443), timeout=20)
    sock = ctx.wrap_socket(raw, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, host, key)
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    print("STATUS %d" % status, flush=True)
    if status != 101:
        return
    for text in messages:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        first, length = read_exactly(sock, 2)
        print("RECV %s" % read_exactly(sock, length & 0x7F).decode(), flush=True)
    sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))


if __name__ == "__main__":
    main()
