"""One frame of split-inference payload as bytes: header, coded occupancy, coded indices.

Layout (little endian)::

    magic "RQBS" | version u8 | mode u8 (0 sparse, 1 dense) | height u16 | width u16 | n u8 | k u16
    | model id 8 bytes | pillars u32 | occupancy words u32 | code words u32 | crc32 u32 (of all else)
    | occupancy payload (u32 words) | code payload (u32 words)

Occupancy and codes are rANS-coded (:mod:`.rans`, numba: the same words on x86_64 and aarch64)
under the :class:`ProbabilityModels` stored with the checkpoint; the model id (a hash of the
codebooks and those models) makes a server with other codebooks refuse the frame. Codes are coded
codebook by codebook in the phases and contexts of :mod:`.contexts`; a context seen fewer than
``CONTEXT_MIN`` times in fitting escapes to the order-0 model. Every field is bounds-checked and the
CRC is verified before any decoding, and each stream must end exactly where its last symbol ends,
so malformed input fails fast with :class:`BitstreamError` and bounded memory.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Collection, Dict, Optional, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream import occupancy as occ_mod
from pcdet_ext.algorithms.bitstream.contexts import Layout, passes, plan
from pcdet_ext.algorithms.bitstream.models import MAX_ENTRIES, BitstreamError, ProbabilityModels
from pcdet_ext.algorithms.bitstream.rans import RansDecoder, RansEncoder, RansError

MAGIC = b"RQBS"
VERSION = 3  # 3: rANS (numba) instead of constriction's range coder; 2: codebooks without the spatial context
HEADER = struct.Struct("<4sBBHHBH8sIIII")
MAX_CELLS = 4096 * 4096
MAX_CODEBOOKS = 16
OLDER_VERSIONS = {1: "pcdet_ext's first bitstream (constriction range coder)",
                  2: "the constriction range coder of pcdet_ext before the portable rANS coder"}


def _code_passes(models: ProbabilityModels, layout: Layout, codes: np.ndarray, cb: int, k: int):
    """(cells, rANS table, row of each cell) of every pass over codebook ``cb``, in coding order;
    the contexts read only codes of earlier passes (the decoder fills ``codes`` as it goes)."""
    for phase, idx in passes(models, layout, cb, k):
        kind, ctx = plan(models, layout, codes, cb, k, phase, idx)
        yield idx, models.code_cdf(kind, cb, k), (np.zeros(len(idx), dtype=np.int64) if ctx is None else ctx)


def _encode_codes(enc: RansEncoder, codes: np.ndarray, k: int, models: ProbabilityModels, layout: Layout) -> None:
    for cb in range(codes.shape[1]):
        for idx, cdf, rows in _code_passes(models, layout, codes, cb, k):
            enc.encode(codes[idx, cb], cdf, rows)


def _decode_codes(dec: RansDecoder, m: int, n: int, k: int, models: ProbabilityModels, layout: Layout) -> np.ndarray:
    codes = np.zeros((m, n), dtype=np.int64)
    for cb in range(n):
        for idx, cdf, rows in _code_passes(models, layout, codes, cb, k):
            codes[idx, cb] = dec.decode(cdf, rows)
    return codes


@dataclass
class Frame:
    """Decoded payload: occupied cells (flat row-major indices, ascending) and their codes [M, n]."""
    height: int
    width: int
    num_embeddings: int
    cells: np.ndarray
    codes: np.ndarray
    dense: bool = False


def _encode_occupancy(enc: RansEncoder, occ: np.ndarray, models: ProbabilityModels) -> None:
    geo = models.geometry
    pyr = occ_mod.pyramid(occ, geo)
    enc.encode(pyr[-1].ravel(), models.occupancy_cdf("top"), occ_mod.top_contexts(geo, pyr[-1].shape))
    for level in range(geo.levels - 1, -1, -1):
        rows, cols, ctx = occ_mod.child_contexts(pyr[level + 1], level, geo)
        enc.encode(occ_mod.child_patterns(pyr[level], rows, cols), models.occupancy_cdf("child"), ctx)


def _decode_occupancy(dec: RansDecoder, models: ProbabilityModels) -> np.ndarray:
    geo = models.geometry
    ph, pw = geo.padded
    shape = (ph >> geo.levels, pw >> geo.levels)
    level_map = dec.decode(models.occupancy_cdf("top"), occ_mod.top_contexts(geo, shape)).astype(bool).reshape(shape)
    for level in range(geo.levels - 1, -1, -1):
        child = np.zeros((level_map.shape[0] * 2, level_map.shape[1] * 2), dtype=bool)
        rows, cols, ctx = occ_mod.child_contexts(level_map, level, geo)
        occ_mod.place_children(child, rows, cols, dec.decode(models.occupancy_cdf("child"), ctx))
        level_map = child
    return level_map[: geo.height, : geo.width]


def occupancy_words(cells: np.ndarray, models: ProbabilityModels) -> np.ndarray:
    """The occupied ``cells`` (distinct flat row-major indices inside the grid) as rANS words under the
    occupancy models: the occupancy part of a sparse frame (also used by other payload formats)."""
    geo = models.geometry
    occ = np.zeros(geo.height * geo.width, dtype=bool)
    occ[cells] = True
    enc = RansEncoder()
    _encode_occupancy(enc, occ.reshape(geo.height, geo.width), models)
    return enc.finish()


def occupancy_cells(words: np.ndarray, models: ProbabilityModels) -> np.ndarray:
    """Inverse of :func:`occupancy_words`: the occupied cells, ascending; :class:`RansError` when the
    words are not exactly one occupancy stream."""
    dec = RansDecoder(words)
    cells = np.flatnonzero(_decode_occupancy(dec, models).ravel())
    dec.finish()
    return cells


def encode_frame(cells: np.ndarray, codes: np.ndarray, num_embeddings: int, models: ProbabilityModels,
                 model_id: bytes, dense: bool = False) -> bytes:
    """Bytes for one frame. ``cells``: flat row-major indices of the occupied BEV cells (any order;
    sparse mode) and ``codes`` [M, n] in the same order. Dense mode codes every cell in raster order
    (``cells`` must then be ``arange(H * W)``)."""
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
        occ_words = occupancy_words(cells, models)
    elif len(cells) != geo.height * geo.width:
        raise ValueError("dense mode codes every cell of the grid")
    enc = RansEncoder()
    if len(codes):
        layout = Layout.of(cells, geo.height, geo.width, models.uses_spatial(num_embeddings))
        _encode_codes(enc, codes, num_embeddings, models, layout)
    code_words = enc.finish()
    body = occ_words.astype("<u4").tobytes() + code_words.astype("<u4").tobytes()
    fields = (MAGIC, VERSION, int(dense), geo.height, geo.width, codes.shape[1], num_embeddings, model_id,
              len(cells), len(occ_words), len(code_words))
    crc = zlib.crc32(HEADER.pack(*fields, 0)[:-4] + body)
    return HEADER.pack(*fields, crc) + body


def max_frame_bytes(geo: "occ_mod.GridGeometry", max_codebooks: int) -> int:
    """An upper bound on any frame for this grid: every cell occupied at every codebook, each coded symbol
    at most 32 bits (rANS at 24-bit precision spends at most 24 a symbol, plus each stream's final state);
    the quadtree codes fewer occupancy symbols than a third of the padded cells."""
    ph, pw = geo.padded
    return HEADER.size + 4 * (ph * pw + geo.height * geo.width * max_codebooks + 8)


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
        older = f": {OLDER_VERSIONS[version]}; re-encode with this release's edge" if version in OLDER_VERSIONS else ""
        raise BitstreamError(f"unsupported format version {version} (this decoder reads {VERSION}){older}")
    if mode not in (0, 1) or not (1 <= h and 1 <= w and h * w <= MAX_CELLS):
        raise BitstreamError(f"header out of range: mode {mode}, grid {h} x {w} (at most {MAX_CELLS} cells)")
    if not 1 <= n <= MAX_CODEBOOKS or not 1 <= k <= MAX_ENTRIES:
        raise BitstreamError(f"header out of range: n={n}, k={k}")
    if pillars > h * w or (mode == 1 and pillars != h * w):
        raise BitstreamError(f"header out of range: {pillars} pillars on a {h} x {w} grid")
    if mode == 1 and occ_len:
        raise BitstreamError(f"a dense frame carries no occupancy, this one has {occ_len} occupancy words")
    expected = HEADER.size + 4 * (occ_len + code_len)
    if expected != len(data):
        raise BitstreamError(f"frame length {len(data)} does not match its header ({expected} bytes)")
    if zlib.crc32(bytes(data[: HEADER.size - 4]) + bytes(data[HEADER.size:])) != crc:
        raise BitstreamError("checksum mismatch: the frame is corrupt")
    return {"dense": bool(mode), "height": h, "width": w, "num_codebooks": n, "num_embeddings": k,
            "model_id": model_id, "pillars": pillars, "occ_words": occ_len, "code_words": code_len}


def decode_frame(data: bytes, models: ProbabilityModels, model_id: bytes, max_codebooks: int,
                 max_entries: int, dense: Optional[bool] = None,
                 cells: Optional[Collection[Tuple[int, int]]] = None) -> Frame:
    """Inverse of :func:`encode_frame`; raises :class:`BitstreamError` on anything malformed. A server
    passes its mode (``dense``) and the (n, k) ``cells`` it was trained for: other frames are refused."""
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
    if dense is not None and hdr["dense"] != dense:
        mode = ("sparse", "dense")
        raise BitstreamError(f"a {mode[hdr['dense']]} frame for a {mode[dense]} model: refusing to decode")
    if cells is not None and (hdr["num_codebooks"], hdr["num_embeddings"]) not in cells:
        raise BitstreamError(f"(n, k) = ({hdr['num_codebooks']}, {hdr['num_embeddings']}) is not a cell this model "
                             f"was trained and its bitstream models fitted for: {sorted(cells)}")
    words = np.frombuffer(bytes(data[HEADER.size:]), dtype="<u4").astype(np.uint32)
    occ_words, code_words = words[: hdr["occ_words"]], words[hdr["occ_words"]:]
    k, n, m = hdr["num_embeddings"], hdr["num_codebooks"], hdr["pillars"]
    try:
        if hdr["dense"]:
            cells = np.arange(geo.height * geo.width, dtype=np.int64)
        else:
            dec = RansDecoder(occ_words)
            cells = np.flatnonzero(_decode_occupancy(dec, models).ravel())
            dec.finish()
        if len(cells) != m:
            raise BitstreamError(f"decoded {len(cells)} occupied cells, header says {m}")
        codes = np.zeros((0, n), dtype=np.int64)
        if m:
            layout = Layout.of(cells, geo.height, geo.width, models.uses_spatial(k))
            dec = RansDecoder(code_words)
            codes = _decode_codes(dec, m, n, k, models, layout)
            dec.finish()
        elif len(code_words):
            raise BitstreamError(f"{len(code_words)} code words for a frame without pillars")
    except RansError as exc:
        raise BitstreamError(f"payload does not decode: {exc}") from exc
    return Frame(geo.height, geo.width, k, cells, codes, bool(hdr["dense"]))
