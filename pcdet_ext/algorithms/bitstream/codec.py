"""One frame of split-inference payload as bytes: header, coded occupancy, coded indices.

Layout (little endian)::

    magic "RQBS" | version u8 | mode u8 (0 sparse, 1 dense) | height u16 | width u16 | n u8 | k u16
    | model id 8 bytes | pillars u32 | occupancy words u32 | code words u32 | crc32 u32 (of all else)
    | occupancy payload (u32 words) | code payload (u32 words)

Occupancy and codes are range-coded (``constriction``) under the :class:`ProbabilityModels`
stored with the checkpoint; the model id (a hash of the codebooks and those models) makes a server
with other codebooks refuse the frame. Codes are coded codebook by codebook, each in four phases
of cells by (row parity, column parity) (:data:`PHASE_NEIGHBOURS`): a cell of phase 1-3 is coded
given the same codebook's code of an already-decoded neighbour (fitted spatial tables, one
distribution per neighbour code, plus one for "no occupied neighbour"); phase 0, and every phase
of a model without spatial tables, given the same pillar's code at codebook c - 1 (c >= 1) or
order-0 (c = 0). A context seen fewer than ``CONTEXT_MIN`` times in fitting escapes to the order-0
model. Every field is bounds-checked and the CRC is verified before any decoding, so malformed
input fails fast with :class:`BitstreamError` and bounded memory.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream import occupancy as occ_mod
from pcdet_ext.algorithms.bitstream.occupancy import GridGeometry

MAGIC = b"RQBS"
VERSION = 1
HEADER = struct.Struct("<4sBBHHBH8sIIII")
MAX_CELLS = 4096 * 4096
MAX_CODEBOOKS = 16
MAX_ENTRIES = 4096
LAPLACE = 0.5
CONTEXT_MIN = 16      # fitting samples a previous code needs for its own distribution (else order-0)
CONTEXT_PRIOR = 0.5   # pseudo-counts per entry, shaped like the order-0 distribution
# Per phase (cells with (row % 2) * 2 + col % 2 == phase), the neighbour offsets (d_row, d_col) whose
# code is the context, in order of preference; each points at a cell of an earlier phase.
PHASE_NEIGHBOURS = (
    (),
    ((0, -1), (0, 1)),
    ((-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)),
    ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)),
)


class BitstreamError(ValueError):
    """The bytes are not a frame this decoder can read (corrupt, truncated, other codebooks)."""


def _constriction():
    try:
        import constriction
    except ImportError as exc:
        raise ImportError("the split-inference bitstream needs constriction: pip install constriction") from exc
    return constriction


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
    _tables: Dict[Tuple, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    _coders: Dict[Tuple, object] = field(default_factory=dict, repr=False, compare=False)
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
            cells = np.asarray(cells, dtype=np.int64)
            order = np.argsort(cells, kind="stable")
            layout = _Layout.of(cells[order], self.geometry.height, self.geometry.width, spatial=True)
        for k, codes in codes_by_k.items():
            for c in range(codes.shape[1]):
                self.code_counts[k][c] += np.bincount(codes[:, c], minlength=k)[:k]
                if self.pair_counts is not None and c:
                    pair = codes[:, c - 1] * k + codes[:, c]
                    self.pair_counts[k][c] += np.bincount(pair, minlength=k * k)[: k * k].reshape(k, k)
                if layout is not None:
                    column = codes[order, c]
                    for idx, ctx in layout.spatial_contexts(column, k):
                        pair = ctx * k + column[idx]
                        self.spatial_counts[k][c] += np.bincount(pair, minlength=(k + 1) * k).reshape(k + 1, k)
        self._tables.clear()
        self._coders.clear()
        self._choice.clear()

    def code_probs(self, c: int, k: int) -> np.ndarray:
        """Order-0 distribution of codebook ``c`` at ``k`` entries."""
        table = self.code_counts.get(k)
        if table is None or c >= table.shape[0]:
            return np.full(k, 1.0 / k)  # an operating point without statistics: uniform
        return _normalise(table[c])

    def _conditional(self, kind: str, c: int, k: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(rows [contexts, k], group [contexts]) of codebook ``c``'s code given a context of ``kind``
        ('previous': codebook c - 1's code; 'spatial': a neighbour's code, k = none), or None when
        there is no such table. Rows seen fewer than CONTEXT_MIN times are the order-0 distribution
        and share group -1."""
        counts = self.pair_counts if kind == "previous" else self.spatial_counts
        table = None if counts is None else counts.get(k)
        if table is None or c >= table.shape[0] or (kind == "previous" and c == 0) or not table[c].any():
            return None
        key = (kind, c, k)
        if key not in self._tables:
            p0 = self.code_probs(c, k)
            n = table[c].sum(axis=1, keepdims=True).astype(np.float64)
            rows = (table[c] + CONTEXT_PRIOR * k * p0) / (n + CONTEXT_PRIOR * k)
            seen = n[:, 0] >= CONTEXT_MIN
            self._tables[key] = (np.where(seen[:, None], rows, p0), np.where(seen, np.arange(len(seen)), -1))
        return self._tables[key]

    def context_probs(self, c: int, k: int) -> Optional[np.ndarray]:
        """[k, k] distributions of codebook ``c``'s code given codebook ``c - 1``'s (row), or None when
        it is coded with its order-0 model (c = 0, no fitted pairs)."""
        table = self._conditional("previous", c, k)
        return None if table is None else table[0]

    def spatial_probs(self, c: int, k: int) -> Optional[np.ndarray]:
        """[k + 1, k] distributions of codebook ``c``'s code given a neighbour's code (row k: no
        occupied neighbour), or None without fitted spatial tables."""
        table = self._conditional("spatial", c, k)
        return None if table is None else table[0]

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
                spatial = self._conditional("spatial", c, k)
                if spatial is None:
                    continue
                p0, alpha = self.code_probs(c, k), CONTEXT_PRIOR * k
                rival = (_held_out_bits(self.pair_counts[k][c], p0, alpha, CONTEXT_MIN)
                         if self._conditional("previous", c, k) is not None else
                         _held_out_bits(self.code_counts[k][c][None], np.full(k, 1.0 / k), LAPLACE * k, 0))
                choice[c] = _held_out_bits(table[c], p0, alpha, CONTEXT_MIN) < rival
            self._choice[k] = choice
        return self._choice[k]

    def uses_spatial(self, k: int) -> bool:
        """Whether frames at ``k`` entries are coded in phases with spatial contexts."""
        return k in self.code_counts and bool(self.spatial_codebooks(k).any())

    def _coder(self, kind: str, c: int, k: int, group: int):
        """constriction model of one context group (cached: building it costs more than coding a group)."""
        key = (kind if group >= 0 else None, c, k, group)
        model = self._coders.get(key)
        if model is None:
            probs = self.code_probs(c, k) if group < 0 else self._conditional(kind, c, k)[0][group]
            model = self._coders[key] = _constriction().stream.model.Categorical(probs, perfect=False)
        return model

    def bit_costs(self, num_codebooks: int, k: int) -> List[np.ndarray]:
        """Cost in bits of each entry per codebook for rate-aware code choice: [k] (order-0) or [k, k]
        (given codebook c - 1's code). The spatial contexts are left out: a neighbour's code is not
        chosen yet when a pillar's is."""
        out = []
        for c in range(num_codebooks):
            table = self.context_probs(c, k)
            out.append(-np.log2(self.code_probs(c, k) if table is None else table))
        return out

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


@dataclass
class _Layout:
    """The order codes are visited in, shared by encoder, decoder and fitting: per phase the
    indices of its cells (into the ascending cell list) and, for phases >= 1, the index of each
    one's context neighbour (-1: none occupied)."""
    phases: List[np.ndarray]
    neighbours: List[Optional[np.ndarray]]

    @classmethod
    def of(cls, cells: np.ndarray, height: int, width: int, spatial: bool) -> "_Layout":
        """``cells``: ascending flat indices. Without ``spatial``: one phase of every cell."""
        if not spatial:
            return cls([np.arange(len(cells))], [None])
        rows, cols = cells // width, cells % width
        phase = (rows & 1) * 2 + (cols & 1)
        phases, neighbours = [], []
        for p, offsets in enumerate(PHASE_NEIGHBOURS):
            idx = np.flatnonzero(phase == p)
            phases.append(idx)
            if p == 0:
                neighbours.append(None)
                continue
            nb = np.full(len(idx), -1, dtype=np.int64)
            r, c = rows[idx], cols[idx]
            for dr, dc in offsets:
                rr, cc = r + dr, c + dc
                want = (nb < 0) & (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
                key = rr * width + cc
                pos = np.minimum(np.searchsorted(cells, key), max(len(cells) - 1, 0))
                hit = want & (cells[pos] == key)
                nb[hit] = pos[hit]
            neighbours.append(nb)
        return cls(phases, neighbours)

    def spatial_contexts(self, column: np.ndarray, k: int):
        """(cell indices, neighbour's code or k) of phases 1-3, given the codes ``column`` of one
        codebook (only the earlier phases' entries are read)."""
        for idx, nb in zip(self.phases[1:], self.neighbours[1:]):
            yield idx, np.where(nb >= 0, column[np.maximum(nb, 0)], k)


def _plan(models: "ProbabilityModels", layout: _Layout, codes: np.ndarray, cb: int, k: int, phase: int):
    """(kind, context group per cell of ``phase``) for codebook ``cb``; kind None = order-0. Reads
    only codes the decoder already has."""
    idx, nb = layout.phases[phase], layout.neighbours[phase]
    if nb is not None and models.spatial_codebooks(k)[cb]:
        table = models._conditional("spatial", cb, k)
        if table is not None:
            return "spatial", table[1][np.where(nb >= 0, codes[np.maximum(nb, 0), cb], k)]
    table = models._conditional("previous", cb, k)
    if table is None:
        return None, None
    return "previous", table[1][codes[idx, cb - 1]]


def _groups(groups: np.ndarray, k: int):
    """Cells sorted by context group (stable), and the runs to code: (group, start, length) for each
    group of at least ``_batch_below(k)`` cells, then (None, start, length) for all shorter groups
    together (coded in one call, each cell under its own group's distribution: one call per tiny
    group would cost more than the codes). Encoder and decoder both visit one phase this way."""
    counts = np.bincount(groups + 1, minlength=k + 2)  # group ids run from -1 (escape) to k
    long = counts >= _batch_below(k)
    order = np.argsort(groups + 1 + (~long[groups + 1]) * (k + 2), kind="stable")  # long groups first, by group
    values = np.flatnonzero(long & (counts > 0))
    lengths = counts[values]
    runs = list(zip((values - 1).tolist(), (np.cumsum(lengths) - lengths).tolist(), lengths.tolist()))
    tail = len(groups) - int(lengths.sum())
    if tail:
        runs.append((None, len(groups) - tail, tail))
    return order, runs


def _batch_below(k: int) -> int:
    """Groups shorter than this go into the shared per-cell call (its cost grows with k per cell)."""
    return max(2, 1024 // k)


def _run_model(models: "ProbabilityModels", kind: str, cb: int, k: int, group, groups_sorted: np.ndarray,
               start: int, length: int):
    """(model, per-cell probabilities or None) for one run of :func:`_groups`."""
    if group is not None:
        return models._coder(kind, cb, k, group), None
    rows = models._conditional(kind, cb, k)[0]
    g = groups_sorted[start:start + length]
    probs = np.where((g >= 0)[:, None], rows[np.maximum(g, 0)], models.code_probs(cb, k)[None])
    return _constriction().stream.model.Categorical(perfect=False), probs


def _encode_codes(enc, codes: np.ndarray, k: int, models: "ProbabilityModels", layout: _Layout) -> None:
    for cb in range(codes.shape[1]):
        for phase, idx in enumerate(layout.phases):
            symbols = codes[idx, cb].astype(np.int32)
            kind, groups = _plan(models, layout, codes, cb, k, phase)
            if kind is None:
                enc.encode(symbols, models._coder(None, cb, k, -1))
                continue
            order, runs = _groups(groups, k)
            symbols, groups = symbols[order], groups[order]
            for group, start, length in runs:
                model, probs = _run_model(models, kind, cb, k, group, groups, start, length)
                if probs is None:
                    enc.encode(symbols[start:start + length], model)
                else:
                    enc.encode(symbols[start:start + length], model, probs)


def _decode_codes(dec, m: int, n: int, k: int, models: "ProbabilityModels", layout: _Layout) -> np.ndarray:
    codes = np.zeros((m, n), dtype=np.int64)
    for cb in range(n):
        for phase, idx in enumerate(layout.phases):
            kind, groups = _plan(models, layout, codes, cb, k, phase)
            if kind is None:
                codes[idx, cb] = dec.decode(models._coder(None, cb, k, -1), len(idx))
                continue
            order, runs = _groups(groups, k)
            groups = groups[order]
            out = np.zeros(len(idx), dtype=np.int64)
            for group, start, length in runs:
                model, probs = _run_model(models, kind, cb, k, group, groups, start, length)
                out[start:start + length] = dec.decode(model, length) if probs is None else dec.decode(model, probs)
            codes[idx[order], cb] = out
    return codes


def code_bits(codes: np.ndarray, k: int, models: "ProbabilityModels", context: bool = True,
              cells: Optional[np.ndarray] = None) -> float:
    """Ideal bits of ``codes`` [M, n] (rows: the flat ``cells``, needed for the spatial contexts)
    under the models, with or without their contexts."""
    codes = np.asarray(codes, dtype=np.int64)
    spatial = context and cells is not None and models.uses_spatial(k)
    if cells is not None:
        order = np.argsort(cells, kind="stable")
        cells, codes = np.asarray(cells)[order], codes[order]
    layout = _Layout.of(cells if spatial else np.arange(len(codes)), models.geometry.height, models.geometry.width,
                        spatial)
    bits = 0.0
    for cb in range(codes.shape[1]):
        for phase, idx in enumerate(layout.phases):
            kind, groups = _plan(models, layout, codes, cb, k, phase) if context else (None, None)
            if kind is None:
                p = models.code_probs(cb, k)[codes[idx, cb]]
            else:
                rows = models._conditional(kind, cb, k)[0]
                p = np.where(groups >= 0, rows[np.maximum(groups, 0), codes[idx, cb]], models.code_probs(cb, k)[codes[idx, cb]])
            bits += float(-np.log2(p).sum())
    return bits


@dataclass
class Frame:
    """Decoded payload: occupied cells (flat row-major indices, ascending) and their codes [M, n]."""
    height: int
    width: int
    num_embeddings: int
    cells: np.ndarray
    codes: np.ndarray
    dense: bool = False


def _encode_occupancy(enc, occ: np.ndarray, models: ProbabilityModels) -> None:
    c = _constriction()
    geo = models.geometry
    pyr = occ_mod.pyramid(occ, geo)
    fam = c.stream.model.Categorical(perfect=False)
    top_p = _normalise(models.top_counts)
    ctx = occ_mod.top_contexts(geo, pyr[-1].shape)
    enc.encode(pyr[-1].ravel().astype(np.int32), fam, top_p[ctx])
    child_p = _normalise(models.child_counts)
    for level in range(geo.levels - 1, -1, -1):
        rows, cols, ctx = occ_mod.child_contexts(pyr[level + 1], level, geo)
        if len(rows):
            enc.encode(occ_mod.child_patterns(pyr[level], rows, cols).astype(np.int32), fam, child_p[ctx])


def _decode_occupancy(dec, models: ProbabilityModels) -> np.ndarray:
    c = _constriction()
    geo = models.geometry
    ph, pw = geo.padded
    shape = (ph >> geo.levels, pw >> geo.levels)
    fam = c.stream.model.Categorical(perfect=False)
    ctx = occ_mod.top_contexts(geo, shape)
    level_map = np.asarray(dec.decode(fam, _normalise(models.top_counts)[ctx]), dtype=bool).reshape(shape)
    child_p = _normalise(models.child_counts)
    for level in range(geo.levels - 1, -1, -1):
        child = np.zeros((level_map.shape[0] * 2, level_map.shape[1] * 2), dtype=bool)
        rows, cols, ctx = occ_mod.child_contexts(level_map, level, geo)
        if len(rows):
            occ_mod.place_children(child, rows, cols, np.asarray(dec.decode(fam, child_p[ctx])))
        level_map = child
    return level_map[: geo.height, : geo.width]


def encode_frame(cells: np.ndarray, codes: np.ndarray, num_embeddings: int, models: ProbabilityModels,
                 model_id: bytes, dense: bool = False) -> bytes:
    """Bytes for one frame. ``cells``: flat row-major indices of the occupied BEV cells (any order;
    sparse mode) and ``codes`` [M, n] in the same order. Dense mode codes every cell in raster order
    (``cells`` must then be ``arange(H * W)``)."""
    c = _constriction()
    geo = models.geometry
    cells = np.asarray(cells, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[0] != cells.shape[0] or not 1 <= codes.shape[1] <= MAX_CODEBOOKS:
        raise ValueError(f"codes must be [M, n] with M = len(cells) and 1 <= n <= {MAX_CODEBOOKS}, "
                         f"got {codes.shape} for {cells.shape[0]} cells")
    if not 1 <= num_embeddings <= MAX_ENTRIES or (codes.size and (codes.min() < 0 or codes.max() >= num_embeddings)):
        raise ValueError(f"code indices must lie in 0..{num_embeddings - 1}")
    order = np.argsort(cells, kind="stable")
    cells, codes = cells[order], codes[order]
    if len(cells) and (cells[0] < 0 or cells[-1] >= geo.height * geo.width or np.any(np.diff(cells) == 0)):
        raise ValueError("cells must be distinct indices inside the grid")
    occ_words = np.zeros(0, dtype=np.uint32)
    if not dense:
        occ = np.zeros(geo.height * geo.width, dtype=bool)
        occ[cells] = True
        enc = c.stream.queue.RangeEncoder()
        _encode_occupancy(enc, occ.reshape(geo.height, geo.width), models)
        occ_words = enc.get_compressed()
    elif len(cells) != geo.height * geo.width:
        raise ValueError("dense mode codes every cell of the grid")
    enc = c.stream.queue.RangeEncoder()
    if len(codes):
        layout = _Layout.of(cells, geo.height, geo.width, models.uses_spatial(num_embeddings))
        _encode_codes(enc, codes, num_embeddings, models, layout)
    code_words = enc.get_compressed()
    body = occ_words.astype("<u4").tobytes() + code_words.astype("<u4").tobytes()
    fields = (MAGIC, VERSION, int(dense), geo.height, geo.width, codes.shape[1], num_embeddings, model_id,
              len(cells), len(occ_words), len(code_words))
    crc = zlib.crc32(HEADER.pack(*fields, 0)[:-4] + body)
    return HEADER.pack(*fields, crc) + body


def read_header(data: bytes) -> Dict[str, object]:
    """Parse and bounds-check the header (no decoding)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    if len(data) < HEADER.size:
        raise BitstreamError(f"truncated frame: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, mode, h, w, n, k, model_id, pillars, occ_len, code_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f"bad magic {magic!r}: not a pcdet_ext RQ frame")
    if version != VERSION:
        raise BitstreamError(f"unsupported format version {version} (this decoder reads {VERSION})")
    if mode not in (0, 1) or not (1 <= h and 1 <= w and h * w <= MAX_CELLS):
        raise BitstreamError(f"header out of range: mode {mode}, grid {h} x {w} (at most {MAX_CELLS} cells)")
    if not 1 <= n <= MAX_CODEBOOKS or not 1 <= k <= MAX_ENTRIES:
        raise BitstreamError(f"header out of range: n={n}, k={k}")
    if pillars > h * w or (mode == 1 and pillars != h * w):
        raise BitstreamError(f"header out of range: {pillars} pillars on a {h} x {w} grid")
    expected = HEADER.size + 4 * (occ_len + code_len)
    if expected != len(data):
        raise BitstreamError(f"frame length {len(data)} does not match its header ({expected} bytes)")
    if zlib.crc32(bytes(data[: HEADER.size - 4]) + bytes(data[HEADER.size:])) != crc:
        raise BitstreamError("checksum mismatch: the frame is corrupt")
    return {"dense": bool(mode), "height": h, "width": w, "num_codebooks": n, "num_embeddings": k,
            "model_id": model_id, "pillars": pillars, "occ_words": occ_len, "code_words": code_len}


def decode_frame(data: bytes, models: ProbabilityModels, model_id: bytes, max_codebooks: int,
                 max_entries: int) -> Frame:
    """Inverse of :func:`encode_frame`; raises :class:`BitstreamError` on anything malformed."""
    c = _constriction()
    hdr = read_header(data)
    geo = models.geometry
    if hdr["model_id"] != model_id:
        raise BitstreamError(f"frame was coded for codebooks/models {hdr['model_id'].hex()}, this server has "
                             f"{model_id.hex()}: refusing to decode")
    if (hdr["height"], hdr["width"]) != (geo.height, geo.width):
        raise BitstreamError(f"grid {hdr['height']} x {hdr['width']} does not match the model's {geo.height} x {geo.width}")
    if hdr["num_codebooks"] > max_codebooks or hdr["num_embeddings"] > max_entries:
        raise BitstreamError(f"n={hdr['num_codebooks']}, k={hdr['num_embeddings']} exceed this model "
                             f"({max_codebooks} codebooks x {max_entries} entries)")
    words = np.frombuffer(bytes(data[HEADER.size:]), dtype="<u4").astype(np.uint32)
    occ_words, code_words = words[: hdr["occ_words"]], words[hdr["occ_words"]:]
    k, n, m = hdr["num_embeddings"], hdr["num_codebooks"], hdr["pillars"]
    try:
        if hdr["dense"]:
            cells = np.arange(geo.height * geo.width, dtype=np.int64)
        else:
            occ = _decode_occupancy(c.stream.queue.RangeDecoder(occ_words), models)
            cells = np.flatnonzero(occ.ravel())
        if len(cells) != m:
            raise BitstreamError(f"decoded {len(cells)} occupied cells, header says {m}")
        codes = np.zeros((0, n), dtype=np.int64)
        if m:
            layout = _Layout.of(cells, geo.height, geo.width, models.uses_spatial(k))
            codes = _decode_codes(c.stream.queue.RangeDecoder(code_words), m, n, k, models, layout)
    except BitstreamError:
        raise
    except Exception as exc:  # the coder itself rejected the payload
        raise BitstreamError(f"payload does not decode: {type(exc).__name__}: {exc}") from exc
    return Frame(geo.height, geo.width, k, cells, codes, bool(hdr["dense"]))
