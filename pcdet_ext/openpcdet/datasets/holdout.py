"""A held-out part of an OpenPCDet training split: frames that train nothing and select the model
(stage best, early stopping), so that the frames a result is reported on selected nothing.

OpenPCDet's datasets keep their frames as a list of infos (``kitti_infos``, ``custom_infos``, or
``infos`` in Waymo / nuScenes style); a subset is that list cut, on the training dataset (the held-out
frames leave it) and on a test-mode copy reading the training split (no augmentation).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from pcdet_ext.config import ConfigError

INFO_LISTS = ("kitti_infos", "custom_infos", "infos")


def infos_attr(dataset) -> str:
    """The name of the list of frame infos ``dataset`` iterates over."""
    for name in INFO_LISTS:
        if isinstance(getattr(dataset, name, None), list):
            return name
    raise ConfigError(f"dataset.selection: train_holdout: {type(dataset).__name__} keeps its frames in none of "
                      f"{list(INFO_LISTS)}; select on the validation split instead (dataset.selection: val)")


def holdout_indices(num_frames: int, fraction: float, seed: int) -> List[int]:
    """``round(fraction x num_frames)`` (at least 1, leaving at least 1) frame indices, chosen by ``seed``:
    the same on every process and every run."""
    if num_frames < 2:
        raise ConfigError(f"dataset.selection: train_holdout needs at least 2 training frames, got {num_frames}")
    n = min(max(1, int(round(fraction * num_frames))), num_frames - 1)
    return sorted(np.random.RandomState(seed).permutation(num_frames)[:n].tolist())


def keep(dataset, indices: Sequence[int]) -> None:
    """Cut ``dataset``'s infos (and a sampler's length, see :func:`resize_sampler`) to ``indices``."""
    name = infos_attr(dataset)
    infos = getattr(dataset, name)
    setattr(dataset, name, [infos[i] for i in indices])


def resize_sampler(sampler, dataset) -> None:
    """A DistributedSampler built over ``dataset`` before it was cut: its lengths for the new size."""
    if sampler is not None and hasattr(sampler, "num_replicas"):
        sampler.dataset = dataset
        sampler.num_samples = -(-len(dataset) // sampler.num_replicas)
        sampler.total_size = sampler.num_samples * sampler.num_replicas
