"""The order codes are visited in and the context each code is coded with (numpy).

Codes are coded codebook by codebook. A codebook coded with the spatial context is visited in four
phases of cells by (row parity, column parity) (:data:`PHASE_NEIGHBOURS`): a cell of phase 1-3 is
coded given the same codebook's code of an already-decoded neighbour (spatial tables, one
distribution per neighbour code plus one for "no occupied neighbour"), phase 0 like the other
codebooks. Every other codebook is visited in one pass over all cells, each code given the same
pillar's code at codebook c - 1 (c >= 1) or order-0 (c = 0). Encoder, decoder, the ideal bit count
and rate-aware code choice all read passes and contexts through :func:`passes` and :func:`plan`, so
they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

# Per phase (cells with (row % 2) * 2 + col % 2 == phase), the neighbour offsets (d_row, d_col) whose
# code is the context, in order of preference; each points at a cell of an earlier phase.
PHASE_NEIGHBOURS = (
    (),
    ((0, -1), (0, 1)),
    ((-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)),
    ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)),
)


@dataclass
class Layout:
    """Per phase the indices of its cells (into the ascending cell list) and, for phases >= 1, the
    index of each one's context neighbour (-1: none occupied)."""
    phases: List[np.ndarray]
    neighbours: List[Optional[np.ndarray]]
    size: int

    @classmethod
    def of(cls, cells: np.ndarray, height: int, width: int, spatial: bool) -> "Layout":
        """``cells``: distinct flat indices of one frame (the coder passes them ascending: the order
        within a phase); without ``spatial``: one phase of every cell."""
        if not spatial:
            return cls([np.arange(len(cells))], [None], len(cells))
        rows, cols = cells // width, cells % width
        index = np.full((height + 2) * (width + 2), -1, dtype=np.int64)  # cell -> position, one-cell border
        stride = width + 2
        padded = (rows + 1) * stride + cols + 1
        index[padded] = np.arange(len(cells))
        phase = (rows & 1) * 2 + (cols & 1)
        phases, neighbours = [], []
        for p, offsets in enumerate(PHASE_NEIGHBOURS):
            idx = np.flatnonzero(phase == p)
            phases.append(idx)
            if p == 0:
                neighbours.append(None)
                continue
            nb = np.full(len(idx), -1, dtype=np.int64)
            at = padded[idx]
            for dr, dc in offsets:
                nb = np.where(nb < 0, index[at + dr * stride + dc], nb)
            neighbours.append(nb)
        return cls(phases, neighbours, len(cells))

    def spatial_contexts(self, column: np.ndarray, k: int):
        """(cell indices, neighbour's code or k) of phases 1-3, given the codes ``column`` of one
        codebook (only the earlier phases' entries are read)."""
        for idx, nb in zip(self.phases[1:], self.neighbours[1:]):
            yield idx, np.where(nb >= 0, column[np.maximum(nb, 0)], k)


def passes(models, layout: Layout, cb: int, k: int) -> List[Tuple[Optional[int], np.ndarray]]:
    """(phase, cell indices) codebook ``cb`` is visited in: the layout's phases where it is coded with
    the spatial context, otherwise one pass over every cell (phase None)."""
    if len(layout.phases) > 1 and models.spatial_codebooks(k)[cb] and models.conditional("spatial", cb, k) is not None:
        return list(enumerate(layout.phases))
    return [(None, np.arange(layout.size))]


def plan(models, layout: Layout, codes: np.ndarray, cb: int, k: int, phase: Optional[int], idx: np.ndarray
         ) -> Tuple[Optional[str], Optional[np.ndarray]]:
    """(kind, context per cell ``idx`` of one of :func:`passes`) for codebook ``cb``: kind 'spatial'
    (context: the neighbour's code, k for none), 'previous' (codebook cb - 1's code) or None
    (order-0). Reads only codes the decoder already has."""
    nb = None if phase is None else layout.neighbours[phase]
    if nb is not None:
        return "spatial", np.where(nb >= 0, codes[np.maximum(nb, 0), cb], k)
    if models.conditional("previous", cb, k) is None:
        return None, None
    return "previous", codes[idx, cb - 1]


def code_bits(codes: np.ndarray, k: int, models, context: bool = True, cells: Optional[np.ndarray] = None) -> float:
    """Ideal bits of ``codes`` [M, n] (rows: the flat ``cells``, needed for the spatial contexts)
    under the models, with or without their contexts."""
    codes = np.asarray(codes, dtype=np.int64)
    spatial = context and cells is not None and models.uses_spatial(k)
    layout = Layout.of(np.asarray(cells) if spatial else np.arange(len(codes)), models.geometry.height,
                       models.geometry.width, spatial)  # contexts do not depend on the order of the rows
    bits = 0.0
    for cb in range(codes.shape[1]):
        for phase, idx in passes(models, layout, cb, k):
            kind, ctx = plan(models, layout, codes, cb, k, phase, idx) if context else (None, None)
            p = (models.code_probs(cb, k)[codes[idx, cb]] if kind is None else
                 models.conditional(kind, cb, k)[ctx, codes[idx, cb]])
            bits += float(-np.log2(p).sum())
    return bits
