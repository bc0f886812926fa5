"""Rate-distortion training on the real pipeline: the codebooks of the cell train on the detection loss
with the codes the edge would send (rate-aware under the current models), the models are refitted on
those codes, and the quantizer's training state comes back unchanged."""
import copy

import numpy as np
import pytest
import torch

from pcdet_ext.deploy import baselines, runtime
from pcdet_ext.engine.recipes.progressive_rq import rate_distortion
from test_split_runtime import frames
from test_study_baselines import sparse  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def trained_2x16(sparse, synthetic_kitti):
    """The study baselines' model with a 2 x 16 quantizer started from the pillar features (k-means++), as
    progressive training leaves it, its state (each test starts from it) and its bitstream models."""
    model, test_set, _, train_loader, _ = sparse
    q = model.quantizer
    feats = torch.from_numpy(baselines.pillar_features(model, train_loader, 8))
    q.start_stage(0, 16, feats)
    q.start_stage(1, 16, feats)
    fit = frames(synthetic_kitti, "train")
    models = runtime.fit_probability_models(model, test_set, fit, [16])
    return model, copy.deepcopy(model.state_dict()), test_set, train_loader, fit, models


def order0_bits(models, c):
    p = models.code_counts[16][c] / models.code_counts[16][c].sum()
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


def test_trains_every_codebook_of_the_cell_under_the_rate_choice_and_refits(trained_2x16):
    model, start, test_set, train_loader, fit, models = trained_2x16
    model.load_state_dict(start)
    q = model.quantizer
    with torch.no_grad():  # nearest codes of the started quantizer use most of the 16 entries
        nearest = q.encode(torch.from_numpy(baselines.pillar_features(model, train_loader, 4)))
    assert len(torch.unique(nearest[:, 0])) >= 8
    state = (q.mode, q.active_sizes(), [cb.requires_grad for cb in q.codebooks], q.stage_start.tolist())
    before = [cb.detach().clone() for cb in q.codebooks]
    seen = []
    hook = model.rq_bottleneck.register_forward_hook(
        lambda m, i, out: seen.append(out["rq_codes"].clone()) if m.training else None)
    try:  # a lambda large enough that the cheapest code in its context wins nearly everywhere
        refitted = rate_distortion.rate_distortion_train(model, train_loader, test_set, fit, models, 2, 16, 50.0, [16],
                                                         rounds=1, steps=3)
    finally:
        hook.remove()
    assert len(seen) == 3 and all(c.shape[1] == 2 for c in seen)  # the cell (2, 16) in every step
    codes = torch.cat(seen)
    assert len(torch.unique(codes[:, 0])) <= 3  # rate-aware in training (nearest codes use most of the 16)
    assert not torch.equal(q.codebooks[0], before[0]) and not torch.equal(q.codebooks[1], before[1])
    assert torch.equal(q.codebooks[2], before[2])  # outside the cell
    assert (q.mode, q.active_sizes(), [cb.requires_grad for cb in q.codebooks], q.stage_start.tolist()) == state
    assert order0_bits(refitted, 0) < 0.5 * order0_bits(models, 0)  # fitted on the codes now chosen


def test_the_refit_control_keeps_the_codebooks_and_lambda_must_be_positive(trained_2x16):
    model, start, test_set, train_loader, fit, models = trained_2x16
    model.load_state_dict(start)
    before = [cb.detach().clone() for cb in model.quantizer.codebooks]
    refitted = rate_distortion.refit_rate_aware(model, test_set, fit, models, 50.0, [16])
    assert all(torch.equal(a, b) for a, b in zip(model.quantizer.codebooks, before))
    assert order0_bits(refitted, 0) < order0_bits(models, 0) and not model.quantizer.rate_active
    with pytest.raises(ValueError, match="rate lambda > 0"):
        rate_distortion.rate_distortion_train(model, train_loader, test_set, fit, models, 2, 16, 0.0, [16])
