"""Wire helpers the e2e test servers share (upstream.py, sdk/llm_server.py, conform/provider_stub.py), standard
library only: an HTTP/1.1 request body, chunked or not (RFC 9112 sections 6 and 7.1), and RFC 6455 WebSocket
framing on the server side — the handshake's answer, reading one frame (unmasking it), writing one unfragmented
frame."""

import base64
import hashlib

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_body(rfile, headers):
    """The request body: `Transfer-Encoding: chunked` (trailers skipped) or `Content-Length` bytes."""
    if "chunked" not in headers.get("Transfer-Encoding", "").lower():
        length = int(headers.get("Content-Length") or 0)
        return rfile.read(length) if length else b""
    data = b""
    while True:
        size = int(rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return data
        data += rfile.read(size)
        rfile.readline()


def accept_upgrade(handler):
    """Answer a `BaseHTTPRequestHandler`'s WebSocket upgrade request with `101` (no extension, no subprotocol); the
    connection is the WebSocket's from here."""
    key = handler.headers.get("Sec-WebSocket-Key", "")
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    handler.send_response(101)
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True


def read_frame(rfile):
    """One frame: (FIN, opcode, payload unmasked); (None, None, b"") when the connection ended."""
    head = rfile.read(2)
    if len(head) < 2:
        return None, None, b""
    fin, opcode, length = bool(head[0] & 0x80), head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(rfile.read(2), "big")
    elif length == 127:
        length = int.from_bytes(rfile.read(8), "big")
    mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = rfile.read(length)
    return fin, opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def send_frame(wfile, payload, opcode=1):
    """One unmasked, unfragmented frame (a server's): text by default."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    wfile.write(head + payload)
    wfile.flush()
