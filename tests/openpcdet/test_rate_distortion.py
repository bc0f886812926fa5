"""Rate-distortion training on the real pipeline: the codebooks of the cell train on the detection loss
with the codes the edge would send (rate-aware under the current models), the models are refitted on
those codes, and the quantizer's training state comes back unchanged; a learned pillar gate drops
pillars from what is coded and scattered, and its rate term teaches it to."""
import copy

import numpy as np
import pytest
import torch

from pcdet_ext.algorithms.pillar_gate import PillarGate
from pcdet_ext.deploy import baselines, runtime
from pcdet_ext.deploy import keep_drop, rate_distortion
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


def test_dropped_pillars_are_neither_coded_nor_scattered_and_the_gate_learns_to_drop(trained_2x16):
    from pcdet.models import load_data_to_gpu
    model, start, test_set, train_loader, fit, models = trained_2x16
    model.load_state_dict(start)
    q = model.quantizer
    gate = PillarGate(q.dim)
    batch = next(iter(train_loader))
    load_data_to_gpu(batch)
    with torch.no_grad():  # keeps half the pillars, drops the others
        gate.net[2].weight.normal_()
        gate.net[2].bias.zero_()
        gate.net[2].bias.fill_(-float(gate.net(model.vfe(dict(batch))["pillar_features"]).median()))
    bev = []
    hook = model.map_to_bev_module.register_forward_hook(lambda m, i, out: bev.append(out["spatial_features"]))
    model.eval()
    try:
        with torch.no_grad():
            keep = gate(model.vfe(dict(batch))["pillar_features"])[0]
            every = batch["voxel_coords"].long().clone()
            bits = keep_drop.code_bits(models, 16, 40.0)
            with keep_drop.gated(model, gate, bits):
                model(batch)
    finally:
        hook.remove()
    coords = batch["voxel_coords"].long()
    assert 0 < int(keep.sum()) < len(keep) and len(coords) == int(keep.sum()) == len(batch["rq_codes"])
    occupied = bev[0].abs().sum(1) > 0  # [B, H, W]
    dropped = every[~keep]
    assert torch.equal(coords, every[keep]) and not occupied[dropped[:, 0], dropped[:, 2], dropped[:, 3]].any()
    assert occupied[coords[:, 0], coords[:, 2], coords[:, 3]].any()
    assert not hasattr(model, "pillar_gate") and not model.rq_bottleneck._forward_hooks

    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    gate = PillarGate(q.dim)
    modes = []  # the quantizer stays in eval mode while the model trains (no EMA, restart or sampled cell)
    hook = model.rq_bottleneck.register_forward_hook(lambda m, i, out: modes.append((model.training, m.training)))
    try:
        losses = keep_drop.train_gate(model, gate, train_loader, keep_drop.code_bits(models, 16, 40.0), 200.0,
                                      steps=6, lr=0.05)
    finally:
        hook.remove()
    assert modes == [(True, False)] * 6
    assert len(losses) == 6 and all(np.isfinite(losses))
    feats = torch.from_numpy(baselines.pillar_features(model, train_loader, 4))
    assert float(gate(feats)[0].float().mean()) < 0.9  # the rate term taught it to drop pillars
    changed = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert changed == ["global_step"], changed  # only the gate trained (OpenPCDet's counter counts its steps)
    assert [p.requires_grad for p in model.parameters()] == grads
