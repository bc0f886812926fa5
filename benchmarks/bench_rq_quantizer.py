"""RQ bottleneck speed: one training step (forward + backward + EMA statistics) and encode, with
5 codebooks x 256 entries, dim 64, on 12,000 vectors (a KITTI frame's non-empty pillars) and on
214,272 (the full 496 x 432 grid).

Reference: vector_quantize_pytorch.ResidualVQ(dim=64, num_quantizers=5, codebook_size=256)
(EMA codebooks, its defaults), in the same run. Prints times, ratios (ours / reference) and
peak memory of each. `pip install vector-quantize-pytorch` for the reference.

``--mse``: held-out reconstruction error instead, at (3, 16) and (3, 64) on a Gaussian mixture (64
clusters, dim 16; 20,000 training and 5,000 held-out vectors), both fitted on the same data with the
same number of EMA passes: ours (k-means++ + Lloyd initialisation per codebook, progressive) vs
ResidualVQ(num_quantizers=3, codebook_size=k, kmeans_init=True).
    python benchmarks/bench_rq_quantizer.py [--threads 2] [--mse]
"""
import argparse
import time

import torch

from pcdet_ext.algorithms.quantization import ResidualQuantizer


def timed(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_mb(fn):
    """Peak bytes allocated by torch's CPU allocator during ``fn`` (via the profiler's memory stats)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.key_averages()
    return max(e.cpu_memory_usage for e in events) / 2 ** 20 if events else float("nan")


def ours(n, mode):
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=64, num_codebooks=5, codebook_size=256, operating_point_training=False,
                          freeze_earlier=False)
    x = torch.randn(n, 64)
    q.train()
    for c in range(5):
        q.start_stage(c, 256, x[:20000])
    q.set_mode(mode)

    def step():
        out = q(x)
        if mode == "gradient":  # the detection loss reaches the codebooks through the gathered vectors
            (out.quantized.sum() + out.losses["codebook"]).backward()
    q_eval = lambda: q.encode(x)  # noqa: E731
    return step, q_eval


def reference(n):
    from vector_quantize_pytorch import ResidualVQ
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=64, num_quantizers=5, codebook_size=256)
    x = torch.randn(1, n, 64, requires_grad=True)
    rvq.train()

    def step():
        quantized, _, loss = rvq(x)
        (quantized.sum() + loss.sum()).backward()

    def enc():
        rvq.eval()
        with torch.no_grad():
            rvq(x)
        rvq.train()
    return step, enc


def gaussian_mixture(n, dim=16, clusters=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 2.0
    labels = torch.randint(clusters, (n,), generator=g)
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g)


def held_out_mse(passes: int = 30) -> None:
    data = gaussian_mixture(25000)
    x, held = data[:20000], data[20000:]
    base = float(held.var(0).sum() / held.shape[1])  # predicting the mean: what learning nothing scores
    for k in (16, 64):
        torch.manual_seed(0)
        q = ResidualQuantizer(dim=16, num_codebooks=3, codebook_size=k, schedule=(k,), operating_point_training=False)
        q.train()
        for c in range(3):
            q.start_stage(c, k, x)
            q.set_mode("ema")
            for _ in range(passes):
                q(x)
        q.eval()
        with torch.no_grad():
            ours_mse = float((q.decode(q.encode(held)) - held).pow(2).mean())
        line = f"(3, {k:2d}): held-out MSE pcdet_ext {ours_mse:.4f}"
        try:
            from vector_quantize_pytorch import ResidualVQ
            torch.manual_seed(0)
            rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=k, kmeans_init=True, kmeans_iters=10)
            rvq.train()
            for _ in range(3 * passes):
                rvq(x[None])
            rvq.eval()
            with torch.no_grad():
                ref = float((rvq(held[None])[0][0] - held).pow(2).mean())
            line += f" | ResidualVQ {ref:.4f} | ratio {ours_mse / ref:.2f}x"
        except ImportError:
            line += " | ResidualVQ not installed"
        print(line + f" | predicting the mean {base:.4f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mse", action="store_true", help="held-out error vs ResidualVQ instead of speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mse:
        held_out_mse()
        return
    try:
        import vector_quantize_pytorch  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("vector-quantize-pytorch not installed: reference skipped (pip install vector-quantize-pytorch)")
    print(f"torch {torch.__version__}, {args.threads} threads; 5 codebooks x 256, dim 64")
    for n in (12000, 214272):
        repeats = 5 if n < 100000 else 2
        step, enc = ours(n, "gradient")
        ema_step, _ = ours(n, "ema")
        t_step, t_enc, t_ema = timed(step, repeats), timed(enc, repeats), timed(ema_step, repeats)
        m_step = peak_mb(step)
        line = (f"N={n:>6}: pcdet_ext gradient step {t_step * 1e3:7.1f} ms (peak {m_step:6.1f} MB), "
                f"EMA step {t_ema * 1e3:6.1f} ms, encode {t_enc * 1e3:6.1f} ms")
        if have_ref:
            rstep, renc = reference(n)
            r_step, r_enc = timed(rstep, repeats), timed(renc, repeats)
            r_mem = peak_mb(rstep)
            line += (f" | ResidualVQ train step {r_step * 1e3:7.1f} ms (peak {r_mem:6.1f} MB), encode {r_enc * 1e3:6.1f} ms"
                     f" | ratio step {t_step / r_step:.2f}x, encode {t_enc / r_enc:.2f}x")
        print(line)


if __name__ == "__main__":
    main()
