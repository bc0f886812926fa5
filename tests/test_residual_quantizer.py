"""ResidualQuantizer: nesting, EMA warm-up, restarts, growth, gradient path, state, bad input."""
import os

import pytest
import torch
import torch.distributed as dist

from _subproc import run_gloo_ranks
from pcdet_ext.algorithms.quantization import ResidualQuantizer
from pcdet_ext.algorithms.quantization.nn_search import _first_min_cpu, kmeans_pp, nearest

SCHED = (4, 8, 16)


def mixture(n=3000, k=8, dim=6, seed=0, spread=5.0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    labels = torch.randint(k, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), centres, labels


def mse(q, x):
    q.eval()
    with torch.no_grad():
        return float((q.decode(q.encode(x)) - x).pow(2).mean())


def make(**kw):
    torch.manual_seed(0)
    args = dict(dim=6, num_codebooks=3, codebook_size=16, schedule=SCHED)
    args.update(kw)
    return ResidualQuantizer(**args)


def staged(x, k, mode, **kw):
    """A quantizer in training mode with codebook 0 started at ``k`` entries from ``x``."""
    q = make(**kw)
    q.train()
    q.start_stage(0, k, x)
    q.set_mode(mode)
    return q


def test_nearest_matches_brute_force_and_chunks():
    g = torch.Generator().manual_seed(1)
    x, book = torch.randn(1000, 5, generator=g), torch.randn(37, 5, generator=g)
    ref = torch.cdist(x, book).argmin(1)
    assert torch.equal(nearest(x, book, chunk=64), ref)


def test_first_min_equals_argmin_on_the_same_block():
    """The CPU float32 argmin from value-only reductions: ties go to the lowest index, zero minima
    of both signs in both orders, negative distances, a row of infinities and one of NaNs (index 0,
    as argmin). 63 columns: an odd K, so a negative-zero key would not wrap to a valid one."""
    g = torch.Generator().manual_seed(2)
    block = torch.randn(300, 63, generator=g)
    block[:100, 40] = block[:100].min(1).values  # ties with an earlier minimum
    block[100:150, 3] = block[100:150, 60] = block[100:150].min(1).values - 1  # tie later in the row
    block[150:170] = block[150:170].abs() + 1
    block[150:160, 7], block[150:160, 9] = 0.0, -0.0
    block[160:170, 7], block[160:170, 9] = -0.0, 0.0
    block[170], block[171] = float("inf"), float("nan")
    ref = block.argmin(1)
    got = _first_min_cpu(block.clone(), torch.empty(300, 1), torch.arange(63, dtype=torch.int32))
    assert torch.equal(got.long(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_on_exact_ties(dtype):
    """Integer-valued data make every distance exact, so duplicated codewords tie exactly: the
    lowest index wins, with and without a penalty (per entry and per row), in any chunking."""
    g = torch.Generator().manual_seed(3)
    book = torch.randint(-3, 4, (40, 8), generator=g).to(dtype)
    book = torch.cat([book, book[:10], torch.zeros(1, 8, dtype=dtype)])
    x = torch.cat([torch.randint(-3, 4, (500, 8), generator=g).to(dtype), book[:30], torch.zeros(3, 8, dtype=dtype)])
    for penalty in [None, torch.randint(0, 3, (len(book),), generator=g).to(dtype),
                    torch.randint(0, 3, (len(x), len(book)), generator=g).to(dtype)]:
        dist = torch.cdist(x.double(), book.double()).pow(2).round()
        ref = (dist if penalty is None else dist + penalty).argmin(1)
        for chunk in (None, 7, 100):
            assert torch.equal(nearest(x, book, chunk=chunk, penalty=penalty), ref)
    assert torch.equal(nearest(x[:5], book[:1]), torch.zeros(5, dtype=torch.long))


def test_codes_respect_active_size_and_prefix_decoding():
    x, _, _ = mixture()
    q = staged(x, 16, "ema")
    for _ in range(5):
        q(x)
    q.eval()
    for k in SCHED:
        q.set_active(1, k)
        codes = q.encode(x)
        assert codes.shape == (len(x), 1) and int(codes.max()) <= k - 1
    q.set_active(3, 8)
    codes = q.encode(x)
    assert codes.shape == (len(x), 3)
    full = q.decode(codes)
    prefix = q.decode(codes[:, :1])
    torch.testing.assert_close(prefix, q.codebooks[0][codes[:, 0]])
    torch.testing.assert_close(full, sum(q.codebooks[c][codes[:, c]] for c in range(3)))


def test_ema_warmup_moves_entries_to_cluster_means():
    x, centres, _ = mixture(k=8, noise=0.05)
    q = make(num_codebooks=1, codebook_size=8, schedule=(8,), operating_point_training=False)
    q.train()
    q.start_stage(0, 8, x)
    q.set_mode("ema")
    for _ in range(40):
        q(x)
    d = torch.cdist(centres, q.codebooks[0].detach())
    assert float(d.min(1).values.max()) < 0.1  # every cluster mean has an entry on it
    assert mse(q, x) < 0.02


def test_dead_entries_restart_only_in_current_stage():
    x, _, _ = mixture(k=4)
    q = make(num_codebooks=1, codebook_size=16, schedule=(4, 16), dead_threshold=0.5)
    q.train()
    q.start_stage(0, 4, x)
    q.set_mode("ema")
    for _ in range(10):
        q(x)
    old = q.codebooks[0][:4].detach().clone()
    q.start_stage(0, 16, x)
    far = torch.full((12, 6), 1e3)
    q.codebooks[0].data[4:16] = far  # no data near these: they die
    q.ema_count[0, 4:16] = 0.0
    q.operating_point_training = False
    q(x)
    assert float(q.codebooks[0][4:16].detach().abs().max()) < 100  # restarted from residuals
    assert torch.equal(q.codebooks[0][:4].detach(), old) or q.mode == "ema"
    q.set_mode("gradient")
    before = q.codebooks[0][:4].detach().clone()
    q.ema_count[0, :4] = 0.0  # even unused, entries of earlier stages are not restarted
    q(x)
    assert torch.equal(q.codebooks[0][:4].detach(), before)


def test_growing_initialises_new_entries_from_data():
    x, _, _ = mixture(k=16)
    q = make(num_codebooks=1)
    q.train()
    q.start_stage(0, 4, x)
    old = q.codebooks[0][:4].detach().clone()
    assert bool(q.initialised[0, :4].all()) and not bool(q.initialised[0, 4:].any())
    q.start_stage(0, 8, x)
    new = q.codebooks[0][4:8].detach()
    assert torch.equal(q.codebooks[0][:4].detach(), old)
    exact = torch.cdist(new, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(exact.min(1).values.max()) < 0.3  # each new entry sits in the data (a Lloyd mean of k-means++ seeds)
    assert float(torch.cdist(new, old).min()) > 0.5  # and away from existing entries
    assert int(q.stage_start[0]) == 4 and int(q.trained_size[0]) == 8


def test_gradient_reaches_codebook_through_frozen_input():
    x, _, _ = mixture()
    q = staged(x, 8, "gradient")
    target = torch.randn_like(x)
    out = q(x.requires_grad_(False))
    assert set(out.losses) == {"codebook"}  # no adapter: no commitment term reported
    task = (out.quantized - target).pow(2).mean()
    (task + out.losses["codebook"]).backward()
    grad = q.codebooks[0].grad
    assert grad is not None and float(grad[:8].abs().sum()) > 0 and float(grad[8:].abs().sum()) == 0
    for loss in out.losses.values():
        assert torch.isfinite(loss) and loss.requires_grad


def test_ema_mode_output_does_not_train_codebooks_and_losses_depend_on_input():
    x, _, _ = mixture()
    q = staged(x, 8, "ema")
    out = q(x)
    assert out.losses == {} and not out.quantized.requires_grad
    q.set_mode("gradient")
    a = q(x).losses["codebook"]
    b = q(x * 3).losses["codebook"]
    assert float(a.detach()) != float(b.detach())


def test_adapter_commitment_trains_the_adapter():
    x, _, _ = mixture()
    q = staged(x, 8, "gradient", adapter_dim=4)
    out = q(x)
    assert set(out.losses) == {"codebook", "commitment"}
    out.losses["commitment"].backward()
    assert float(q.adapter_in.weight.grad.abs().sum()) > 0
    assert out.quantized.shape == x.shape


def test_freeze_earlier_codebooks():
    x, _, _ = mixture()
    q = staged(x, 8, "ema")
    q.start_stage(1, 4, x)
    assert q.trainable_codebooks() == [1]
    assert not q.codebooks[0].requires_grad and q.codebooks[1].requires_grad
    q2 = make(freeze_earlier=False)
    q2.start_stage(0, 8, x)
    q2.start_stage(1, 4, x)
    assert q2.trainable_codebooks() == [0, 1]


def test_smaller_prefix_error_does_not_rise_when_larger_stage_trains():
    """The k=16 stage trains by gradient, where the prefix can move: operating-point training keeps the
    k=4 prefix working (training at k=16 only would drift it)."""
    x, _, _ = mixture(k=16, noise=0.3)
    q = staged(x, 4, "gradient", num_codebooks=1, codebook_size=16)
    _gradient_steps(q, x, 30)
    q.set_active(1, 4)
    err4 = mse(q, x)
    q.train()
    q.start_stage(0, 16, x)
    prefix = q.codebooks[0][:4].detach().clone()
    torch.manual_seed(1)
    _gradient_steps(q, x, 150, lr=0.3)  # operating-point training samples k in {4, 8, 16}
    assert not torch.equal(q.codebooks[0][:4].detach(), prefix)  # the prefix did train in this stage
    q.set_active(1, 4)
    assert mse(q, x) <= err4 * 1.05  # measured 0.98x (training at k=16 only: 1.16x)
    q.set_active(1, 16)
    assert mse(q, x) < err4


def test_state_dict_round_trip_across_set_active():
    x, _, _ = mixture()
    q = staged(x, 16, "gradient")
    q.start_stage(1, 8, x)
    shapes = {k: v.shape for k, v in make().state_dict().items()}
    state = q.state_dict()
    assert {k: v.shape for k, v in state.items()} == shapes  # one shape in every stage
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.mode == "gradient" and fresh.active_sizes() == [16, 8]
    assert fresh.trainable_codebooks() == [1] or not fresh.freeze_earlier
    fresh.eval(), q.eval()
    assert torch.equal(fresh.encode(x), q.encode(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule=(8, 4)), "strictly increasing"),
    (dict(schedule=(4, 32)), "1..codebook_size=16"),
    (dict(num_codebooks=0), "num_codebooks must be >= 1"),
    (dict(decay=1.0), "decay"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_runtime_inputs():
    q = make()
    with pytest.raises(ValueError, match=r"num_codebooks must be in 1..3"):
        q.set_active(4, 8)
    with pytest.raises(ValueError, match=r"num_embeddings must be in 1..16"):
        q.set_active(1, 17)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        q(torch.randn(5, 7))
    bad = torch.randn(10, 6)
    bad[3, 2] = float("nan")
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match="2 of 10 input vectors contain NaN/inf"):
        q.train()(bad)
    assert torch.isfinite(q.codebooks[0]).all()
    with pytest.raises(ValueError, match="mode must be one of"):
        q.set_mode("adam")
    with pytest.raises(ValueError, match="not in the schedule"):
        q.start_stage(0, 5)


def test_kmeans_pp_spreads_over_clusters():
    x, centres, _ = mixture(k=6, noise=0.01)
    picks = kmeans_pp(x, x.new_zeros((0, 6)), 6, torch.Generator().manual_seed(0))
    assert float(torch.cdist(centres, picks).min(1).values.max()) < 0.2


def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial state
        q = ResidualQuantizer(dim=6, num_codebooks=2, codebook_size=16, schedule=(4, 16))
        x, _, _ = mixture(seed=rank)  # different data on each rank
        q.train()
        q.start_stage(0, 16, x)
        q.set_mode("ema")
        for _ in range(3):
            q(x)
        q.set_mode("gradient")
        torch.manual_seed(100 + rank)  # each rank would draw its own operating points: rank 0's are broadcast
        points = [tuple(q(x).num_embeddings) for _ in range(8)]
        results[rank] = (q.codebooks[0].detach().clone(), q.ema_count.clone(), points)
    finally:
        dist.destroy_process_group()


def test_ddp_ema_sync_two_gloo_processes():
    results = run_gloo_ranks(_ddp_worker)
    (cb0, cnt0, pts0), (cb1, cnt1, pts1) = results[0], results[1]
    assert torch.equal(cb0, cb1) and torch.equal(cnt0, cnt1)
    assert pts0 == pts1 and len(set(pts0)) > 1  # one sampled (n, k) per step on every rank


def test_codebook_loss_equals_direct_mse_in_value_and_gradient():
    x, _, _ = mixture(noise=0.5)
    q = make(operating_point_training=False, freeze_earlier=False)
    q.train()
    q.start_stage(0, 16, x)
    q.start_stage(1, 8, x)
    q.set_mode("gradient")
    out = q(x)
    out.losses["codebook"].backward()
    fast_grads = [cb.grad.clone() for cb in q.codebooks[:2]]
    q.zero_grad()
    codes = out.codes
    r0 = x
    g0 = q.codebooks[0][codes[:, 0]]
    r1 = (r0 - g0).detach()
    g1 = q.codebooks[1][:8][codes[:, 1]]
    direct = (r0 - g0).pow(2).mean() + (r1 - g1).pow(2).mean()
    direct.backward()
    torch.testing.assert_close(out.losses["codebook"].detach(), direct.detach(), rtol=1e-4, atol=1e-5)
    for fast, cb in zip(fast_grads, q.codebooks[:2]):
        torch.testing.assert_close(fast, cb.grad, rtol=1e-4, atol=1e-6)


def test_quantization_stays_fp32_under_autocast():
    x, _, _ = mixture()
    q = make()
    q.train()
    q.start_stage(0, 16, x)
    q.eval()
    ref = q.encode(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes = q.encode(x)
        out = q(x.bfloat16())
    assert torch.equal(codes, ref)
    assert out.quantized.dtype == torch.float32 and torch.equal(out.codes, q.encode(x.bfloat16().float()))


def _gradient_steps(q, x, steps, lr=0.1):
    """SGD on every trainable tensor (codebooks, adapter) with the quantizer's own losses."""
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = sum(q(x).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ema_warmup_of_a_stage_leaves_earlier_trained_entries_bit_identical():
    x, _, _ = mixture(k=16)
    q = staged(x, 4, "gradient", num_codebooks=1, schedule=(4, 16))
    _gradient_steps(q, x, 50)
    before = q.codebooks[0].detach().clone()
    q.start_stage(0, 16, x)
    q.set_mode("ema")
    new_init = q.codebooks[0][4:16].detach().clone()
    for _ in range(3):
        q(x)
    assert torch.equal(q.codebooks[0][:4].detach(), before[:4])     # trained in the k=4 stage: untouched by EMA
    assert not torch.equal(q.codebooks[0][4:16].detach(), new_init)  # the stage's own entries do move
    # after gradient epochs moved entries and counts, EMA restarts from sum = entry x count (no jump)
    q.set_mode("gradient")
    _gradient_steps(q, x, 5)
    q.set_mode("ema")
    torch.testing.assert_close(q.ema_sum[0], q.codebooks[0].detach() * q.ema_count[0].unsqueeze(1))


def test_legacy_ema_trains_every_codebook_opened_together():
    """Legacy mode (all codebooks together, freeze_earlier off): EMA warm-up moves every codebook."""
    x, _, _ = mixture(k=16, noise=0.5)
    shifted, _, _ = mixture(k=16, noise=0.5, seed=1)  # other data than the initialisation's: every entry has to move
    q = make(freeze_earlier=False, schedule=(16,))
    q.train()
    q.start_together(3, 16, x)
    q.set_mode("ema")
    before = [b.detach().clone() for b in q.codebooks]
    for _ in range(30):
        q(shifted)
    moved = [float((b.detach() - b0).abs().max()) for b, b0 in zip(q.codebooks, before)]
    assert all(m > 1e-3 for m in moved), moved
    assert q.active_sizes() == [16, 16, 16] and q.stage_start.tolist() == [0, 0, 0]


def test_every_warmup_batch_updates_the_stages_new_entries():
    """EMA warm-up of the k=16 stage assigns at k=16 (no operating-point sampling of a smaller k), so
    each batch moves the stage's new entries [4, 16); gradient batches still sample k."""
    x, _, _ = mixture(k=16, noise=0.5)
    q = staged(x, 4, "ema", num_codebooks=1)
    q.start_stage(0, 16, x)
    q.set_mode("ema")
    changed = 0
    for step in range(20):
        before = q.codebooks[0][4:16].detach().clone()
        out = q(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:500]])
        assert out.num_embeddings == [16]
        changed += int(not torch.equal(q.codebooks[0][4:16].detach(), before))
    assert changed == 20
    q.set_mode("gradient")
    torch.manual_seed(0)
    assert {q(x).num_embeddings[0] for _ in range(12)} == {4, 8, 16}


def test_opening_a_stage_closes_the_other_codebooks():
    """With freeze_earlier off (earlier codebooks train by gradient), a new stage's EMA warm-up and
    restarts leave codebook 0's entries alone: they are no stage's new entries any more."""
    x, _, _ = mixture(k=16, noise=0.5)
    q = make(freeze_earlier=False)
    q.train()
    q.start_stage(0, 16, x)
    q.start_stage(1, 8, x)
    assert q.stage_start.tolist() == [16, 0, 0] and q.trainable_codebooks() == [0, 1]
    q.set_mode("ema")
    book0 = q.codebooks[0].detach().clone()
    for _ in range(5):
        q(x)
    assert torch.equal(q.codebooks[0].detach(), book0)


def test_unused_entries_restart_within_bounded_steps_at_the_default_threshold():
    x, _, _ = mixture(k=16)
    q = staged(x, 16, "ema", num_codebooks=1, schedule=(16,))
    for _ in range(20):
        q(x)
    q.set_mode("gradient")
    q.codebooks[0].data[12:16] = 1e3  # no data near these any more: they were used, now they die
    restarted = []
    for step in range(500):
        stats = q(x).stats
        if stats["restarts_0"]:
            restarted.append(step)
    assert restarted and restarted[0] < 470  # (the raw 1e-3 count needed ~690 steps here)
    assert float(q.codebooks[0][12:16].detach().abs().max()) < 100
    assert q.ema_count[0, 12:16].min() > 0


def test_no_restart_storm_and_no_worse_than_no_restarts():
    """Restarted entries start at the threshold (not at a raw count below it), so a high threshold
    restarts only entries that really go unused instead of most of them every step."""
    data, _, _ = mixture(n=6000, k=8, noise=0.5, seed=2)
    x, held = data[:4000], data[4000:]
    results = {}
    for thr in (0.0, 0.01, 0.5):
        q = staged(x, 64, "ema", num_codebooks=1, codebook_size=64, schedule=(64,), dead_threshold=thr)
        storms = [q(x).stats["restarts_0"] for _ in range(60)][10:]
        results[thr] = (sum(storms) / len(storms), mse(q, held))
    assert results[0.01][0] <= 0.5 and results[0.5][0] <= 0.05 * 64  # restarts per step after the first ten
    assert results[0.01][1] <= 1.05 * results[0.0][1] and results[0.5][1] <= 1.05 * results[0.0][1]


def test_adapter_freezes_with_the_codebooks_it_serves():
    x, _, _ = mixture(k=16)
    q = staged(x, 16, "gradient", num_codebooks=2, schedule=(16,), adapter_dim=4)
    assert q.adapter_in.weight.requires_grad
    _gradient_steps(q, x, 5, lr=0.05)
    q.start_stage(1, 16, x)
    assert not q.adapter_in.weight.requires_grad and not q.adapter_out.weight.requires_grad
    q.eval()
    q.set_active(1, 16)
    frozen_cell = q.decode(q.encode(x)).detach().clone()
    q.train()
    q.start_stage(1, 16)
    _gradient_steps(q, x, 5, lr=0.05)
    q.eval()
    q.set_active(1, 16)
    assert torch.equal(q.decode(q.encode(x)), frozen_cell)  # the (1, 16) cell did not drift


def test_lloyd_refinement_lowers_held_out_error_at_small_and_large_k():
    data, _, _ = mixture(n=8000, k=64, noise=0.6, seed=4)
    x, held = data[:6000], data[6000:]
    errors = {}
    for iters in (0, 4):
        for k in (16, 64):
            q = make(num_codebooks=3, codebook_size=64, schedule=(16, 64), lloyd_iterations=iters)
            q.train()
            for c in range(3):
                q.start_stage(c, k, x)
            errors[iters, k] = mse(q, held)
    assert errors[4, 16] < errors[0, 16] and errors[4, 64] < errors[0, 64]


def test_min_sq_dist_kmeans_pp_and_lloyd_against_brute_force():
    """Over several chunks: the squared distance to the nearest centre, one Lloyd step with fixed
    centres keeping their points, k-means++'s edge cases and its generator."""
    from pcdet_ext.algorithms.quantization.nn_search import lloyd, min_sq_dist
    g = torch.Generator().manual_seed(3)
    x, centres = torch.randn(257, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    brute = torch.cdist(x, centres).pow(2).min(1).values
    torch.testing.assert_close(min_sq_dist(x, centres, chunk=50), brute)
    assert torch.isinf(min_sq_dist(x, centres[:0])).all()
    fixed, start = centres[:3], centres[3:]
    owner = torch.cdist(x, centres).argmin(1) - 3
    ref = start.clone()
    for j in range(4):  # the mean of the points nearest to each new centre; none won: it stays
        if (owner == j).any():
            ref[j] = x[owner == j].mean(0)
    torch.testing.assert_close(lloyd(x, fixed, start, iterations=1, chunk=50), ref)
    assert kmeans_pp(x, centres, 0).shape == (0, 5)
    with pytest.raises(ValueError, match="at least one data vector"):
        kmeans_pp(x[:0], centres, 2)
    same = x[:1].repeat(10, 1)  # every point on an existing centre: uniform picks, still num_new of them
    assert kmeans_pp(same, same[:1], 3).shape == (3, 5)
    a = kmeans_pp(x, centres, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, kmeans_pp(x, centres, 4, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, kmeans_pp(x, centres, 4, torch.Generator().manual_seed(2)))


def test_legacy_operating_points_sample_every_depth_and_allowed_size():
    """Without freeze_earlier, gradient batches sample n in 1..depth and k among the schedule sizes up to
    the active size, truncating every used codebook to k."""
    x, _, _ = mixture(k=16, noise=0.5)
    q = make(freeze_earlier=False)
    q.train()
    q.start_together(3, 16, x)
    q.set_mode("gradient")
    torch.manual_seed(0)
    seen = {tuple(q(x).num_embeddings) for _ in range(80)}
    assert {len(s) for s in seen} == {1, 2, 3} and {s[0] for s in seen} == set(SCHED)
    assert all(len(set(s)) == 1 for s in seen)


@pytest.mark.parametrize("kwargs", [dict(codebook_size=1, schedule=(1,)), dict(schedule=(1, 16)),
                                    dict(decay=0.5), dict(dead_threshold=0.0)])
def test_constructor_edges_accepted(kwargs):
    assert make(**kwargs) is not None


def test_bounds_refuse_just_beyond_the_edges():
    for kwargs, match in ((dict(codebook_size=0), "codebook_size must be >= 1"),
                          (dict(schedule=(4, 4)), "strictly increasing"), (dict(schedule=(0, 4)), "1..codebook_size"),
                          (dict(decay=0.0), "decay"), (dict(decay=1.0), "decay"),
                          (dict(dead_threshold=1.0), "dead_threshold")):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    q = make()
    with pytest.raises(ValueError, match=r"codebook must be in 0..2, got 3"):
        q.start_stage(3, 4)
    q.set_active(1, 1)  # one entry is a valid operating point
    with pytest.raises(ValueError, match="num_embeddings must be in 1..16"):
        q.set_active(1, 0)
    with pytest.raises(ValueError, match=r"codes must be \[N, n\]"):
        q.decode(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"code indices must lie in 0..15"):
        q.decode(torch.full((2, 1), 16, dtype=torch.long))
    assert q.decode(torch.full((2, 1), 15, dtype=torch.long)).shape == (2, 6)
