"""The client side of the split transport: length-prefixed request envelopes over TCP (optionally TLS).

Request: ``u32 length (big endian) | envelope`` (:mod:`pcdet_ext.edge.auth`: kind, key id, sequence
number, time, body, MAC). Reply: ``u32 length | status u8 | flags u8 | body | [MAC]``; status OK
(body: the server's answer) or one of REFUSED / BUSY / TIMEOUT / DRAINING with a body
``<reason class>: <text>`` that names no internals. A reply to a signed request is signed; an unsigned
reply is only ever taken as an error. The server is :mod:`pcdet_ext.deploy.server`.
"""
from __future__ import annotations

import hmac
import json
import secrets
import socket
import ssl
import struct
import time
from typing import Optional

from pcdet_ext.edge.auth import FRAME, HEALTH, MAC_SIZE, SIGNED, Key, reply_mac, seal

LENGTH = struct.Struct("!I")
OK, REFUSED, BUSY, TIMEOUT, DRAINING = range(5)
STATUS_NAMES = {OK: "ok", REFUSED: "refused", BUSY: "busy", TIMEOUT: "timeout", DRAINING: "draining"}
MAX_REPLY = 16 * 1024 * 1024


class TransportError(RuntimeError):
    """The server refused, shed or timed out a request (``status``, ``reason``), or the connection failed
    (``status`` None)."""

    def __init__(self, message: str, status: Optional[int] = None, reason: str = "connection"):
        super().__init__(message)
        self.status, self.reason = status, reason


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def client_tls(ca_file: str, cert_file: Optional[str] = None, key_file: Optional[str] = None) -> ssl.SSLContext:
    """Verifies the server's certificate against ``ca_file`` (and its host name); presents a client
    certificate when the server asks for one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def parse_address(text: str, flag: str) -> tuple:
    """``host:port`` (IPv6 as ``[::1]:port``) or a ValueError naming ``flag``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{flag}: expected host:port, got '{text}'")
    return host, int(port)


class FrameClient:
    """Sends coded frames (and health requests) to a split server and returns its replies; signs them
    with ``key`` and speaks TLS with ``tls`` when given. A connection the server closed while idle is
    re-opened once per request."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0, key: Optional[Key] = None,
                 tls: Optional[ssl.SSLContext] = None, source: Optional[str] = None):
        self.address, self.timeout_s, self.key, self.tls = (host, port), timeout_s, key, tls
        self.source = (source, 0) if source else None  # the local address to send from
        self.seq = 0
        self.sock: Optional[socket.socket] = None
        self._connect()

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout_s, source_address=self.source)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.address[0]) if self.tls else sock
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot connect to {self.address[0]}:{self.address[1]}: {exc}") from None

    def request(self, payload: bytes, kind: int = FRAME) -> bytes:
        for attempt in (0, 1):
            # increasing, across restarts of this edge too: a microsecond clock (x 1024, plus random low bits so
            # that threads or processes sharing a key do not collide), or one more than the last
            self.seq = seq = max(self.seq + 1, (time.time_ns() // 1000 << 10) | secrets.randbelow(1024))
            envelope = seal(kind, payload, seq, self.key)
            try:
                if self.sock is None:
                    self._connect()
                self.sock.sendall(LENGTH.pack(len(envelope)) + envelope)
                (size,) = LENGTH.unpack(recv_exact(self.sock, LENGTH.size))
                if not 2 <= size <= MAX_REPLY:
                    raise TransportError(f"reply of {size} bytes: not a split server reply")
                reply = recv_exact(self.sock, size)
            except (ConnectionError, ssl.SSLError, OSError) as exc:
                self.close()
                if attempt == 0 and isinstance(exc, (ConnectionError, BrokenPipeError)):
                    continue  # the server closed an idle connection: once more on a new one
                raise TransportError(f"{self.address[0]}:{self.address[1]}: {exc}") from None
            return self._open_reply(reply, seq)
        raise AssertionError("unreachable")

    def _open_reply(self, reply: bytes, seq: int) -> bytes:
        status, flags = reply[0], reply[1]
        body = reply[2:]
        if flags & SIGNED:
            if self.key is None or len(body) < MAC_SIZE:
                raise TransportError("signed reply to an unsigned request")
            body, mac = body[:-MAC_SIZE], body[-MAC_SIZE:]
            if not hmac.compare_digest(mac, reply_mac(self.key, seq, status, body)):
                raise TransportError("reply MAC does not verify: not from the server holding this key")
        elif status == OK and self.key is not None:
            raise TransportError("unsigned OK reply to a signed request")
        if status == OK:
            return body
        text = body.decode("utf-8", "replace")
        reason = text.split(":", 1)[0] if status == REFUSED else STATUS_NAMES.get(status, "unknown")
        raise TransportError(f"{STATUS_NAMES.get(status, status)}: {text}", status, reason)

    def health(self) -> dict:
        return json.loads(self.request(b"", HEALTH))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "FrameClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_client_arguments(parser) -> None:
    """``--key_file`` / ``--tls_ca`` / ``--tls_cert`` / ``--tls_key`` for a tool that sends to a split server."""
    parser.add_argument("--key_file", default=None,
                        help="this edge's key file ('<key id> <hex key>', chmod 600): sign every frame")
    parser.add_argument("--tls_ca", default=None, help="CA certificate(s) to verify the server's TLS certificate")
    parser.add_argument("--tls_cert", default=None, help="client certificate, for a server that asks for one")
    parser.add_argument("--tls_key", default=None, help="private key of --tls_cert")


def client_from_args(args, remote: str, timeout_s: float = 60.0) -> FrameClient:
    """A :class:`FrameClient` for ``--remote host:port`` and the flags of :func:`add_client_arguments`;
    ValueError / KeyFileError / TransportError name what is wrong."""
    from pcdet_ext.edge.auth import read_client_key
    host, port = parse_address(remote, "--remote")
    key = read_client_key(args.key_file) if args.key_file else None
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        raise ValueError("--tls_cert / --tls_key: need --tls_ca (the server's CA) as well")
    try:
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls_ca / --tls_cert / --tls_key: cannot load ({exc})") from None
    return FrameClient(host, port, timeout_s=timeout_s, key=key, tls=tls)
