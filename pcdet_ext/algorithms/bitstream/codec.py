"""One frame of split-inference payload as bytes: header, coded occupancy, coded indices.

Layout (little endian)::

    magic "RQBS" | version u8 | mode u8 (0 sparse, 1 dense) | height u16 | width u16 | n u8 | k u16
    | model id 8 bytes | pillars u32 | occupancy words u32 | code words u32 | crc32 u32 (of all else)
    | occupancy payload (u32 words) | code payload (u32 words)

Occupancy and codes are range-coded (``constriction``) under the :class:`ProbabilityModels`
stored with the checkpoint; the model id (a hash of the codebooks and those models) makes a server
with other codebooks refuse the frame. The code of codebook c >= 1 is coded conditioned on the same
pillar's code at codebook c - 1 (fitted tables, one distribution per previous code, blended with
the order-0 distribution; a previous code seen fewer than ``CONTEXT_MIN`` times in fitting escapes
to the order-0 model); the decoder has codebook c - 1 of every pillar before it reads codebook c. Every field is bounds-checked and the CRC is verified
before any decoding, so malformed input fails fast with :class:`BitstreamError` and bounded memory.
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
    unused); None codes every codebook with its order-0 model. ``top_counts`` [ranges, 2] and
    ``child_counts`` [contexts, 15] model the occupancy.
    """
    geometry: GridGeometry
    code_counts: Dict[int, np.ndarray]
    top_counts: np.ndarray
    child_counts: np.ndarray
    pair_counts: Optional[Dict[int, np.ndarray]] = None
    _tables: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, geometry: GridGeometry, num_codebooks: int, sizes: Sequence[int],
              context: bool = True) -> "ProbabilityModels":
        pairs = {int(k): np.zeros((num_codebooks, int(k), int(k)), dtype=np.int64) for k in sizes} if context else None
        return cls(geometry, {int(k): np.zeros((num_codebooks, int(k)), dtype=np.int64) for k in sizes},
                   np.zeros((occ_mod.NUM_RANGE, 2), dtype=np.int64),
                   np.zeros((occ_mod.num_child_contexts(geometry.levels), occ_mod.PATTERNS), dtype=np.int64), pairs)

    def observe(self, occupancy: Optional[np.ndarray], codes_by_k: Dict[int, np.ndarray]) -> None:
        """Add one training frame: its occupancy map and its codes [M, C] at each k."""
        if occupancy is not None:
            top, child = occ_mod.count(occupancy, self.geometry)
            self.top_counts += top
            self.child_counts += child
        for k, codes in codes_by_k.items():
            for c in range(codes.shape[1]):
                self.code_counts[k][c] += np.bincount(codes[:, c], minlength=k)[:k]
                if self.pair_counts is not None and c:
                    pair = codes[:, c - 1] * k + codes[:, c]
                    self.pair_counts[k][c] += np.bincount(pair, minlength=k * k)[: k * k].reshape(k, k)
        self._tables.clear()

    def code_probs(self, c: int, k: int) -> np.ndarray:
        """Order-0 distribution of codebook ``c`` at ``k`` entries."""
        table = self.code_counts.get(k)
        if table is None or c >= table.shape[0]:
            return np.full(k, 1.0 / k)  # an operating point without statistics: uniform
        return _normalise(table[c])

    def context_probs(self, c: int, k: int) -> Optional[np.ndarray]:
        """[k, k] distributions of codebook ``c``'s code given codebook ``c - 1``'s (row), or None when
        it is coded with its order-0 model (c = 0, no fitted pairs)."""
        pairs = None if self.pair_counts is None else self.pair_counts.get(k)
        if c == 0 or pairs is None or c >= pairs.shape[0]:
            return None
        key = (c, k)
        if key not in self._tables:
            p0 = self.code_probs(c, k)
            n = pairs[c].sum(axis=1, keepdims=True).astype(np.float64)
            rows = (pairs[c] + CONTEXT_PRIOR * k * p0) / (n + CONTEXT_PRIOR * k)
            self._tables[key] = np.where(n >= CONTEXT_MIN, rows, p0)
        return self._tables[key]

    def bit_costs(self, num_codebooks: int, k: int) -> List[np.ndarray]:
        """Cost in bits of each entry per codebook as the coder charges it: [k] (order-0) or [k, k]
        (given codebook c - 1's code), for rate-aware code choice."""
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
        pairs = None
        if "pair_counts" in state:
            pairs = {int(k): _counts(v, f"pair_counts['{k}']") for k, v in _mapping(state, "pair_counts").items()}
            if set(pairs) != set(codes):
                raise BitstreamError(f"bitstream models: pair_counts sizes {sorted(pairs)} differ from code_counts "
                                     f"sizes {sorted(codes)}")
            for k, t in pairs.items():
                _shape(t, (codes[k].shape[0], k, k), f"pair_counts['{k}']")
        top = _counts(state.get("top_counts"), "top_counts")
        _shape(top, (occ_mod.NUM_RANGE, 2), "top_counts")
        child = _counts(state.get("child_counts"), "child_counts")
        _shape(child, (occ_mod.num_child_contexts(geo.levels), occ_mod.PATTERNS), "child_counts")
        return cls(geo, codes, top, child, pairs)

    def identifier(self, codebooks: np.ndarray) -> bytes:
        """8 bytes naming these codebooks and models."""
        h = hashlib.sha256(np.ascontiguousarray(codebooks, dtype=np.float32).tobytes())
        pairs = [self.pair_counts[k] for k in sorted(self.pair_counts)] if self.pair_counts is not None else []
        for part in (self.top_counts, self.child_counts, *[self.code_counts[k] for k in sorted(self.code_counts)],
                     *pairs):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(str(self.to_state()["geometry"]).encode())
        return h.digest()[:8]


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


def _context_groups(prev: np.ndarray) -> Tuple[np.ndarray, List[Tuple[int, int, int]]]:
    """Pillars sorted by their previous code (stable) and (code, start, length) per group: the order
    in which encoder and decoder both visit one codebook."""
    order = np.argsort(prev, kind="stable")
    values, starts, counts = np.unique(prev[order], return_index=True, return_counts=True)
    return order, list(zip(values.tolist(), starts.tolist(), counts.tolist()))


def _encode_codes(enc, codes: np.ndarray, k: int, models: "ProbabilityModels") -> None:
    c = _constriction()
    for cb in range(codes.shape[1]):
        table = models.context_probs(cb, k)
        if table is None:
            enc.encode(codes[:, cb].astype(np.int32), c.stream.model.Categorical(models.code_probs(cb, k), perfect=False))
            continue
        order, groups = _context_groups(codes[:, cb - 1])
        symbols = codes[order, cb].astype(np.int32)
        for value, start, length in groups:
            enc.encode(symbols[start:start + length], c.stream.model.Categorical(table[value], perfect=False))


def _decode_codes(dec, m: int, n: int, k: int, models: "ProbabilityModels") -> np.ndarray:
    c = _constriction()
    codes = np.zeros((m, n), dtype=np.int64)
    for cb in range(n):
        table = models.context_probs(cb, k)
        if table is None:
            codes[:, cb] = dec.decode(c.stream.model.Categorical(models.code_probs(cb, k), perfect=False), m)
            continue
        order, groups = _context_groups(codes[:, cb - 1])
        out = np.zeros(m, dtype=np.int64)
        for value, start, length in groups:
            out[start:start + length] = dec.decode(c.stream.model.Categorical(table[value], perfect=False), length)
        codes[order, cb] = out
    return codes


def code_bits(codes: np.ndarray, k: int, models: "ProbabilityModels", context: bool = True) -> float:
    """Ideal bits of ``codes`` [M, n] under the models (with or without the previous-code contexts)."""
    bits = 0.0
    for cb in range(codes.shape[1]):
        table = models.context_probs(cb, k) if context else None
        p = models.code_probs(cb, k)[codes[:, cb]] if table is None else table[codes[:, cb - 1], codes[:, cb]]
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
        _encode_codes(enc, codes, num_embeddings, models)
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
        codes = _decode_codes(c.stream.queue.RangeDecoder(code_words), m, n, k, models) if m else \
            np.zeros((0, n), dtype=np.int64)
    except BitstreamError:
        raise
    except Exception as exc:  # the coder itself rejected the payload
        raise BitstreamError(f"payload does not decode: {type(exc).__name__}: {exc}") from exc
    return Frame(geo.height, geo.width, k, cells, codes, bool(hdr["dense"]))
