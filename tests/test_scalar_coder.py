"""The scalar-quantized feature baseline: a real, decodable payload whose bytes follow its bits."""
import numpy as np
import pytest

from pcdet_ext.algorithms.bitstream import BitstreamError
from pcdet_ext.algorithms.bitstream.scalar import HEADER, ScalarFeatureCoder
from test_bitstream import MODELS, frame


def features(rng, m, c=8):
    """Pillar-feature-like: ReLU'd, channel scales apart, one constant channel."""
    x = np.maximum(rng.normal(0.3, 1.0, size=(m, c)) * np.linspace(0.1, 5, c), 0).astype(np.float32)
    x[:, -1] = 2.5
    return x


def test_round_trip_and_error_within_half_a_step():
    rng = np.random.default_rng(0)
    cells, _ = frame(seed=3)
    x = features(rng, len(cells))
    coder = ScalarFeatureCoder.fit(features(rng, 5000), 8)
    data = coder.encode(cells, coder.quantize(x), MODELS)
    got_cells, symbols = coder.decode(data, MODELS)
    order = np.argsort(cells)
    assert np.array_equal(got_cells, cells[order])
    assert np.array_equal(symbols, coder.quantize(x)[order])
    inside = (x >= coder.lo) & (x <= coder.hi)
    err = np.abs(coder.dequantize(symbols) - x[order])
    assert (err[inside[order]] <= (coder.step / 2 + 1e-5)[None].repeat(len(x), 0)[inside[order]]).all()
    assert np.allclose(coder.dequantize(symbols)[:, -1], 2.5)  # a constant channel is sent exactly


def test_fewer_bits_fewer_bytes_and_skewed_features_cost_less_than_raw_bits():
    rng = np.random.default_rng(1)
    cells, _ = frame(seed=4)
    train, x = features(rng, 5000), features(rng, len(cells))
    sizes = {b: len(ScalarFeatureCoder.fit(train, b).encode(cells, ScalarFeatureCoder.fit(train, b).quantize(x), MODELS))
             for b in (8, 4, 2)}
    assert sizes[8] > sizes[4] > sizes[2]
    assert sizes[8] < len(cells) * x.shape[1]  # entropy coding beats 8 raw bits per value on skewed features


def rewritten(data, **fields):
    """The frame with header fields changed and its CRC recomputed (what a CRC alone cannot catch)."""
    import zlib
    names = ["magic", "bits", "channels", "pillars", "occ", "feat", "crc"]
    values = dict(zip(names, HEADER.unpack_from(data)), **fields)
    body = bytes(data[HEADER.size:])
    head = HEADER.pack(*[values[n] for n in names[:-1]], 0)[:-4]
    return head + zlib.crc32(head + body).to_bytes(4, "little") + body


@pytest.mark.parametrize("edit", ["truncate", "flip", "append", "other_bits", "pillars", "split"])
def test_malformed_frames_are_refused(edit):
    rng = np.random.default_rng(2)
    cells, _ = frame(seed=5)
    coder = ScalarFeatureCoder.fit(features(rng, 2000), 6)
    data = bytearray(coder.encode(cells, coder.quantize(features(rng, len(cells))), MODELS))
    if edit == "truncate":
        data = data[:-4]
    elif edit == "flip":
        data[-9] ^= 0x10
    elif edit == "append":
        data += b"\0\0\0\0"
    elif edit == "pillars":
        data = rewritten(data, pillars=HEADER.unpack_from(data)[3] - 1)
    elif edit == "split":  # one occupancy word counted as a feature word
        _, _, _, _, occ, feat, _ = HEADER.unpack_from(data)
        data = rewritten(data, occ=occ - 1, feat=feat + 1)
    else:
        coder = ScalarFeatureCoder.fit(features(rng, 2000), 5)
    with pytest.raises(BitstreamError, match={"pillars": "occupied cells decoded", "flip": "CRC"}.get(edit)):
        coder.decode(bytes(data), MODELS)


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="bits"):
        ScalarFeatureCoder.fit(np.zeros((4, 2)), 0)
    with pytest.raises(ValueError, match="finite"):
        ScalarFeatureCoder.fit(np.array([[np.nan, 1.0]]), 8)
