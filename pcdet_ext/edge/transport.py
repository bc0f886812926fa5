"""Length-prefixed frames over TCP between an edge process and a server process.

Request: ``u32 length (big endian) | payload``. Reply: ``u32 length | status u8 | body`` with
status 0 (body: the handler's reply) or 1 (body: a UTF-8 error message). The server reads with a
timeout, refuses frames above ``max_frame`` bytes without reading them, answers a handler error
with status 1 and keeps the connection, and drops a client that disconnects or stalls mid-frame;
other clients are unaffected (one thread per connection).
"""
from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from typing import Callable, Optional, Tuple

LENGTH = struct.Struct("!I")
OK, ERROR = 0, 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
log = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """The peer closed, stalled, or answered with an error."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(LENGTH.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket, max_frame: int) -> Optional[bytes]:
    """One frame, or None when the peer closed cleanly between frames."""
    head = sock.recv(LENGTH.size, socket.MSG_WAITALL)
    if not head:
        return None
    if len(head) < LENGTH.size:
        raise ConnectionError("peer closed inside a length prefix")
    (size,) = LENGTH.unpack(head)
    if size > max_frame:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {max_frame}")
    return _recv_exact(sock, size)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: FrameServer = self.server  # type: ignore[assignment]
        self.request.settimeout(server.timeout_s)
        peer = self.client_address
        while True:
            try:
                data = recv_frame(self.request, server.max_frame)
            except ValueError as exc:  # oversized: answer, then drop (the rest of the stream is unread)
                self._reply(ERROR, str(exc).encode())
                log.warning("%s: %s; connection closed", peer, exc)
                return
            except (ConnectionError, socket.timeout, OSError) as exc:
                log.info("%s: dropped (%s)", peer, exc)
                return
            if data is None:
                return
            try:
                reply = server.handle_frame(data)
            except Exception as exc:  # a bad frame must not take the server down: report it to the client
                log.info("%s: frame rejected: %s", peer, exc)
                self._reply(ERROR, f"{type(exc).__name__}: {exc}".encode())
                continue
            if not self._reply(OK, reply):
                return

    def _reply(self, status: int, body: bytes) -> bool:
        try:
            send_frame(self.request, bytes([status]) + body)
            return True
        except OSError as exc:
            log.info("%s: reply failed (%s)", self.client_address, exc)
            return False


class FrameServer(socketserver.ThreadingTCPServer):
    """Serves ``handle_frame(payload) -> reply bytes`` on (host, port); port 0 picks a free one."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], handle_frame: Callable[[bytes], bytes],
                 max_frame: int = DEFAULT_MAX_FRAME, timeout_s: float = 30.0):
        self.handle_frame, self.max_frame, self.timeout_s = handle_frame, max_frame, timeout_s
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


class FrameClient:
    """Sends frames to a :class:`FrameServer` and returns its replies."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0, max_frame: int = DEFAULT_MAX_FRAME):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.max_frame = max_frame

    def request(self, payload: bytes) -> bytes:
        send_frame(self.sock, payload)
        reply = recv_frame(self.sock, self.max_frame)
        if reply is None or not reply:
            raise TransportError("server closed the connection")
        if reply[0] != OK:
            raise TransportError(reply[1:].decode(errors="replace"))
        return reply[1:]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "FrameClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
