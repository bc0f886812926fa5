"""Rate-aware code choice under the bitstream's context models: each code is charged what the coder
spends on it, so measured bytes fall with lambda (pure torch / numpy)."""
import numpy as np
import pytest
import torch

from pcdet_ext.algorithms.bitstream import ProbabilityModels, decode_frame, encode_frame
from pcdet_ext.algorithms.bitstream.contexts import code_bits
from pcdet_ext.algorithms.bitstream.rate_choice import ContextRate, cell_positions
from pcdet_ext.algorithms.quantization import ResidualQuantizer
from test_bitstream import GEO, lidar_like_occupancy, smooth_codes

K = 64


def quantizer():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=8, num_codebooks=2, codebook_size=K, schedule=(16, K))
    with torch.no_grad():
        q.codebooks[0].copy_(torch.randn(K, 8))
        q.codebooks[1].copy_(0.3 * torch.randn(K, 8))
    q.set_active(2, K)
    return q.eval()


def features(q, rng, cells):
    """Spatially smooth features (pieces of one codebook-0 entry, as neighbouring pillars are) plus noise."""
    field = smooth_codes(rng, GEO, 2, K)[cells]
    with torch.no_grad():
        x = q.codebooks[0][torch.from_numpy(field[:, 0])] + q.codebooks[1][torch.from_numpy(field[:, 1])]
    return x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))


def fitted(q, rng, frames=6):
    models = ProbabilityModels.empty(GEO, 2, (16, K))
    for _ in range(frames):
        occ = lidar_like_occupancy(rng)
        cells = np.flatnonzero(occ.ravel())
        models.observe(occ, {K: q.encode(features(q, rng, cells)).numpy()}, cells=cells)
    assert models.uses_spatial(K)
    return models


def test_measured_bytes_fall_and_distortion_rises_with_lambda():
    rng = np.random.default_rng(3)
    q = quantizer()
    models = fitted(q, rng)
    mid = models.identifier(np.zeros(3))
    occ = lidar_like_occupancy(rng)
    cells = rng.permutation(np.flatnonzero(occ.ravel()))  # rows in any order
    x = features(q, rng, cells)
    rate = ContextRate(models)
    rows = []
    for lam in (0.0, 0.05, 0.5, 4.0):
        q.set_rate(lam, rate)
        codes = q.encode(x, cell_positions(cells, GEO.width))
        data = encode_frame(cells, codes.numpy(), K, models, mid)
        out = decode_frame(data, models, mid, 2, K)
        assert np.array_equal(out.codes, codes.numpy()[np.argsort(cells)])  # the decoder is unchanged
        err = float((q.decode(codes).detach() - x).pow(2).mean())
        rows.append((lam, len(data), code_bits(codes.numpy(), K, models, cells=cells), err))
    q.set_rate(0.0)
    sizes, bits, errors = zip(*[(b, ideal, e) for _, b, ideal, e in rows])
    assert all(a > b for a, b in zip(sizes, sizes[1:])), rows  # measured bytes, not only the model's bits
    assert all(a > b for a, b in zip(bits, bits[1:])), rows
    assert all(a < b for a, b in zip(errors, errors[1:])), rows
    assert sizes[-1] < 0.8 * sizes[0], rows


def test_a_batch_chooses_what_each_frame_chooses_alone():
    rng = np.random.default_rng(5)
    q = quantizer()
    q.set_rate(0.5, ContextRate(fitted(q, rng)))
    frames = [np.flatnonzero(lidar_like_occupancy(rng).ravel()) for _ in range(2)]
    xs = [features(q, rng, c) for c in frames]
    alone = [q.encode(x, cell_positions(c, GEO.width)) for x, c in zip(xs, frames)]
    pos = [cell_positions(c, GEO.width) for c in frames]
    pos[1][:, 0] = 1
    batch = q.encode(torch.cat(xs), torch.cat(pos))
    assert torch.equal(batch, torch.cat(alone))


def test_rate_needs_positions_inside_the_grid_and_is_off_in_training():
    rng = np.random.default_rng(6)
    q = quantizer()
    q.set_rate(1.0, ContextRate(fitted(q, rng, frames=2)))
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="needs the rows' positions"):
        q.encode(x)
    with pytest.raises(ValueError, match="outside the bitstream models' 96 x 80 grid"):
        q.encode(x, torch.tensor([[0, 0, c] for c in range(78, 83)]))
    with pytest.raises(ValueError, match="two rows of one sample at one cell"):
        q.encode(x, torch.zeros(5, 3, dtype=torch.long))
    q.train()
    assert not q.rate_active
    plain = q.encode(x)  # training ignores the rate term (no positions needed)
    q.eval()
    q.set_rate(0.0)
    assert torch.equal(q.encode(x), plain)


def test_rate_distortion_training_chooses_in_training_what_the_edge_chooses():
    """set_rate(..., in_training=True): the training forward's codes are the rate-aware ones (and need
    positions), equal to what encode sends at that lambda; without it training codes are the nearest."""
    rng = np.random.default_rng(8)
    q = quantizer()
    rate = ContextRate(fitted(q, rng, frames=3))
    occ = lidar_like_occupancy(rng)
    cells = np.flatnonzero(occ.ravel())
    x, pos = features(q, rng, cells), cell_positions(cells, GEO.width)
    q.set_rate(2.0, rate, in_training=True)
    sent = q.encode(x, pos)
    q.set_mode("gradient")  # a trained quantizer: no entry new (no k-means start, EMA move or restart)
    q.initialised.fill_(True)
    q.stage_start.fill_(K)
    q.train()
    with pytest.raises(ValueError, match="needs the rows' positions"):
        q(x)
    trained = q(x, pos).codes
    assert torch.equal(trained, sent)
    q.set_rate(2.0, rate)  # outside training only
    assert not q.rate_active
    nearest = q(x).codes
    q.set_rate(0.0)
    assert torch.equal(nearest, q(x).codes) and not torch.equal(nearest, trained)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="rate lambda must be a number >= 0"):
            q.set_rate(bad, ContextRate(ProbabilityModels.empty(GEO, 2, (K,))))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_the_bottleneck_passes_each_rows_position(mode):
    """PointPillarRQ's bottleneck in eval with a rate set: the codes of a batch of two frames equal
    the quantizer's own choice per frame with explicit positions (sparse pillars or every BEV cell)."""
    from easydict import EasyDict

    from pcdet_ext.openpcdet.models.bottlenecks.rq_bottleneck import RQBottleneck
    rng = np.random.default_rng(9)
    torch.manual_seed(0)
    bottleneck = RQBottleneck(EasyDict(NUM_CODEBOOKS=2, CODEBOOK_SIZE=K, EMBEDDING_SCHEDULE=[16, K], MODE=mode),
                              input_channels=8)
    q = bottleneck.quantizer
    with torch.no_grad():
        q.codebooks[0].copy_(torch.randn(K, 8))
        q.codebooks[1].copy_(0.3 * torch.randn(K, 8))
    q.set_active(2, K)
    bottleneck.eval()
    q.set_rate(0.5, ContextRate(fitted(q, rng, frames=3)))
    frames = [np.flatnonzero(lidar_like_occupancy(rng).ravel()) for _ in range(2)]
    if mode == "dense":
        frames = [np.arange(GEO.height * GEO.width)] * 2
    xs = [features(q, rng, cells) for cells in frames]
    alone = torch.cat([q.encode(x, cell_positions(c, GEO.width)) for x, c in zip(xs, frames)])
    if mode == "sparse":
        coords = torch.cat([torch.stack([torch.full((len(c),), b), torch.zeros(len(c), dtype=torch.long),
                                         torch.from_numpy(c // GEO.width), torch.from_numpy(c % GEO.width)], 1)
                            for b, c in enumerate(frames)])
        batch = {"pillar_features": torch.cat(xs), "voxel_coords": coords.int()}
    else:
        bev = torch.stack([x.reshape(GEO.height, GEO.width, 8).permute(2, 0, 1) for x in xs])
        batch = {"spatial_features": bev}
    with torch.no_grad():
        out = bottleneck(batch)
    assert torch.equal(out["rq_codes"], alone)


def test_joint_cell_trains_every_codebook_of_the_cell_and_restores_the_quantizer():
    from pcdet_ext.deploy.rate_distortion import joint_cell
    q = quantizer()
    data = torch.randn(400, 8)
    q.start_stage(0, 16, data)
    q.start_stage(1, 16, data)
    before = (q.mode, q.active_sizes(), [cb.requires_grad for cb in q.codebooks], q.stage_start.tolist(),
              q.freeze_earlier, q.operating_point_training)
    assert before[2] == [False, True]  # progressive: only the deepest codebook trains
    with joint_cell(q, 2, 16) as params:
        assert len(params) == 2 and all(cb.requires_grad for cb in q.codebooks)
        assert q.mode == "gradient" and q.active_sizes() == [16, 16] and q.stage_start.tolist() == [16, 16]
        assert not q.operating_point_training
    assert (q.mode, q.active_sizes(), [cb.requires_grad for cb in q.codebooks], q.stage_start.tolist(),
            q.freeze_earlier, q.operating_point_training) == before
