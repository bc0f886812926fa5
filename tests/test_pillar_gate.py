"""The learned pillar keep/drop gate (pure torch): a hard 0/1 keep in the forward with the sigmoid's gradient,
starting by keeping every pillar, and a rate term in KB per frame that trains it."""
import pytest
import torch

from pcdet_ext.algorithms.pillar_gate import PillarGate, kept_bits


def test_starts_keeping_everything_and_the_forward_is_the_hard_decision():
    torch.manual_seed(0)
    gate = PillarGate(8)
    feats = torch.randn(50, 8)
    keep, value = gate(feats)
    assert keep.all() and torch.equal(value, torch.ones(50))
    with torch.no_grad():
        gate.net[2].weight.normal_()
        gate.net[2].bias.zero_()
    keep, value = gate(feats)
    assert 0 < int(keep.sum()) < 50 and torch.allclose(value, keep.float(), atol=1e-6)  # forward: 0 / 1


def test_the_rate_term_counts_kept_bits_and_trains_the_gate_toward_dropping():
    torch.manual_seed(1)
    gate = PillarGate(8)
    feats, bits = torch.randn(64, 8), torch.full((64,), 8192.0)  # 1 KB a pillar
    _, value = gate(feats)
    rate = kept_bits(value, bits, frames=2)
    assert float(rate.detach()) == pytest.approx(32.0)  # 64 pillars x 1 KB over 2 frames
    rate.backward()
    assert gate.net[2].bias.grad is not None and float(gate.net[2].bias.grad) > 0  # lowering the score lowers the rate
    opt = torch.optim.SGD(gate.parameters(), lr=10.0)
    for _ in range(20):
        opt.zero_grad()
        kept_bits(gate(feats)[1], bits, 2).backward()
        opt.step()
    assert float(gate(feats)[0].float().mean()) < 0.5
    with pytest.raises(ValueError, match="gate .* and bits .* differ"):
        kept_bits(value, bits[:3], 1)
    with pytest.raises(ValueError, match="init_keep must be > 0"):
        PillarGate(8, init_keep=0.0)


def test_every_frame_keeps_at_least_its_best_pillar():
    gate = PillarGate(4)
    with torch.no_grad():
        gate.net[2].bias.fill_(-5.0)  # drops everything
        gate.net[2].weight.normal_()
    feats, sample = torch.randn(12, 4), torch.tensor([0] * 5 + [2] * 7)  # frame 1 has no pillar at all
    assert not gate(feats)[0].any()
    keep, value = gate(feats, sample)
    assert keep.tolist().count(True) == 2 and keep[:5].any() and keep[5:].any()
    scores = gate.net(feats).squeeze(1)
    assert bool(keep[int(scores[:5].argmax())]) and bool(keep[5 + int(scores[5:].argmax())])
    assert torch.allclose(value, keep.float(), atol=1e-6)
