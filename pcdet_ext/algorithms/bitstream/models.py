"""Symbol statistics of the split-inference bitstream (numpy): fitted count tables, the smoothed
distributions the coder uses (as rANS frequency tables derived from the integer counts alone), and
their checkpoint state (validated at load)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream import occupancy as occ_mod
from pcdet_ext.algorithms.bitstream.contexts import Layout
from pcdet_ext.algorithms.bitstream.occupancy import GridGeometry
from pcdet_ext.algorithms.bitstream.rans import quantise

MAX_ENTRIES = 4096
LAPLACE = 0.5         # (code_cdf's integer weights are written for these two halves)
CONTEXT_MIN = 16      # fitting samples a context needs for its own distribution (else order-0)
CONTEXT_PRIOR = 0.5   # pseudo-counts per entry, shaped like the order-0 distribution


class BitstreamError(ValueError):
    """The bytes are not a frame this decoder can read (corrupt, truncated, other codebooks)."""


def _normalise(counts: np.ndarray) -> np.ndarray:
    p = counts.astype(np.float64) + LAPLACE
    return p / p.sum(axis=-1, keepdims=True)


@dataclass
class ProbabilityModels:
    """Symbol statistics learned from training frames, stored with the checkpoint.

    ``code_counts[k]`` is [C, k]: how often each entry of each codebook was used when encoding
    at k entries; ``pair_counts[k]`` [C, k, k]: how often (code at c - 1, code at c) occurred (row 0
    unused); ``spatial_counts[k]`` [C, k + 1, k]: (neighbour's code or k for none, code) over the
    cells of phases 1-3. None codes without those contexts. ``top_counts`` [ranges, 2] and
    ``child_counts`` [contexts, 15] model the occupancy.
    """
    geometry: GridGeometry
    code_counts: Dict[int, np.ndarray]
    top_counts: np.ndarray
    child_counts: np.ndarray
    pair_counts: Optional[Dict[int, np.ndarray]] = None
    spatial_counts: Optional[Dict[int, np.ndarray]] = None
    _tables: Dict[Tuple, Optional[np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    _cdfs: Dict[Tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _choice: Dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, geometry: GridGeometry, num_codebooks: int, sizes: Sequence[int],
              context: bool = True) -> "ProbabilityModels":
        """Zero counts; ``context`` adds the previous-code and spatial tables."""
        sizes = [int(k) for k in sizes]
        pairs = {k: np.zeros((num_codebooks, k, k), dtype=np.int64) for k in sizes} if context else None
        spatial = {k: np.zeros((num_codebooks, k + 1, k), dtype=np.int64) for k in sizes} if context else None
        return cls(geometry, {k: np.zeros((num_codebooks, k), dtype=np.int64) for k in sizes},
                   np.zeros((occ_mod.NUM_RANGE, 2), dtype=np.int64),
                   np.zeros((occ_mod.num_child_contexts(geometry.levels), occ_mod.PATTERNS), dtype=np.int64),
                   pairs, spatial)

    def observe(self, occupancy: Optional[np.ndarray], codes_by_k: Dict[int, np.ndarray],
                cells: Optional[np.ndarray] = None) -> None:
        """Add one training frame: its occupancy map and its codes [M, C] at each k, row i the code of
        flat cell ``cells[i]`` (default: the occupied cells of ``occupancy`` in raster order; without
        either the spatial tables learn nothing from this frame)."""
        if occupancy is not None:
            top, child = occ_mod.count(occupancy, self.geometry)
            self.top_counts += top
            self.child_counts += child
            if cells is None:
                cells = np.flatnonzero(np.asarray(occupancy).ravel())
        layout = None
        if cells is not None and self.spatial_counts is not None:
            layout = Layout.of(np.asarray(cells, dtype=np.int64), self.geometry.height, self.geometry.width, spatial=True)
        for k, codes in codes_by_k.items():
            for c in range(codes.shape[1]):
                self.code_counts[k][c] += np.bincount(codes[:, c], minlength=k)[:k]
                if self.pair_counts is not None and c:
                    pair = codes[:, c - 1] * k + codes[:, c]
                    self.pair_counts[k][c] += np.bincount(pair, minlength=k * k)[: k * k].reshape(k, k)
                if layout is not None:
                    column = codes[:, c]
                    for idx, ctx in layout.spatial_contexts(column, k):
                        pair = ctx * k + column[idx]
                        self.spatial_counts[k][c] += np.bincount(pair, minlength=(k + 1) * k).reshape(k + 1, k)
        self._tables.clear()
        self._cdfs.clear()
        self._choice.clear()

    def code_probs(self, c: int, k: int) -> np.ndarray:
        """Order-0 distribution of codebook ``c`` at ``k`` entries."""
        table = self.code_counts.get(k)
        if table is None or c >= table.shape[0]:
            return np.full(k, 1.0 / k)  # an operating point without statistics: uniform
        return _normalise(table[c])

    def _context_counts(self, kind: str, c: int, k: int) -> Optional[np.ndarray]:
        """Fitted counts [contexts, k] of codebook ``c``'s code given a context of ``kind``, or None when
        there are none (no table, codebook 0 has no previous code, nothing counted)."""
        counts = self.pair_counts if kind == "previous" else self.spatial_counts
        table = None if counts is None else counts.get(k)
        if table is None or c >= table.shape[0] or (kind == "previous" and c == 0) or not table[c].any():
            return None
        return table[c]

    def conditional(self, kind: str, c: int, k: int) -> Optional[np.ndarray]:
        """Rows [contexts, k]: codebook ``c``'s code given a context of ``kind`` ('previous': codebook
        c - 1's code; 'spatial': a neighbour's code, k = none), or None when there is no such table.
        Rows seen fewer than CONTEXT_MIN times are the order-0 distribution."""
        key = (kind, c, k)
        if key not in self._tables:  # None results cached too: encoder and decoder ask per phase
            counts = self._context_counts(kind, c, k)
            if counts is None:
                self._tables[key] = None
                return None
            p0 = self.code_probs(c, k)
            n = counts.sum(axis=1, keepdims=True).astype(np.float64)
            rows = (counts + CONTEXT_PRIOR * k * p0) / (n + CONTEXT_PRIOR * k)
            self._tables[key] = np.where(_seen(counts)[:, None], rows, p0)
        return self._tables[key]

    def spatial_codebooks(self, k: int) -> np.ndarray:
        """[C] bool: which codebooks code phases 1-3 with the spatial context: where it scores fewer
        held-out bits per code on the fitting counts than the previous-code (for codebook 0 the
        order-0) model. Computed once from the counts and stored with them, so encoder and decoder
        never disagree."""
        if k not in self._choice:
            table = None if self.spatial_counts is None else self.spatial_counts.get(k)
            depth = self.code_counts[k].shape[0] if k in self.code_counts else 0
            choice = np.zeros(depth, dtype=bool)
            for c in range(depth if table is not None else 0):
                spatial = self.conditional("spatial", c, k)
                if spatial is None:
                    continue
                p0, alpha = self.code_probs(c, k), CONTEXT_PRIOR * k
                rival = (_held_out_bits(self.pair_counts[k][c], p0, alpha, CONTEXT_MIN)
                         if self.conditional("previous", c, k) is not None else
                         _held_out_bits(self.code_counts[k][c][None], np.full(k, 1.0 / k), LAPLACE * k, 0))
                choice[c] = _held_out_bits(table[c], p0, alpha, CONTEXT_MIN) < rival
            self._choice[k] = choice
        return self._choice[k]

    def uses_spatial(self, k: int) -> bool:
        """Whether frames at ``k`` entries are coded in phases with spatial contexts."""
        return k in self.code_counts and bool(self.spatial_codebooks(k).any())

    def code_cdf(self, kind: Optional[str], c: int, k: int) -> np.ndarray:
        """rANS tables of codebook ``c`` at ``k``: [1, k + 1] (order-0, ``kind`` None) or one row per
        context of ``conditional(kind, c, k)``, each the same distribution as there, from the
        integer counts only (the float tables serve rate estimates)."""
        key = (kind, c, k)
        if key not in self._cdfs:
            table = self.code_counts.get(k)
            order0 = 2 * table[c] + 1 if table is not None and c < table.shape[0] else np.ones(k, dtype=np.int64)
            weights = order0[None]
            if kind is not None:  # (counts + a k p0) / (n + a k) with p0 = (2 c0 + 1) / S0, a = 1/2: x 2 S0
                counts = self._context_counts(kind, c, k)
                if counts.max(initial=0) * 2 * order0.sum() >= 1 << 62:
                    raise BitstreamError(f"bitstream models: {kind} counts of codebook {c} at k={k} too large to code")
                weights = np.where(_seen(counts)[:, None], 2 * order0.sum() * counts + k * order0, order0)
            self._cdfs[key] = quantise(weights)
        return self._cdfs[key]

    def occupancy_cdf(self, level: str) -> np.ndarray:
        """rANS tables of the occupancy: ``level`` 'top' [ranges, 3] or 'child' [contexts, 16]."""
        if level not in self._cdfs:
            self._cdfs[level] = quantise(2 * (self.top_counts if level == "top" else self.child_counts) + 1)
        return self._cdfs[level]

    def to_state(self) -> Dict[str, object]:
        g = self.geometry
        state = {"geometry": [g.height, g.width, g.sensor_row, g.sensor_col, g.cell_m, g.levels],
                 "code_counts": {str(k): v.tolist() for k, v in self.code_counts.items()},
                 "top_counts": self.top_counts.tolist(), "child_counts": self.child_counts.tolist()}
        if self.pair_counts is not None:
            state["pair_counts"] = {str(k): v.tolist() for k, v in self.pair_counts.items()}
        if self.spatial_counts is not None:
            state["spatial_counts"] = {str(k): v.tolist() for k, v in self.spatial_counts.items()}
            state["spatial_codebooks"] = {str(k): self.spatial_codebooks(k).astype(int).tolist()
                                          for k in self.spatial_counts}
        return state

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "ProbabilityModels":
        """Models as :meth:`to_state` wrote them; malformed tables (wrong shapes, negative or non-integer
        counts) raise :class:`BitstreamError` naming the key."""
        try:
            h, w, sr, sc, cell, levels = state["geometry"]
            geo = GridGeometry(int(h), int(w), float(sr), float(sc), float(cell), int(levels))
        except (KeyError, TypeError, ValueError) as exc:
            raise BitstreamError(f"bitstream models: 'geometry' must be [height, width, sensor_row, sensor_col, "
                                 f"cell_m, levels] ({exc})") from exc
        codes = {int(k): _counts(v, f"code_counts['{k}']") for k, v in _mapping(state, "code_counts").items()}
        for k, t in codes.items():
            _shape(t, (t.shape[0] if t.ndim == 2 else "C", k), f"code_counts['{k}']")
        depth = {t.shape[0] for t in codes.values()}
        if len(depth) > 1:
            raise BitstreamError(f"bitstream models: code_counts tables hold different numbers of codebooks {sorted(depth)}")
        pairs = _sized_tables(state, "pair_counts", codes, lambda k: (codes[k].shape[0], k, k))
        spatial = _sized_tables(state, "spatial_counts", codes, lambda k: (codes[k].shape[0], k + 1, k))
        if spatial is not None:
            choice = {int(k): _counts(v, f"spatial_codebooks['{k}']") for k, v in
                      _mapping(state, "spatial_codebooks").items()}
            for k in spatial:
                if k not in choice:
                    raise BitstreamError(f"bitstream models: spatial_codebooks has no entry for size {k}")
                _shape(choice[k], (codes[k].shape[0],), f"spatial_codebooks['{k}']")
                if choice[k].max() > 1:
                    raise BitstreamError(f"bitstream models: spatial_codebooks['{k}'] must hold 0/1 flags")
        top = _counts(state.get("top_counts"), "top_counts")
        _shape(top, (occ_mod.NUM_RANGE, 2), "top_counts")
        child = _counts(state.get("child_counts"), "child_counts")
        _shape(child, (occ_mod.num_child_contexts(geo.levels), occ_mod.PATTERNS), "child_counts")
        models = cls(geo, codes, top, child, pairs, spatial)
        if spatial is not None:
            models._choice.update({k: choice[k].astype(bool) for k in spatial})
        return models

    def identifier(self, codebooks: np.ndarray) -> bytes:
        """8 bytes naming these codebooks and models."""
        h = hashlib.sha256(np.ascontiguousarray(codebooks, dtype=np.float32).tobytes())
        tables = [t[k] for t in (self.pair_counts, self.spatial_counts) if t is not None for k in sorted(t)]
        for part in (self.top_counts, self.child_counts, *[self.code_counts[k] for k in sorted(self.code_counts)],
                     *tables):
            h.update(np.ascontiguousarray(part).tobytes())
        if self.spatial_counts is not None:
            h.update(np.concatenate([self.spatial_codebooks(k) for k in sorted(self.spatial_counts)]).tobytes())
        h.update(str(self.to_state()["geometry"]).encode())
        return h.digest()[:8]


def _seen(counts: np.ndarray) -> np.ndarray:
    """[contexts] bool: contexts counted at least CONTEXT_MIN times in fitting (the rest escape to order-0)."""
    return counts.sum(axis=1) >= CONTEXT_MIN


def _held_out_bits(counts: np.ndarray, prior: np.ndarray, alpha: float, min_count: int) -> float:
    """Bits per code of the fitting counts [contexts, k] under the smoothed tables fitted on them,
    each code scored leave-one-out (without its own count), so a model with more contexts is not
    favoured merely for memorising the fitting frames. Rows under ``min_count`` use ``prior``."""
    counts = counts.astype(np.float64)
    total = counts.sum()
    if not total:
        return float("inf")
    n = counts.sum(axis=1, keepdims=True)
    p = (counts - 1 + alpha * prior) / np.maximum(n - 1 + alpha, 1e-12)
    p = np.where(n >= min_count, p, prior)
    return float(-(counts * np.log2(np.where(counts > 0, p, 1.0))).sum() / total)


def _sized_tables(state: Dict[str, object], key: str, codes: Dict[int, np.ndarray], shape) -> Optional[Dict]:
    """The optional per-size count tables under ``key`` (None if absent), each of ``shape(k)``,
    for exactly the sizes of ``codes``."""
    if key not in state:
        return None
    tables = {int(k): _counts(v, f"{key}['{k}']") for k, v in _mapping(state, key).items()}
    if set(tables) != set(codes):
        raise BitstreamError(f"bitstream models: {key} sizes {sorted(tables)} differ from code_counts sizes "
                             f"{sorted(codes)}")
    for k, t in tables.items():
        _shape(t, shape(k), f"{key}['{k}']")
    return tables


def _mapping(state: Dict[str, object], key: str) -> Dict:
    value = state.get(key)
    if not isinstance(value, dict) or not value:
        raise BitstreamError(f"bitstream models: '{key}' must map each size k to its table, got {type(value).__name__}")
    for k in value:
        if not str(k).isdigit() or not 1 <= int(k) <= MAX_ENTRIES:
            raise BitstreamError(f"bitstream models: '{key}' has size {k!r}, expected 1..{MAX_ENTRIES}")
    return value


def _counts(value, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged lists
        raise BitstreamError(f"bitstream models: {key} is not a rectangular table ({exc})") from exc
    if arr.dtype.kind not in "iu" or arr.size == 0 or (arr < 0).any():
        raise BitstreamError(f"bitstream models: {key} must hold non-negative integer counts, got dtype "
                             f"{arr.dtype} shape {arr.shape}")
    return arr.astype(np.int64)


def _shape(arr: np.ndarray, expected: Tuple, key: str) -> None:
    if arr.shape != tuple(expected):
        raise BitstreamError(f"bitstream models: {key} has shape {arr.shape}, expected {expected}")


