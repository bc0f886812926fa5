"""tools/train.py --label_fraction: a seeded subset of the labelled frames, and gt_sampling cut to their
objects (copy-paste must not bring back the labels left out)."""
import subprocess
import sys

import pytest

from pcdet_ext.config import ConfigError
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.startup.args import load_config
from pcdet_ext.openpcdet.datasets.label_fraction import frame_ids, frame_of, keep_label_fraction
from tier2 import REPO, SMALL

SECOND_FT = "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase1.yaml"


def train_set(root):
    cfg = load_config(SECOND_FT, ["DATA_CONFIG.DATA_PATH", str(root), *SMALL])
    (dataset, _, _), _ = builders.build_loaders(cfg, root, batch_size=2, workers=0)
    return dataset


def database(dataset):
    sampler = next(s for s in dataset.data_augmentor.data_augmentor_queue if hasattr(s, "db_infos"))
    return sampler


def test_subset_is_seeded_and_the_database_keeps_only_its_objects(synthetic_isarc):
    full = train_set(synthetic_isarc)
    before = {name: list(objs) for name, objs in database(full).db_infos.items()}
    cut = train_set(synthetic_isarc)
    kept = keep_label_fraction(cut, 0.5, seed=3)
    assert kept == keep_label_fraction(train_set(synthetic_isarc), 0.5, seed=3)  # every process keeps the same
    assert len(cut) == len(kept) == round(0.5 * len(full)) >= 1
    frames = frame_ids(cut.custom_infos)
    assert frames < frame_ids(full.custom_infos)
    sampler = database(cut)
    for name, objs in sampler.db_infos.items():
        assert [o["path"] for o in objs] == [o["path"] for o in before[name] if frame_of(o) in frames]  # all, only
        assert sampler.sample_groups[name]["pointer"] == len(objs) and len(sampler.sample_groups[name]["indices"]) == len(objs)
    assert sum(map(len, sampler.db_infos.values())) < sum(map(len, before.values()))
    for i in range(len(cut)):  # gt_sampling draws from the cut database (a class left empty pastes nothing)
        assert len(cut[i]["gt_boxes"]) >= 0


def test_frame_of_reads_kitti_and_custom_entries_and_refuses_others():
    assert frame_of({"image_idx": "000007", "path": "gt_database/000007_Car_0.bin"}) == "000007"
    assert frame_of({"name": "roller", "gt_idx": 2, "path": "gt_database/site_03_roller_2.bin"}) == "site_03"
    with pytest.raises(ConfigError, match="gt_sampling"):
        frame_of({"name": "roller", "gt_idx": 2, "path": "db/roller.bin"})
    with pytest.raises(ConfigError, match="0 < fraction"):
        keep_label_fraction(object(), 0.0, 0)


def test_train_tool_reports_the_subset(synthetic_isarc, tmp_path):
    import os
    env = dict(os.environ, PCDET_EXT_OUTPUT_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools/train.py"), "--cfg_file", SECOND_FT, "--batch_size", "2", "--epochs", "3",
           "--max_iters_per_epoch", "1", "--extra_tag", "labels", "--skip_eval", "--label_fraction", "0.5",
           "--label_seed", "1", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--label_fraction 0.5 (--label_seed 1): training on 2 of 4 labelled frames" in res.stderr + res.stdout
    bad = subprocess.run(cmd + ["--label_fraction", "0"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--label_fraction 0.0: expected 0 < fraction <= 1" in bad.stderr


def test_a_class_left_without_objects_pastes_none(synthetic_isarc):
    cut = train_set(synthetic_isarc)
    for obj in database(cut).db_infos["roller"]:  # every roller from a frame that is not in the set
        obj["path"] = f"gt_database/elsewhere_roller_{obj['gt_idx']}.bin"
    keep_label_fraction(cut, 0.5, seed=3)
    sampler = database(cut)
    assert sampler.db_infos["roller"] == [] and set(sampler.sample_groups) == {"dumptruck", "excavator", "grader"}
    for i in range(len(cut)):
        cut[i]  # OpenPCDet's gt_sampling would stack an empty draw and fail
