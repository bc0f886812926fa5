"""Shared keys, authenticated request envelopes and the replay window of the split transport (stdlib only).

A key file holds one key per line, ``<key id> <hex key>`` (``#`` starts a comment); an edge's file holds
its own key, a server's file the keys of every edge it accepts (``cat`` of the edges' files). Each key id
has its own key and its own replay window, so one edge cannot sign for another. Key files must not be
readable by group or others (``chmod 600``); ``python -m pcdet_ext.edge.auth ID FILE`` writes a new one.

Request envelope (big endian): ``magic "RQTP" | kind u8 | flags u8 | key id 16 B | seq u64 |
time_ms u64 | body | HMAC-SHA256 32 B`` (the MAC only with flag 1, over everything before it).
Reply: ``status u8 | flags u8 | body | HMAC-SHA256 32 B`` (MAC over the request's seq, status and body,
only when the request was authenticated).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

ENVELOPE = struct.Struct("!4sBB16sQQ")
MAGIC = b"RQTP"
FRAME, HEALTH = 1, 2  # request kinds
SIGNED = 1  # flag: a MAC follows the body
MAC_SIZE = 32
MIN_KEY_BYTES = 16
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")
REPLAY_CAPACITY = 4096  # sequence numbers remembered per key id


class KeyFileError(ValueError):
    """A key file that is missing, readable by others or malformed (names the file and line)."""


class EnvelopeError(ValueError):
    """A request that is not a well-formed envelope."""


@dataclass(frozen=True)
class Key:
    key_id: str
    secret: bytes

    def mac(self, *parts: bytes) -> bytes:
        return hmac.new(self.secret, b"".join(parts), hashlib.sha256).digest()


def read_keys(path) -> Dict[str, Key]:
    """Every key of ``path``: {key id: Key}; a :class:`KeyFileError` naming the file (and line) otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path}: readable by group or others (mode {stat.S_IMODE(mode):o}); "
                           f"chmod 600 {path}")
    keys: Dict[str, Key] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"key file {path}, line {number}"
        if len(fields) != 2 or not KEY_ID.match(fields[0]):
            raise KeyFileError(f"{where}: expected '<key id> <hex key>' with a key id of 1-16 letters, digits, "
                               "'_', '.' or '-'")
        try:
            secret = bytes.fromhex(fields[1])
        except ValueError:
            raise KeyFileError(f"{where}: the key of '{fields[0]}' is not hexadecimal") from None
        if len(secret) < MIN_KEY_BYTES:
            raise KeyFileError(f"{where}: the key of '{fields[0]}' has {len(secret)} bytes, at least "
                               f"{MIN_KEY_BYTES} needed")
        if fields[0] in keys:
            raise KeyFileError(f"{where}: key id '{fields[0]}' appears twice")
        keys[fields[0]] = Key(fields[0], secret)
    if not keys:
        raise KeyFileError(f"key file {path}: holds no key (lines '<key id> <hex key>')")
    return keys


def read_client_key(path) -> Key:
    """The single key of an edge's key file."""
    keys = read_keys(path)
    if len(keys) != 1:
        raise KeyFileError(f"key file {path}: holds {len(keys)} keys ({', '.join(sorted(keys))}); an edge's key "
                           "file holds its own key only")
    return next(iter(keys.values()))


def write_new_key(key_id: str, path) -> Key:
    """A fresh 256-bit key written to a new file (mode 600; an existing file is never overwritten)."""
    if not KEY_ID.match(key_id):
        raise KeyFileError(f"key id '{key_id}': expected 1-16 letters, digits, '_', '.' or '-'")
    key = Key(key_id, secrets.token_bytes(32))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path}: exists; not overwritten") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{key_id} {key.secret.hex()}\n")
    return key


def _key_id_field(key: Optional[Key]) -> bytes:
    return key.key_id.encode("ascii").ljust(16, b"\0") if key else bytes(16)


def seal(kind: int, body: bytes, seq: int, key: Optional[Key], now_ms: Optional[int] = None) -> bytes:
    """A request envelope around ``body``, signed with ``key`` (unsigned without one)."""
    head = ENVELOPE.pack(MAGIC, kind, SIGNED if key else 0, _key_id_field(key), seq,
                         int(time.time() * 1000) if now_ms is None else now_ms)
    return head + body + (key.mac(head, body) if key else b"")


@dataclass
class Envelope:
    kind: int
    key_id: Optional[str]  # None: unsigned
    seq: int
    time_ms: int
    body: bytes
    head: bytes
    mac: bytes


def open_envelope(data: bytes) -> Envelope:
    """Parse (not verify) a request envelope."""
    if len(data) < ENVELOPE.size:
        raise EnvelopeError(f"{len(data)} bytes: shorter than the {ENVELOPE.size}-byte envelope")
    magic, kind, flags, key_id, seq, time_ms = ENVELOPE.unpack_from(data)
    if magic != MAGIC or kind not in (FRAME, HEALTH) or flags not in (0, SIGNED):
        raise EnvelopeError("not a pcdet_ext request envelope (magic, kind or flags)")
    signed = flags == SIGNED
    end = len(data) - (MAC_SIZE if signed else 0)
    if end < ENVELOPE.size:
        raise EnvelopeError("signed envelope without room for its MAC")
    name = key_id.rstrip(b"\0")
    if signed and (b"\0" in name or not KEY_ID.match(name.decode("ascii", "replace"))):
        raise EnvelopeError("malformed key id")
    if not signed and any(key_id):
        raise EnvelopeError("unsigned envelope naming a key id")
    return Envelope(kind, name.decode("ascii") if signed else None, seq, time_ms, bytes(data[ENVELOPE.size:end]),
                    bytes(data[:ENVELOPE.size]), bytes(data[end:]))


def verify(env: Envelope, key: Key) -> bool:
    return hmac.compare_digest(key.mac(env.head, env.body), env.mac)


def reply_mac(key: Key, seq: int, status: int, body: bytes) -> bytes:
    return key.mac(b"reply", struct.pack("!QB", seq, status), body)


class ReplayWindow:
    """Per key id: the sequence numbers seen (at most ``capacity``; beyond, the lower half is forgotten and
    everything at or below it refused from then on) and a clock window: repeats, numbers at or below the
    forgotten floor and timestamps outside ``max_skew_s`` of this clock (or from before the server started)
    are refused. Numbers may arrive in any order otherwise (several connections, threads or processes of
    one edge). ``max_skew_s`` 0 turns the clock check off."""

    def __init__(self, max_skew_s: float, started_ms: Optional[int] = None, capacity: int = REPLAY_CAPACITY):
        self.max_skew_ms = int(max_skew_s * 1000)
        self.started_ms = int(time.time() * 1000) if started_ms is None else started_ms
        self.capacity = capacity
        self._floor: Dict[str, int] = {}
        self._seen: Dict[str, set] = {}

    def check(self, env: Envelope, now_ms: Optional[int] = None) -> str:
        """'' and the number recorded, or why it is refused: 'stale' or 'replay' (nothing recorded)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if self.max_skew_ms and (abs(env.time_ms - now_ms) > self.max_skew_ms
                                 or env.time_ms < self.started_ms - self.max_skew_ms):
            return "stale"
        seen = self._seen.setdefault(env.key_id, set())
        if env.seq <= self._floor.get(env.key_id, -1) or env.seq in seen:
            return "replay"
        seen.add(env.seq)
        if len(seen) > self.capacity:
            ordered = sorted(seen)
            self._floor[env.key_id] = ordered[len(ordered) // 2 - 1]
            self._seen[env.key_id] = set(ordered[len(ordered) // 2:])
        return ""


def main(argv=None) -> int:
    """``python -m pcdet_ext.edge.auth KEY_ID FILE``: write a new key file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pcdet_ext.edge.auth KEY_ID FILE  (writes a new 256-bit key, mode 600)",
              file=sys.stderr)
        return 2
    try:
        write_new_key(args[0], args[1])
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"key '{args[0]}' written to {args[1]}; give the server a file holding this line (cat the edges' files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
