"""R-MAE radial / random voxel masking: ratios, independence, reproducibility, bad input."""
import numpy as np
import pytest
import torch

from pcdet_ext.datasets import synthetic
from pcdet_ext.pretraining import MaskingConfig, mask_voxels

VOXEL = (0.1, 0.1, 0.2)
PC_RANGE = (-70.4, -70.4, -6.0, 70.4, 70.4, 10.0)
GRID = (1408, 1408, 80)
SPEC = synthetic.SceneSpec(max_range=60.0, sensor=synthetic.SensorSpec(num_azimuth=512, height=2.0, max_range=70.0))


def voxelize(points, b):
    idx = np.floor((points[:, :3] - np.array(PC_RANGE[:3])) / np.array(VOXEL)).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(GRID)), axis=1)
    idx = np.unique(idx[ok], axis=0)
    return torch.from_numpy(np.c_[np.full(len(idx), b), idx[:, 2], idx[:, 1], idx[:, 0]])


@pytest.fixture(scope="module")
def batches():
    out = []
    for i in range(6):
        coords = torch.cat([voxelize(synthetic.generate_scene(100 + 2 * i + b, SPEC).points, b) for b in range(2)])
        out.append(coords)
    return out


@pytest.mark.parametrize("cfg", [
    MaskingConfig(masked_ratio=0.8),
    MaskingConfig(masked_ratio=0.6, use_bernoulli=False),
    MaskingConfig(masked_ratio=0.9, two_stage=False),
    MaskingConfig(masked_ratio=0.7, mask_type="random"),
])
def test_achieved_ratio_within_two_percent(batches, cfg):
    masked = total = 0
    for seed, coords in enumerate(batches):
        res = mask_voxels(coords, 2, VOXEL, PC_RANGE, cfg, seed=seed, grid_size=GRID)
        masked += int(res.masked.sum())
        total += len(coords)
        assert res.masked.shape == (len(coords),) and res.masked.dtype == torch.bool
        assert torch.equal(res.visible, ~res.masked)  # disjoint and covering
    assert abs(masked / total - cfg.masked_ratio) < 0.02


def test_radial_masks_whole_sectors_all_around_the_sensor(batches):
    coords = batches[0]
    res = mask_voxels(coords, 2, VOXEL, PC_RANGE, MaskingConfig(masked_ratio=0.5, two_stage=False), seed=1)
    xy = (coords[:, [3, 2]].double() + 0.5) * 0.1 - 70.4
    az = torch.rad2deg(torch.atan2(xy[:, 1], xy[:, 0]))
    sector = ((az + 180) // 1).long()
    for b in range(2):
        sel = coords[:, 0] == b
        per_sector = {}
        for s, m in zip(sector[sel].tolist(), res.masked[sel].tolist()):
            per_sector.setdefault(s, set()).add(m)
        assert all(len(v) == 1 for v in per_sector.values())  # a sector is masked entirely or not at all
        masked_az = az[sel & res.masked]
        assert (masked_az < -90).any() and (masked_az > 90).any()  # all quadrants occur, not just 0-90


def test_range_aware_second_stage_follows_range_probabilities(batches):
    cfg = MaskingConfig(masked_ratio=0.6, range_mask_probs={"NEAR": 0.2, "MID": 0.6, "FAR": 1.0})
    res = mask_voxels(torch.cat(batches[:1]), 2, VOXEL, PC_RANGE, cfg, seed=3)
    r = res.ratio_per_range
    assert r["NEAR"] < r["MID"] < r["FAR"]
    assert set(r) == {"NEAR", "MID", "FAR"} and res.ratio_per_sample.shape == (2,)


def test_samples_are_independent_and_seeds_reproducible(batches):
    one = batches[0][batches[0][:, 0] == 0]
    twin = torch.cat([one, one.clone().index_fill_(1, torch.tensor([0]), 1)])  # the same frame twice
    cfg = MaskingConfig(masked_ratio=0.8)
    res = mask_voxels(twin, 2, VOXEL, PC_RANGE, cfg, seed=5)
    a, b = res.masked[: len(one)], res.masked[len(one):]
    assert not torch.equal(a, b)
    again = mask_voxels(twin, 2, VOXEL, PC_RANGE, cfg, seed=5)
    assert torch.equal(again.masked, res.masked)
    assert not torch.equal(mask_voxels(twin, 2, VOXEL, PC_RANGE, cfg, seed=6).masked, res.masked)


def test_zero_ratio_and_empty_sample():
    coords = torch.tensor([[0, 0, 5, 5], [0, 0, 6, 700]])
    assert not mask_voxels(coords, 2, VOXEL, PC_RANGE, MaskingConfig(masked_ratio=0.0)).masked.any()
    res = mask_voxels(coords, 2, VOXEL, PC_RANGE, MaskingConfig(masked_ratio=0.5))  # sample 1 has no voxels
    assert res.ratio_per_sample[1] == 0
    empty = mask_voxels(torch.zeros(0, 4, dtype=torch.long), 2, VOXEL, PC_RANGE, MaskingConfig())
    assert empty.masked.numel() == 0 and empty.ratio == 0.0


@pytest.mark.parametrize("cfg,match", [
    ({"MASKED_RATIO": 1.0}, r"MODEL.BACKBONE_3D.MASKED_RATIO: expected a value in \[0.0, 1.0\)"),
    ({"MASKED_RATIO": -0.1}, "MASKED_RATIO"),
    ({"DISTANCE_THRESHOLDS": [30, 10]}, "DISTANCE_THRESHOLDS: expected two increasing"),
    ({"RANGE_MASK_PROBS": {"NEAR": 0.5, "MID": 1.5, "FAR": 0.9}}, r"RANGE_MASK_PROBS.MID: expected a probability"),
    ({"RANGE_MASK_PROBS": {"NEAR": 0.5}}, "RANGE_MASK_PROBS: expected keys"),
    ({"NUM_ANGULAR_GROUPS": 360, "ANGULAR_GROUP_SIZE": 2}, "must be 360 degrees"),
    ({"MASK_TYPE": "block"}, "MASK_TYPE"),
])
def test_bad_config_names_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        MaskingConfig.from_cfg(cfg)


def test_config_keys_and_grid_check():
    cfg = MaskingConfig.from_cfg({"MASKED_RATIO": 0.9, "NUM_ANGULAR_GROUPS": 180, "USE_BERNOULLI_MASKING": False,
                                  "ENABLE_2STAGE_MASKING": True, "DISTANCE_THRESHOLDS": [10, 30]})
    assert cfg.angular_group_size == 2.0 and not cfg.use_bernoulli
    with pytest.raises(ValueError, match="outside the grid"):
        mask_voxels(torch.tensor([[0, 0, 5, 5000]]), 1, VOXEL, PC_RANGE, cfg, grid_size=GRID)


def test_a_samples_mask_does_not_depend_on_the_rest_of_the_batch(batches):
    coords = batches[1]
    first = coords[coords[:, 0] == 0]
    other = coords[coords[:, 0] == 1]
    cfg = MaskingConfig(masked_ratio=0.7)
    alone = mask_voxels(first, 1, VOXEL, PC_RANGE, cfg, seed=4).masked
    together = mask_voxels(torch.cat([other, first]), 2, VOXEL, PC_RANGE, cfg, seed=4).masked
    assert torch.equal(together[len(other):], alone)  # other voxels placed before it change nothing
