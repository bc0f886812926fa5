"""Build OpenPCDet infos and gt databases by calling OpenPCDet's own creators.

Inputs are validated first (clear errors naming file and line). A read-only source (e.g. a
shared copy of KITTI) is used through a workspace folder of symlinks. Outputs that already
exist are moved aside and restored if creation fails, so a failed run leaves the previous
state untouched and no partial files behind.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

from easydict import EasyDict

from pcdet_ext.config import cfg_from_yaml_file, find_config
from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.openpcdet.datasets import validation

KITTI_CLASSES = ("Car", "Pedestrian", "Cyclist")
KITTI_OUTPUTS = ("kitti_infos_train.pkl", "kitti_infos_val.pkl", "kitti_infos_trainval.pkl",
                 "kitti_infos_test.pkl", "kitti_dbinfos_train.pkl", "gt_database")
CUSTOM_OUTPUTS = ("custom_infos_train.pkl", "custom_infos_val.pkl", "custom_dbinfos_train.pkl", "gt_database")


def _load_dataset_cfg(dataset_cfg, default_ref: str) -> EasyDict:
    if isinstance(dataset_cfg, dict):
        return EasyDict(dataset_cfg)
    path = Path(dataset_cfg) if dataset_cfg else find_config(default_ref)
    return cfg_from_yaml_file(path)


def _inject_path(module) -> None:
    """Upstream's create_* functions use ``Path``, which the module imports only under __main__."""
    if not hasattr(module, "Path"):
        module.Path = pathlib.Path


def make_workspace(src: Path, dst: Path, data_dirs: Sequence[str], extra_splits: Sequence[str] = ()) -> Path:
    """``dst`` mirrors ``src``'s data folders as symlinks and copies its ImageSets; empty
    splits listed in ``extra_splits`` are added when ``src`` has none."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if src == dst:
        return dst
    (dst / "ImageSets").mkdir(parents=True, exist_ok=True)
    for sub in data_dirs:
        link, target = dst / sub, src / sub
        if not target.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() != target:
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    for split_file in (src / "ImageSets").glob("*.txt"):
        shutil.copyfile(split_file, dst / "ImageSets" / split_file.name)
    for split in extra_splits:
        path = dst / "ImageSets" / f"{split}.txt"
        if not path.exists():
            path.write_text("")
    return dst


@contextlib.contextmanager
def _transaction(root: Path, outputs: Sequence[str]) -> Iterator[None]:
    """Move existing outputs aside; on failure remove new ones and restore, on success drop the backup."""
    backup = root / f".create_data_backup_{os.getpid()}"
    backup.mkdir()
    for name in outputs:
        if (root / name).exists():
            (root / name).rename(backup / name)
    try:
        yield
    except BaseException:
        for name in outputs:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            if (backup / name).exists():
                (backup / name).rename(path)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup)


def create_kitti(data_path: Path, out_dir: Optional[Path] = None, dataset_cfg=None,
                 class_names: Sequence[str] = KITTI_CLASSES, workers: int = 2) -> Path:
    """Validate a KITTI-layout folder and run OpenPCDet's ``create_kitti_infos`` on it.

    ``out_dir`` (default: ``data_path``) receives the infos and gt database; when it differs
    from ``data_path`` the data is linked, not copied. Returns the dataset root to train on.
    """
    require_pcdet("create_kitti")
    from pcdet.datasets.kitti import kitti_dataset
    src = Path(data_path)
    validation.validate_kitti(src)
    root = make_workspace(src, Path(out_dir or src),
                          [f"training/{d}" for d in ("velodyne", "calib", "label_2", "image_2", "planes")] +
                          ["testing"], extra_splits=("test",))
    (root / "testing").mkdir(exist_ok=True)
    if not (root / "ImageSets" / "test.txt").exists():
        (root / "ImageSets" / "test.txt").write_text("")
    cfg = _load_dataset_cfg(dataset_cfg, "cfgs/dataset_configs/kitti_dataset.yaml")
    _inject_path(kitti_dataset)
    with _transaction(root, KITTI_OUTPUTS):
        kitti_dataset.create_kitti_infos(dataset_cfg=cfg, class_names=list(class_names), data_path=root,
                                         save_path=root, workers=workers)
    return root


def create_custom(data_path: Path, class_names: Sequence[str], out_dir: Optional[Path] = None,
                  dataset_cfg=None, workers: int = 2) -> Path:
    """Validate a custom-layout folder and run OpenPCDet's ``create_custom_infos`` on it."""
    require_pcdet("create_custom")
    from pcdet.datasets.custom import custom_dataset
    cfg = _load_dataset_cfg(dataset_cfg, "cfgs/dataset_configs/custom_dataset.yaml")
    src = Path(data_path)
    num_features = len(cfg.POINT_FEATURE_ENCODING.src_feature_list)
    validation.validate_custom(src, class_names, num_features)
    root = make_workspace(src, Path(out_dir or src), ["points", "labels"])
    _inject_path(custom_dataset)
    with _transaction(root, CUSTOM_OUTPUTS):
        custom_dataset.create_custom_infos(dataset_cfg=cfg, class_names=list(class_names), data_path=root,
                                           save_path=root, workers=workers)
    return root


def create_unlabelled(scans: Sequence[Path], out_dir: Path, dataset_cfg=None, val_fraction: float = 0.25) -> Path:
    """Unlabelled scans (KITTI ``.bin`` float32 x, y, z, intensity, or ``.npy``) -> OpenPCDet's custom
    layout for self-supervised pretraining: ``points/<id>.npy`` with the config's
    ``src_feature_list`` columns, ImageSets, and infos without annotations (OpenPCDet's own
    ``get_infos(has_label=False)``). Pretrain on it with gt_sampling disabled."""
    require_pcdet("create_unlabelled")
    import pickle

    import numpy as np
    from pcdet.datasets.custom import custom_dataset
    cfg = _load_dataset_cfg(dataset_cfg, "cfgs/dataset_configs/custom_dataset.yaml")
    num_features = len(cfg.POINT_FEATURE_ENCODING.src_feature_list)
    scans = sorted(Path(s) for s in scans)
    if not scans:
        raise FileNotFoundError("create_unlabelled: no scans given")
    root = Path(out_dir)
    (root / "points").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets").mkdir(exist_ok=True)
    ids = []
    for scan in scans:
        if scan.suffix == ".bin":
            pts = np.fromfile(scan, dtype=np.float32, count=4 * validation.check_velodyne(scan)).reshape(-1, 4)
        else:
            pts = np.load(scan).astype(np.float32)
        if pts.ndim != 2 or pts.shape[1] < num_features:
            raise validation.DatasetFormatError(f"{scan}: expected N x >={num_features} points, got {pts.shape}")
        np.save(root / "points" / f"{scan.stem}.npy", np.ascontiguousarray(pts[:, :num_features]))
        ids.append(scan.stem)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    splits = {"train": ids[:len(ids) - n_val] or ids, "val": ids[len(ids) - n_val:] or ids}
    for split, names in splits.items():
        (root / "ImageSets" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    _inject_path(custom_dataset)
    from pcdet.utils import common_utils
    dataset = custom_dataset.CustomDataset(dataset_cfg=cfg, class_names=[], root_path=root, training=False,
                                           logger=common_utils.create_logger())
    with _transaction(root, ("custom_infos_train.pkl", "custom_infos_val.pkl")):
        for split in ("train", "val"):
            dataset.set_split(split)
            infos = dataset.get_infos([], num_workers=1, has_label=False, num_features=num_features)
            with open(root / f"custom_infos_{split}.pkl", "wb") as f:
                pickle.dump(infos, f)
    return root
