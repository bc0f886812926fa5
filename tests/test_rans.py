"""rANS coder: exact round trips at the entropy, integer-only tables, a stream that must end exactly."""
import numpy as np
import pytest

from pcdet_ext.algorithms.bitstream import BitstreamError, decode_frame, encode_frame
from pcdet_ext.algorithms.bitstream.codec import HEADER, VERSION
from pcdet_ext.algorithms.bitstream.rans import TOTAL, RansDecoder, RansEncoder, RansError, quantise

from test_bitstream import fitted_models, lidar_like_occupancy


def _skewed(rng, n, k):
    return np.minimum(rng.geometric(0.2, size=n) - 1, k - 1)


def test_tables_sum_to_total_with_every_symbol_codable():
    weights = np.array([[1, 1, 10 ** 15, 3], [5, 5, 5, 5], [1, 2, 3, 4]], dtype=np.int64)
    cdf = quantise(weights)
    freq = np.diff(cdf, axis=1)
    assert (cdf[:, -1] == TOTAL).all() and (freq >= 1).all()
    assert (freq[1] == TOTAL // 4).all()
    assert np.allclose(freq[2] / TOTAL, weights[2] / weights[2].sum(), atol=1e-6)
    with pytest.raises(ValueError, match="positive integers"):
        quantise(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="positive integers"):
        quantise(np.array([1, 0]))


def test_round_trip_over_passes_with_contexts_at_the_entropy():
    rng = np.random.default_rng(0)
    k, rows = 64, 5
    probs = rng.dirichlet(np.full(k, 0.3), size=rows)
    cdf = quantise(np.maximum((probs * 1e9).astype(np.int64), 1))
    passes = []
    enc = RansEncoder()
    for m in (1, 5000, 0, 3000):  # several passes, one of them empty
        ctx = rng.integers(0, rows, m)
        sym = np.array([rng.choice(k, p=probs[c]) for c in ctx], dtype=np.int64)
        enc.encode(sym, cdf, ctx)
        passes.append((sym, ctx))
    words = enc.finish()
    dec = RansDecoder(words)
    for sym, ctx in passes:
        assert np.array_equal(dec.decode(cdf, ctx), sym)
    dec.finish()
    ideal = sum(-np.log2(probs[ctx, sym]).sum() for sym, ctx in passes)
    assert 32 * len(words) <= ideal * 1.01 + 96  # within 1 % of the model's entropy plus the flushed state


def test_a_stream_must_end_where_it_began():
    rng = np.random.default_rng(1)
    cdf = quantise(np.arange(1, 17))
    sym = rng.integers(0, 16, 2000)
    enc = RansEncoder()
    enc.encode(sym, cdf)
    words = enc.finish()
    rows = np.zeros(len(sym), dtype=np.int64)
    with pytest.raises(RansError, match="words left"):  # a word appended
        dec = RansDecoder(np.append(words, np.uint32(7)))
        dec.decode(cdf, rows)
        dec.finish()
    with pytest.raises(RansError, match="ended before|initial state"):  # the last word dropped
        dec = RansDecoder(words[:-1])
        dec.decode(cdf, rows)
        dec.finish()
    flips = 0
    for i in range(len(words)):
        bad = words.copy()
        bad[i] ^= np.uint32(1 << int(rng.integers(32)))
        try:
            dec = RansDecoder(bad)
            out = dec.decode(cdf, rows)
            dec.finish()
            flips += not np.array_equal(out, sym)  # a flip that decodes must not decode to other symbols silently
        except RansError:
            pass
    assert flips == 0
    assert len(RansEncoder().finish()) == 0
    RansDecoder(np.zeros(0, dtype=np.uint32)).finish()
    with pytest.raises(RansError, match="empty stream"):
        RansDecoder(np.zeros(0, dtype=np.uint32)).decode(cdf, rows[:1])


def test_older_frame_versions_are_refused_by_name():
    models = fitted_models()
    occ = lidar_like_occupancy(np.random.default_rng(2))
    cells = np.flatnonzero(occ.ravel())
    codes = _skewed(np.random.default_rng(3), (len(cells), 2), 16).reshape(len(cells), 2)
    data = bytearray(encode_frame(cells, codes, 16, models, b"m" * 8))
    assert data[4] == VERSION == 3
    data[4] = 2
    with pytest.raises(BitstreamError, match="version 2.*constriction.*re-encode"):
        decode_frame(bytes(data), models, b"m" * 8, 3, 64)


def test_trailing_code_words_are_refused():
    """A word appended to the code stream, with header and CRC made consistent, is refused."""
    import zlib
    models = fitted_models()
    occ = lidar_like_occupancy(np.random.default_rng(4))
    cells = np.flatnonzero(occ.ravel())
    codes = _skewed(np.random.default_rng(5), (len(cells), 3), 64).reshape(len(cells), 3)
    data = encode_frame(cells, codes, 64, models, b"m" * 8)
    fields = list(HEADER.unpack_from(data))
    fields[10] += 1  # code words
    body = data[HEADER.size:] + b"\x01\x00\x00\x00"
    fields[11] = zlib.crc32(HEADER.pack(*fields[:-1], 0)[:-4] + body)
    with pytest.raises(BitstreamError, match="words left"):
        decode_frame(HEADER.pack(*fields) + body, models, b"m" * 8, 3, 64)
