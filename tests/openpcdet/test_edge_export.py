"""tools/export_edge.py -> the lean edge (numpy + onnxruntime) on real KITTI scans: the same frames as
the PyTorch EdgeRuntime, without torch, OpenPCDet or spconv, and one-line errors on bad input."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import decode_frame
from pcdet_ext.deploy import runtime
from pcdet_ext.edge import EdgeBundle, LeanEdge, read_scan
from pcdet_ext.edge.bundle import ENCODER, quantizer_file
from pcdet_ext.engine.recipes.progressive_rq.measured import STATE_KEY
from pcdet_ext.utils.checkpoint import atomic_save
from tier2 import REPO, assert_other_codebooks_refuse

CELLS = [(1, 16), (3, 64), (5, 256)]
PER_MILLION_LIMIT = 100  # codes allowed to differ where the float encoders disagree on a near-tie


def tool(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(REPO), timeout=timeout)


def test_lean_frames_equal_the_pytorch_edge_frames_on_20_real_scans(exported):
    model, dataset, models, _, bundle_dir, scans = exported
    bundle = EdgeBundle.load(bundle_dir)
    server = runtime.ServerRuntime(model, dataset, models)
    assert bundle.model_id == server.model_id
    report = []
    for n, k in CELLS:
        lean, ref = LeanEdge(bundle, n, k), runtime.EdgeRuntime(model, dataset, models, n, k)
        identical, differing, codes = 0, 0, 0
        for path in scans:
            points = read_scan(path)
            ours, info = lean.encode(points)
            theirs, _ = ref.encode(points)
            assert info["pillars"] > 3000 and set(info) >= {"voxelise_ms", "encoder_ms", "quantize_ms", "code_ms"}
            a, b = (decode_frame(f, models, server.model_id, 5, 256) for f in (ours, theirs))
            assert np.array_equal(a.cells, b.cells)  # the same pillars, always
            codes += a.codes.size
            if ours == theirs:
                identical += 1
                continue
            differing += int((a.codes != b.codes).sum())
            assert differing, "frames differ although their codes agree"
            pred, _ = server.decode(ours)  # a frame with a flipped near-tie code still decodes and detects
            assert len(pred["pred_boxes"]) == len(pred["pred_scores"])
        report.append(f"({n}, {k}): {identical}/{len(scans)} identical, {1e6 * differing / codes:.1f} codes per million differ")
        assert identical >= len(scans) // 2 and 1e6 * differing / codes <= PER_MILLION_LIMIT, report[-1]
    print("; ".join(report))


def test_lean_edge_runs_where_torch_openpcdet_and_spconv_cannot_be_imported(exported):
    _, _, _, _, bundle_dir, scans = exported
    lean = LeanEdge(EdgeBundle.load(bundle_dir), 3, 64)
    expected = [hashlib.sha256(lean.encode(read_scan(p))[0]).hexdigest() for p in scans[:3]]
    code = f"""
import hashlib, sys
sys.modules.update(torch=None, pcdet=None, spconv=None, cumm=None)  # import of any of them now fails
from pcdet_ext.edge import EdgeBundle, LeanEdge, read_scan
lean = LeanEdge(EdgeBundle.load({str(bundle_dir)!r}), 3, 64)
print([hashlib.sha256(lean.encode(read_scan(p))[0]).hexdigest() for p in {[str(p) for p in scans[:3]]!r}])
print(sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'pcdet', 'spconv')))
"""
    proc = tool("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes, loaded = proc.stdout.strip().splitlines()[-2:]
    assert hashes == str(expected) and loaded == "[]"


def test_both_edges_write_frames_that_cmp_compares_and_the_server_answers_the_lean_one(exported, tmp_path, capsys):
    _, _, _, ckpt, bundle_dir, scans = exported
    scan_dir = tmp_path / "scans"
    scan_dir.mkdir()
    for path in scans[:3]:
        os.symlink(path, scan_dir / path.name)
    lean = tool("-m", "pcdet_ext.edge", "--bundle", str(bundle_dir), "--input", str(scan_dir), "--out",
                str(tmp_path / "lean"), "--num_codebooks", "1", "--num_embeddings", "16", "--json", str(tmp_path / "lean.json"))
    assert lean.returncode == 0, lean.stderr[-3000:]
    assert "voxelise" in lean.stdout and "p50 / p95 / p99" in lean.stdout
    torch_side = tool("tools/split_infer.py", "--ckpt", str(ckpt), "--frames_dir", str(scan_dir), "--save_frames",
                      str(tmp_path / "torch"), "--num_codebooks", "1", "--num_embeddings", "16", "--json",
                      str(tmp_path / "torch.json"))
    assert torch_side.returncode == 0, torch_side.stderr[-3000:]
    for path in scans[:3]:
        frame = path.stem + ".rqf"
        assert subprocess.run(["cmp", str(tmp_path / "lean" / frame), str(tmp_path / "torch" / frame)]).returncode == 0
    summary = json.loads((tmp_path / "torch.json").read_text())["summary"]
    assert summary["median_edge_ms"] > summary["median_quantize_encode_ms"] > 0  # the whole edge, head included
    # the lean edge's --remote to a split server with keys (its handler, in this process: the tools' runs are above)
    from pcdet_ext.cli.split_server import frame_handler
    from pcdet_ext.deploy.server import FrameServer
    from pcdet_ext.edge.__main__ import main as edge_main
    from pcdet_ext.edge.auth import read_keys, write_new_key
    model, dataset, models = exported[:3]
    server_side = runtime.ServerRuntime(model, dataset, models)
    write_new_key("truck07", tmp_path / "truck07.key")
    server = FrameServer(("127.0.0.1", 0), frame_handler(server_side, list(dataset.class_names)),
                         keys=read_keys(tmp_path / "truck07.key"))
    server.start()
    try:
        assert edge_main(["--bundle", str(bundle_dir), "--input", str(scan_dir / scans[0].name), "--num_codebooks",
                          "1", "--num_embeddings", "16", "--remote", f"127.0.0.1:{server.port}",
                          "--key_file", str(tmp_path / "truck07.key")]) == 0
        row = capsys.readouterr().out.splitlines()[2]
        expected = len(server_side.decode((tmp_path / "lean" / (scans[0].stem + ".rqf")).read_bytes())[0]["pred_boxes"])
        assert row.split()[0] == scans[0].name and int(row.split()[-1]) == expected, row  # the server's boxes
        # without the key: refused by the server, counted by the edge (exit 1)
        assert edge_main(["--bundle", str(bundle_dir), "--input", str(scan_dir / scans[0].name),
                          "--remote", f"127.0.0.1:{server.port}"]) == 1
        assert " refused: auth: authentication failed" in capsys.readouterr().out
    finally:
        server.stop()


def test_bad_bundles_points_and_checkpoints_are_one_line_errors(exported, tmp_path, capsys):
    from pcdet_ext.edge.__main__ import main as edge_main
    model, dataset, models, ckpt, bundle_dir, scans = exported
    bare = tmp_path / "bare.pth"
    atomic_save({k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != STATE_KEY}, bare)
    refused = tool("tools/export_edge.py", "--ckpt", str(bare), "--out", str(tmp_path / "never"))
    assert refused.returncode == 2 and "--fit_models" in refused.stderr and not (tmp_path / "never").exists()

    def one_line(argv, *needles):
        code = edge_main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), lines

    edge = ["--input", str(scans[0]), "--bundle"]
    missing = tmp_path / "missing"
    shutil.copytree(bundle_dir, missing)
    (missing / quantizer_file(256)).unlink()
    one_line(edge + [str(missing)], str(missing / quantizer_file(256)), "missing")
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle_dir, swapped)
    shutil.copyfile(swapped / quantizer_file(16), swapped / ENCODER)
    one_line(edge + [str(swapped)], str(swapped / ENCODER), "does not match the bundle's metadata")
    one_line(edge + [str(tmp_path)], "edge_bundle.json", "missing")
    one_line(edge + [str(bundle_dir), "--num_codebooks", "6", "--num_embeddings", "16"], "(6, 16)")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 33)
    one_line(["--bundle", str(bundle_dir), "--input", str(odd)], str(odd), "33 bytes")
    points = read_scan(scans[0]).copy()
    points[:7, 1] = np.nan
    points[7:9, 3] = np.inf
    nan_file = tmp_path / "nan.bin"
    points.tofile(nan_file)
    assert edge_main(["--bundle", str(bundle_dir), "--input", str(nan_file), "--num_codebooks", "1",
                      "--num_embeddings", "16"]) == 0
    assert "nan.bin: 9 points with NaN/inf values dropped" in capsys.readouterr().err
    capped = tmp_path / "capped"  # a config allowing fewer pillars than a real scan has: capped as OpenPCDet caps
    shutil.copytree(bundle_dir, capped)
    meta = json.loads((capped / "edge_bundle.json").read_text())
    meta["voxels"]["max_voxels"] = 1000
    (capped / "edge_bundle.json").write_text(json.dumps(meta))
    assert edge_main(["--bundle", str(capped), "--input", str(scans[0]), "--num_codebooks", "1",
                      "--num_embeddings", "16"]) == 0
    out = capsys.readouterr().out
    assert " 1000 " in out and "pillars beyond the cap of 1000 dropped (as OpenPCDet drops them)" in out, out
    # a frame of this bundle at a server whose codebooks differ (another checkpoint) is refused by model id
    data, _ = LeanEdge(EdgeBundle.load(bundle_dir), 2, 16).encode(read_scan(scans[0]))
    assert_other_codebooks_refuse(model, dataset, models, data)


def test_watch_encodes_scans_as_they_arrive(exported, tmp_path, capsys):
    """--watch: scans written into the folder after the start are encoded once complete, then it stops
    after --idle_exit_s without new ones."""
    import threading
    import time

    from pcdet_ext.edge.__main__ import main as edge_main
    _, _, _, _, bundle_dir, scans = exported
    incoming, out = tmp_path / "incoming", tmp_path / "frames"
    incoming.mkdir()
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=edge_main(
        ["--bundle", str(bundle_dir), "--input", str(incoming), "--out", str(out), "--watch", "--poll_s", "0.1",
         "--settle_s", "1", "--idle_exit_s", "3", "--num_codebooks", "1", "--num_embeddings", "16"])))
    worker.start()
    (incoming / "bad.bin").write_bytes(b"\x00" * 33)  # reported and skipped: the watcher goes on
    for path in scans[:2]:
        time.sleep(0.5)
        data = path.read_bytes()
        with open(incoming / path.name, "wb") as fh:  # arrives in two writes: encoded only once complete
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.4)
            fh.write(data[len(data) // 2:])
    worker.join(timeout=120)
    assert not worker.is_alive() and result["code"] == 0
    assert sorted(p.name for p in out.iterdir()) == [p.stem + ".rqf" for p in scans[:2]]
    lean = LeanEdge(EdgeBundle.load(bundle_dir), 1, 16)
    for path in scans[:2]:
        assert (out / (path.stem + ".rqf")).read_bytes() == lean.encode(read_scan(path))[0]
    captured = capsys.readouterr()
    assert "2 frames" in captured.out and "bad.bin: 33 bytes" in captured.err
