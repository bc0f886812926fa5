"""Rate-aware code choice under the bitstream's own context models (entropy-constrained RQ).

Each code is charged what the coder will spend on it: codes are chosen codebook by codebook in the
coder's phases (:mod:`.contexts`), so a cell's context (the previous codebook's code, an
already-chosen neighbour's code, or none) is known when its code is chosen. One trained model then
serves lower rates without retraining; the decoder is unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream.contexts import Layout, passes, plan
from pcdet_ext.algorithms.bitstream.models import ProbabilityModels
from pcdet_ext.algorithms.quantization.nn_search import nearest


def cell_positions(cells: np.ndarray, width: int) -> torch.Tensor:
    """[N, 3] positions (sample 0, row, column) of one frame's flat cell indices."""
    cells = torch.as_tensor(np.asarray(cells), dtype=torch.long)
    return torch.stack([torch.zeros_like(cells), cells // width, cells % width], 1)


class ContextRate:
    """``ResidualQuantizer.set_rate(lambda, ContextRate(models))``: bit costs of ``models`` (fitted
    bitstream models) in the contexts the coder uses."""

    def __init__(self, models: ProbabilityModels):
        self.models = models
        self._bits: Dict[Tuple[Optional[str], int, int], torch.Tensor] = {}

    def bits(self, kind: Optional[str], c: int, k: int) -> torch.Tensor:
        """-log2 p: [k] (order-0) or [contexts, k] (``kind`` 'previous' / 'spatial')."""
        key = (kind, c, k)
        if key not in self._bits:
            probs = self.models.code_probs(c, k) if kind is None else self.models.conditional(kind, c, k)
            self._bits[key] = torch.from_numpy(-np.log2(probs)).float()
        return self._bits[key]

    def bind(self, positions: torch.Tensor) -> "_Choice":
        """The choice for rows at ``positions`` [N, 3] (sample, row, column)."""
        geo = self.models.geometry
        pos = positions.detach().long().cpu().numpy()
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must be [N, 3] (sample, row, column), got {tuple(pos.shape)}")
        if len(pos) and (pos[:, 1].min() < 0 or pos[:, 1].max() >= geo.height or pos[:, 2].min() < 0
                         or pos[:, 2].max() >= geo.width):
            raise ValueError(f"positions outside the bitstream models' {geo.height} x {geo.width} grid")
        return _Choice(self, pos)


class _Choice:
    """One call's rows: the coder's layout of every sample, in row indices of the call."""

    def __init__(self, rate: ContextRate, pos: np.ndarray):
        self.rate, self.pos = rate, pos
        self.sample = np.unique(pos[:, 0], return_inverse=True)[1].reshape(-1)  # 0..S-1 per row
        self.layouts: Dict[int, Layout] = {}
        self.chosen = np.zeros((len(pos), 0), dtype=np.int64)
        self.weight = torch.zeros(0)

    def _layout(self, k: int) -> Layout:
        """The coder's layout of every sample at once, in row indices of this call: samples stacked
        along the rows of one grid, a blank row between them and an even stride (phases keep their
        parity, no neighbour crosses into another sample)."""
        if k not in self.layouts:
            geo = self.rate.models.geometry
            stride = geo.height + 2 - geo.height % 2
            cells = (self.sample * stride + self.pos[:, 1]) * geo.width + self.pos[:, 2]
            if len(np.unique(cells)) != len(cells):
                raise ValueError("positions: two rows of one sample at one cell")
            height = (int(self.sample.max()) + 1) * stride if len(cells) else 1
            self.layouts[k] = Layout.of(cells, height, geo.width, self.rate.models.uses_spatial(k))
        return self.layouts[k]

    def choose(self, c: int, k: int, residual: torch.Tensor, book: torch.Tensor, rate_lambda: float
               ) -> torch.Tensor:
        if c != self.chosen.shape[1]:
            raise RuntimeError(f"rate-aware choice: codebook {c} asked before codebook {self.chosen.shape[1]}")
        if c == 0:  # per row: lambda x its frame's mean ||z||^2 (a frame's codes do not depend on the batch)
            sample = torch.from_numpy(self.sample).to(residual.device)
            energy = residual.pow(2).sum(1)
            mean = torch.zeros(int(sample.max()) + 1 if len(sample) else 0, device=residual.device)
            mean = mean.index_add_(0, sample, energy) / torch.bincount(sample, minlength=len(mean)).clamp_min(1)
            self.weight = rate_lambda * mean.clamp_min(1e-12)[sample]
        layout = self._layout(k)
        self.chosen = np.concatenate([self.chosen, np.zeros((len(self.pos), 1), dtype=np.int64)], 1)
        for phase, idx in passes(self.rate.models, layout, c, k):
            if not len(idx):
                continue
            kind, ctx = plan(self.rate.models, layout, self.chosen, c, k, phase, idx)
            bits = self.rate.bits(kind, c, k)
            bits = bits if kind is None else bits[torch.from_numpy(ctx)]
            rows = torch.from_numpy(idx).to(residual.device)
            weight = self.weight.index_select(0, rows)[:, None]
            sel = nearest(residual.index_select(0, rows), book, penalty=weight * bits.to(residual.device))
            self.chosen[idx, c] = sel.cpu().numpy()
        return torch.from_numpy(self.chosen[:, c].copy()).to(residual.device)
