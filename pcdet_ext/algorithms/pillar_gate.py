"""Learned keep/drop of pillars before the RQ bottleneck (pure torch).

A small MLP scores each pillar from its features; a pillar is sent where its score is > 0, else it is
not sent at all (neither its codes nor its occupancy bit: at the server it is an empty cell). In
training the gate is the hard 0/1 decision with the sigmoid's gradient (straight-through), so the
detection loss sees exactly what the server will see while the score still learns; the rate term is
``sum_i gate_i x bits_i``, the bits each kept pillar costs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


class PillarGate(nn.Module):
    """Per-pillar keep score; starts keeping every pillar (bias ``init_keep`` > 0, output weights 0)."""

    def __init__(self, dim: int, hidden: int = 32, init_keep: float = 3.0):
        super().__init__()
        if init_keep <= 0:
            raise ValueError(f"init_keep must be > 0 (start by keeping every pillar), got {init_keep}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, init_keep)

    def forward(self, feats: torch.Tensor, sample: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``feats`` [N, dim] -> (keep [N] bool, gate [N] float: the 0/1 keep with the sigmoid's gradient).
        With ``sample`` [N] (each row's frame) every frame keeps at least its best-scored pillar (a frame
        without pillars has no place in a batch of OpenPCDet's scatter)."""
        logits = self.net(feats.detach().float()).squeeze(1)
        keep = logits > 0
        if sample is not None and len(logits):
            best = torch.full((int(sample.max()) + 1,), -torch.inf, device=logits.device)
            best = best.scatter_reduce(0, sample, logits.detach(), "amax")
            keep = keep | (logits.detach() == best[sample])
        soft = torch.sigmoid(logits)
        return keep, keep.float() + soft - soft.detach()


def kept_bits(gate: torch.Tensor, bits: torch.Tensor, frames: int) -> torch.Tensor:
    """KB per frame the kept pillars cost: ``sum_i gate_i x bits_i / 8192 / frames`` (differentiable in gate)."""
    if gate.shape != bits.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and bits {tuple(bits.shape)} differ")
    return (gate * bits).sum() / 8192.0 / max(frames, 1)
