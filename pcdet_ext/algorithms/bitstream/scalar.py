"""A baseline payload for split inference: pillar features scalar-quantized per channel to ``bits``
bits and entropy-coded (rANS, one static distribution per channel fitted on training features), the
occupied cells coded by the same occupancy models as the RQ bitstream. What "just quantize the
features" costs, in real bytes, next to the RQ codes.

Layout (little endian): magic "SQBS" | bits u8 | channels u16 | pillars u32 | occupancy words u32 |
feature words u32 | crc32 u32 (of all else) | occupancy payload | feature payload (u32 words).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream.codec import occupancy_cells, occupancy_words
from pcdet_ext.algorithms.bitstream.models import BitstreamError, ProbabilityModels
from pcdet_ext.algorithms.bitstream.rans import RansDecoder, RansEncoder, RansError, quantise

MAGIC = b"SQBS"
HEADER = struct.Struct("<4sBHIIII")


@dataclass
class ScalarFeatureCoder:
    """Uniform per-channel quantizer over [lo, hi] (the training range) and its per-channel symbol counts."""
    bits: int
    lo: np.ndarray      # [C] float32
    hi: np.ndarray      # [C] float32
    counts: np.ndarray  # [C, 2 ** bits] int64, training symbol counts
    _table: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    @classmethod
    def fit(cls, features: np.ndarray, bits: int) -> "ScalarFeatureCoder":
        """Ranges and symbol counts from training features [N, C]."""
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be 1..16, got {bits}")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features) or not np.isfinite(features).all():
            raise ValueError(f"training features must be a finite [N, C] array with N > 0, got shape {features.shape}")
        coder = cls(bits, features.min(0), features.max(0), np.zeros((features.shape[1], 1 << bits), np.int64))
        symbols = coder.quantize(features)
        for c in range(features.shape[1]):  # C bincounts, not a loop over pillars
            coder.counts[c] = np.bincount(symbols[:, c], minlength=1 << bits)
        return coder

    @property
    def step(self) -> np.ndarray:
        span = (self.hi - self.lo).astype(np.float32)
        return np.where(span > 0, span / ((1 << self.bits) - 1), np.float32(1)).astype(np.float32)

    def quantize(self, features: np.ndarray) -> np.ndarray:
        """[N, C] floats -> [N, C] int64 symbols (values outside the training range clamp to its ends)."""
        sym = np.rint((np.asarray(features, np.float32) - self.lo) / self.step)
        return np.clip(sym, 0, (1 << self.bits) - 1).astype(np.int64)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        return (self.lo + symbols.astype(np.float32) * self.step).astype(np.float32)

    def _cdf(self) -> np.ndarray:
        if self._table is None:
            self._table = quantise(2 * self.counts + 1)
        return self._table

    def encode(self, cells: np.ndarray, symbols: np.ndarray, models: ProbabilityModels) -> bytes:
        """One frame: occupied ``cells`` (distinct flat indices) and their ``symbols`` [M, C]."""
        cells = np.asarray(cells, np.int64)
        channels = self.counts.shape[0]
        if symbols.shape != (len(cells), channels):
            raise ValueError(f"symbols must be [{len(cells)}, {channels}], got {symbols.shape}")
        order = np.argsort(cells, kind="stable")
        occ = occupancy_words(cells[order], models)
        enc = RansEncoder()
        enc.encode(symbols[order].ravel(), self._cdf(), np.tile(np.arange(channels), len(cells)))
        feat = enc.finish()
        body = occ.astype("<u4").tobytes() + feat.astype("<u4").tobytes()
        fields = (MAGIC, self.bits, channels, len(cells), len(occ), len(feat))
        return HEADER.pack(*fields, zlib.crc32(HEADER.pack(*fields, 0)[:-4] + body)) + body

    def decode(self, data: bytes, models: ProbabilityModels) -> Tuple[np.ndarray, np.ndarray]:
        """(cells ascending, symbols [M, C]); :class:`BitstreamError` for anything but a frame of this coder."""
        if len(data) < HEADER.size:
            raise BitstreamError(f"frame of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
        magic, bits, channels, pillars, n_occ, n_feat, crc = HEADER.unpack_from(data)
        if (magic, bits, channels) != (MAGIC, self.bits, self.counts.shape[0]):
            raise BitstreamError(f"not a {self.bits}-bit, {self.counts.shape[0]}-channel scalar frame")
        if len(data) != HEADER.size + 4 * (n_occ + n_feat) or zlib.crc32(data[:HEADER.size - 4] + data[HEADER.size:]) != crc:
            raise BitstreamError("scalar frame: length or CRC does not match its header")
        words = np.frombuffer(data, "<u4", offset=HEADER.size).astype(np.uint32)
        try:
            cells = occupancy_cells(words[:n_occ], models)
            if len(cells) != pillars:
                raise BitstreamError(f"scalar frame: {len(cells)} occupied cells decoded, the header says {pillars}")
            dec = RansDecoder(words[n_occ:])
            symbols = dec.decode(self._cdf(), np.tile(np.arange(channels), pillars)).reshape(pillars, channels)
            dec.finish()
        except RansError as exc:
            raise BitstreamError(f"scalar frame: {exc}") from exc
        return cells, symbols
