"""The main job (tools/demo_split_rq.py, what tools/quickstart.sh runs), on a tiny setting: it trains,
fits the bitstream models, codes the val frames and prints a table of measured bytes with its unit."""
import re

from tier2 import tool


def test_demo_table_shows_measured_bytes_and_its_unit(tmp_path):
    out = tmp_path / "demo"
    proc = tool("demo_split_rq.py", "--out", str(out), "--num_frames", "8", "--iters", "4", "--n_codebook", "1",
                "--schedule", "16", "--stage_epochs", "2", out_root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "bitstream models fitted on 6 train frames" in text
    row = re.search(r"^\s+1\s+16\s+-\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)$", text, re.M)
    assert row, text[-3000:]  # the measured column holds a number, not "-"
    measured, fixed = float(row.group(2)), float(row.group(3))
    assert 0 < measured < fixed
    assert "mAP %: mean over classes of the 3D AP (KITTI metric, R40, moderate difficulty" in text
    assert "on the val split, 2 frames" in text
    assert (out / "rq" / "eval" / "sweep.json").is_file()
    study(tmp_path, out, measured)


def study(tmp_path, demo_out, measured_kb):
    """benchmarks/rate_accuracy_study.py on the demo's run (--config/--rq_ckpt: no training): every method's
    rows with measured bytes, the same RQ bytes as the demo's table, CSV/JSON/PNG."""
    import csv
    import json
    import subprocess
    import sys

    from tier2 import REPO
    bitstream = next((demo_out / "rq" / "checkpoints").glob("*_bitstream.pth"))
    run = [sys.executable, str(REPO / "benchmarks/rate_accuracy_study.py"), "--out", str(tmp_path / "study")]
    proc = subprocess.run(run + ["--config", str(demo_out / "split_demo.yaml"), "--rq_ckpt", str(bitstream),
                                 "--lambdas", "0.01", "--rd_lambdas", "0.5", "--rd_rounds", "1", "--rd_steps", "2",
                                 "--gate_weights", "1", "--gate_steps", "2",
                                 "--scalar_bits", "8,2", "--draco_bits", "8"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "study" / "study"
    rows = list(csv.DictReader(open(out / "rate_accuracy.csv")))
    by = {(r["method"], re.sub(r", \d+ % of pillars$", "", r["setting"])): float(r["kb_per_frame"]) for r in rows}
    assert set(by) == {("RQ fixed-length (estimate)", "(1, 16)"), ("RQ context-coded", "(1, 16)"),
                       ("RQ rate-aware", "(1, 16) lambda 0.01"), ("RQ rate-aware, models refitted", "(1, 16) lambda 0.5"),
                       ("RQ rate-distortion trained", "(1, 16) lambda 0.5"),
                       ("RQ + learned pillar keep/drop", "(1, 16) weight 1"),
                       ("scalar-quantized features, entropy-coded", "8 bits"),
                       ("scalar-quantized features, entropy-coded", "2 bits"),
                       ("Draco point cloud -> uncompressed detector", "8-bit positions")}
    assert round(by[("RQ context-coded", "(1, 16)")], 2) == measured_kb  # the bytes the demo's table measured
    scalar8, scalar2 = (by[("scalar-quantized features, entropy-coded", f"{b} bits")] for b in (8, 2))
    assert scalar8 > scalar2 > by[("RQ context-coded", "(1, 16)")]
    summary = json.loads((out / "rate_accuracy.json").read_text())
    assert summary["reported_on"] == "val split, 2 frames" and "never trained on" in summary["selected_on"]
    assert summary["mean_points_per_frame"] > 0 and (out / "rate_accuracy.png").stat().st_size > 10000
    saved = summary["bytes_saved_vs_rate_aware"]
    assert [p["setting"] for p in saved["RQ rate-distortion trained"]] == ["(1, 16) lambda 0.5"]
    assert by[("RQ rate-aware, models refitted", "(1, 16) lambda 0.5")] < by[("RQ context-coded", "(1, 16)")]
    assert any(re.fullmatch(r"\(1, 16\) weight 1, \d+ % of pillars", r["setting"]) for r in rows)
    refused = subprocess.run(run + ["--config", str(demo_out / "split_demo.yaml")], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "--config and --rq_ckpt go together" in refused.stderr
