"""Nearest-codeword search and data-driven codeword initialisation (pure torch)."""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK = 16384  # rows per distance block (16384 x 256 floats: 16 MiB)


def nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: Optional[int] = None,
            penalty: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the nearest row of ``codebook`` [K, D] for every row of ``x`` [N, D].

    Squared distances by one ``addmm`` per chunk of rows (||c||^2 - 2 x.c; ||x||^2 is constant
    per row and dropped), so memory stays at ``chunk x K``. Ties resolve to the lowest index, like
    argmin.
    ``penalty`` ([K], or [N, K] per row) is added to the squared distances (rate-aware choice).
    """
    chunk = chunk or DEFAULT_CHUNK
    n, k = x.shape[0], codebook.shape[0]
    c_sq = codebook.pow(2).sum(1).unsqueeze(0)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    block = torch.empty(min(chunk, n), k, dtype=x.dtype, device=x.device)  # reused per chunk
    fast = x.device.type == "cpu" and x.dtype == torch.float32
    if fast:
        lowest, ranks = torch.empty(min(chunk, n), 1), torch.arange(k, dtype=torch.int32)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        dist = torch.addmm(c_sq, x[start:end], codebook.t(), beta=1.0, alpha=-2.0, out=block[:end - start])
        if penalty is not None:
            dist.add_(penalty if penalty.dim() == 1 else penalty[start:end])
        if fast:
            out[start:end] = _first_min_cpu(dist, lowest[:end - start], ranks)
        else:
            out[start:end] = dist.argmin(1)
    return out


def _first_min_cpu(dist: torch.Tensor, lowest: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``dist.argmin(1)`` of a float32 CPU block (overwritten) from value-only reductions, ~3x
    faster than the index-tracking one: after subtracting the row minimum, the minima are exactly
    zero and every other entry is positive, so as int32 bits a minimum clamps to 0 and the rest to
    1; the smallest ``bit * K + j`` is then the first minimum's index j. A row of infinities or
    NaNs gives 0 (as argmin); rows mixing NaN with numbers are the callers' to refuse."""
    torch.amin(dist, 1, keepdim=True, out=lowest)
    bits = dist.sub_(lowest).view(torch.int32).clamp_(0, 1)  # -0.0 (a zero minimum) clamps to 0 too
    key = torch.add(ranks, bits, alpha=ranks.numel(), out=bits).amin(1)
    return key.remainder_(ranks.numel())


def min_sq_dist(x: torch.Tensor, centres: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its nearest row of ``centres`` (inf if none)."""
    if centres.shape[0] == 0:
        return torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
    c_sq = centres.pow(2).sum(1)
    out = torch.empty(x.shape[0], device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        dist = torch.addmm(c_sq.unsqueeze(0), rows, centres.t(), beta=1.0, alpha=-2.0)
        out[start:start + chunk] = (dist.min(1).values + rows.pow(2).sum(1)).clamp_min(0)
    return out


def kmeans_pp(x: torch.Tensor, existing: torch.Tensor, num_new: int, generator: torch.Generator = None
              ) -> torch.Tensor:
    """``num_new`` new centres chosen from ``x`` by k-means++ (D^2 sampling) given ``existing`` centres.

    Points that coincide with a centre have zero weight, so new centres are distinct from the old
    ones whenever the data allows it.
    """
    if num_new <= 0:
        return x.new_zeros((0, x.shape[1]))
    if x.shape[0] == 0:
        raise ValueError("k-means++ initialisation needs at least one data vector")
    d2 = min_sq_dist(x, existing)
    picks = []
    for _ in range(num_new):
        if torch.isinf(d2).all():
            idx = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").to(x.device)
        else:
            w = d2.clamp_min(0)
            total = w.sum()
            if not torch.isfinite(total) or total <= 0:
                idx = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").to(x.device)
            else:
                idx = torch.multinomial((w / total).cpu(), 1, generator=generator).to(x.device)
        centre = x[idx]
        picks.append(centre)
        d2 = torch.minimum(d2, (x - centre).pow(2).sum(1))
    return torch.cat(picks, 0)


def lloyd(x: torch.Tensor, fixed: torch.Tensor, centres: torch.Tensor, iterations: int = 4,
          chunk: Optional[int] = None) -> torch.Tensor:
    """A few Lloyd (k-means) iterations refining ``centres`` on ``x`` while ``fixed`` centres (entries
    of earlier stages) keep their place and their points: each new centre moves to the mean of the
    points nearest to it; a centre that wins no point stays where it is."""
    centres = centres.clone()
    n_fixed = fixed.shape[0]
    for _ in range(iterations):
        idx = nearest(x, torch.cat([fixed, centres], 0), chunk) - n_fixed
        own = idx >= 0
        sums = torch.zeros_like(centres).index_add_(0, idx[own], x[own])
        counts = torch.bincount(idx[own], minlength=centres.shape[0]).to(x.dtype)
        won = counts > 0
        centres[won] = sums[won] / counts[won].unsqueeze(1)
    return centres
