"""Weighting of several pretraining losses: fixed weights or learned uncertainty weighting (pure torch)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

MODES = ("fixed", "uncertainty")


class LossBalancer(nn.Module):
    """``total = sum_i w_i L_i`` (fixed) or, with ``mode='uncertainty'`` (Kendall et al. 2018),
    ``sum_i w_i exp(-s_i) L_i + s_i`` with a learned log-variance ``s_i`` per term (initialised 0,
    i.e. the fixed weights at the start). Returns the total and every term's effective weight."""

    def __init__(self, weights: Dict[str, float], mode: str = "fixed"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LOSS_BALANCING: expected one of {MODES}, got {mode!r}")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or w < 0 or w != w:
                raise ValueError(f"loss weight {name}: expected a number >= 0, got {w!r}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.mode = mode
        self.log_vars = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in weights} if mode == "uncertainty"
                                         else {})

    def forward(self, losses: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise KeyError(f"loss terms {unknown} have no weight (known: {sorted(self.weights)})")
        total, effective = None, {}
        for name, loss in losses.items():
            w = self.weights[name]
            if w == 0.0:
                effective[name] = 0.0
                continue
            if self.mode == "uncertainty":
                s = self.log_vars[name]
                term = w * torch.exp(-s) * loss + s
                effective[name] = float(w * torch.exp(-s.detach()))
            else:
                term = w * loss
                effective[name] = w
            total = term if total is None else total + term
        if total is None:
            raise ValueError("every enabled loss has weight 0: nothing to train")
        return total, effective
