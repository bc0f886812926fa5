"""Tier 2: benchmarks/pretraining_study.py cpu end to end at a tiny budget: the occupancy gate, every arm
on each seed's labelled subset, and paired differences that are the per-seed differences of the runs."""
import json
import subprocess
import sys

import pytest

from tier2 import REPO


def test_cpu_study_runs_every_arm_and_pairs_them_by_seed(tmp_path):
    out = tmp_path / "study"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/pretraining_study.py"), "cpu", "--frames", "8",
                          "--pretrain_iters", "3", "--finetune_iters", "3", "--seeds", "0", "1", "--probe",
                          "--label_fraction", "0.5", "--workers", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "held-out masked-occupancy AP" in res.stdout and (out / "study.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    gate = data["meta"]["occupancy_gate"]
    assert 0 <= gate["pretrained"]["occ_ap"] <= 1 and 0 <= gate["random encoder"]["occ_ap"] <= 1
    assert data["meta"]["pretraining_passes_control"] == (gate["pretrained"]["occ_ap"] > gate["random encoder"]["occ_ap"])
    runs = data["runs"]["0.5"]
    arms = ("rand_diff", "pre_diff", "rand_flat", "pre_flat", "rand_probe", "pre_probe")
    assert sorted(runs) == ["0", "1"] and all(sorted(runs[s]) == sorted(arms) for s in runs)
    assert all(r["labelled frames"] == 3 for s in runs for r in runs[s].values())  # half of the 6 training frames
    for s in runs:  # pretrained weights reach the pretrained arms; the LR rule changes training
        assert runs[s]["pre_diff"]["held-out loss"] != runs[s]["rand_diff"]["held-out loss"]
        assert runs[s]["rand_flat"]["held-out loss"] != runs[s]["rand_diff"]["held-out loss"]
    paired = data["summary"]["0.5"]["paired"]
    assert len(paired) == 5
    d = paired["pretrained - random init, differential LR"]["held-out loss"]
    assert d["diffs"] == pytest.approx([runs[s]["pre_diff"]["held-out loss"] - runs[s]["rand_diff"]["held-out loss"]
                                        for s in ("0", "1")])
    assert d["low"] <= d["mean"] <= d["high"]
    assert "| pretrained - random encoder, frozen probe |" in (out / "table.md").read_text()
