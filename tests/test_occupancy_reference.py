"""Occupancy targets against independent references (dense ray sampling, python loops) on a
non-square grid with the sensor off the grid's centre: what a mutation run found untested."""
import math

import pytest
import torch
import torch.nn.functional as F

from pcdet_ext.algorithms.occupancy import (CellGeometry, OccupancyConfig, average_precision, occupancy_loss,
                                             occupancy_targets, ray_free_cells, sparse_to_bev)

FULL = (4, 12, 20)                          # D, H, W voxels of 1 m
VOXEL = (1.0, 1.0, 1.0)
PC_RANGE = (-8.0, -5.0, -2.0, 12.0, 7.0, 2.0)
SENSOR = (1.5, -0.5, 0.3)                   # inside the range, off every axis


def geometry(batch=2, cfg=None):
    cfg = cfg or OccupancyConfig(target_stride_xy=1, target_stride_z=1)
    return CellGeometry.of(batch, FULL, VOXEL, PC_RANGE, cfg, sensor=SENSOR, bands=(3.0, 6.0))


def returns(n=40, batch=2, seed=0, outside=False):
    """LiDAR returns (batch, x, y, z, intensity) inside the range (or just outside it)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    xyz = lo + (hi - lo) * (0.02 + 0.96 * torch.rand(n, 3, generator=g))
    if outside:
        xyz[:, 0] = PC_RANGE[3] + 1.0 + torch.rand(n, generator=g)
    b = torch.randint(batch, (n, 1), generator=g).float()
    return torch.cat([b, xyz, torch.zeros(n, 1)], 1)


def dense_ray_cells(points, geo, cfg, samples=4000):
    """Cells (b, z, y, x) a beam crosses from the sensor to RAY_STOP cells before its return, sampled
    densely in float64 (an independent reference of the traced free space)."""
    cells = set()
    lo, sensor = torch.tensor(geo.pc_min, dtype=torch.float64), torch.tensor(geo.sensor, dtype=torch.float64)
    cell = torch.tensor(geo.cell, dtype=torch.float64)
    _, dt, ht, wt = geo.shape
    for p in points.double():
        b, end = int(p[0]), p[1:4]
        length = float((end - sensor).norm())
        reach = length - cfg.ray_stop * float(cell.max())
        if reach <= 0:
            continue
        t = torch.linspace(0, reach / length, samples, dtype=torch.float64)
        pos = ((sensor + t[:, None] * (end - sensor) - lo) / cell).floor().long()
        for x, y, z in pos.tolist():
            if 0 <= x < wt and 0 <= y < ht and 0 <= z < dt:
                cells.add((b, z, y, x))
    return cells


def marked(free, geo):
    return {tuple(c) for c in torch.nonzero(free.view(geo.shape)).tolist()}


def test_rays_trace_only_cells_on_the_beams_from_an_off_centre_sensor_and_cover_them():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, ray_stop=1.0, rays_per_frame=0)
    geo, pts = geometry(), returns()
    got, ref = marked(ray_free_cells(pts, geo, cfg), geo), dense_ray_cells(pts, geo, cfg)
    assert got and got <= ref, sorted(got - ref)[:5]       # nothing off a beam, nothing past RAY_STOP
    assert len(got) >= 0.9 * len(ref)                       # a quarter-cell step misses few cells
    assert {c[0] for c in got} == {0, 1}                    # each frame's own beams
    assert not ray_free_cells(returns(outside=True), geo, cfg).any()  # returns outside the range trace nothing


def test_rays_per_frame_traces_that_many_beams_of_each_frame():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, ray_stop=1.0, rays_per_frame=1)
    geo, pts = geometry(), returns(n=60)
    picked = set()
    for seed in range(6):
        got = marked(ray_free_cells(pts, geo, cfg, torch.Generator().manual_seed(seed)), geo)
        for b in (0, 1):
            frame = {c for c in got if c[0] == b}
            beams = [p for p in pts if int(p[0]) == b]
            on_one = [i for i, p in enumerate(beams) if frame <= dense_ray_cells(p[None], geo, cfg)]
            assert frame and on_one, (seed, b)              # one beam per frame, not all of them
            picked.add((b, on_one[0]))
    assert len(picked) > 2                                  # the generator picks different beams


def test_sparse_to_bev_places_every_voxel_in_its_height_channel():
    g = torch.Generator().manual_seed(1)
    d, h, w, c, b = 3, 5, 7, 2, 2
    flat = torch.randperm(b * d * h * w, generator=g)[:30]
    idx = torch.stack([flat // (d * h * w), (flat // (h * w)) % d, (flat // w) % h, flat % w], 1)
    feats = torch.randn(30, c, generator=g)
    bev = sparse_to_bev(feats, idx, [d, h, w], b)
    ref = torch.zeros(b, c * d, h, w)
    for (bi, zi, yi, xi), f in zip(idx.tolist(), feats):
        ref[bi, torch.arange(c) * d + zi, yi, xi] = f        # channel-major, height cells within
    assert torch.equal(bev, ref)
    two_d = sparse_to_bev(feats, idx[:, [0, 2, 3]], [h, w], b)
    ref2 = torch.zeros(b, c, h, w)
    for (bi, _, yi, xi), f in zip(idx.tolist(), feats):
        ref2[bi, :, yi, xi] = f
    assert two_d.shape == (b, c, h, w) and torch.equal(two_d.sum(0), ref2.sum(0))


def _targets(cfg, seed=3):
    geo = geometry(cfg=cfg)
    g = torch.Generator().manual_seed(seed)
    _, dt, ht, wt = geo.shape
    coords = torch.unique(torch.stack([torch.randint(2, (80,), generator=g), torch.randint(dt, (80,), generator=g),
                                       torch.randint(ht, (80,), generator=g), torch.randint(wt, (80,), generator=g)], 1),
                          dim=0)
    masked = torch.rand(len(coords), generator=g) < 0.6
    return occupancy_targets(coords, masked, returns(n=200, seed=seed), geo, cfg, torch.Generator().manual_seed(seed)), geo


def test_negatives_hard_ones_next_to_positives_the_rest_free_and_their_number():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, rays_per_frame=0, neg_per_pos=2.0,
                          hard_neg_share=0.25, min_negatives=4)
    t, geo = _targets(cfg)
    pos = torch.stack(torch.unravel_index(t.positives, geo.shape), 1)

    def next_to_a_positive(i):  # within one cell (26-neighbourhood) of a positive of its own frame
        c = torch.stack(torch.unravel_index(i, geo.shape))
        return bool(((pos[:, 0] == c[0]) & ((pos[:, 1:] - c[1:]).abs().max(1).values <= 1)).any())

    n_neg = round(2.0 * len(pos))
    assert len(pos) > 5 and len(t.negatives) == n_neg and all(t.free[i] and not t.occupied[i] for i in t.negatives)
    n_hard = round(0.25 * n_neg)
    assert all(next_to_a_positive(i) for i in t.negatives[:n_hard])  # the hard share first
    assert len(set(t.negatives[:n_hard].tolist())) == n_hard
    uniform = _targets(OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, rays_per_frame=0,
                                       neg_per_pos=2.0, hard_neg_share=0.0, min_negatives=4))[0]
    assert len(uniform.negatives) == n_neg and all(uniform.free[i] for i in uniform.negatives)
    assert not all(next_to_a_positive(i) for i in uniform.negatives[:n_hard])
    again = _targets(cfg)[0]
    assert torch.equal(again.negatives, t.negatives) and not torch.equal(_targets(cfg, seed=4)[0].positives, t.positives)


def test_focal_and_bce_losses_match_their_formulas():
    cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, ray_step=0.25, rays_per_frame=0, min_negatives=4)
    t, geo = _targets(cfg)
    logits = torch.randn(geo.shape, generator=torch.Generator().manual_seed(0))
    flat = logits.reshape(-1)

    def mean_term(ids, label, gamma=None):
        z = flat[ids].double()
        p = torch.sigmoid(z) if label else 1 - torch.sigmoid(z)
        loss = -torch.log(p)
        return ((1 - p) ** gamma * loss if gamma is not None else loss).mean()

    bce = 0.5 * (mean_term(t.positives, 1) + mean_term(t.negatives, 0))
    assert occupancy_loss(logits, t, cfg).item() == pytest.approx(bce.item(), rel=1e-5)
    focal_cfg = OccupancyConfig(target_stride_xy=1, target_stride_z=1, loss="focal", focal_gamma=2.0)
    focal = 0.5 * (mean_term(t.positives, 1, 2.0) + mean_term(t.negatives, 0, 2.0))
    assert occupancy_loss(logits, t, focal_cfg).item() == pytest.approx(focal.item(), rel=1e-5)
    assert focal.item() < bce.item()


def _ap_reference(scores, labels, weights):
    """Average precision by its definition: sum over distinct score thresholds (descending) of the recall
    gained times the precision there (scikit-learn's step interpolation)."""
    pairs = sorted(zip(scores.tolist(), labels.tolist(), weights.tolist()), key=lambda p: -p[0])
    total = sum(w for _, y, w in pairs if y)
    ap, tp, fp, prev_recall, i = 0.0, 0.0, 0.0, 0.0, 0
    while i < len(pairs):
        s = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == s:
            tp += pairs[i][2] * pairs[i][1]
            fp += pairs[i][2] * (1 - pairs[i][1])
            i += 1
        recall = tp / total
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def test_average_precision_equals_its_definition_with_ties_and_weights():
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 12, (200,), generator=g).float()  # many ties
    labels = (torch.rand(200, generator=g) < 0.3).long()
    weights = 0.5 + torch.rand(200, generator=g).double()
    assert average_precision(scores, labels) == pytest.approx(_ap_reference(scores, labels, torch.ones(200)))
    assert average_precision(scores, labels, weights) == pytest.approx(_ap_reference(scores, labels, weights))
    assert math.isnan(average_precision(scores, torch.zeros(200, dtype=torch.long)))


def test_range_bands_by_horizontal_distance_from_the_sensor():
    geo = geometry(batch=1)
    _, dt, ht, wt = geo.shape
    ids = torch.arange(dt * ht * wt)
    ref = []
    for i in ids.tolist():
        x, y = i % wt, (i // wt) % ht
        r = math.hypot(PC_RANGE[0] + x + 0.5 - SENSOR[0], PC_RANGE[1] + y + 0.5 - SENSOR[1])
        ref.append(0 if r < 3.0 else 1 if r < 6.0 else 2)
    assert geo.band(ids).tolist() == ref and set(ref) == {0, 1, 2}
    with pytest.raises(ValueError, match="sensor: expected"):
        CellGeometry.of(1, FULL, VOXEL, PC_RANGE, OccupancyConfig(), sensor=(0.0, 0.0))


def test_decoder_blocks_are_dilated_as_configured_and_residual():
    from pcdet_ext.algorithms.occupancy import OccupancyDecoder, _Context
    cfg = OccupancyConfig(target_stride_xy=2, context_dilations=(1, 3), hidden_channels=8, reduce_channels=4)
    dec = OccupancyDecoder(cfg, input_channels=6, input_depth=2, input_stride=8, full_shape=(4, 40, 56))
    blocks = [m for m in dec.body if isinstance(m, _Context)]
    convs = [[c for c in b.body if isinstance(c, torch.nn.Conv2d)] for b in blocks]
    assert [[c.dilation[0] for c in cs] for cs in convs] == [[1, 1], [3, 3]]
    assert all(c.padding == c.dilation and c.kernel_size == (3, 3) for cs in convs for c in cs)
    assert len([m for m in dec.body if isinstance(m, torch.nn.ConvTranspose2d)]) == 2  # stride 8 -> 2
    prior = 1.0 / (1.0 + cfg.neg_per_pos)
    assert torch.allclose(torch.sigmoid(dec.logits.bias), torch.full_like(dec.logits.bias, prior))
    idx = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 3], [1, 0, 4, 6], [1, 1, 0, 0], [0, 0, 4, 6]])
    assert dec(torch.randn(5, 6), idx, [2, 5, 7], 2).shape == (2, 2, 20, 28)
    block = blocks[1].eval()
    with torch.no_grad():
        for c in convs[1]:
            c.weight.zero_()
        x = torch.randn(1, 8, 6, 6)
        assert torch.allclose(block(x), F.relu(x + block.body(x)))  # input + body, then ReLU


def test_decoder_output_covers_an_odd_grid_the_encoder_rounded_down():
    """Full grid 41 x 59 at target stride 2 -> 21 x 30 target cells; the stride-8 encoder's 5 x 7 output
    upsamples to 20 x 28: the last row and columns repeat their neighbours, nothing is left uncovered."""
    from pcdet_ext.algorithms.occupancy import OccupancyDecoder
    cfg = OccupancyConfig(target_stride_xy=2, context_dilations=(1,), hidden_channels=8, reduce_channels=4)
    dec = OccupancyDecoder(cfg, input_channels=6, input_depth=1, input_stride=8, full_shape=(2, 41, 59)).eval()
    idx = torch.tensor([[0, 0, 1, 1], [0, 0, 4, 6], [0, 0, 2, 3]])
    with torch.no_grad():
        out = dec(torch.randn(3, 6), idx, [1, 5, 7], 1)
    assert out.shape == (1, 1, 21, 30)
    assert torch.equal(out[..., 20, :], out[..., 19, :]) and torch.equal(out[..., 28], out[..., 27])
    assert torch.equal(out[..., 29], out[..., 27]) and not torch.equal(out[..., 19, :28], out[..., 18, :28])
    narrow = OccupancyDecoder(cfg, input_channels=6, input_depth=1, input_stride=8, full_shape=(2, 40, 59)).eval()
    with torch.no_grad():  # only the width falls short
        assert narrow(torch.randn(3, 6), idx, [1, 5, 7], 1).shape == (1, 1, 20, 30)
