"""Fine-tuning on a fraction of the labelled frames (pretraining studies at 5 / 20 / 100 % labels): a
seeded subset of the training infos, and the GT-sampling database cut to the objects of those frames,
so that copy-paste augmentation cannot bring back the labels left out."""
from __future__ import annotations

from pathlib import Path
from typing import List, Set

import numpy as np

from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.datasets.holdout import holdout_indices, infos_attr, keep


def frame_of(db_info: dict) -> str:
    """The frame a GT-database object was cut from: ``image_idx`` (KITTI) or the ``<frame>_<class>_<i>.bin``
    file name OpenPCDet's custom dataset writes."""
    if "image_idx" in db_info:
        return str(db_info["image_idx"])
    stem = Path(str(db_info.get("path", ""))).stem
    suffix = f"_{db_info.get('name')}_{db_info.get('gt_idx')}"
    if not stem.endswith(suffix):
        raise ConfigError(f"--label_fraction: a GT-sampling database entry names no frame (no image_idx, path "
                          f"{db_info.get('path')!r}): cannot keep the left-out frames' objects out of gt_sampling; "
                          f"remove gt_sampling from DATA_AUGMENTOR.AUG_CONFIG_LIST for this run")
    return stem[: -len(suffix)]


def frame_ids(infos: List[dict]) -> Set[str]:
    return {str(info["point_cloud"]["lidar_idx"]) for info in infos}


def keep_label_fraction(dataset, fraction: float, seed: int) -> List[int]:
    """Cut a training ``dataset`` to ``round(fraction x frames)`` frames chosen by ``seed`` (the same
    on every process) and its gt_sampling databases to their objects; returns the kept indices."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--label_fraction {fraction}: expected 0 < fraction <= 1")
    infos = getattr(dataset, infos_attr(dataset))
    if fraction == 1:
        return list(range(len(infos)))
    kept = holdout_indices(len(infos), fraction, seed) if len(infos) > 1 else [0]
    keep(dataset, kept)
    frames = frame_ids(getattr(dataset, infos_attr(dataset)))
    augmentor = getattr(dataset, "data_augmentor", None)
    for sampler in getattr(augmentor, "data_augmentor_queue", []):
        if hasattr(sampler, "db_infos") and hasattr(sampler, "sample_groups"):
            for name, objects in sampler.db_infos.items():
                sampler.db_infos[name] = [o for o in objects if frame_of(o) in frames]
            for name in list(sampler.sample_groups):  # as OpenPCDet builds them, for the cut lists
                if not sampler.db_infos[name]:  # nothing left to paste (OpenPCDet would fail on an empty draw)
                    del sampler.sample_groups[name]
                    continue
                sampler.sample_groups[name].update(pointer=len(sampler.db_infos[name]),
                                                   indices=np.arange(len(sampler.db_infos[name])))
    return kept
