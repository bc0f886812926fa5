"""R-MAE radial / random voxel masking: ratios, independence, reproducibility, bad input."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pcdet_ext.openpcdet.datasets import synthetic
from pcdet_ext.algorithms.masking import MaskingConfig, mask_voxels

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
    MaskingConfig(masked_ratio=0.6, use_bernoulli=False, range_mask_probs={"NEAR": 0.2, "MID": 0.3, "FAR": 0.35}),
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
    cfg = MaskingConfig(masked_ratio=0.6, range_mask_probs={"NEAR": 0.1, "MID": 0.3, "FAR": 0.6},
                        whole_group_min_share=0.0)
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
    res = mask_voxels(coords, 2, VOXEL, PC_RANGE, MaskingConfig(masked_ratio=0.5, two_stage=False))  # sample 1: none
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


def test_every_config_key_reaches_the_masking_config():
    """Each key of MASKING_SPEC lands in its field (both ways of giving the group size; the 1-degree
    default), and a wrongly shaped coords tensor is refused."""
    from pcdet_ext.algorithms.masking import voxel_centres_xy
    cfg = MaskingConfig.from_cfg({"MASKED_RATIO": 0.7, "MASK_TYPE": "random", "NUM_ANGULAR_GROUPS": 36,
                                  "ANGULAR_GROUP_SIZE": 10, "DISTANCE_THRESHOLDS": [5, 20],
                                  "RANGE_MASK_PROBS": {"NEAR": 0.1, "MID": 0.2, "FAR": 0.3},
                                  "USE_BERNOULLI_MASKING": False, "ENABLE_2STAGE_MASKING": False,
                                  "WHOLE_GROUP_MIN_SHARE": 0.4, "SENSOR_ORIGIN": [1.0, 2.0, 0.5]})
    assert (cfg.masked_ratio, cfg.mask_type, cfg.angular_group_size, tuple(cfg.distance_thresholds)) == \
        (0.7, "random", 10.0, (5, 20))
    assert cfg.range_mask_probs == {"NEAR": 0.1, "MID": 0.2, "FAR": 0.3} and not cfg.use_bernoulli
    assert not cfg.two_stage and cfg.whole_group_min_share == 0.4 and cfg.sensor_xyz == (1.0, 2.0, 0.5)
    assert MaskingConfig.from_cfg({}).angular_group_size == 1.0
    assert MaskingConfig.from_cfg({"ANGULAR_GROUP_SIZE": 7.5}).angular_group_size == 7.5
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE_3D.NUM_ANGULAR_GROUPS x ANGULAR_GROUP_SIZE must be 360 "
                                         r"degrees, got 36 x 10.5"):
        MaskingConfig.from_cfg({"NUM_ANGULAR_GROUPS": 36, "ANGULAR_GROUP_SIZE": 10.5})
    with pytest.raises(ValueError, match=r"^SEC.MASKED_RATIO"):
        MaskingConfig.from_cfg({"MASKED_RATIO": 2.0}, where="SEC")
    xy = voxel_centres_xy(torch.tensor([[0, 0, 3, 7]]), (0.2, 0.5, 0.1), (-10.0, -4.0, -1.0, 10.0, 4.0, 1.0))
    assert xy.tolist() == [[-10.0 + 7.5 * 0.2, -4.0 + 3.5 * 0.5]]  # x from column and VOXEL_SIZE[0], y from row
    for bad in (torch.zeros(5, 3, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"voxel_coords must be \[N, 4\]"):
            mask_voxels(bad, 1, VOXEL, PC_RANGE, cfg)


def test_rank_in_sample_breaks_ties_by_position():
    from pcdet_ext.algorithms.masking import rank_in_sample
    score = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.5, 0.9], dtype=torch.float64)
    b_idx = torch.tensor([0, 0, 0, 1, 1, 1])
    rank = rank_in_sample(score, b_idx, torch.tensor([3, 3]))
    assert rank.tolist() == [1.0, 0.0, 2.0, 2.0, 1.0, 0.0]
    big = torch.zeros(5000, dtype=torch.float64)  # all tied: ranks follow the order, whatever the sort kernel
    assert torch.equal(rank_in_sample(big, torch.zeros(5000, dtype=torch.long), torch.tensor([5000])),
                       torch.arange(5000, dtype=torch.float64))


def test_a_samples_mask_does_not_depend_on_the_rest_of_the_batch(batches):
    coords = batches[1]
    first = coords[coords[:, 0] == 0]
    other = coords[coords[:, 0] == 1]
    cfg = MaskingConfig(masked_ratio=0.8)
    alone = mask_voxels(first, 1, VOXEL, PC_RANGE, cfg, seed=4).masked
    together = mask_voxels(torch.cat([other, first]), 2, VOXEL, PC_RANGE, cfg, seed=4).masked
    assert torch.equal(together[len(other):], alone)  # other voxels placed before it change nothing


REAL = Path(__file__).resolve().parents[2] / "shared/data/kitti_raw_2011_09_26/velodyne"


@pytest.fixture(scope="module")
def real_scans():
    scans = sorted(REAL.glob("*.bin"))[:12]
    if not scans:
        pytest.skip(f"real scans absent ({REAL})")
    return [voxelize(np.fromfile(s, np.float32).reshape(-1, 4), 0) for s in scans]


@pytest.mark.parametrize("groups", [{}, {"NUM_ANGULAR_GROUPS": 36, "ANGULAR_GROUP_SIZE": 10}])
def test_shipped_masking_on_real_scans_is_radial(real_scans, groups):
    """Shipped config (1-degree groups) and users' 36 x 10 degrees: ratio, whole-group share, no band erased."""
    cfg = MaskingConfig.from_cfg({"MASKED_RATIO": 0.8, "DISTANCE_THRESHOLDS": [10, 30],
                                  "RANGE_MASK_PROBS": {"NEAR": 0.5, "MID": 0.75, "FAR": 0.9}, **groups})
    results = [mask_voxels(c, 1, VOXEL, PC_RANGE, cfg, seed=i, grid_size=GRID) for i, c in enumerate(real_scans)]
    for r in results:
        assert abs(r.ratio - 0.8) <= 0.02
        assert r.whole_group_share >= 0.59                       # Bernoulli noise of stage 2 aside, >= 0.6
        assert all(v <= 0.95 for v in r.ratio_per_range.values()), r.ratio_per_range
        assert 0 < r.stage2_scale <= 1
    assert np.mean([r.whole_group_share for r in results]) >= 0.6
    near, mid, far = (np.mean([r.ratio_per_range[b] for r in results]) for b in ("NEAR", "MID", "FAR"))
    assert near < mid < far  # far masked most (users' meaning of RANGE_MASK_PROBS)


def test_whole_groups_are_whole_and_kept_groups_partly_masked(batches):
    coords = batches[2][batches[2][:, 0] == 0]
    res = mask_voxels(coords, 1, VOXEL, PC_RANGE, MaskingConfig(angular_group_size=10.0), seed=3)
    xy = (coords[:, [3, 2]].double() + 0.5) * 0.1 - 70.4
    group = ((torch.rad2deg(torch.atan2(xy[:, 1], xy[:, 0])) + 180) // 10).long()
    share = torch.zeros(36, dtype=torch.float64).index_add_(0, group, res.masked.double()) / \
        torch.bincount(group, minlength=36).clamp_min(1)
    occupied = torch.bincount(group, minlength=36) > 0
    full = occupied & (share == 1)
    assert full.any() and (occupied & (share < 1) & (share > 0)).any()
    in_full = res.masked & full[group]
    assert abs(res.whole_group_share - float(in_full.sum()) / float(res.masked.sum())) < 0.03  # groups can be full by chance


def test_group_order_and_voxel_noise_are_separate_streams():
    from pcdet_ext.algorithms.masking import _per_sample_uniform, _per_voxel_uniform
    b = torch.zeros(360, dtype=torch.long)
    groups = [_per_sample_uniform(1, 360, s, torch.device("cpu"))[0] for s in range(40)]
    for s in range(40):
        noise = _per_voxel_uniform(b, 1, s)
        assert not any(torch.allclose(noise, g) for g in groups)  # used to be groups(s + 17)


@pytest.mark.parametrize("cfg,match", [
    ({"MASKED_RATIO": 0.5}, r"MASKED_RATIO 0.5 is unreachable with RANGE_MASK_PROBS"),
    ({"MASKED_RATIO": 0.8, "RANGE_MASK_PROBS": {"NEAR": 0.5, "MID": 0.75, "FAR": 1.0}},
     r"RANGE_MASK_PROBS.FAR: expected a probability in \[0, 1\) \(1 would mask the whole band\)"),
    ({"WHOLE_GROUP_MIN_SHARE": 1.0}, "WHOLE_GROUP_MIN_SHARE"),
])
def test_unreachable_or_band_erasing_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        MaskingConfig.from_cfg(cfg)
    if "unreachable" in match:  # whole groups alone reach any ratio
        assert MaskingConfig.from_cfg({**cfg, "ENABLE_2STAGE_MASKING": False}).masked_ratio == cfg["MASKED_RATIO"]


def test_log_dict_names_every_statistic(batches):
    res = mask_voxels(batches[0], 2, VOXEL, PC_RANGE, MaskingConfig(), seed=0)
    assert set(res.log_dict()) == {"mask_ratio", "mask_whole_group_share", "mask_stage2_scale",
                                   "mask_ratio_near", "mask_ratio_mid", "mask_ratio_far"}
