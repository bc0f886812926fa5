"""The split transport on localhost: signed and fresh requests, bounded resources, shedding, deadlines,
replies without internals, drain; every case of the review's table (issue 28) as a refusal or a drop."""
import random
import re
import select
import socket
import struct
import threading
import time

import pytest

from pcdet_ext.algorithms.bitstream import decode_frame, encode_frame
from pcdet_ext.deploy.server import FrameServer, Limits, Refused
from pcdet_ext.edge.auth import ENVELOPE, FRAME, MAC_SIZE, Key, KeyFileError, ReplayWindow, open_envelope, \
    read_client_key, read_keys, seal, write_new_key
from pcdet_ext.edge.transport import BUSY, LENGTH, REFUSED, TIMEOUT, FrameClient, TransportError
from test_bitstream import MODEL_ID, MODELS, frame

KEY_A, KEY_B = Key("edge-a", bytes(range(32))), Key("edge-b", bytes(range(1, 33)))
KEYS = {"edge-a": KEY_A, "edge-b": KEY_B}
FAST = dict(frame_timeout_s=1.0, idle_timeout_s=5.0, request_timeout_s=5.0, drain_timeout_s=5.0, max_frame=1 << 20)


class Handler:
    """Decodes like the split server (and counts what reached it); ``gate`` holds it until set."""

    def __init__(self):
        self.calls, self.gate, self.seen = 0, threading.Event(), []
        self.gate.set()

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        self.seen.append(data)
        self.gate.wait(10)
        try:
            out = decode_frame(data, MODELS, MODEL_ID, 3, 64)
        except Exception as exc:
            raise Refused("format", str(exc)) from None
        return struct.pack("!I", len(out.cells))


def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for the server's side of a step (polling, so a loaded machine is only slower, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def serve(handler=None, keys=KEYS, **limits):
    srv = FrameServer(("127.0.0.1", 0), handler or Handler(), Limits(**{**FAST, **limits}), keys=keys)
    srv.start()
    return srv


@pytest.fixture()
def server():
    srv = serve()
    yield srv
    srv.stop()


def good_frame(seed=1):
    cells, codes = frame(seed=seed)
    return encode_frame(cells, codes, 64, MODELS, MODEL_ID), len(cells)


def raw_request(port: int, envelope: bytes, source: str = "127.0.0.1"):
    """(status, body) of one request sent by hand."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(LENGTH.pack(len(envelope)) + envelope)
        (size,) = LENGTH.unpack(s.recv(4, socket.MSG_WAITALL))
        reply = s.recv(size, socket.MSG_WAITALL)
    return reply[0], reply[2:]


def test_signed_frames_round_trip_and_replies_are_signed(server):
    with FrameClient("127.0.0.1", server.port, timeout_s=5, key=KEY_A) as client:
        for seed in range(3):
            data, n = good_frame(seed)
            assert struct.unpack("!I", client.request(data))[0] == n
        health = client.health()
    assert health["status"] == "ready" and health["served"] == 3 and health["latency_ms_p99"] is not None
    # a reply whose body or MAC was changed on the way is refused by the client
    client = FrameClient.__new__(FrameClient)
    client.key = KEY_A
    body = b"detections"
    from pcdet_ext.edge.auth import reply_mac
    signed = bytes([0, 1]) + body + reply_mac(KEY_A, 7, 0, body)
    assert client._open_reply(signed, 7) == body
    for bad in (bytes([0, 1]) + b"Detections" + signed[-MAC_SIZE:], signed, bytes([0, 0]) + body):
        with pytest.raises(TransportError, match="MAC|unsigned OK"):
            client._open_reply(bad, 8 if bad == signed else 7)


def test_unsigned_wrong_and_unknown_keys_are_refused_before_decoding():
    handler = Handler()
    srv = serve(handler)
    data, _ = good_frame()
    try:
        cases = {"unsigned": FrameClient("127.0.0.1", srv.port, key=None),
                 "wrong key": FrameClient("127.0.0.1", srv.port, key=Key("edge-a", bytes(32))),
                 "unknown id": FrameClient("127.0.0.1", srv.port, key=Key("edge-z", bytes(range(32)))),
                 "a's id, b's key": FrameClient("127.0.0.1", srv.port, key=Key("edge-a", KEY_B.secret))}
        for name, client in cases.items():
            with client, pytest.raises(TransportError) as err:
                client.request(data)
            assert err.value.status == REFUSED and err.value.reason == "auth", name
        assert handler.calls == 0
        # each edge with its own key
        for key in (KEY_A, KEY_B):
            with FrameClient("127.0.0.1", srv.port, key=key) as client:
                client.request(data)
        assert handler.calls == 2
    finally:
        srv.stop()
    keyless = serve(keys=None)
    try:
        with FrameClient("127.0.0.1", keyless.port, key=KEY_A) as client, pytest.raises(TransportError, match="auth"):
            client.request(data)
        with FrameClient("127.0.0.1", keyless.port) as client:
            client.request(data)
    finally:
        keyless.stop()


def test_replayed_reordered_and_stale_requests(server):
    data, _ = good_frame()
    now = int(time.time() * 1000)
    first = seal(FRAME, data, 1000, KEY_A, now)
    assert raw_request(server.port, first)[0] == 0
    status, body = raw_request(server.port, first)  # the same request again: 10 of 10 were accepted before
    assert status == REFUSED and body.startswith(b"replay: sequence number already seen or too old")
    assert raw_request(server.port, seal(FRAME, data, 1005, KEY_A, now))[0] == 0
    assert raw_request(server.port, seal(FRAME, data, 1003, KEY_A, now))[0] == 0  # reordered: taken once
    assert raw_request(server.port, seal(FRAME, data, 1003, KEY_A, now))[1].startswith(b"replay")
    assert raw_request(server.port, seal(FRAME, data, 1000, KEY_B, now))[0] == 0  # b has its own window
    for skew_ms in (-60_000, 60_000):
        assert raw_request(server.port, seal(FRAME, data, 5000 + abs(skew_ms), KEY_A, now + skew_ms))[1].startswith(b"stale")
    window = ReplayWindow(30.0, started_ms=now)
    before_start = open_envelope(seal(FRAME, data, 1, KEY_A, now - 40_000))
    assert window.check(before_start, now_ms=now - 20_000) == "stale"  # recorded before this server started
    # beyond its capacity the window forgets its lower half, and refuses everything at or below it from then on
    window = ReplayWindow(30.0, started_ms=now, capacity=4)
    envs = {seq: open_envelope(seal(FRAME, data, seq, KEY_A, now)) for seq in range(8, 16)}
    assert [window.check(envs[seq], now) for seq in (10, 14, 12, 11, 13)] == [""] * 5  # 10, 11 forgotten
    assert [window.check(envs[seq], now) for seq in (11, 9, 12, 15)] == ["replay", "replay", "replay", ""]


def test_slowloris_idle_and_partial_senders_are_dropped_by_deadline(server):
    data, n = good_frame()
    envelope = seal(FRAME, data, 1, KEY_A)
    slow = socket.create_connection(("127.0.0.1", server.port))
    start = time.monotonic()
    wire = LENGTH.pack(len(envelope)) + envelope
    dropped_after = None
    for i in range(100):  # one byte every 0.1 s: every recv is prompt, the whole frame is not
        try:
            slow.sendall(wire[i:i + 1])
            closed = bool(select.select([slow], [], [], 0)[0]) and slow.recv(1) == b""
        except OSError:
            closed = True
        if closed:
            dropped_after = time.monotonic() - start
            break
        time.sleep(0.1)
    # the 1 s whole-request deadline (a per-recv timeout would never fire: a byte comes every 0.1 s)
    assert dropped_after is not None and dropped_after < 6.0, dropped_after
    slow.close()
    with socket.create_connection(("127.0.0.1", server.port)) as quitter:  # half a frame, then gone
        quitter.sendall(wire[:30])
    with FrameClient("127.0.0.1", server.port, key=KEY_A) as client:
        assert struct.unpack("!I", client.request(data))[0] == n
    counts = server.counters.snapshot()
    assert counts["dropped_slow"] >= 1 and counts["dropped_partial"] >= 1, counts


def test_connection_caps():
    srv = serve(max_connections=6, max_per_address=4, idle_timeout_s=120.0)  # no idle close during the test
    data, n = good_frame()
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.0.2", 0)) for _ in range(6)]
        until(lambda: len(select.select(idle, [], [], 0)[0]) >= 2 and srv.connections == 4)
        answered = select.select(idle, [], [], 0)[0]
        # beyond 4 from one address: answered busy and closed
        assert len(answered) == 2 and all(s.recv(5)[4] == BUSY for s in answered)
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:  # another address still gets in
            assert struct.unpack("!I", client.request(data))[0] == n
        until(lambda: srv.connections == 4)  # the client's close has reached the server
        others = [socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.0.3", 0)) for _ in range(3)]
        until(lambda: srv.connections == 6 and srv.counters.snapshot()["connections_refused"] == 3)
        with pytest.raises(TransportError) as err:  # 4 + 2 in all: the total cap
            FrameClient("127.0.0.1", srv.port, key=KEY_A).request(data)
        assert err.value.status == BUSY
        for s in idle + others:
            s.close()
        until(lambda: srv.connections == 0)
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:  # closed slots are free again
            assert struct.unpack("!I", client.request(data))[0] == n
    finally:
        srv.stop()


def test_idle_connections_are_closed_after_the_idle_timeout():
    srv = serve(idle_timeout_s=1.0)
    data, n = good_frame()
    try:
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:
            assert struct.unpack("!I", client.request(data))[0] == n
            idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
            until(lambda: srv.connections == 0)  # the served client too: idle between requests
            assert srv.counters.snapshot()["dropped_idle"] == 3
            assert all(s.recv(16) == b"" for s in idle)  # closed by the server
        for s in idle:
            s.close()
    finally:
        srv.stop()


def test_a_burst_is_shed_at_once_and_the_queue_is_fair():
    handler = Handler()
    handler.gate.clear()
    srv = serve(handler, workers=1, queue=2, queue_per_address=1)
    data, n = good_frame()
    other_data = good_frame(seed=2)[0]
    results = {}

    def send(name, source):
        with FrameClient("127.0.0.1", srv.port, key=KEY_A if source != "127.0.0.4" else KEY_B, source=source) as client:
            t0 = time.monotonic()
            try:
                client.request(other_data if name == "other" else data)
                results[name] = ("ok", time.monotonic() - t0, time.monotonic())
            except TransportError as exc:
                results[name] = (exc.reason, time.monotonic() - t0, time.monotonic())
    threads = [threading.Thread(target=send, args=(f"burst{i}", "127.0.0.2")) for i in range(6)]
    try:
        for t in threads:
            t.start()
        until(lambda: len(results) == 4)
        shed = [name for name, (what, _, _) in results.items() if what == "busy"]
        # 1 running + 1 queued from .2, the rest answered at once (not at the 5 s deadline)
        assert len(shed) == 4 and all(results[s][1] < 3.0 for s in shed), results
        late = threading.Thread(target=send, args=("other", "127.0.0.4"))
        late.start()
        until(lambda: srv.scheduler.n_waiting == 2)
        handler.gate.set()
        for t in threads + [late]:
            t.join(10)
        assert sorted(what for what, _, _ in results.values()) == ["busy"] * 4 + ["ok"] * 3, results
        # the address served least recently goes first: 127.0.0.4 before 127.0.0.2's queued frame
        assert handler.seen == [data, other_data, data]
        assert srv.counters.snapshot()["shed"] == 4
    finally:
        handler.gate.set()
        srv.stop()


def test_request_deadline_oversize_and_replies_without_internals():
    def handler(data):
        if data == b"slow":
            time.sleep(1.5)
        if data == b"explode":
            raise RuntimeError("model id 0123abcd, grid 496 x 432, n <= 5")
        return b"fine"
    srv = serve(handler, request_timeout_s=0.5, max_frame=4096, workers=2)
    try:
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:
            with pytest.raises(TransportError) as err:
                client.request(b"slow")
            assert err.value.status == TIMEOUT
            with pytest.raises(TransportError) as err:
                client.request(b"explode")
            assert err.value.reason == "internal" and "0123abcd" not in str(err.value) and "496" not in str(err.value)
            with pytest.raises(TransportError) as err:
                client.request(b"x" * 5000)
            assert err.value.reason == "size"
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:
            with pytest.raises(TransportError) as err:
                client.request(b"random garbage" * 3, kind=7)
            assert err.value.reason == "envelope"
            assert client.request(b"ok") == b"fine"
    finally:
        srv.stop()


def test_drain_answers_requests_in_the_server_and_refuses_new_ones():
    handler = Handler()
    handler.gate.clear()
    srv = serve(handler)
    data, n = good_frame()
    out = {}

    def inflight():
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as client:
            out["reply"] = client.request(data)
    t = threading.Thread(target=inflight)
    t.start()
    until(lambda: srv.answering == 1)
    waiting = FrameClient("127.0.0.1", srv.port, key=KEY_A)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    until(lambda: srv.draining)
    with pytest.raises(TransportError):  # no new connections while draining
        FrameClient("127.0.0.1", srv.port, key=KEY_A).request(data)
    handler.gate.set()
    t.join(5)
    stopper.join(10)
    assert struct.unpack("!I", out["reply"])[0] == n and not stopper.is_alive()
    with pytest.raises(TransportError):
        waiting.request(data)


def test_fuzz_10000_mutations_of_signed_requests_reach_no_decoder(server):
    """Bit flips, header fields re-signed with a wrong key, truncations, appended words: all refused."""
    handler = server.handle_frame
    data, _ = good_frame()
    rng = random.Random(0)
    wrong = Key("edge-a", bytes(range(100, 132)))
    seq = 10_000
    statuses = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for i in range(10_000):
            seq += 1
            env = bytearray(seal(FRAME, data, seq, KEY_A))
            kind = i % 4
            if kind == 0:
                pos = rng.randrange(len(env))
                env[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:  # a header field changed, the MAC recomputed with a key the server does not hold
                frame_head = ENVELOPE.size + rng.randrange(40)
                env[frame_head] = (env[frame_head] + rng.randrange(1, 256)) % 256
                env = bytearray(bytes(env[:-MAC_SIZE]) + wrong.mac(bytes(env[:ENVELOPE.size]),
                                                                   bytes(env[ENVELOPE.size:-MAC_SIZE])))
            elif kind == 2:
                env = env[:rng.randrange(len(env))]
            else:
                env = env[:-MAC_SIZE] + struct.pack("<I", rng.getrandbits(32)) * rng.randrange(1, 4) + env[-MAC_SIZE:]
            s.sendall(LENGTH.pack(len(env)) + bytes(env))
            (size,) = LENGTH.unpack(s.recv(4, socket.MSG_WAITALL))
            statuses.append(s.recv(size, socket.MSG_WAITALL)[0])
    assert handler.calls == 0 and statuses.count(REFUSED) == 10_000


def test_limits_are_validated_naming_the_flag():
    assert Limits().problems() == ""
    for field, value, match in (("workers", 0, "--workers: expected an integer >= 1"),
                                ("queue", -1, "--queue: expected an integer >= 0"),
                                ("frame_timeout_s", 0.0, "--frame_timeout: expected a positive"),
                                ("request_timeout_s", float("nan"), "--request_timeout"),
                                ("max_skew_s", -1.0, "--max_skew: expected a non-negative"),
                                ("max_per_address", 99, "--max_per_address \\(99\\) exceeds")):
        assert re.search(match, Limits(**{field: value}).problems())
    with pytest.raises(ValueError, match="--workers"):
        FrameServer(("127.0.0.1", 0), lambda b: b, Limits(workers=0))


def test_key_files(tmp_path):
    path = tmp_path / "edge.key"
    key = write_new_key("truck07", path)
    assert read_client_key(path) == key and len(key.secret) == 32 and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(KeyFileError, match="exists; not overwritten"):
        write_new_key("truck07", path)
    both = tmp_path / "server.keys"
    both.write_text(path.read_text() + "# the second truck\ntruck08 " + "ab" * 16 + "\n")
    both.chmod(0o600)
    assert sorted(read_keys(both)) == ["truck07", "truck08"]
    with pytest.raises(KeyFileError, match="holds 2 keys"):
        read_client_key(both)
    both.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by group or others.*chmod 600"):
        read_keys(both)
    for text, match in (("truck07 abcd\n", "has 2 bytes, at least 16"), ("truck07 xyz\n", "not hexadecimal"),
                        ("just-one-field\n", "line 1: expected '<key id> <hex key>'"), ("", "holds no key"),
                        (f"a {'00' * 16}\na {'11' * 16}\n", "line 2: key id 'a' appears twice")):
        bad = tmp_path / "bad.keys"
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(KeyFileError, match=match):
            read_keys(bad)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_keys(tmp_path / "missing.keys")
def test_a_bin_frame_of_odd_size_is_refused_naming_it(tmp_path):
    import numpy as np
    import pytest
    from pcdet_ext.deploy.runtime import read_points
    from pcdet_ext.openpcdet.datasets.validation import DatasetFormatError
    pts = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = tmp_path / "000000.bin"
    pts.tofile(good)
    assert np.array_equal(read_points(good, 4), pts)
    for extra in (1, 2, 3):
        bad = tmp_path / f"odd{extra}.bin"
        bad.write_bytes(pts.tobytes() + b"\x00" * extra)
        with pytest.raises(DatasetFormatError, match=rf"{bad}: {32 + extra} bytes is not a positive multiple of 16"):
            read_points(bad, 4)


def test_detections_payload_rounds_huge_boxes_without_overflow():
    """An untrained head's boxes can be ~1e35: float32's round() overflowed (RuntimeWarning on the server)."""
    import warnings

    import torch
    from pcdet_ext.deploy.runtime import boxes_payload
    pred = {"pred_boxes": torch.tensor([[3e35, 1.23456, 2.0, 1, 1, 1, 0.5]]), "pred_scores": torch.tensor([0.54321]),
            "pred_labels": torch.tensor([2])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = boxes_payload(pred, ["Car", "Pedestrian"])
    assert out["labels"] == ["Pedestrian"] and out["boxes"][0][1] == 1.2346 and out["scores"] == [0.5432]


def make_certs(folder):
    """(server cert, server key, client cert, client key): self-signed, the server's for 127.0.0.1."""
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make test certificates")
    paths = []
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:truck07")):
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        paths += [str(cert), str(key)]
    return paths


def test_tls_with_and_without_client_certificates(tmp_path):
    from pcdet_ext.deploy.server import server_tls
    from pcdet_ext.edge.transport import client_tls
    server_crt, server_key, client_crt, client_key = make_certs(tmp_path)
    data, n = good_frame()
    srv = FrameServer(("127.0.0.1", 0), Handler(), Limits(**FAST), keys=KEYS,
                      tls=server_tls(server_crt, server_key, client_ca=client_crt))
    srv.start()
    try:
        with FrameClient("127.0.0.1", srv.port, key=KEY_A, tls=client_tls(server_crt, client_crt, client_key)) as c:
            assert struct.unpack("!I", c.request(data))[0] == n
        with pytest.raises(TransportError):  # no client certificate
            FrameClient("127.0.0.1", srv.port, key=KEY_A, tls=client_tls(server_crt)).request(data)
        with pytest.raises(TransportError, match="certificate verify failed"):  # a server it cannot verify
            FrameClient("127.0.0.1", srv.port, key=KEY_A, tls=client_tls(client_crt))
        with FrameClient("127.0.0.1", srv.port, key=KEY_A) as plain, pytest.raises(TransportError):  # no TLS at all
            plain.request(data)
        with FrameClient("127.0.0.1", srv.port, key=KEY_A, tls=client_tls(server_crt, client_crt, client_key)) as c:
            assert struct.unpack("!I", c.request(data))[0] == n
    finally:
        srv.stop()


def _stderr_of(main, argv) -> str:
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    return err.getvalue().strip()


def test_server_flags_refused_at_start_naming_the_flag(tmp_path):
    """Without a key only loopback (unless --insecure); TLS flags in pairs; limits checked before anything loads."""
    from types import SimpleNamespace

    from pcdet_ext.cli.split_server import check_flags, main
    ok = dict(port=18890, host="127.0.0.1", key_file=None, insecure=False, tls_cert=None, tls_key=None,
              tls_client_ca=None)
    assert check_flags(SimpleNamespace(**ok)) == ""
    assert check_flags(SimpleNamespace(**dict(ok, host="localhost"))) == ""
    assert "--host 0.0.0.0: without --key_file" in check_flags(SimpleNamespace(**dict(ok, host="0.0.0.0")))
    assert check_flags(SimpleNamespace(**dict(ok, host="0.0.0.0", insecure=True))) == ""
    assert check_flags(SimpleNamespace(**dict(ok, host="0.0.0.0", key_file="k"))) == ""
    assert "--tls_cert and --tls_key" in check_flags(SimpleNamespace(**dict(ok, tls_cert="c")))
    assert "--tls_client_ca: needs --tls_cert" in check_flags(SimpleNamespace(**dict(ok, tls_client_ca="c")))
    assert "--port: expected 0..65535" in check_flags(SimpleNamespace(**dict(ok, port=70000)))
    for argv, line in ((["--frame_timeout", "-1"], "error: --frame_timeout: expected a positive number of seconds, got -1.0"),
                       (["--max_frame", "0"], "error: --max_frame: expected an integer >= 1, got 0"),
                       (["--host", "0.0.0.0"], "error: --host 0.0.0.0: without --key_file"),
                       (["--key_file", str(tmp_path / "none.keys")], f"error: key file {tmp_path / 'none.keys'}: cannot read")):
        err = _stderr_of(main, ["--ckpt", str(tmp_path / "none.pth"), *argv])
        assert err.startswith(line), err


def test_the_largest_frame_bound_holds_for_the_costliest_frames():
    """--max_frame's default: every cell occupied, codes uniformly random or all the rarest code, in both modes."""
    import numpy as np
    from pcdet_ext.algorithms.bitstream import max_frame_bytes
    geo = MODELS.geometry
    cells = np.arange(geo.height * geo.width)
    rng = np.random.default_rng(0)
    rarest = int(np.argmin(MODELS.code_counts[64][0]))
    bound = max_frame_bytes(geo, 3)
    for codes in (rng.integers(0, 64, (len(cells), 3)), np.full((len(cells), 3), rarest)):
        for dense in (False, True):
            size = len(encode_frame(cells, codes, 64, MODELS, MODEL_ID, dense=dense))
            assert size <= bound, (size, bound, dense)
    assert size > bound / 8  # a bound, not a figure out of all proportion


def test_drain_deadline_passes_a_detection_that_does_not_end():
    """stop() returns at --drain_timeout even when a handler runs on; the server reports it running (the
    tool then exits without waiting for it)."""
    handler = Handler()
    handler.gate.clear()
    srv = serve(handler, drain_timeout_s=0.5)
    data, _ = good_frame()
    client = FrameClient("127.0.0.1", srv.port, key=KEY_A)
    threading.Thread(target=lambda: pytest.raises(TransportError, client.request, data), daemon=True).start()
    until(lambda: srv.running == 1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 8.0 and srv.running == 1  # 0.5 s drain; the handler runs on for 10 s
    handler.gate.set()
