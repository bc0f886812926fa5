"""Occupancy decoder / targets / loss / metrics and teacher-student pieces (pure torch)."""
import math

import pytest
import torch
import torch.nn as nn

from pcdet_ext.algorithms.occupancy import (CellGeometry, OccupancyAP, OccupancyConfig, OccupancyDecoder,
                                             average_precision, grow_visible_scores, occupancy_loss,
                                             occupancy_metrics, occupancy_targets, ray_free_cells, sparse_to_bev)
from pcdet_ext.algorithms.teacher_student import (FeatureRegression, ema_update_, match_features,
                                                   params_to_buffers_)

FULL = (8, 32, 32)  # D, H, W voxels


def _voxels(n=300, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(batch, (n,), generator=g), torch.randint(FULL[0], (n,), generator=g),
                          torch.randint(FULL[1], (n,), generator=g), torch.randint(FULL[2], (n,), generator=g)], 1)
    coords = torch.unique(coords, dim=0)
    masked = torch.rand(len(coords), generator=g) < 0.7
    return coords, masked


VOXEL = (0.5, 0.5, 0.5)
PC_RANGE = (-8.0, -8.0, -2.0, 8.0, 8.0, 2.0)      # FULL voxels of 0.5 m, sensor at the centre


def _geometry(cfg, batch=2):
    return CellGeometry.of(batch, FULL, VOXEL, PC_RANGE, cfg, bands=(3.0, 6.0))


def _points(coords):
    """One LiDAR return per voxel centre, OpenPCDet's layout (batch, x, y, z, intensity)."""
    c = coords.double()
    xyz = (c[:, [3, 2, 1]] + 0.5) * torch.tensor(VOXEL, dtype=torch.float64) + torch.tensor(PC_RANGE[:3])
    return torch.cat([c[:, :1], xyz, torch.zeros(len(c), 1, dtype=torch.float64)], 1).float()


def _targets(cfg, coords, masked, seed=1):
    return occupancy_targets(coords, masked, _points(coords), _geometry(cfg), cfg, torch.Generator().manual_seed(seed))


def test_rays_mark_the_space_before_a_return_and_nothing_behind_it():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, ray_stop=1.0)
    geo = _geometry(cfg, batch=1)
    wall = torch.tensor([[0, 5.25, y, 0.25, 0.0] for y in (-0.75, -0.25, 0.25, 0.75)])  # returns at x = 5.25 m
    free = ray_free_cells(wall, geo, cfg).view(geo.shape)[0]
    zc, yc = 4, 16                                                # cells of z = 0.25 m, y in [0, 0.5)
    xs = torch.nonzero(free[zc, yc]).squeeze(1)
    assert xs.min() == 16 and xs.max() == 25                      # from the sensor cell up to one cell short of the wall
    assert not free[:, :, 27:].any()                              # behind the returns: unknown, never free
    assert not free[:, :12].any() and not free[:, 20:].any()      # off the beams: unknown


def test_targets_positives_masked_only_negatives_free_and_not_occupied():
    cfg = OccupancyConfig(target_stride_xy=2, target_stride_z=2, min_negatives=64, rays_per_frame=0)
    coords, masked = _voxels()
    t = _targets(cfg, coords, masked)
    assert len(t.positives) > 0 and len(t.negatives) > 0
    assert not t.visible[t.positives].any() and t.occupied[t.positives].all()
    assert t.free[t.negatives].all() and not t.occupied[t.negatives].any()
    assert not (t.free & t.occupied).any()
    dt, ht, wt = t.shape[1:]
    c = coords
    cell = ((c[:, 0] * dt + c[:, 1] // 2) * ht + c[:, 2] // 2) * wt + c[:, 3] // 2
    expect = set(cell[masked].tolist()) - set(cell[~masked].tolist())
    assert set(t.positives.tolist()) == expect
    # a quarter of the negatives next to a positive (hard); the rest anywhere in free space
    pos = t.positives
    near = 0
    for n in t.negatives.tolist():
        x, y, z, b = n % wt, (n // wt) % ht, (n // (wt * ht)) % dt, n // (wt * ht * dt)
        px, py, pz, pb = pos % wt, (pos // wt) % ht, (pos // (wt * ht)) % dt, pos // (wt * ht * dt)
        near += bool((((px - x).abs() <= 1) & ((py - y).abs() <= 1) & ((pz - z).abs() <= 1) & (pb == b)).any())
    assert near >= 0.2 * len(t.negatives)


def test_loss_finite_balanced_depends_on_logits_and_has_gradient():
    cfg = OccupancyConfig(min_negatives=64, rays_per_frame=0)
    coords, masked = _voxels()
    t = _targets(cfg, coords, masked)
    logits = torch.zeros(t.shape, requires_grad=True)
    loss = occupancy_loss(logits, t, cfg)
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad.abs().sum() > 0
    perfect = torch.full(t.shape, -8.0)
    perfect.view(-1)[t.positives] = 8.0
    assert occupancy_loss(perfect, t, cfg).item() < 1e-3 < loss.item()
    m = occupancy_metrics(perfect, t)
    assert m["occ_ap"] == pytest.approx(1.0) and m["occ_iou"] == pytest.approx(1.0)
    everything = torch.full(t.shape, 8.0)  # predicting occupied everywhere: full recall, poor precision
    m = occupancy_metrics(everything, t)
    assert m["occ_recall"] == 1.0 and m["occ_precision"] < 0.5
    share = len(t.positives) / (len(t.positives) + int(t.free.sum()))
    assert m["occ_ap"] == pytest.approx(share)  # one tie: AP is the positives' share
    bce = OccupancyConfig(loss="bce", min_negatives=64)
    assert float(occupancy_loss(torch.zeros(t.shape), t, bce)) == pytest.approx(math.log(2), rel=1e-5)


def test_average_precision_steps_and_weights():
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    y = torch.tensor([1, 0, 1, 0, 0])
    assert average_precision(s, y) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)  # scikit-learn's value
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])  # the negative at 0.8 counted three times
    assert average_precision(s, y, w) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 5)
    assert math.isnan(average_precision(s, torch.zeros(5)))
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(20000, generator=g)
    labels = (torch.rand(20000, generator=g) < 0.1).long()
    assert abs(average_precision(rand, labels) - 0.1) < 0.02  # scores that know nothing: AP = prevalence


def test_histogram_ap_equals_the_exact_ap_over_every_free_cell_overall_and_per_band():
    cfg = OccupancyConfig(rays_per_frame=0)
    coords, masked = _voxels(n=600)
    t = _targets(cfg, coords, masked)
    scores = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    scores.view(-1)[t.positives] += 1.0
    meter = OccupancyAP()
    meter.add(scores, t)
    got = meter.result()
    free = torch.nonzero(t.free).squeeze(1)
    ids = torch.cat([t.positives, free])
    labels = torch.cat([torch.ones(len(t.positives)), torch.zeros(len(free))])
    flat, band = scores.reshape(-1)[ids], t.geometry.band(ids)
    assert got["occ_ap"] == pytest.approx(average_precision(flat, labels), abs=0.005) and 0.1 < got["occ_ap"] < 0.9
    for i, name in enumerate(("near", "mid", "far")):
        sel = band == i
        if labels[sel].sum() > 0:
            assert got[f"occ_ap_{name}"] == pytest.approx(average_precision(flat[sel], labels[sel]), abs=0.005)
    grown = grow_visible_scores(t)  # integer scores: each its own bin, ties as in the exact AP
    meter = OccupancyAP()
    meter.add(grown, t)
    assert meter.result()["occ_ap"] == pytest.approx(average_precision(grown.reshape(-1)[ids], labels), abs=1e-9)


def test_histogram_counts_add_up_over_frames_and_processes():
    """Frames pooled in one meter = the same frames split over two meters whose counts are summed
    (what all_reduce does across ranks); the counts never grow with the frames."""
    cfg = OccupancyConfig(rays_per_frame=0)
    frames = []
    for seed in range(4):
        coords, masked = _voxels(n=400, seed=seed)
        t = _targets(cfg, coords, masked, seed=seed)
        scores = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
        scores.view(-1)[t.positives] += 0.5 * seed
        frames.append((scores, t))
    one, a, b = OccupancyAP(), OccupancyAP(), OccupancyAP()
    for i, (scores, t) in enumerate(frames):
        one.add(scores, t)
        (a if i % 2 else b).add(scores, t)
    a.counts += b.counts
    assert a.result() == pytest.approx(one.result(), nan_ok=True)
    assert one.counts.numel() == 3 * 2 * one.bins


def test_grow_visible_baseline_scores_by_distance():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1)
    coords = torch.tensor([[0, 4, 16, 16]])
    t = _targets(cfg, coords, torch.tensor([False]))
    score = grow_visible_scores(t, radius=3).view(t.shape)[0]
    assert score[4, 16, 17] == 3 and score[4, 16, 18] == 2 and score[4, 16, 19] == 1 and score[4, 16, 20] == 0
    assert score[4, 16, 16] == 0  # the visible cell itself is not scored (it is in no metric)


def test_no_points_gives_zero_loss_in_the_graph():
    cfg = OccupancyConfig(min_negatives=32)
    empty = torch.zeros(0, 4, dtype=torch.long)
    t = occupancy_targets(empty, torch.zeros(0, dtype=torch.bool), torch.zeros(0, 5), _geometry(cfg), cfg,
                          torch.Generator())
    assert len(t.positives) == 0 and len(t.negatives) == 0 and not t.free.any()
    logits = torch.zeros(t.shape, requires_grad=True)
    loss = occupancy_loss(logits, t, cfg)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_no_positives_still_learns_free_space():
    cfg = OccupancyConfig(min_negatives=32, rays_per_frame=0)
    coords, _ = _voxels()
    t = _targets(cfg, coords, torch.zeros(len(coords), dtype=torch.bool))
    assert len(t.positives) == 0 and len(t.negatives) == 32
    logits = torch.zeros(t.shape, requires_grad=True)
    occupancy_loss(logits, t, cfg).backward()
    assert logits.grad.abs().sum() > 0


def test_decoder_receptive_field_spans_a_sector():
    cfg = OccupancyConfig(hidden_channels=8, reduce_channels=4)
    dec = OccupancyDecoder(cfg, input_channels=16, input_depth=1, input_stride=8, full_shape=(8, 512, 512))
    assert dec.receptive_field == 63  # encoder-stride cells: 50 m at 0.8 m cells, > a 10-degree sector at 50 m
    feats = torch.randn(1, 16, requires_grad=True)
    out = dec(feats, torch.tensor([[0, 0, 32, 32]]), (1, 64, 64), 1)
    out[0, :, 128, 128 + 4 * 25].sum().backward()  # 25 encoder cells away
    assert feats.grad.abs().sum() > 0


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
                                      ({"RAY_STEP": 0.0}, "RAY_STEP"), ({"CONTEXT_DILATIONS": [1, 0]}, "CONTEXT_DILATIONS"),
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


def test_sensor_origin_padded_once_by_the_masking_config():
    from pcdet_ext.algorithms.masking import MaskingConfig
    assert MaskingConfig(sensor_origin=(1.0, 2.0)).sensor_xyz == (1.0, 2.0, 0.0)
    assert MaskingConfig(sensor_origin=(1.0, 2.0, 1.7)).sensor_xyz == (1.0, 2.0, 1.7)
    with pytest.raises(ValueError, match=r"sensor: expected \(x, y, z\)"):
        CellGeometry.of(1, FULL, VOXEL, PC_RANGE, OccupancyConfig(), sensor=(1.0, 2.0))
