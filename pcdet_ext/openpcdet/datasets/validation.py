"""Checks of dataset files before OpenPCDet reads them, with errors naming file and line."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np


class DatasetFormatError(ValueError):
    """A dataset file does not have the layout OpenPCDet expects."""


def read_split(root: Path, split: str) -> List[str]:
    path = Path(root) / "ImageSets" / f"{split}.txt"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: split file missing (one frame id per line expected)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_velodyne(path: Path) -> int:
    """A KITTI .bin: float32 x, y, z, intensity per point. Returns the point count."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: velodyne file missing")
    size = path.stat().st_size
    if size == 0 or size % 16:
        raise DatasetFormatError(
            f"{path}: {size} bytes is not a positive multiple of 16 (float32 x, y, z, intensity per point); "
            "the file is truncated or not a KITTI velodyne scan")
    return size // 16


def check_custom_points(path: Path, num_features: int) -> int:
    """A custom-layout .npy: float (N, num_features). Returns N."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: points file missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable .npy array ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] != num_features or arr.dtype.kind != "f":
        raise DatasetFormatError(f"{path}: expected a float array of shape (N, {num_features}) "
                                 f"(POINT_FEATURE_ENCODING.src_feature_list), got {arr.dtype} {arr.shape}")
    return int(arr.shape[0])


def parse_custom_labels(path: Path, class_names: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Lines ``x y z dx dy dz heading class``; every class must be in ``class_names``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: label file missing")
    lines = path.read_text().splitlines()
    boxes, names = [], []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 8:
            raise DatasetFormatError(f"{path}:{no}: expected 8 fields 'x y z dx dy dz heading class', "
                                     f"got {len(fields)}: {line!r}")
        try:
            box = [float(v) for v in fields[:7]]
        except ValueError as exc:
            raise DatasetFormatError(f"{path}:{no}: non-numeric box value in {line!r}") from exc
        if not all(np.isfinite(box)) or min(box[3:6]) <= 0:
            raise DatasetFormatError(f"{path}:{no}: box values must be finite with dx, dy, dz > 0: {line!r}")
        if fields[7] not in class_names:
            raise DatasetFormatError(f"{path}:{no}: class {fields[7]!r} is not in the config's CLASS_NAMES "
                                     f"{list(class_names)}")
        boxes.append(box)
        names.append(fields[7])
    if not boxes:
        raise DatasetFormatError(f"{path}: empty label file; OpenPCDet's CustomDataset needs at least one box "
                                 "per labelled frame (drop the frame from ImageSets or label it)")
    return np.asarray(boxes, dtype=np.float32), names


def parse_kitti_labels(path: Path) -> List[str]:
    """KITTI label_2 lines: 15 fields (16 with a score). Returns the object types."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: label file missing")
    types = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) not in (15, 16):
            raise DatasetFormatError(f"{path}:{no}: expected 15 KITTI label fields, got {len(fields)}: {line!r}")
        try:
            [float(v) for v in fields[1:]]
        except ValueError as exc:
            raise DatasetFormatError(f"{path}:{no}: non-numeric value in {line!r}") from exc
        types.append(fields[0])
    return types


def validate_kitti(root: Path, splits: Sequence[str] = ("train", "val")) -> int:
    """Check every frame of the labelled splits; returns the number of frames checked."""
    root = Path(root)
    count = 0
    for split in splits:
        for frame in read_split(root, split):
            base = root / "training"
            check_velodyne(base / "velodyne" / f"{frame}.bin")
            for sub, ext in (("calib", "txt"), ("image_2", "png")):
                if not (base / sub / f"{frame}.{ext}").is_file():
                    raise DatasetFormatError(f"{base / sub / f'{frame}.{ext}'}: missing (frame {frame} of {split})")
            parse_kitti_labels(base / "label_2" / f"{frame}.txt")
            count += 1
    return count


def validate_custom(root: Path, class_names: Sequence[str], num_features: int,
                    splits: Sequence[str] = ("train", "val")) -> int:
    """Check points and labels of every frame; returns the number of frames checked."""
    root = Path(root)
    count = 0
    for split in splits:
        for frame in read_split(root, split):
            check_custom_points(root / "points" / f"{frame}.npy", num_features)
            parse_custom_labels(root / "labels" / f"{frame}.txt", class_names)
            count += 1
    return count
