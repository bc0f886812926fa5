"""Length-prefixed TCP transport on localhost: normal use, garbage, disconnects, oversize, stalls."""
import socket
import struct
import time

import pytest

from pcdet_ext.algorithms.bitstream import decode_frame, encode_frame
from pcdet_ext.edge.transport import FrameClient, FrameServer, TransportError
from test_bitstream import MODEL_ID, MODELS, frame


def handler(data: bytes) -> bytes:
    out = decode_frame(data, MODELS, MODEL_ID, 3, 64)
    return struct.pack("!I", len(out.cells))


@pytest.fixture()
def server():
    srv = FrameServer(("127.0.0.1", 0), handler, max_frame=1 << 20, timeout_s=1.0)
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def good_frame(seed=1):
    cells, codes = frame(seed=seed)
    return encode_frame(cells, codes, 64, MODELS, MODEL_ID), len(cells)


def test_frames_round_trip(server):
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        for seed in range(3):
            data, n = good_frame(seed)
            assert struct.unpack("!I", client.request(data))[0] == n


def test_garbage_gets_an_error_and_the_connection_survives(server):
    data, n = good_frame()
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        with pytest.raises(TransportError, match="BitstreamError"):
            client.request(b"random garbage" * 10)
        assert struct.unpack("!I", client.request(data))[0] == n


def test_disconnect_mid_frame_and_stall_do_not_affect_others(server):
    data, n = good_frame()
    quitter = socket.create_connection(("127.0.0.1", server.port))
    quitter.sendall(struct.pack("!I", len(data)) + data[:20])  # half a frame, then gone
    quitter.close()
    staller = socket.create_connection(("127.0.0.1", server.port))
    staller.sendall(struct.pack("!I", len(data)))  # length only, then silence past the timeout
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        assert struct.unpack("!I", client.request(data))[0] == n
    time.sleep(1.5)
    staller.settimeout(2)
    assert staller.recv(1) == b""  # the server dropped the stalled client
    staller.close()
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        assert struct.unpack("!I", client.request(data))[0] == n


def test_oversized_frame_is_refused_without_reading_it(server):
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        client.sock.sendall(struct.pack("!I", 1 << 30))  # claims 1 GiB
        reply = client.sock.recv(1024)
        assert b"exceeds the limit" in reply
    data, n = good_frame()
    with FrameClient("127.0.0.1", server.port, timeout_s=5) as client:
        assert struct.unpack("!I", client.request(data))[0] == n


def test_many_clients_in_parallel(server):
    import concurrent.futures as cf
    frames = [good_frame(seed) for seed in range(8)]

    def one(item):
        data, n = item
        with FrameClient("127.0.0.1", server.port, timeout_s=10) as client:
            return struct.unpack("!I", client.request(data))[0] == n
    with cf.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, frames))


def test_server_limits_refused_at_start_and_a_port_in_use_is_one_line(tmp_path):
    """split_server.py refuses --timeout 0 / -1 / nan, --max_frame -1 and a bad --port before loading
    anything; a port another process listens on is one line, not a traceback."""
    import subprocess
    import sys
    from pathlib import Path
    from pcdet_ext.cli.split_server import check_limits
    from types import SimpleNamespace
    ok = dict(port=18890, max_frame=1024, timeout=30.0)
    assert check_limits(SimpleNamespace(**ok)) == ""
    for key, value, match in (("timeout", 0.0, "--timeout: expected a positive"), ("timeout", -1.0, "--timeout"),
                              ("timeout", float("nan"), "--timeout"), ("max_frame", -1, "--max_frame: expected"),
                              ("port", 70000, "--port: expected 0..65535")):
        assert match in check_limits(SimpleNamespace(**dict(ok, **{key: value})))
    tool = Path(__file__).resolve().parent.parent / "tools/split_server.py"
    res = subprocess.run([sys.executable, str(tool), "--ckpt", str(tmp_path / "none.pth"), "--timeout", "-1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == "error: --timeout: expected a positive number of seconds, got -1.0"


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
