"""One frame of split-inference payload as bytes: header, coded occupancy, coded indices.

Layout (little endian)::

    magic "RQBS" | version u8 | mode u8 (0 sparse, 1 dense) | height u16 | width u16 | n u8 | k u16
    | model id 8 bytes | pillars u32 | occupancy words u32 | code words u32 | crc32 u32 (of all else)
    | occupancy payload (u32 words) | code payload (u32 words)

Occupancy and codes are range-coded (``constriction``) under the :class:`ProbabilityModels`
stored with the checkpoint; the model id (a hash of the codebooks and those models) makes a server
with other codebooks refuse the frame. Every field is bounds-checked and the CRC is verified
before any decoding, so malformed input fails fast with :class:`BitstreamError` and bounded memory.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from . import occupancy as occ_mod
from .occupancy import GridGeometry

MAGIC = b"RQBS"
VERSION = 1
HEADER = struct.Struct("<4sBBHHBH8sIIII")
MAX_CELLS = 4096 * 4096
MAX_CODEBOOKS = 16
MAX_ENTRIES = 4096
LAPLACE = 0.5


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
    at k entries. ``top_counts`` [ranges, 2] and ``child_counts`` [contexts, 15] model the occupancy.
    """
    geometry: GridGeometry
    code_counts: Dict[int, np.ndarray]
    top_counts: np.ndarray
    child_counts: np.ndarray

    @classmethod
    def empty(cls, geometry: GridGeometry, num_codebooks: int, sizes: Sequence[int]) -> "ProbabilityModels":
        return cls(geometry, {int(k): np.zeros((num_codebooks, int(k)), dtype=np.int64) for k in sizes},
                   np.zeros((occ_mod.NUM_RANGE, 2), dtype=np.int64),
                   np.zeros((occ_mod.num_child_contexts(geometry.levels), occ_mod.PATTERNS), dtype=np.int64))

    def observe(self, occupancy: Optional[np.ndarray], codes_by_k: Dict[int, np.ndarray]) -> None:
        """Add one training frame: its occupancy map and its codes [M, C] at each k."""
        if occupancy is not None:
            top, child = occ_mod.count(occupancy, self.geometry)
            self.top_counts += top
            self.child_counts += child
        for k, codes in codes_by_k.items():
            for c in range(codes.shape[1]):
                self.code_counts[k][c] += np.bincount(codes[:, c], minlength=k)[:k]

    def code_probs(self, c: int, k: int) -> np.ndarray:
        table = self.code_counts.get(k)
        if table is None or c >= table.shape[0]:
            return np.full(k, 1.0 / k)  # an operating point without statistics: uniform
        return _normalise(table[c])

    def to_state(self) -> Dict[str, object]:
        g = self.geometry
        return {"geometry": [g.height, g.width, g.sensor_row, g.sensor_col, g.cell_m, g.levels],
                "code_counts": {str(k): v.tolist() for k, v in self.code_counts.items()},
                "top_counts": self.top_counts.tolist(), "child_counts": self.child_counts.tolist()}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "ProbabilityModels":
        h, w, sr, sc, cell, levels = state["geometry"]
        return cls(GridGeometry(int(h), int(w), float(sr), float(sc), float(cell), int(levels)),
                   {int(k): np.asarray(v, dtype=np.int64) for k, v in state["code_counts"].items()},
                   np.asarray(state["top_counts"], dtype=np.int64), np.asarray(state["child_counts"], dtype=np.int64))

    def identifier(self, codebooks: np.ndarray) -> bytes:
        """8 bytes naming these codebooks and models."""
        h = hashlib.sha256(np.ascontiguousarray(codebooks, dtype=np.float32).tobytes())
        for part in (self.top_counts, self.child_counts, *[self.code_counts[k] for k in sorted(self.code_counts)]):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(str(self.to_state()["geometry"]).encode())
        return h.digest()[:8]


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
    for cb in range(codes.shape[1]):
        if len(codes):
            enc.encode(codes[:, cb].astype(np.int32),
                       c.stream.model.Categorical(models.code_probs(cb, num_embeddings), perfect=False))
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
        dec = c.stream.queue.RangeDecoder(code_words)
        codes = np.zeros((m, n), dtype=np.int64)
        if m:
            for cb in range(n):
                codes[:, cb] = dec.decode(c.stream.model.Categorical(models.code_probs(cb, k), perfect=False), m)
    except BitstreamError:
        raise
    except Exception as exc:  # the coder itself rejected the payload
        raise BitstreamError(f"payload does not decode: {type(exc).__name__}: {exc}") from exc
    return Frame(geo.height, geo.width, k, cells, codes, bool(hdr["dense"]))
