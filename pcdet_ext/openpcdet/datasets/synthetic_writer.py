"""Write synthetic scenes as the datasets OpenPCDet reads: KITTI layout and custom layout.

The dataset is built in a temporary sibling folder and renamed into place at the end, so
an interrupted run leaves nothing half-written. An existing non-empty target is refused.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from pcdet_ext.openpcdet.datasets.kitti_format import Calibration, kitti_label_lines, write_gray_png
from pcdet_ext.openpcdet.datasets.synthetic import CONSTRUCTION_SCENE, KITTI_SCENE, SceneSpec, class_counts_for, generate_scene
from pcdet_ext.utils.console import progress

CONSTRUCTION_CLASSES = ("dumptruck", "excavator", "grader", "roller")


def _prepare(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _finish(tmp: Path, out_dir: Path) -> Path:
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def _splits(num_frames: int, val_fraction: float) -> Tuple[list, list]:
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (a train and a val frame), got {num_frames}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = [f"{i:06d}" for i in range(num_frames)]
    num_val = min(max(1, int(round(num_frames * val_fraction))), num_frames - 1)
    return ids[:-num_val], ids[-num_val:]


def _write_imagesets(root: Path, train: list, val: list, extra: Optional[Dict[str, list]] = None) -> None:
    sets = {"train": train, "val": val, "trainval": train + val, **(extra or {})}
    (root / "ImageSets").mkdir(parents=True, exist_ok=True)
    for name, ids in sets.items():
        (root / "ImageSets" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def write_kitti(out_dir: Path, num_frames: int = 8, seed: int = 0, val_fraction: float = 0.25,
                spec: SceneSpec = KITTI_SCENE) -> Path:
    """KITTI object layout (training/{velodyne,calib,label_2,image_2,planes}, ImageSets/ with an
    empty test split) with Car/Pedestrian/Cyclist labels in camera coordinates."""
    out_dir = Path(out_dir)
    train, val = _splits(num_frames, val_fraction)
    tmp = _prepare(out_dir)
    try:
        calib = Calibration()
        sub = {k: tmp / "training" / k for k in ("velodyne", "calib", "label_2", "image_2", "planes")}
        for d in sub.values():
            d.mkdir(parents=True)
        (tmp / "testing").mkdir()
        for i, frame in enumerate(progress(train + val, desc="synthetic KITTI frames", unit="frame")):
            scene = generate_scene(seed * 100003 + i, spec)
            scene.points.astype(np.float32).tofile(sub["velodyne"] / f"{frame}.bin")
            (sub["calib"] / f"{frame}.txt").write_text(calib.to_text())
            (sub["label_2"] / f"{frame}.txt").write_text(
                "".join(kitti_label_lines(scene.boxes, list(scene.names), scene.visibility, calib)))
            write_gray_png(sub["image_2"] / f"{frame}.png")
            (sub["planes"] / f"{frame}.txt").write_text(calib.road_plane_text(spec.sensor.height))
        _write_imagesets(tmp, train, val, {"test": []})
        return _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_custom(out_dir: Path, num_frames: int = 8, seed: int = 0, val_fraction: float = 0.25,
                 class_names: Sequence[str] = CONSTRUCTION_CLASSES, with_intensity: bool = False,
                 spec: SceneSpec = CONSTRUCTION_SCENE) -> Path:
    """OpenPCDet custom layout: points/<id>.npy (x, y, z[, intensity]) float32,
    labels/<id>.txt lines ``x y z dx dy dz heading class``, ImageSets/{train,val}.txt."""
    out_dir = Path(out_dir)
    train, val = _splits(num_frames, val_fraction)
    spec = SceneSpec(class_counts=class_counts_for(class_names), min_range=spec.min_range,
                     max_range=spec.max_range, fov_deg=spec.fov_deg, num_clutter=spec.num_clutter,
                     sensor=spec.sensor)
    tmp = _prepare(out_dir)
    try:
        (tmp / "points").mkdir()
        (tmp / "labels").mkdir()
        for i, frame in enumerate(progress(train + val, desc="synthetic frames", unit="frame")):
            scene = generate_scene(seed * 100003 + i, spec)
            if len(scene.boxes) == 0:
                raise RuntimeError(f"synthetic frame {frame} has no objects; widen the scene ranges")
            pts = scene.points if with_intensity else scene.points[:, :3]
            np.save(tmp / "points" / f"{frame}.npy", np.ascontiguousarray(pts, dtype=np.float32))
            (tmp / "labels" / f"{frame}.txt").write_text("".join(
                f"{b[0]:.3f} {b[1]:.3f} {b[2]:.3f} {b[3]:.3f} {b[4]:.3f} {b[5]:.3f} {b[6]:.4f} {n}\n"
                for b, n in zip(scene.boxes, scene.names)))
        _write_imagesets(tmp, train, val)
        return _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
