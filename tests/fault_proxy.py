"""An HTTP/1.1 proxy on loopback that injects storage faults between a client and an S3 server,
for the fault-injection tests."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    n: int  # 1-based, over every request the proxy has seen


_ERRORS = {
    500: ("Internal Server Error", "InternalError"),
    503: ("Service Unavailable", "ServiceUnavailable"),
}
_HOP = (b"connection", b"keep-alive", b"expect", b"proxy-connection")


class FaultProxy:
    """An HTTP/1.1 proxy on loopback in front of the S3 server. ``rule`` picks, per request:

    * ``pass``: forward it;
    * ``500`` / ``503``: answer with an S3 error (InternalError / ServiceUnavailable);
    * ``reset``: close the connection with a TCP reset, no answer;
    * ``truncate``: forward, then send half the answer and reset;
    * ``drop_ack``: forward (a PUT is applied), then reset instead of answering;
    * ``cut_body``: send the server only the first half of the request body, then reset both
      connections (an upload that dies mid-body);
    * ``delay:S``: wait S seconds, then forward;
    * ``stall:S``: wait S seconds, then close without an answer (the client times out first).

    One request per connection (answers say ``Connection: close``), which aiohttp's keep-alive
    pool handles by opening another.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rule: Callable[[Request], str] = lambda req: "pass"
        self.log: list[tuple[Request, str]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def faults(self, method: str | None = None) -> list[tuple[Request, str]]:
        with self._lock:
            return [(r, a) for r, a in self.log if a != "pass" and method in (None, r.method)]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            got = _read_request(conn)
            if got is None:
                return
            method, path, headers, body = got
            with self._lock:
                req = Request(method, path, len(self.log) + 1)
                action = self.rule(req)
                self.log.append((req, action))
            kind, _, arg = action.partition(":")
            if kind in ("delay", "stall"):
                time.sleep(float(arg))
            if kind in ("reset", "stall"):
                _reset(conn)
                return
            if kind == "cut_body":
                with socket.create_connection(self.upstream, timeout=30) as up:
                    up.sendall(_head(method, path, headers) + body[: len(body) // 2])
                    _reset(up)
                _reset(conn)
                return
            if kind in ("500", "503"):
                reason, code = _ERRORS[int(kind)]
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>injected fault</Message><RequestId>fault</RequestId></Error>"
                ).encode()
                payload = b"" if method == "HEAD" else xml
                conn.sendall(
                    f"HTTP/1.1 {kind} {reason}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                    + payload
                )
                return
            answer = self._forward(method, path, headers, body)
            if kind == "drop_ack":
                _reset(conn)
            elif kind == "truncate":
                body_len = len(answer.partition(b"\r\n\r\n")[2])
                conn.sendall(answer[: len(answer) - max(1, body_len // 2)])
                _reset(conn)
            else:
                conn.sendall(answer)

    def _forward(self, method: str, path: str, headers: list[bytes], body: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(_head(method, path, headers) + body)
            chunks = []
            while chunk := up.recv(65536):
                chunks.append(chunk)
        rhead, _, rbody = b"".join(chunks).partition(b"\r\n\r\n")
        status, *lines = rhead.split(b"\r\n")
        return b"\r\n".join([status, *_end_to_end(lines), b"Connection: close"]) + b"\r\n\r\n" + rbody


def _end_to_end(headers: list[bytes]) -> list[bytes]:
    """The headers without the hop-by-hop ones the proxy sets itself (one request a connection)."""
    return [h for h in headers if h.split(b":", 1)[0].strip().lower() not in _HOP]


def _head(method: str, path: str, headers: list[bytes]) -> bytes:
    return (
        b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), *_end_to_end(headers), b"Connection: close"])
        + b"\r\n\r\n"
    )


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _recv_until(conn: socket.socket, buf: bytes, done: Callable[[bytes], bool]) -> bytes | None:
    """``buf`` and what ``conn`` sends after it, until ``done(buf)``; None if it closes first."""
    while not done(buf):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return buf


def _read_request(conn: socket.socket) -> tuple[str, str, list[bytes], bytes] | None:
    buf = _recv_until(conn, b"", lambda b: b"\r\n\r\n" in b)
    if buf is None:
        return None
    head, _, body = buf.partition(b"\r\n\r\n")
    first, *headers = head.split(b"\r\n")
    method, path, _ = first.decode("latin-1").split(" ", 2)
    fields = {h.split(b":", 1)[0].strip().lower(): h.split(b":", 1)[1].strip() for h in headers}
    if fields.get(b"expect", b"").lower() == b"100-continue" and not body:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    rest: bytes | None = body
    if b"content-length" in fields:
        need = int(fields[b"content-length"])
        rest = _recv_until(conn, body, lambda b: len(b) >= need)
    elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        rest = _recv_until(conn, body, lambda b: b.endswith(b"0\r\n\r\n"))
    return None if rest is None else (method, path, headers, rest)
