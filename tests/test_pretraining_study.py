"""Paired differences (pcdet_ext.utils.paired) and benchmarks/pretraining_study.py paired over run folders
as tools/train.py writes them (no OpenPCDet needed)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from pcdet_ext.utils.paired import paired_difference

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks/pretraining_study.py"
ARMS = ("rand_diff", "pre_diff", "rand_flat", "pre_flat")


def test_paired_difference_mean_and_t_interval():
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d.diffs == [1.0, 2.0, 3.0] and d.mean == 2.0
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) x sd / sqrt(n)
    assert d.low == pytest.approx(2.0 - half) and d.high == pytest.approx(2.0 + half)
    assert str(d) == "+2.00 [-0.48, +4.48]"
    wide = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0], confidence=0.99)
    assert wide.low < d.low and wide.high > d.high
    one = paired_difference([5.0], [3.0])
    assert one.mean == 2.0 and one.low == -math.inf and one.high == math.inf


def test_paired_difference_refuses_unpaired_input():
    with pytest.raises(ValueError, match="2 treatment vs 3 control"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0], [1.0], confidence=1.0)


def write_runs(root: Path, fractions, seeds, skip=()):
    """result.json per run as tools/train.py's final evaluation writes it; pre_diff gains 1, 2, 3 AP on
    Car per seed over rand_diff, nothing elsewhere."""
    for f in fractions:
        for s in seeds:
            for arm in ARMS:
                if (arm, f, s) in skip:
                    continue
                car = 50.0 + s + ((s + 1) if arm == "pre_diff" else 0.0)
                result = {"recall/rcnn_0.3": 0.5, "Car_3d/moderate_R40": car, "Car_bev/moderate_R40": car + 5,
                          "Pedestrian_3d/moderate_R40": 30.0, "Cyclist_3d/moderate_R40": 20.0 + s}
                out = root / f"{arm}_{f}_{s}" / "eval" / "eval_with_train"
                for epoch in (2, 10):  # the last epoch counts (by number, not name)
                    (out / f"epoch_{epoch}").mkdir(parents=True, exist_ok=True)
                    scale = 1.0 if epoch == 10 else 0.0
                    (out / f"epoch_{epoch}" / "result.json").write_text(
                        json.dumps({k: v * scale for k, v in result.items()}))


def run_paired(monkeypatch, capsys, *args):
    """The script's ``main`` in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("pretraining_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(sys, "argv", [str(STUDY), "paired", *args])
    code = 0
    try:
        study.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_paired_command_reads_the_runs_and_reports_paired_differences(tmp_path, monkeypatch, capsys):
    write_runs(tmp_path / "runs", ["0.05", "1.0"], [0, 1, 2])
    code, out, err = run_paired(monkeypatch, capsys, "--runs_dir", str(tmp_path / "runs"), "--fractions", "0.05",
                                "1.0", "--out", str(tmp_path / "out"))
    assert code == 0, err
    table = (tmp_path / "out/table.md").read_text()
    assert out.startswith(table)
    assert "### 5 % labels, seeds 0, 1, 2" in table and "### 100 % labels, seeds 0, 1, 2" in table
    row = next(line for line in table.splitlines() if line.startswith("| pretrained - random init, differential LR"))
    # columns mAP, Car, Pedestrian, Cyclist: Car +2 [-0.48, +4.48], mAP a third of it
    assert row.split(" | ")[2] == "+2.00 [-0.48, +4.48]" and row.split(" | ")[1].startswith("+0.67")
    assert "| differential - uniform LR, random init | +0.00 [+0.00, +0.00]" in table
    summary = json.loads((tmp_path / "out/results.json").read_text())["summary"]
    assert summary["1.0"]["paired"]["pretrained - random init, differential LR"]["Car"]["diffs"] == [1.0, 2.0, 3.0]
    assert summary["1.0"]["arms"]["pre_diff"]["Car"]["mean"] == pytest.approx(53.0)
    assert (tmp_path / "out/study.png").stat().st_size > 0


def test_paired_command_names_every_missing_run_and_bad_fractions(tmp_path, monkeypatch, capsys):
    write_runs(tmp_path / "runs", ["0.2"], [0, 1], skip={("pre_flat", "0.2", 1), ("rand_diff", "0.2", 0)})
    code, _, err = run_paired(monkeypatch, capsys, "--runs_dir", str(tmp_path / "runs"), "--fractions", "0.2",
                              "--seeds", "0", "1")
    assert code != 0
    assert "missing runs" in err and "pre_flat_0.2_1" in err and "rand_diff_0.2_0" in err
    code, _, err = run_paired(monkeypatch, capsys, "--runs_dir", str(tmp_path / "runs"), "--fractions", "20")
    assert code == 2 and "--fractions 20" in err
