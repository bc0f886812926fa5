"""The split server's transport: authenticated requests, bounded resources, load shedding, drain.

One asyncio loop reads every connection (no thread per client); ``handle_frame(body) -> reply`` runs on
a fixed pool of ``workers`` threads. Each connection has at most one request in the server, so a
connection holds at most one frame of at most ``max_frame`` bytes, and the detector runs at most
``workers`` times at once: peak memory is set by the limits, not by the number of clients.

- Connections beyond ``max_connections`` (or ``max_per_address`` from one address) are answered BUSY
  and closed; a connection idle for ``idle_timeout_s`` between requests is closed.
- A request must arrive whole within ``frame_timeout_s`` of its first byte (slow senders are dropped)
  and may not exceed ``max_frame`` bytes (answered, then dropped unread).
- With keys, a request must be signed by a known key id (HMAC-SHA256), carry a sequence number not
  seen before (per key id, :class:`ReplayWindow`) and a time within ``max_skew_s``: checked before the
  body reaches the handler. Without keys, only unsigned requests are taken.
- Admission: a free worker runs the request; otherwise it waits in a queue of at most ``queue``
  requests (``queue_per_address`` from one address; the address served least recently goes first);
  beyond that it is answered BUSY at once. A request not answered within ``request_timeout_s`` of its
  arrival is answered TIMEOUT (a handler already running finishes in the background, holding its
  worker).
- Replies name a reason class only (``refused: format``); the details go to the log. The handler
  raises :class:`Refused` with its class, anything else is ``internal``.
- ``stop()`` (SIGTERM / SIGINT in :meth:`serve_forever`) drains: no new connections, new requests
  answered DRAINING, requests in the server answered, exit within ``drain_timeout_s``.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Callable, Deque, Dict, Optional, Tuple, Union

from pcdet_ext.edge.auth import FRAME, HEALTH, SIGNED, EnvelopeError, Key, ReplayWindow, open_envelope, reply_mac, verify
from pcdet_ext.edge.transport import BUSY, DRAINING, LENGTH, OK, REFUSED, TIMEOUT

log = logging.getLogger(__name__)
REASONS = ("size", "envelope", "auth", "stale", "replay", "model", "format", "internal")
_MESSAGES = {"size": "the request is larger than this server accepts",
             "envelope": "not a request envelope of this protocol",
             "auth": "authentication failed (key id, key or MAC)",
             "stale": "the request's time is outside the server's window (check both clocks)",
             "replay": "sequence number already seen or too old",
             "model": "the frame was coded for another model",
             "format": "the frame does not decode",
             "internal": "the server failed on this request"}


class Refused(Exception):
    """Raised by a handler: the request is refused for ``reason`` (one of :data:`REASONS`); the message
    goes to the server's log only."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def flag_of(field_name: str) -> str:
    """The command-line flag of a :class:`Limits` field (seconds fields drop their ``_s``)."""
    return "--" + (field_name[:-2] if field_name.endswith("_s") else field_name)


@dataclass
class Limits:
    workers: int = 1
    queue: int = 4
    queue_per_address: int = 2
    max_connections: int = 32
    max_per_address: int = 8
    max_frame: int = 8 * 1024 * 1024
    frame_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 20.0
    max_skew_s: float = 30.0
    drain_timeout_s: float = 20.0

    def problems(self) -> str:
        """What is wrong, naming the command-line flag (empty: nothing)."""
        for f in fields(self):
            value, flag = getattr(self, f.name), flag_of(f.name)
            floor = 0 if f.name in ("queue", "queue_per_address", "max_skew_s") else 1
            if f.type in ("int", int):
                if not isinstance(value, int) or value < floor:
                    return f"{flag}: expected an integer >= {floor}, got {value}"
            elif not (math.isfinite(value) and (value > 0 or floor == 0 and value == 0)):
                return f"{flag}: expected a {'positive' if floor else 'non-negative'} number of seconds, got {value}"
        if self.max_per_address > self.max_connections:
            return f"--max_per_address ({self.max_per_address}) exceeds --max_connections ({self.max_connections})"
        return ""

    def buffer_bound(self) -> int:
        """Bytes the transport may hold: each connection one request being read plus its copy."""
        return 2 * self.max_connections * (self.max_frame + LENGTH.size)


class Counters:
    """Frames served, refused by reason, shed, timed out, connections refused / dropped, latency."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.latency_ms: Deque[float] = collections.deque(maxlen=4096)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def served(self, ms: float) -> None:
        with self.lock:
            self.counts["served"] += 1
            self.latency_ms.append(ms)

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.latency_ms)
            out = dict(self.counts)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
        return {**out, "latency_ms_p50": pick(0.5), "latency_ms_p99": pick(0.99)}


class _Job:
    __slots__ = ("address", "body", "done", "started")

    def __init__(self, address: str, body: bytes, loop: asyncio.AbstractEventLoop):
        self.address, self.body, self.done, self.started = address, body, loop.create_future(), False


class _Scheduler:
    """Fixed workers, a bounded fair queue (loop thread only)."""

    def __init__(self, limits: Limits, pool: ThreadPoolExecutor, handle: Callable[[bytes], bytes],
                 loop: asyncio.AbstractEventLoop):
        self.limits, self.pool, self.handle, self.loop = limits, pool, handle, loop
        self.free = limits.workers
        self.waiting: Dict[str, Deque[_Job]] = {}
        self.last_start: Dict[str, float] = {}
        self.n_waiting = 0

    @property
    def in_server(self) -> int:
        return self.limits.workers - self.free + self.n_waiting

    def admit(self, job: _Job) -> bool:
        if self.free and not self.n_waiting:
            self._start(job)
            return True
        mine = self.waiting.setdefault(job.address, collections.deque())
        if self.n_waiting >= self.limits.queue or len(mine) >= self.limits.queue_per_address:
            if not mine:
                del self.waiting[job.address]
            return False
        mine.append(job)
        self.n_waiting += 1
        return True

    def withdraw(self, job: _Job) -> None:
        """A waiting job past its deadline leaves the queue (a started one runs to its end)."""
        mine = self.waiting.get(job.address)
        if not job.started and mine and job in mine:
            mine.remove(job)
            self.n_waiting -= 1
            if not mine:
                del self.waiting[job.address]

    def _start(self, job: _Job) -> None:
        self.free -= 1
        job.started = True
        self.last_start[job.address] = time.monotonic()
        future = self.loop.run_in_executor(self.pool, self.handle, job.body)
        future.add_done_callback(lambda f: self._finished(job, f))

    def _finished(self, job: _Job, future: asyncio.Future) -> None:
        if not job.done.done():
            if future.cancelled():
                job.done.cancel()
            elif future.exception() is not None:
                job.done.set_exception(future.exception())
            else:
                job.done.set_result(future.result())
        self.free += 1
        if self.n_waiting:  # the address served least recently goes next
            address = min(self.waiting, key=lambda a: self.last_start.get(a, 0.0))
            mine = self.waiting[address]
            nxt = mine.popleft()
            self.n_waiting -= 1
            if not mine:
                del self.waiting[address]
            self._start(nxt)


def listen(address: Tuple[str, int], limits: Limits) -> socket.socket:
    """The listening socket (binding early lets a tool refuse a taken port before loading a model)."""
    return socket.create_server(address, backlog=max(128, limits.max_connections))


class FrameServer:
    """Serves ``handle_frame(body) -> reply bytes`` on (host, port) (port 0: a free one; or a socket from
    :func:`listen`) within ``limits``; ``keys`` ({key id: Key}) makes signed requests mandatory; ``tls`` wraps
    every connection."""

    def __init__(self, address: Union[Tuple[str, int], socket.socket], handle_frame: Callable[[bytes], bytes], limits: Limits = Limits(),
                 keys: Optional[Dict[str, Key]] = None, tls: Optional[ssl.SSLContext] = None):
        bad = limits.problems()
        if bad:
            raise ValueError(bad)
        self.handle_frame, self.limits, self.keys, self.tls = handle_frame, limits, keys, tls
        self.sock = address if isinstance(address, socket.socket) else listen(address, limits)
        self.port: int = self.sock.getsockname()[1]  # port 0: the one picked
        self.counters = Counters()
        self.replay = ReplayWindow(limits.max_skew_s)
        self.per_address: Dict[str, int] = collections.Counter()
        self.connections = 0
        self.answering = 0  # requests read and not yet answered
        self.draining = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._idle_writers: set = set()

    @property
    def running(self) -> int:
        """Handlers still running (after a drain whose deadline passed, or of requests answered 'timeout')."""
        return self.limits.workers - self.scheduler.free if hasattr(self, "scheduler") else 0

    # ---- running -------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve in this (main) thread until SIGTERM / SIGINT, then drain."""
        asyncio.run(self._main(signals=True))

    def start(self) -> threading.Thread:
        """Serve in a background thread (returns once accepting)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(signals=False)), daemon=True,
                                        name="split-server")
        self._thread.start()
        self._ready.wait(30)
        return self._thread

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """Drain and stop a server started with :meth:`start`."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(self.limits.drain_timeout_s + 5 if timeout_s is None else timeout_s)

    async def _main(self, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="split-worker")
        self.scheduler = _Scheduler(self.limits, pool, self.handle_frame, self._loop)
        server = await asyncio.start_server(self._connection, sock=self.sock, ssl=self.tls,
                                            ssl_handshake_timeout=self.limits.frame_timeout_s if self.tls else None)
        self._ready.set()
        await self._stop.wait()
        log.info("draining: %d request(s) in the server", self.answering)
        self.draining = True
        server.close()
        for writer in list(self._idle_writers):
            writer.close()
        deadline = time.monotonic() + self.limits.drain_timeout_s
        while self.answering and time.monotonic() < deadline:  # admitted requests get their replies
            await asyncio.sleep(0.02)
        pool.shutdown(wait=False)  # queued requests never reached the pool
        log.info("stopped: %s", json.dumps(self.counters.snapshot()))

    # ---- one connection ------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = str((writer.get_extra_info("peername") or ("?",))[0])
        if self.draining or self.connections >= self.limits.max_connections \
                or self.per_address[address] >= self.limits.max_per_address:
            self.counters.add("connections_refused")
            await self._refuse_connection(reader, writer, DRAINING if self.draining else BUSY)
            return
        self.connections += 1
        self.per_address[address] += 1
        try:
            while not self.draining:
                request = await self._read_request(reader, writer, address)
                if request is None:
                    break
                arrived, data = request
                self.answering += 1
                try:
                    status, body, key, seq = await self._answer(address, data, arrived)
                    sent = await self._reply(writer, status, body, key, seq)
                finally:
                    self.answering -= 1
                if not sent:
                    break
        finally:
            self._idle_writers.discard(writer)
            self.connections -= 1
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            writer.close()

    async def _refuse_connection(self, reader, writer, status: int) -> None:
        try:
            writer.write(self._frame(status, b"too many connections" if status == BUSY else b"server is draining"))
            await asyncio.wait_for(writer.drain(), 1.0)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(reader.read(1 << 16), 1.0)  # let the reply arrive before closing
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass  # the connection is being refused anyway
        finally:
            writer.close()

    async def _read_request(self, reader, writer, address) -> Optional[Tuple[float, bytes]]:
        """(arrival time, envelope bytes), or None when the connection is to be closed."""
        limits = self.limits
        self._idle_writers.add(writer)
        try:
            first = await asyncio.wait_for(reader.read(1), limits.idle_timeout_s)
        except asyncio.TimeoutError:
            self.counters.add("dropped_idle")
            return None
        except (OSError, ssl.SSLError):
            return None
        finally:
            self._idle_writers.discard(writer)
        if not first:
            return None
        deadline = time.monotonic() + limits.frame_timeout_s
        try:
            head = first + await asyncio.wait_for(reader.readexactly(LENGTH.size - 1), limits.frame_timeout_s)
            (size,) = LENGTH.unpack(head)
            if size > limits.max_frame:
                log.warning("%s: request of %d bytes above --max_frame %d; dropped", address, size, limits.max_frame)
                self.counters.add("refused_size")
                await self._reply(writer, REFUSED, b"size: " + _MESSAGES["size"].encode())
                return None
            data = await asyncio.wait_for(reader.readexactly(size), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.info("%s: request not complete within %.1f s; dropped", address, limits.frame_timeout_s)
            self.counters.add("dropped_slow")
            return None
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError) as exc:
            log.info("%s: dropped mid-request (%s)", address, type(exc).__name__)
            self.counters.add("dropped_partial")
            return None
        return time.monotonic(), data

    async def _answer(self, address: str, data: bytes, arrived: float):
        """(status, body, key to sign the reply with, seq)."""
        try:
            env = open_envelope(data)
        except EnvelopeError as exc:
            return self._refusal(address, "envelope", str(exc))
        if env.kind == HEALTH and env.key_id is None:  # probes need no key; they reach no handler
            return OK, self._health(), None, 0
        key = None
        if self.keys is None:
            if env.key_id is not None:
                return self._refusal(address, "auth", "signed request, but this server has no keys")
        else:
            key = self.keys.get(env.key_id) if env.key_id is not None else None
            if key is None or not verify(env, key):
                why = "unsigned request" if env.key_id is None else (
                    f"unknown key id '{env.key_id}'" if key is None else f"MAC does not verify for '{env.key_id}'")
                return self._refusal(address, "auth", why)
            stale_or_replay = self.replay.check(env)
            if stale_or_replay:
                return (*self._refusal(address, stale_or_replay, f"key id '{env.key_id}', seq {env.seq}, "
                                       f"time {env.time_ms} ms")[:2], key, env.seq)
        if env.kind == HEALTH:
            return OK, self._health(), key, env.seq
        if self.draining:
            return DRAINING, b"server is draining", key, env.seq
        job = _Job(address, env.body, self._loop)
        if not self.scheduler.admit(job):
            self.counters.add("shed")
            return BUSY, b"all workers and the queue are busy; retry later", key, env.seq
        remaining = self.limits.request_timeout_s - (time.monotonic() - arrived)
        try:
            reply = await asyncio.wait_for(asyncio.shield(job.done), max(0.0, remaining))
        except asyncio.TimeoutError:
            self.scheduler.withdraw(job)
            job.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is nobody's now
            self.counters.add("timed_out")
            log.warning("%s: request not answered within %.1f s (%s)", address, self.limits.request_timeout_s,
                        "running" if job.started else "queued")
            return TIMEOUT, b"not answered within the server's deadline", key, env.seq
        except Refused as exc:
            return (*self._refusal(address, exc.reason, str(exc))[:2], key, env.seq)
        except Exception as exc:  # the handler failed: the client learns the class, the log the details
            log.error("%s: handler failed: %s", address, exc, exc_info=exc)
            return (*self._refusal(address, "internal", type(exc).__name__)[:2], key, env.seq)
        self.counters.served((time.monotonic() - arrived) * 1e3)
        return OK, reply, key, env.seq

    def _health(self) -> bytes:
        return json.dumps({"status": "draining" if self.draining else "ready", "in_server": self.scheduler.in_server,
                           **self.counters.snapshot()}).encode()

    def _refusal(self, address: str, reason: str, detail: str):
        self.counters.add(f"refused_{reason}")
        log.info("%s: refused (%s): %s", address, reason, detail)
        return REFUSED, f"{reason}: {_MESSAGES[reason]}".encode(), None, 0

    @staticmethod
    def _frame(status: int, body: bytes, key: Optional[Key] = None, seq: int = 0) -> bytes:
        tail = reply_mac(key, seq, status, body) if key else b""
        payload = bytes([status, SIGNED if key else 0]) + body + tail
        return LENGTH.pack(len(payload)) + payload

    async def _reply(self, writer, status: int, body: bytes, key: Optional[Key] = None, seq: int = 0) -> bool:
        try:
            writer.write(self._frame(status, body, key, seq))
            await asyncio.wait_for(writer.drain(), self.limits.frame_timeout_s)
            return True
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.info("reply failed (%s)", type(exc).__name__)
            self.counters.add("dropped_reply")
            return False


def server_tls(cert: str, key: str, client_ca: Optional[str] = None) -> ssl.SSLContext:
    """TLS 1.2+ with ``cert``; with ``client_ca`` every client must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def limits_from_args(args) -> Limits:
    """:class:`Limits` from argparse flags of the same names (``--frame_timeout`` -> frame_timeout_s)."""
    return Limits(**{f.name: getattr(args, flag_of(f.name)[2:]) for f in fields(Limits)})


def add_limit_arguments(parser) -> None:
    defaults = asdict(Limits())
    helps = {"workers": "requests decoded and detected at once (threads)",
             "queue": "requests waiting for a worker, beyond which the server answers busy",
             "queue_per_address": "of those, from one address",
             "max_connections": "connections in all", "max_per_address": "connections from one address",
             "max_frame": "bytes of one request (default: the largest frame this model can be sent)",
             "frame_timeout_s": "seconds for a whole request to arrive from its first byte",
             "idle_timeout_s": "seconds a connection may wait between requests",
             "request_timeout_s": "seconds from a request's arrival to its answer (queue + decode + detect)",
             "max_skew_s": "seconds a signed request's time may differ from this clock (0: no clock check)",
             "drain_timeout_s": "seconds to finish requests after SIGTERM"}
    for name, value in defaults.items():
        default = None if name == "max_frame" else value
        parser.add_argument(flag_of(name), type=type(value), default=default, help=f"{helps[name]} (default {value})"
                            if default is not None else helps[name])
