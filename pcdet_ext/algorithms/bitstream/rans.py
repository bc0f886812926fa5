"""rANS entropy coder (64-bit state, 32-bit words, 24-bit probabilities) compiled with numba.

Portable by construction: the coding loops are numba (wheels for x86_64 and aarch64), every
probability is an integer frequency derived from integer counts (:func:`quantise`), so an edge on
ARM and a server on x86 write and read the same words. rANS is last-in first-out: the encoder
collects every symbol with its frequency interval, then codes them in reverse in one compiled
call, so the decoder reads them forward, pass by pass, in the order they were collected. The
decoder checks that the stream ends exactly where the encoder started it (all words consumed, the
initial state restored): a payload with words added, removed or altered fails there.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
from numba import njit

PRECISION = 24                       # frequencies of each distribution sum to 2 ** PRECISION
TOTAL = 1 << PRECISION
_LOW = np.uint64(1 << 31)            # the state lives in [_LOW, _LOW << 32)
_STATE_END = 1 << 63


class RansError(ValueError):
    """The words are not a stream of the symbols asked for (corrupt, truncated or with extra words)."""


def quantise(weights: np.ndarray) -> np.ndarray:
    """Cumulative frequency tables [rows, k + 1] (int64, 0 .. ``TOTAL``, every symbol >= 1) of
    positive integer ``weights`` [rows, k] (or [k]): each row proportional to its weights. Only
    integer sums and elementwise IEEE arithmetic, so every platform derives the same table."""
    w = np.atleast_2d(np.asarray(weights))
    if w.dtype.kind not in "iu" or (w <= 0).any():
        raise ValueError("rANS weights must be positive integers")
    k = w.shape[1]
    if not 1 <= k <= TOTAL // 2:
        raise ValueError(f"rANS alphabets hold 1..{TOTAL // 2} symbols, got {k}")
    total = w.astype(np.int64).sum(axis=1, keepdims=True)
    freq = np.floor(w.astype(np.float64) * (float(TOTAL - k) / total.astype(np.float64))).astype(np.int64) + 1
    rows = np.arange(len(freq))
    freq[rows, freq.argmax(axis=1)] += TOTAL - freq.sum(axis=1)  # the rounding left-over to the likeliest
    cdf = np.zeros((len(freq), k + 1), dtype=np.int64)
    np.cumsum(freq, axis=1, out=cdf[:, 1:])
    return cdf


@njit(cache=True, nogil=True)
def _encode(starts: np.ndarray, freqs: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(len(starts) + 2, dtype=np.uint32)
    pos = len(out)
    x = _LOW
    bound = (_LOW >> np.uint64(PRECISION)) << np.uint64(32)
    for i in range(len(starts) - 1, -1, -1):
        f = np.uint64(freqs[i])
        if x >= bound * f:
            pos -= 1
            out[pos] = np.uint32(x & np.uint64(0xFFFFFFFF))
            x >>= np.uint64(32)
        x = ((x // f) << np.uint64(PRECISION)) + (x % f) + np.uint64(starts[i])
    out[pos - 2] = np.uint32(x & np.uint64(0xFFFFFFFF))
    out[pos - 1] = np.uint32(x >> np.uint64(32))
    return out[pos - 2:].copy()


@njit(cache=True, nogil=True)
def _decode(words: np.ndarray, state: np.ndarray, cdf: np.ndarray, rows: np.ndarray,
            out: np.ndarray) -> bool:  # pragma: no cover - compiled
    """Decode len(out) symbols, symbol i under cdf[rows[i]]; False if the words run out."""
    x, pos = np.uint64(state[0]), state[1]
    mask = np.uint64(TOTAL - 1)
    k = cdf.shape[1] - 1
    for i in range(len(out)):
        row = rows[i]
        slot = x & mask
        lo, hi = 0, k
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if np.uint64(cdf[row, mid]) <= slot:
                lo = mid
            else:
                hi = mid
        start = np.uint64(cdf[row, lo])
        x = np.uint64(cdf[row, lo + 1] - cdf[row, lo]) * (x >> np.uint64(PRECISION)) + slot - start
        if x < _LOW:
            if pos >= len(words):
                return False
            x = (x << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        out[i] = lo
    state[0], state[1] = np.int64(x), pos
    return True


class RansEncoder:
    """Collects symbols pass by pass (:meth:`encode`), codes them all in :meth:`finish`."""

    def __init__(self):
        self._starts: List[np.ndarray] = []
        self._freqs: List[np.ndarray] = []

    def encode(self, symbols: np.ndarray, cdf: np.ndarray, rows: Optional[np.ndarray] = None) -> None:
        """``symbols`` [m], each under row ``rows[i]`` of ``cdf`` (default row 0)."""
        symbols = np.asarray(symbols, dtype=np.int64)
        rows = np.zeros(len(symbols), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        starts = cdf[rows, symbols]
        self._starts.append(starts)
        self._freqs.append(cdf[rows, symbols + 1] - starts)

    def finish(self) -> np.ndarray:
        """The words (uint32): none for no symbols, else the final state (2 words) then the rest."""
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, dtype=np.int64)
        if not len(starts):
            return np.zeros(0, dtype=np.uint32)
        return _encode(starts, np.concatenate(self._freqs))


class RansDecoder:
    """Reads symbols in the order they were encoded; :meth:`finish` checks the stream's end."""

    def __init__(self, words: np.ndarray):
        self.words = np.ascontiguousarray(words, dtype=np.uint32)
        self.state = np.zeros(2, dtype=np.int64)  # (x, next word)
        if len(self.words):
            if len(self.words) < 2:
                raise RansError("a stream holds at least its 2-word final state")
            x = int(self.words[0]) | int(self.words[1]) << 32
            if not int(_LOW) <= x < _STATE_END:
                raise RansError("stream state out of range: corrupt payload")
            self.state[:] = (x, 2)

    def decode(self, cdf: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One symbol per entry of ``rows`` (its row of ``cdf``)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        if len(rows) and not len(self.words):
            raise RansError(f"empty stream, {len(rows)} symbols asked for")
        if len(rows) and not _decode(self.words, self.state, cdf, rows, out):
            raise RansError("stream ended before its last symbol: truncated or corrupt payload")
        return out

    def finish(self) -> None:
        """Every word consumed and the encoder's initial state restored, else :class:`RansError`."""
        if not len(self.words):
            return
        if self.state[1] != len(self.words):
            raise RansError(f"{len(self.words) - int(self.state[1])} words left after the last symbol")
        if self.state[0] != int(_LOW):
            raise RansError("stream does not end in the coder's initial state: corrupt payload")
