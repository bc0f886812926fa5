"""Phase 2 pure-torch parts: MLFR inputs and loss, voxel and frame contrast, momentum schedule,
loss balancing (tier 1)."""
import math

import pytest
import torch

from pcdet_ext.algorithms.contrastive import (FrameQueue, ProjectionHead, check_queue_size, frame_infonce,
                                             top1_retrieval, voxel_infonce)
from pcdet_ext.algorithms.loss_balancing import LossBalancer
from pcdet_ext.algorithms.mlfr import (nearest_visible_baseline, reconstruction_loss, sinusoidal_position,
                                       teacher_site_inputs)
from pcdet_ext.algorithms.momentum import cosine_momentum

SHAPE = (8, 16, 16)


def sites(n, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch * 8 * 16 * 16, generator=g)[:n]
    b, rest = flat // (8 * 16 * 16), flat % (8 * 16 * 16)
    return torch.stack([b, rest // 256, (rest // 16) % 16, rest % 16], 1).int()


def test_teacher_site_inputs_put_the_token_exactly_where_the_student_lacks_the_site():
    t_idx = sites(200, 0)
    keep = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.4
    s_idx, s_feat = t_idx[keep], torch.randn(int(keep.sum()), 8)
    token = torch.randn(8)
    pos = sinusoidal_position(t_idx, SHAPE, 8)
    feats, masked = teacher_site_inputs((s_feat, s_idx), t_idx, SHAPE, token, pos)
    assert torch.equal(masked, ~keep)
    assert torch.allclose(feats[keep], s_feat) and torch.allclose(feats[~keep], token + pos[~keep])
    assert pos.abs().sum() > 0 and not torch.allclose(pos[0], pos[1])


def test_mlfr_loss_scores_masked_sites_and_its_gradient_reaches_the_prediction_only():
    torch.manual_seed(0)
    teacher = torch.randn(100, 16, requires_grad=True)
    pred = torch.randn(100, 16, requires_grad=True)
    masked = torch.arange(100) < 60
    for kind in ("smooth_l1", "cosine"):
        loss = reconstruction_loss(pred, teacher, masked, kind)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        assert pred.grad.abs().sum() > 0 and teacher.grad is None
        assert pred.grad[~masked].abs().sum() == 0  # visible sites carry no weight by default
        pred.grad = None
        visible_changed = teacher.detach().clone()
        visible_changed[~masked] += 5 * torch.randn(40, 16)
        assert torch.allclose(reconstruction_loss(pred, visible_changed, masked, kind), loss)
        masked_changed = teacher.detach().clone()
        masked_changed[masked] = torch.randn(60, 16)
        assert not torch.allclose(reconstruction_loss(pred, masked_changed, masked, kind), loss)
        assert reconstruction_loss(pred, teacher, masked, kind, visible_weight=0.1) > loss
    with pytest.raises(ValueError, match="MLFR loss"):
        reconstruction_loss(pred, teacher, masked, "l3")
    with pytest.raises(ValueError, match=">= 0"):
        reconstruction_loss(pred, teacher, masked, visible_weight=-1)


def test_nearest_visible_baseline_copies_the_closest_visible_site_of_the_same_sample():
    t_idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 5], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.int32)
    s_idx = t_idx[[0, 1]]
    s_feat = torch.tensor([[1.0], [2.0]])
    masked = torch.tensor([False, False, True, True])
    out = nearest_visible_baseline((s_feat, s_idx), t_idx, masked)
    assert out.tolist() == [[0.0], [1.0]]  # sample 1 has no visible site: zeros; (0,0,0,1) nearest (0,0,0,0)


def test_voxel_infonce_is_finite_input_dependent_and_never_trains_the_teacher():
    torch.manual_seed(0)
    s = torch.randn(64, 32, requires_grad=True)
    t = torch.randn(64, 32, requires_grad=True)
    loss = voxel_infonce(s, t)
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0 and t.grad is None
    aligned = voxel_infonce(t.detach() + 0.01 * torch.randn(64, 32), t)
    assert aligned < loss  # matching projections score lower than random ones
    assert top1_retrieval(t.detach() + 0.01 * torch.randn(64, 32), t.detach()) == 1.0
    hard = voxel_infonce(s, t, hard_negative_ratio=0.3)
    assert torch.isfinite(hard) and not torch.allclose(hard, loss)
    with pytest.raises(ValueError, match="CONTRASTIVE_TEMPERATURE"):
        voxel_infonce(s, t, temperature=0.0)


def test_frame_queue_and_sequence_aware_negatives():
    torch.manual_seed(0)
    q = FrameQueue(8, 16)
    s, t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    seq = torch.tensor([0, 0, 1, 2])
    loss = frame_infonce(s, t, seq, q)
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0
    q.enqueue(t, seq)
    assert int(q.pointer) == 4 and q.sequence[:4].tolist() == [0, 0, 1, 2]
    q.enqueue(t, seq)
    assert int(q.pointer) == 0
    # a near-duplicate of frame 0 in the queue under frame 0's sequence is no negative for it
    q2 = FrameQueue(4, 16)
    q2.enqueue(torch.stack([s.detach()[0]] * 4), torch.tensor([0, 0, 0, 0]))
    same = frame_infonce(s, t, seq, q2)
    q3 = FrameQueue(4, 16)
    q3.enqueue(torch.stack([s.detach()[0]] * 4), torch.tensor([7, 7, 7, 7]))
    other = frame_infonce(s, t, seq, q3)
    assert other > same
    with pytest.raises(ValueError, match="multiple of the global batch"):
        check_queue_size(6, 4)
    short = FrameQueue(6, 16)  # a short last batch of an epoch wraps around
    short.enqueue(torch.randn(4, 16), seq), short.enqueue(torch.randn(4, 16), seq + 10)
    assert int(short.pointer) == 2 and short.sequence.tolist() == [11, 12, 1, 2, 10, 10]
    # a window: only frames at most `window` indices apart in one sequence are near-duplicates
    idx = torch.tensor([0, 50, 0, 0])
    q4 = FrameQueue(4, 16)
    q4.enqueue(torch.stack([s.detach()[0]] * 4), torch.tensor([0, 0, 0, 0]), torch.tensor([1, 2, 3, 100]))
    windowed = frame_infonce(s, t, seq, q4, index=idx, window=10)
    whole = frame_infonce(s, t, seq, q4, index=idx)
    assert windowed > whole  # frame index 100 is a negative again under the window
    assert frame_infonce(s, t, seq, q4, index=idx, window=10, max_negatives=3) < windowed  # the newest three only
    with pytest.raises(ValueError, match="FRAME_TEMPERATURE"):
        frame_infonce(s, t, seq, q, temperature=-1)


def test_frame_hard_negative_mining_keeps_the_most_similar_share():
    import torch.nn.functional as F
    torch.manual_seed(1)
    q = FrameQueue(32, 16)
    q.enqueue(torch.randn(32, 16), torch.arange(10, 42))
    s, t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    seq = torch.arange(4)
    full = frame_infonce(s, t, seq, q, temperature=0.1)
    assert torch.allclose(frame_infonce(s, t, seq, q, temperature=0.1, hard_negative_ratio=1.0), full)
    hard = frame_infonce(s, t, seq, q, temperature=0.1, hard_negative_ratio=0.25)
    hard.backward()
    assert torch.isfinite(hard) and s.grad.abs().sum() > 0 and hard < full
    sn, tn = F.normalize(s.detach(), dim=1), F.normalize(t, dim=1)
    neg = torch.cat([(sn @ tn.t()).masked_fill(torch.eye(4, dtype=torch.bool), -float("inf")), sn @ q.keys.t()], 1)
    kept = neg.topk(9, dim=1).values  # round(0.25 x 36 negative columns)
    expect = F.cross_entropy(torch.cat([(sn * tn).sum(1, keepdim=True), kept], 1) / 0.1, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(hard.detach(), expect, atol=1e-5)
    with pytest.raises(ValueError, match="HARD_NEGATIVE_RATIO"):
        frame_infonce(s, t, seq, q, hard_negative_ratio=0.0)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(500, 100, 0.99, 1.0) == pytest.approx(1.0)
    vals = [cosine_momentum(i, 10, 0.9, 1.0) for i in range(11)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError, match="start <= end"):
        cosine_momentum(0, 10, 1.0, 0.9)


def test_loss_balancer_fixed_and_uncertainty():
    losses = {"occupancy": torch.tensor(2.0, requires_grad=True), "mlfr": torch.tensor(1.0, requires_grad=True)}
    total, eff = LossBalancer({"occupancy": 1.0, "mlfr": 0.5})(losses)
    assert float(total.detach()) == pytest.approx(2.5) and eff == {"occupancy": 1.0, "mlfr": 0.5}
    bal = LossBalancer({"occupancy": 1.0, "mlfr": 0.5}, mode="uncertainty")
    total, eff = bal(losses)
    total.backward()
    assert float(total.detach()) == pytest.approx(2.5) and all(p.grad is not None for p in bal.parameters())
    assert bal.log_vars["occupancy"].grad < 0  # descent raises the log-variance of a large loss (w L > 1)
    with pytest.raises(ValueError, match="loss weight mlfr"):
        LossBalancer({"mlfr": -1.0})
    with pytest.raises(KeyError, match="no weight"):
        LossBalancer({"mlfr": 1.0})({"other": torch.tensor(1.0)})
    assert math.isfinite(eff["mlfr"])


def test_projection_head_any_number_of_rows():
    head = ProjectionHead(16, 8).train()
    assert head(torch.randn(1, 16)).shape == (1, 8) and head(torch.randn(0, 16)).shape == (0, 8)
