"""tools/split_infer.py and tools/split_server.py on a checkpoint from tools/train_eval_rq.py."""
import json
import os
import socket
import struct
import subprocess
import sys
import zlib

import pytest
import yaml

from pcdet_ext.algorithms.bitstream.codec import HEADER
from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.edge.transport import FrameClient, TransportError
from tier2 import REPO, main_in_process

SMALL = ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]"]


def tool(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=timeout, env=dict(os.environ, WANDB_MODE="disabled"))


@pytest.fixture(scope="module")
def checkpoint(synthetic_kitti, tmp_path_factory):
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.utils.checkpoint import atomic_save
    tmp = tmp_path_factory.mktemp("split_tools")
    cfg = cfg_from_yaml_file(REPO / "cfgs/kitti_models/pointpillar_rq.yaml")
    cfg_from_list(SMALL, cfg)
    cfg.MODEL.NAME = "PointPillar"
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    atomic_save({"model_state": builders.build_model(cfg, train_set).state_dict()}, tmp / "pp.pth")
    exp = {"dataset": {"dir": str(synthetic_kitti)}, "model": {"n_codebook": 2, "pretrained_weight": str(tmp / "pp.pth")},
           "progressive_learning": {"embedding_schedule": [16], "embedding_stage_epochs": 2, "warmup_epochs": 1},
           "training": {"batch_size": 2, "num_workers": 0, "max_epoch": 4},
           "logging": {"use_wandb": False, "saved_path": str(tmp / "run")}}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    proc = tool("train_eval_rq.py", "--config", str(tmp / "exp.yaml"), "--set", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run" / "checkpoints" / ck.GLOBAL_BEST


def test_split_infer_local_and_remote(checkpoint, synthetic_kitti, tmp_path, capsys):
    fitted = tmp_path / "with_models.pth"
    local = tool("split_infer.py", "--ckpt", str(checkpoint), "--data_path", str(synthetic_kitti), "--fit_models",
                 "--save_ckpt", str(fitted), "--json", str(tmp_path / "local.json"))
    assert local.returncode == 0, local.stderr[-3000:]
    assert "bitstream models fitted on 4 train frames" in local.stdout and "(2, 16): median" in local.stdout
    rows = json.loads((tmp_path / "local.json").read_text())
    assert len(rows["frames"]) == 2 and rows["summary"]["ratio_vs_float32_dense"] > 100
    assert all(r["bytes"] == r["occupancy_bytes"] + r["code_bytes"] + HEADER.size for r in rows["frames"])
    # train_eval_rq.py's evaluation reports the same measured bytes when the checkpoint carries the models
    ev = tool("train_eval_rq.py", "--config", str(checkpoint.parents[2] / "exp.yaml"), "--mode", "eval",
              "--rq_ckpt", str(fitted), "--eval_num_codebooks", "2", "--eval_num_embeddings", "16", "--set", *SMALL)
    assert ev.returncode == 0, ev.stderr[-3000:]
    measured = next(line for line in ev.stdout.splitlines() if line.startswith("measured rate:"))
    kb = float(measured.split("= ")[1].split()[0])
    totals = next(line for line in ev.stdout.splitlines() if line.startswith("rate estimates")).split("total ")[1].split()
    fixed, entropy = float(totals[0]), float(totals[4])  # "X KB (fixed) / Y KB (entropy)"
    # context coding (quadtree occupancy, codes given neighbours) beats the zeroth-order entropy estimate
    assert 0.3 * entropy < kb < entropy < fixed, ev.stdout[-600:]
    # the same frames as the evaluation: cropped to the camera's field of view as OpenPCDet crops them
    assert "frames cropped to the camera's field of view" in local.stdout
    assert float(measured.split()[2]) == pytest.approx(rows["summary"]["mean_bytes"], abs=0.5), ev.stdout[-600:]
    plain_ckpt = tool("train_eval_rq.py", "--config", str(checkpoint.parents[2] / "exp.yaml"), "--mode", "eval",
                      "--rq_ckpt", str(checkpoint), "--set", *SMALL)
    assert plain_ckpt.returncode == 0 and "the rates below are estimates" in plain_ckpt.stdout
    from test_transport import make_certs
    from pcdet_ext.edge.auth import read_client_key, write_new_key
    from pcdet_ext.edge.transport import client_tls
    cert, cert_key = make_certs(tmp_path)[:2]
    write_new_key("truck07", tmp_path / "truck07.key")
    key = read_client_key(tmp_path / "truck07.key")
    server = subprocess.Popen([sys.executable, str(REPO / "tools/split_server.py"), "--ckpt", str(fitted), "--port", "0",
                               "--frame_timeout", "2", "--key_file", str(tmp_path / "truck07.key"), "--tls_cert", cert,
                               "--tls_key", cert_key], cwd=str(REPO), stdout=subprocess.PIPE,
                              stderr=(tmp_path / "server.log").open("w"), text=True)
    try:
        banner = server.stdout.readline()
        assert banner.startswith("signed frames from 1 key id(s), TLS; 1 worker(s)") and "memory bound" in banner, banner
        line = server.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.strip().rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as quitter:  # half a frame, then gone
            quitter.sendall(struct.pack("!I", 1000) + b"x" * 10)
        remote = tool("split_infer.py", "--ckpt", str(fitted), "--data_path", str(synthetic_kitti), "--remote",
                      f"127.0.0.1:{port}", "--key_file", str(tmp_path / "truck07.key"), "--tls_ca", cert,
                      "--save_frames", str(tmp_path / "sent"), "--json", str(tmp_path / "remote.json"))
        assert remote.returncode == 0, remote.stderr[-3000:]
        again = json.loads((tmp_path / "remote.json").read_text())["frames"]
        assert [(r["bytes"], r["boxes"]) for r in again] == [(r["bytes"], r["boxes"]) for r in rows["frames"]]
        sent = sorted((tmp_path / "sent").iterdir())[0].read_bytes()
        fields = list(HEADER.unpack_from(sent))
        fields[7] = bytes(8)  # coded for another model, checksum recomputed: refused by class, no model id told
        other = HEADER.pack(*fields[:-1], zlib.crc32(HEADER.pack(*fields[:-1], 0)[:-4] + sent[HEADER.size:]))
        with FrameClient("127.0.0.1", port, timeout_s=60, key=key, tls=client_tls(cert)) as client:
            for data, reason in ((b"\x00" * 100, "format"), (other + sent[HEADER.size:], "model")):
                with pytest.raises(TransportError) as err:
                    client.request(data)
                assert err.value.reason == reason and fields[7].hex() not in str(err.value), str(err.value)
            assert client.health()["served"] == 2
        with FrameClient("127.0.0.1", port, timeout_s=60, tls=client_tls(cert)) as unsigned:
            with pytest.raises(TransportError, match="refused: auth"):
                unsigned.request(sent)
        assert server.poll() is None  # still serving
        assert main_in_process(capsys, "split_server", "--ckpt", fitted, "--port", port) == (  # before loading a model
            2, [f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"])
        frames = tmp_path / "frames"
        frames.mkdir()
        (frames / "000000.bin").write_bytes(b"\x00" * 33)  # two points and a stray byte
        assert main_in_process(capsys, "split_infer", "--ckpt", fitted, "--frames_dir", frames) == (2, [
            f"error: {frames / '000000.bin'}: 33 bytes is not a positive multiple of 16 (float32 x, y, z, intensity "
            "per point); the file is truncated or not a KITTI velodyne scan"])
        server.terminate()  # SIGTERM: drains and exits 0
        assert server.wait(timeout=30) == 0 and "stopped:" in (tmp_path / "server.log").read_text()
    finally:
        server.kill()
        server.wait(timeout=30)


def test_rate_aware_encoding_trades_bytes_for_distortion(checkpoint, synthetic_kitti, tmp_path, capsys):
    fitted = tmp_path / "with_models.pth"
    runs = {}
    for lam in ("0", "0.5", "4"):  # the first as users run it, the others in this process (no fresh interpreter)
        args = ["--ckpt", str(checkpoint), "--data_path", str(synthetic_kitti), "--json", str(tmp_path / f"{lam}.json")]
        if lam == "0":
            proc = tool("split_infer.py", *args, "--fit_models", "--save_ckpt", str(fitted), "--lambda", lam)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            args[1] = str(fitted)
            assert main_in_process(capsys, "split_infer", *args, "--lambda", lam)[0] == 0
        runs[lam] = json.loads((tmp_path / f"{lam}.json").read_text())["summary"]
    code = {lam: r["mean_bytes"] for lam, r in runs.items()}
    assert code["4"] < code["0.5"] < code["0"], code  # one model, lower rates without retraining
    assert runs["0.5"]["rate_lambda"] == 0.5
    refit = ["--ckpt", str(checkpoint), "--data_path", str(synthetic_kitti), "--fit_models", "--save_ckpt",
             str(tmp_path / "refit.pth"), "--lambda", "4", "--json", str(tmp_path / "refit.json")]
    assert main_in_process(capsys, "split_infer", *refit)[0] == 0  # models fitted on the codes chosen at lambda 4
    assert json.loads((tmp_path / "refit.json").read_text())["summary"]["mean_bytes"] < code["4"]
    assert main_in_process(capsys, "split_infer", *refit, "--fit_rounds", "0") == (
        2, ["error: --fit_rounds: expected an integer >= 1, got 0"])
    code, err = main_in_process(capsys, "split_infer", "--ckpt", fitted, "--data_path", synthetic_kitti, "--lambda", "-1")
    assert code == 2 and err == ["error: --lambda: expected a number >= 0, got -1.0"]
    sweep = tool("train_eval_rq.py", "--config", str(checkpoint.parents[2] / "exp.yaml"), "--mode", "eval",
                 "--rq_ckpt", str(fitted), "--eval_sweep", "--eval_lambdas", "0.5", "4", "--set", *SMALL)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    table = [line.split() for line in sweep.stdout.splitlines() if line.strip().startswith("2 ")]
    measured = {row[2]: float(row[4]) for row in table}  # lambda column -> measured KB/frame
    assert set(measured) == {"-", "0.5", "4"} and measured["4"] < measured["0.5"] < measured["-"], sweep.stdout
    code, err = main_in_process(capsys, "train_eval_rq", "--config", checkpoint.parents[2] / "exp.yaml", "--mode", "eval",
                        "--rq_ckpt", checkpoint, "--eval_sweep", "--eval_lambdas", "0.5", "--set", *SMALL)
    assert code == 2 and "need bitstream models" in err[-1]
    code, err = main_in_process(capsys, "train_eval_rq", "--config", checkpoint.parents[2] / "exp.yaml", "--mode", "eval",
                        "--rq_ckpt", fitted, "--eval_sweep", "--eval_lambdas", "-0.1", "--set", *SMALL)
    assert code == 2 and "--eval_lambdas: expected a list of numbers >= 0" in err[-1]


def test_checkpoint_without_models_is_a_clear_error(checkpoint, synthetic_kitti, capsys):
    """One line, no traceback and no stray quotes, from the client and from the server (a fresh process:
    nothing else on stderr either)."""
    line = (f"error: {checkpoint} has no bitstream models ('bitstream_models'): fit them first "
            "(tools/split_infer.py --fit_models)")
    assert main_in_process(capsys, "split_infer", "--ckpt", checkpoint, "--data_path", synthetic_kitti) == (2, [line])
    proc = tool("split_server.py", "--ckpt", str(checkpoint), "--port", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]


def test_wrong_checkpoints_are_one_line_errors(checkpoint, synthetic_kitti, tmp_path, capsys):
    plain_pp = checkpoint.parents[2] / "pp.pth"  # a PointPillars state, no RQ bottleneck
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    cases = [("split_infer", "--ckpt", plain_pp, "--data_path", str(synthetic_kitti)),
             ("train_eval_rq", "--config", str(checkpoint.parents[2] / "exp.yaml"), "--mode", "eval",
              "--rq_ckpt", plain_pp),
             ("train_eval_rq", "--config", str(checkpoint.parents[2] / "exp.yaml"), "--mode", "eval",
              "--rq_ckpt", junk)]
    for script, *args in cases:
        code, lines = main_in_process(capsys, script, *args)  # an exception would fail the test: no traceback either
        assert code == 2 and len(lines) == 1, lines
        assert str(args[-1] if script == "train_eval_rq" else plain_pp) in lines[0]
        assert "weights_only" not in lines[0]
        if args[-1] == plain_pp or script == "split_infer":
            assert "holds an OpenPCDet checkpoint with modules" in lines[0] and "expected a PointPillarRQ" in lines[0]
        else:
            assert "not a torch.save file" in lines[0]
