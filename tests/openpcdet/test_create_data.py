"""tools/create_data.py through OpenPCDet's own info creators; bad inputs leave nothing behind."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tier2 import REPO
from pcdet_ext.openpcdet.datasets import create_infos
from pcdet_ext.openpcdet.datasets import synthetic_writer
from pcdet_ext.openpcdet.datasets.validation import DatasetFormatError

CLASSES = list(synthetic_writer.CONSTRUCTION_CLASSES)
ISARC_CFG = REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml"


def test_real_kitti_frames_through_create_data_cli(kitti_mini, tmp_path):
    out = tmp_path / "kitti_mini"
    proc = subprocess.run([sys.executable, str(REPO / "tools/create_data.py"), "kitti", "--data_path", str(kitti_mini),
                           "--out_dir", str(out), "--workers", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "kitti_infos_train.pkl", "rb") as f:
        infos = pickle.load(f)
    assert len(infos) == 8 and "gt_boxes_lidar" in infos[0]["annos"]
    assert infos[0]["annos"]["num_points_in_gt"].max() > 50  # points_in_boxes on real scans
    with open(out / "kitti_dbinfos_train.pkl", "rb") as f:
        db = pickle.load(f)
    assert len(db["Car"]) > 0 and (out / db["Car"][0]["path"]).is_file()
    assert (out / "training" / "velodyne").is_symlink()  # read-only source linked, not copied


def test_custom_4class_infos(synthetic_isarc):
    with open(synthetic_isarc / "custom_infos_train.pkl", "rb") as f:
        infos = pickle.load(f)
    names = set(np.concatenate([i["annos"]["name"] for i in infos]))
    assert names <= set(CLASSES) and len(names) >= 3
    with open(synthetic_isarc / "custom_dbinfos_train.pkl", "rb") as f:
        assert set(pickle.load(f)) <= set(CLASSES)


@pytest.fixture()
def fresh_custom(tmp_path):
    return synthetic_writer.write_custom(tmp_path / "c", num_frames=3, seed=3)


def test_bad_custom_label_fails_before_writing(fresh_custom):
    (fresh_custom / "labels" / "000001.txt").write_text("1 2 0 9 3 4 0.1 dumptruck\n1 2 0 9 3 4 0.1 crane\n")
    before = sorted(p.name for p in fresh_custom.iterdir())
    with pytest.raises(DatasetFormatError, match=r"000001.txt:2: class 'crane'"):
        create_infos.create_custom(fresh_custom, CLASSES, dataset_cfg=ISARC_CFG)
    assert sorted(p.name for p in fresh_custom.iterdir()) == before


def test_failure_inside_openpcdet_restores_previous_outputs(fresh_custom, monkeypatch):
    create_infos.create_custom(fresh_custom, CLASSES, dataset_cfg=ISARC_CFG, workers=1)
    good = (fresh_custom / "custom_infos_train.pkl").read_bytes()
    from pcdet.datasets.custom import custom_dataset

    def crash(*args, **kwargs):
        (fresh_custom / "custom_infos_train.pkl").write_bytes(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(custom_dataset.CustomDataset, "create_groundtruth_database", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        create_infos.create_custom(fresh_custom, CLASSES, dataset_cfg=ISARC_CFG, workers=1)
    assert (fresh_custom / "custom_infos_train.pkl").read_bytes() == good
    assert (fresh_custom / "gt_database").is_dir()
    assert not [p for p in fresh_custom.iterdir() if p.name.startswith(".create_data_backup")]


def test_corrupt_velodyne_fails_before_writing(tmp_path):
    root = synthetic_writer.write_kitti(tmp_path / "k", num_frames=2, seed=1)
    velo = root / "training" / "velodyne" / "000001.bin"
    velo.write_bytes(velo.read_bytes()[:-6])
    with pytest.raises(DatasetFormatError, match="000001.bin: .* not a positive multiple of 16"):
        create_infos.create_kitti(root)
    assert not list(root.glob("*.pkl")) and not (root / "gt_database").exists()
