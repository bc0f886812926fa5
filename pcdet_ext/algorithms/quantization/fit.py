"""Fit a ResidualQuantizer to a bank of feature vectors, progressively (no detector involved)."""
from __future__ import annotations

from typing import Sequence

import torch

from pcdet_ext.algorithms.quantization.residual_quantizer import ResidualQuantizer


def fit_progressive(q: ResidualQuantizer, x: torch.Tensor, depth: int, schedule: Sequence[int],
                    steps: int = 40, batch: int = 8192, lr: float = 1e-3) -> ResidualQuantizer:
    """Codebook by codebook, size by size: ``steps`` EMA warm-up batches, then ``steps`` Adam steps
    on the codebook loss (feature reconstruction), like the detector-driven schedule minus the
    detection loss."""
    for c in range(depth):
        for k in schedule:
            q.train()
            q.start_stage(c, k, x)
            q.set_mode("ema")
            for _ in range(steps):
                q(x[torch.randint(len(x), (batch,))])
            q.set_mode("gradient")
            opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=lr)
            for _ in range(steps):
                out = q(x[torch.randint(len(x), (batch,))])
                opt.zero_grad()
                out.losses["codebook"].backward()
                opt.step()
    q.eval()
    return q
