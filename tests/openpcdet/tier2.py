"""Helpers shared by the tier-2 tests."""
from pathlib import Path

import numpy as np

from pcdet_ext.openpcdet.datasets import synthetic

REPO = Path(__file__).resolve().parents[2]

KITTI_TEST_SCENE = synthetic.SceneSpec(fov_deg=70.0, max_range=38.0, sensor=synthetic.SensorSpec(num_azimuth=768))
CUSTOM_TEST_SCENE = synthetic.SceneSpec(max_range=36.0, sensor=synthetic.SensorSpec(
    elevation_deg=(15.0, -25.0), num_beams=64, num_azimuth=768, height=2.0, max_range=60.0))


def set_voxelization(cfg, voxel_size, max_voxels):
    for proc in cfg.DATA_CONFIG.DATA_PROCESSOR:
        if proc.NAME == "transform_points_to_voxels":
            proc.VOXEL_SIZE = list(voxel_size)
            proc.MAX_NUMBER_OF_VOXELS = {"train": max_voxels, "test": max_voxels}


def seed_everything(seed=0):
    import torch
    np.random.seed(seed)
    torch.manual_seed(seed)
