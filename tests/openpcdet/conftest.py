"""Tier 2: tests that run unmodified OpenPCDet (PCDET_ROOT or an installed pcdet) on this CPU."""
import sys
from pathlib import Path

import numpy as np
import pytest

import pcdet_ext
from pcdet_ext.datasets import create_infos, synthetic, synthetic_writer

REPO = Path(__file__).resolve().parents[2]


def _why_no_openpcdet():
    try:
        pcdet_ext.import_pcdet()
        return None
    except ImportError as exc:
        return f"tier 2 needs OpenPCDet: {exc}"


_REASON = _why_no_openpcdet()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if "tests/openpcdet" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pcdet_tools() -> Path:
    """OpenPCDet's tools/ folder on sys.path (train_utils lives there, not in the pcdet package)."""
    import pcdet
    tools = Path(pcdet.__file__).resolve().parent.parent / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    return tools


KITTI_TEST_SCENE = synthetic.SceneSpec(fov_deg=70.0, max_range=38.0, sensor=synthetic.SensorSpec(num_azimuth=768))
CUSTOM_TEST_SCENE = synthetic.SceneSpec(max_range=36.0, sensor=synthetic.SensorSpec(
    elevation_deg=(15.0, -25.0), num_beams=64, num_azimuth=768, height=2.0, max_range=60.0))


@pytest.fixture(scope="session")
def synthetic_kitti(tmp_path_factory) -> Path:
    root = synthetic_writer.write_kitti(tmp_path_factory.mktemp("kitti") / "synthetic_kitti", num_frames=6,
                                        seed=7, val_fraction=0.34, spec=KITTI_TEST_SCENE)
    return create_infos.create_kitti(root, workers=1)


@pytest.fixture(scope="session")
def synthetic_isarc(tmp_path_factory) -> Path:
    root = synthetic_writer.write_custom(tmp_path_factory.mktemp("isarc") / "synthetic_isarc", num_frames=6,
                                         seed=7, val_fraction=0.34, spec=CUSTOM_TEST_SCENE)
    return create_infos.create_custom(root, synthetic_writer.CONSTRUCTION_CLASSES,
                                      dataset_cfg=REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml", workers=1)


def set_voxelization(cfg, voxel_size, max_voxels):
    for proc in cfg.DATA_CONFIG.DATA_PROCESSOR:
        if proc.NAME == "transform_points_to_voxels":
            proc.VOXEL_SIZE = list(voxel_size)
            proc.MAX_NUMBER_OF_VOXELS = {"train": max_voxels, "test": max_voxels}


def seed_everything(seed=0):
    import torch
    np.random.seed(seed)
    torch.manual_seed(seed)
