"""Tier 2: what runs on the CPU of a CUDA machine (model construction before .cuda()) must not need
the CPU runtime's patches, which are off there."""
import numpy as np
import pytest

from pcdet_ext.config import cfg_from_yaml_file
from pcdet_ext.openpcdet.cpu.spconv_patch import stock_conv_forward
from pcdet_ext.engine.startup.args import load_config
from tier2 import REPO

SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "cfgs").glob("*/rmae_cmae*.yaml"))


def test_every_shipped_config_is_covered():
    assert len(SHIPPED) >= 6 and any("pretraining" in p for p in SHIPPED) and any("finetune" in p for p in SHIPPED)


@pytest.mark.parametrize("rel", SHIPPED)
def test_shipped_rmae_configs_build_their_backbone_with_stock_spconv(rel):
    from pcdet.models import backbones_3d
    from pcdet_ext.openpcdet.models.backbones_3d import __all__ as ours
    encoder = cfg_from_yaml_file(REPO / rel).MODEL.BACKBONE_3D.get("ENCODER", "VoxelResBackBone8xVoxelNeXt")
    if encoder not in backbones_3d.__all__:
        pytest.skip(f"this OpenPCDet has no {encoder} (v0.6.0 predates VoxelNeXt)")
    cfg = load_config(rel, None)
    bb_cfg = cfg.MODEL.BACKBONE_3D
    data = cfg.DATA_CONFIG
    voxel = next(p for p in data.DATA_PROCESSOR if p.NAME == "transform_points_to_voxels").VOXEL_SIZE
    pc_range = np.array(data.POINT_CLOUD_RANGE, dtype=np.float64)
    grid = np.round((pc_range[3:] - pc_range[:3]) / np.array(voxel)).astype(np.int64)
    with stock_conv_forward():
        bb = ours[bb_cfg.NAME](model_cfg=bb_cfg, input_channels=len(data.POINT_FEATURE_ENCODING.used_feature_list),
                               grid_size=grid, voxel_size=voxel, point_cloud_range=list(pc_range))
    if bb_cfg.PRETRAINING:
        assert bb.occ_decoder is not None and len(bb._encoded_shape) in (2, 3)
