"""Occupancy decoder / targets / loss / metrics and teacher-student pieces (pure torch)."""
import math

import pytest
import torch
import torch.nn as nn

from pcdet_ext.pretraining.occupancy import (OccupancyConfig, OccupancyDecoder, occupancy_loss, occupancy_metrics,
                                             occupancy_targets, sparse_to_bev)
from pcdet_ext.pretraining.teacher_student import (FeatureRegression, ema_update_, match_features,
                                                   params_to_buffers_)

FULL = (8, 32, 32)  # D, H, W voxels


def _voxels(n=300, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(batch, (n,), generator=g), torch.randint(FULL[0], (n,), generator=g),
                          torch.randint(FULL[1], (n,), generator=g), torch.randint(FULL[2], (n,), generator=g)], 1)
    coords = torch.unique(coords, dim=0)
    masked = torch.rand(len(coords), generator=g) < 0.7
    return coords, masked


def test_targets_positives_are_masked_only_cells_and_negatives_empty():
    cfg = OccupancyConfig(target_stride_xy=2, target_stride_z=2, min_negatives=64)
    coords, masked = _voxels()
    t = occupancy_targets(coords, masked, 2, FULL, cfg, torch.Generator().manual_seed(1))
    assert len(t.positives) > 0
    assert not t.visible[t.positives].any() and t.occupied[t.positives].all()
    assert not t.occupied[t.negatives].any()
    assert len(t.negatives) >= max(cfg.min_negatives, round(cfg.neg_per_pos * len(t.positives))) * 0.9
    # every masked voxel whose cell holds no visible voxel is a positive
    dt, ht, wt = t.shape[1:]
    c = coords
    cell = ((c[:, 0] * dt + c[:, 1] // 2) * ht + c[:, 2] // 2) * wt + c[:, 3] // 2
    expect = set(cell[masked].tolist()) - set(cell[~masked].tolist())
    assert set(t.positives.tolist()) == expect


def test_loss_finite_balanced_depends_on_logits_and_has_gradient():
    cfg = OccupancyConfig(min_negatives=64)
    coords, masked = _voxels()
    t = occupancy_targets(coords, masked, 2, FULL, cfg, torch.Generator().manual_seed(1))
    logits = torch.zeros(t.shape, requires_grad=True)
    loss = occupancy_loss(logits, t, cfg)
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad.abs().sum() > 0
    perfect = torch.full(t.shape, -8.0)
    perfect.view(-1)[t.positives] = 8.0
    assert occupancy_loss(perfect, t, cfg).item() < 1e-3 < loss.item()
    m = occupancy_metrics(perfect, t)
    assert m["occ_iou"] == pytest.approx(1.0) and m["occ_precision"] == pytest.approx(1.0)
    everything = torch.full(t.shape, 8.0)  # predicting occupied everywhere: full recall, poor precision
    m = occupancy_metrics(everything, t)
    assert m["occ_recall"] == 1.0 and m["occ_precision"] < 0.2
    bce = OccupancyConfig(loss="bce", min_negatives=64)
    assert float(occupancy_loss(torch.zeros(t.shape), t, bce)) == pytest.approx(math.log(2), rel=1e-5)


def test_no_positives_still_learns_empty_space():
    cfg = OccupancyConfig(min_negatives=32)
    coords, _ = _voxels()
    t = occupancy_targets(coords, torch.zeros(len(coords), dtype=torch.bool), 2, FULL, cfg, torch.Generator())
    assert len(t.positives) == 0 and len(t.negatives) == 32
    logits = torch.zeros(t.shape, requires_grad=True)
    occupancy_loss(logits, t, cfg).backward()
    assert logits.grad.abs().sum() > 0


def test_decoder_predicts_unseen_cells_on_target_grid():
    cfg = OccupancyConfig(target_stride_xy=2, target_stride_z=2, hidden_channels=8, reduce_channels=4)
    dec = OccupancyDecoder(cfg, input_channels=16, input_depth=2, input_stride=8, full_shape=FULL)
    feats = torch.randn(5, 16)
    idx = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 3], [1, 0, 0, 0], [1, 1, 3, 3], [1, 0, 2, 1]])
    out = dec(feats, idx, (2, 4, 4), 2)
    assert out.shape == (2, 4, 16, 16)
    assert out.abs().sum() > 0 and out[0].std() > 0  # dense output: cells with no input voxel get logits too
    bev = sparse_to_bev(feats, idx, (2, 4, 4), 2)
    assert bev.shape == (2, 32, 4, 4) and torch.equal(bev[0, 0::2, 1, 1], feats[0])
    with pytest.raises(ValueError, match="TARGET_STRIDE_XY"):
        OccupancyDecoder(OccupancyConfig(target_stride_xy=3), 16, 2, 8, FULL)


@pytest.mark.parametrize("bad, key", [({"LOSS": "l2"}, "LOSS"), ({"NEG_PER_POS": 0}, "NEG_PER_POS"),
                                      ({"HARD_NEG_SHARE": 1.5}, "HARD_NEG_SHARE"), ({"TARGET_STRIDE_Z": 0}, "TARGET_STRIDE_Z"),
                                      ({"STRIDE": 2}, "unknown")])
def test_occupancy_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        OccupancyConfig.from_cfg(bad)


def test_teacher_as_buffers_never_in_parameters_and_ema_math():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    import copy
    teacher = params_to_buffers_(copy.deepcopy(student))
    assert list(teacher.parameters()) == []
    assert set(teacher.state_dict()) == set(student.state_dict())
    before = {k: v.clone() for k, v in teacher.named_buffers()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, student.named_parameters(), 0.9)
    for name, p in student.named_parameters():
        t = dict(teacher.named_buffers())[name]
        assert torch.allclose(t, 0.9 * before[name] + 0.1 * p.detach())
    assert torch.equal(dict(teacher.named_buffers())["1.running_mean"], before["1.running_mean"])
    with pytest.raises(ValueError, match="TEACHER_MOMENTUM"):
        ema_update_(teacher, student.named_parameters(), 1.5)


def test_feature_regression_matches_coordinates_and_trains_student_only():
    shape = (4, 8, 8)
    t_idx = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [1, 3, 7, 7], [1, 2, 2, 2]])
    t_feat = torch.randn(4, 6)
    s_idx = torch.tensor([[1, 3, 7, 7], [0, 1, 2, 3], [0, 2, 2, 2]])  # last one absent in the teacher
    student_feat = torch.randn(3, 6, requires_grad=True)
    s, t = match_features((student_feat, s_idx), (t_feat, t_idx), shape)
    assert len(s) == 2  # pairs come out in voxel-key order: (0,1,2,3) then (1,3,7,7)
    assert torch.equal(s[0], student_feat[1]) and torch.equal(t[0], t_feat[1])
    assert torch.equal(s[1], student_feat[0]) and torch.equal(t[1], t_feat[2])
    reg = FeatureRegression({"x": 6}, hidden=8)
    teacher_feat = t_feat.clone().requires_grad_(True)
    loss = reg({"x": match_features((student_feat, s_idx), (teacher_feat, t_idx), shape)})
    loss.backward()
    assert math.isfinite(loss.item()) and student_feat.grad.abs().sum() > 0
    assert teacher_feat.grad is None  # the target is detached
    other = reg({"x": (s, -t)})  # (a constant shift would vanish in the layer norm)
    assert other.item() != pytest.approx(loss.item())
