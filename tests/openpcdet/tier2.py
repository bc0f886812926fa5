"""Helpers shared by the tier-2 tests."""
import os
import subprocess
import sys
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


CONFIGS = {  # the shipped 4-class configs per encoder; VoxelNeXt needs OpenPCDet master (v0.6.0 lacks it)
    "voxelnext": ("cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml",
                  "cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml"),
    "second": ("cfgs/custom_models/rmae_cmae_second_isarc_4class_pretraining_phase1.yaml",
               "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase1.yaml"),
}
SMALL = ["DATA_CONFIG.POINT_CLOUD_RANGE", "[-25.6, -25.6, -4, 25.6, 25.6, 4]",
         "DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE", "[0.2, 0.2, 0.2]"]
RAW = REPO.parent / "shared" / "data" / "kitti_raw_2011_09_26" / "velodyne"


def has_voxelnext():
    from pcdet.models import backbones_3d, dense_heads
    return "VoxelResBackBone8xVoxelNeXt" in backbones_3d.__all__ and "VoxelNeXtHead" in dense_heads.__all__


def phase_cfgs(phase: int):
    """(pretraining, fine-tune) configs of ``phase``: VoxelNeXt where OpenPCDet has it, else SECOND."""
    pre, fine = CONFIGS["voxelnext" if has_voxelnext() else "second"]
    return pre.replace("phase1", f"phase{phase}"), fine.replace("phase1", f"phase{phase}")


def tool(script, *args, out_root, timeout=600, launcher=None):
    """A tools/ script (or ``dist_train.sh 2`` with ``launcher``) in a subprocess, outputs under ``out_root``."""
    env = dict(os.environ, PCDET_EXT_OUTPUT_ROOT=str(out_root), OMP_NUM_THREADS="1")
    if launcher and script:
        env["TRAIN_SCRIPT"] = str(REPO / "tools" / script)
    cmd = ["bash", str(REPO / "tools/scripts/dist_train.sh"), "2"] if launcher else [sys.executable, str(REPO / "tools" / script)]
    return subprocess.run(cmd + list(args), cwd=REPO / "tools", env=env, capture_output=True, text=True, timeout=timeout)


def small_cfg(rel, data_path):
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    cfg = cfg_from_yaml_file(REPO / rel)
    cfg_from_list(SMALL, cfg)
    cfg.DATA_CONFIG.DATA_PATH = str(data_path)
    return cfg


def assert_other_codebooks_refuse(model, dataset, models, data: bytes) -> None:
    """A server whose codebooks differ from the ones ``data`` was coded with (another checkpoint)
    refuses the frame by model id; the model is restored after."""
    import pytest
    from pcdet_ext.algorithms.bitstream import BitstreamError
    from pcdet_ext.deploy import runtime
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.quantizer.codebooks[0].data += 0.01
        with pytest.raises(BitstreamError, match="refusing to decode"):
            runtime.ServerRuntime(model, dataset, models).decode(data)
    finally:
        model.load_state_dict(saved)


def main_in_process(capsys, name: str, *args):
    """(exit code, stderr lines) of ``pcdet_ext.cli.<name>.main(args)`` in this process: for refusals of
    bad arguments, which need no fresh interpreter (tool runs are subprocesses, as users run them)."""
    import importlib
    capsys.readouterr()
    code = importlib.import_module(f"pcdet_ext.cli.{name}").main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()
