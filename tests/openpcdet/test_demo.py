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
