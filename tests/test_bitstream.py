"""Bitstream codec: lossless round trips, rate against entropy, and malformed input (fuzzed)."""
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcdet_ext.algorithms.bitstream import BitstreamError, GridGeometry, ProbabilityModels, decode_frame, encode_frame, read_header
from pcdet_ext.algorithms.bitstream.codec import HEADER
from pcdet_ext.algorithms.bitstream.contexts import code_bits
from pcdet_ext.algorithms.rate import binary_entropy

GEO = GridGeometry(height=96, width=80, sensor_row=48.0, sensor_col=0.0, cell_m=0.32, levels=4)
SIZES = (16, 64)


def lidar_like_occupancy(rng, geo=GEO):
    """Rings around the sensor plus a few blobs, thinning with range."""
    rows, cols = np.indices((geo.height, geo.width))
    r = np.hypot(rows + 0.5 - geo.sensor_row, cols + 0.5 - geo.sensor_col) * geo.cell_m
    ring = (np.abs((r % 3.0) - 1.5) < 0.25) & (rng.random(r.shape) < 0.8 * np.exp(-r / 20))
    blobs = np.zeros_like(ring)
    for _ in range(6):
        y, x = rng.integers(0, geo.height), rng.integers(0, geo.width)
        blobs[max(0, y - 3): y + 3, max(0, x - 5): x + 5] = True
    return ring | (blobs & (rng.random(r.shape) < 0.7))


def fitted_models(seed=0, frames=20):
    rng = np.random.default_rng(seed)
    models = ProbabilityModels.empty(GEO, 3, SIZES)
    for _ in range(frames):
        occ = lidar_like_occupancy(rng)
        m = int(occ.sum())
        skew = lambda k: np.minimum(rng.geometric(0.15, size=(m, 3)) - 1, k - 1)  # noqa: E731
        models.observe(occ, {k: skew(k) for k in SIZES})
    return models


MODELS = fitted_models()
MODEL_ID = MODELS.identifier(np.zeros((3, 64, 8)))


def frame(seed=1, n=3, k=64):
    rng = np.random.default_rng(seed)
    occ = lidar_like_occupancy(rng)
    cells = np.flatnonzero(occ.ravel())
    rng.shuffle(cells)  # any order in
    codes = np.minimum(rng.geometric(0.15, size=(len(cells), n)) - 1, k - 1)
    return cells, codes


def test_round_trip_is_lossless_at_every_operating_point():
    for n in (1, 2, 3):
        for k in (16, 64, 5):  # 5: no statistics for that size -> uniform model, still lossless
            cells, codes = frame(n=n, k=k)
            data = encode_frame(cells, codes, k, MODELS, MODEL_ID)
            out = decode_frame(data, MODELS, MODEL_ID, max_codebooks=3, max_entries=64)
            order = np.argsort(cells)
            assert np.array_equal(out.cells, cells[order]) and np.array_equal(out.codes, codes[order])


def test_empty_frame_and_dense_mode():
    data = encode_frame(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64), 16, MODELS, MODEL_ID)
    out = decode_frame(data, MODELS, MODEL_ID, 3, 64)
    assert out.cells.size == 0 and out.codes.shape == (0, 2)
    cells = np.arange(GEO.height * GEO.width)
    codes = np.random.default_rng(0).integers(0, 16, (len(cells), 1))
    dense = encode_frame(cells, codes, 16, MODELS, MODEL_ID, dense=True)
    out = decode_frame(dense, MODELS, MODEL_ID, 3, 64)
    assert out.dense and np.array_equal(out.codes, codes)


def test_rates_codes_near_model_entropy_and_occupancy_below_iid_bound():
    cells, codes = frame(seed=5, n=3, k=64)
    data = encode_frame(cells, codes, 64, MODELS, MODEL_ID)
    hdr = read_header(data)
    cross_entropy_bits = sum(-np.log2(MODELS.code_probs(c, 64)[codes[:, c]]).sum() for c in range(3))
    assert hdr["code_words"] * 32 <= cross_entropy_bits * 1.02 + 64
    m = len(cells)
    iid_bits = GEO.height * GEO.width * binary_entropy(m / (GEO.height * GEO.width))
    assert hdr["occ_words"] * 32 < iid_bits


def test_other_codebooks_are_refused():
    cells, codes = frame()
    data = encode_frame(cells, codes, 64, MODELS, MODEL_ID)
    other = MODELS.identifier(np.ones((3, 64, 8)))
    with pytest.raises(BitstreamError, match="refusing to decode"):
        decode_frame(data, MODELS, other, 3, 64)
    with pytest.raises(BitstreamError, match="exceed this model"):
        decode_frame(data, MODELS, MODEL_ID, 2, 64)


def test_models_survive_a_state_round_trip():
    again = ProbabilityModels.from_state(MODELS.to_state())
    assert again.identifier(np.zeros((3, 64, 8))) == MODEL_ID
    cells, codes = frame()
    assert np.array_equal(decode_frame(encode_frame(cells, codes, 64, MODELS, MODEL_ID), again, MODEL_ID, 3, 64).codes,
                          codes[np.argsort(cells)])


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0..15"):
        encode_frame(np.array([1, 2]), np.array([[0], [16]]), 16, MODELS, MODEL_ID)
    with pytest.raises(ValueError, match="distinct"):
        encode_frame(np.array([3, 3]), np.array([[0], [1]]), 16, MODELS, MODEL_ID)


def test_encoder_argument_edges():
    """Each bound, just inside (encodes and decodes) and just outside (refused, naming it)."""
    from pcdet_ext.algorithms.bitstream.codec import MAX_CODEBOOKS
    last = GEO.height * GEO.width - 1
    cells = np.array([0, last])
    data = encode_frame(cells, np.array([[0], [15]]), 16, MODELS, MODEL_ID)
    assert decode_frame(data, MODELS, MODEL_ID, 3, 64).codes.tolist() == [[0], [15]]
    for bad_cells, bad_codes, k, match in (
            (np.array([0, last + 1]), np.array([[0], [1]]), 16, "inside the grid"),
            (np.array([-1, 4]), np.array([[0], [1]]), 16, "inside the grid"),
            (np.array([1, 2]), np.array([[0], [-1]]), 16, r"0\.\.15"),
            (np.array([1, 2]), np.array([[0]]), 16, r"\[M, n\] with M = len\(cells\)"),
            (np.array([1, 2]), np.zeros((2, MAX_CODEBOOKS + 1), dtype=np.int64), 16, r"1 <= n <= "),
            (np.array([1, 2]), np.zeros((2, 0), dtype=np.int64), 16, r"1 <= n <= "),
            (np.array([1, 2]), np.array([0, 1]), 16, r"\[M, n\]"),
            (np.array([1, 2]), np.array([[0], [0]]), 0, r"0\.\.-1")):
        with pytest.raises(ValueError, match=match):
            encode_frame(bad_cells, bad_codes, k, MODELS, MODEL_ID)
    with pytest.raises(ValueError, match="dense mode codes every cell"):
        encode_frame(np.array([0, 1]), np.array([[0], [1]]), 16, MODELS, MODEL_ID, dense=True)


VALID = encode_frame(*frame(seed=9), 64, MODELS, MODEL_ID)


def _rewrite(data, **fields):
    names = ["magic", "version", "mode", "h", "w", "n", "k", "model_id", "pillars", "occ", "codes", "crc"]
    vals = dict(zip(names, HEADER.unpack_from(data)))
    vals.update(fields)
    packed = HEADER.pack(*[vals[n] for n in names])
    body = data[HEADER.size:]
    crc = zlib.crc32(packed[:-4] + body)
    return HEADER.pack(*[vals[n] for n in names[:-1]], crc) + body


@pytest.mark.parametrize("data,match", [
    (b"", "truncated"), (VALID[:10], "truncated"), (VALID[:-4], "does not match its header"),
    (b"XXXX" + VALID[4:], "bad magic"), (VALID[:4] + bytes([9]) + VALID[5:], "unsupported format version"),
    (_rewrite(VALID, h=60000, w=60000), "out of range"), (_rewrite(VALID, n=0), "out of range"),
    (_rewrite(VALID, k=0), "out of range"), (_rewrite(VALID, pillars=10 ** 9), "out of range"),
    (_rewrite(VALID, occ=2 ** 31), "does not match its header"), (_rewrite(VALID, mode=7), "out of range"),
    (_rewrite(VALID, h=GEO.height + 16), "does not match the model"),
    (_rewrite(VALID, pillars=5), "header says 5"),
])
def test_malformed_frames(data, match):
    with pytest.raises(BitstreamError, match=match):
        decode_frame(data, MODELS, MODEL_ID, 3, 64)


def test_flipped_bits_are_detected():
    rng = np.random.default_rng(0)
    for _ in range(200):
        data = bytearray(VALID)
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(BitstreamError):
            decode_frame(bytes(data), MODELS, MODEL_ID, 3, 64)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # timed below, in CPU time
@given(st.one_of(
    st.binary(max_size=4096),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
        lambda t: VALID[:t[0]] + bytes([t[1]]) + VALID[t[0] + 1:]),
    st.binary(min_size=HEADER.size, max_size=HEADER.size + 64).map(lambda b: b"RQBS" + bytes([1]) + b[5:]),
))
def test_fuzz_never_crashes_and_fails_fast(data):
    start = time.thread_time()  # this thread's CPU time: a loaded machine delays the decoder, it does not make it work more
    try:
        out = decode_frame(data, MODELS, MODEL_ID, 3, 64)
    except BitstreamError:
        pass
    else:
        assert data == VALID or len(out.cells) == read_header(data)["pillars"]
    assert time.thread_time() - start < 0.2


def correlated_codes(rng, m, n, k):
    """Codebook c's code depends on codebook c - 1's (as residual stages of real RQ codes do, weakly)."""
    codes = np.zeros((m, n), dtype=np.int64)
    codes[:, 0] = np.minimum(rng.geometric(0.1, size=m) - 1, k - 1)
    for c in range(1, n):
        follow = rng.random(m) < 0.6
        codes[:, c] = np.where(follow, (codes[:, c - 1] * 7 + 3) % k, rng.integers(0, k, size=m))
    return codes


def test_context_models_code_fewer_bytes_and_stay_lossless():
    rng = np.random.default_rng(3)
    ctx = ProbabilityModels.empty(GEO, 3, SIZES)
    plain = ProbabilityModels.empty(GEO, 3, SIZES, context=False)
    for _ in range(10):  # fitted on other frames than the one measured
        occ = lidar_like_occupancy(rng)
        by_k = {k: correlated_codes(rng, int(occ.sum()), 3, k) for k in SIZES}
        ctx.observe(occ, by_k)
        plain.observe(occ, by_k)
    occ = lidar_like_occupancy(rng)
    cells = np.flatnonzero(occ.ravel())
    codes = correlated_codes(rng, len(cells), 3, 64)
    sizes = {}
    for name, models in (("context", ctx), ("order-0", plain)):
        mid = models.identifier(np.zeros((3, 64, 8)))
        data = encode_frame(cells, codes, 64, models, mid)
        assert np.array_equal(decode_frame(data, models, mid, 3, 64).codes, codes)  # bit-exact
        sizes[name] = 4 * read_header(data)["code_words"]
    assert sizes["context"] < 0.8 * sizes["order-0"], sizes
    assert ctx.identifier(np.zeros((3, 64, 8))) != plain.identifier(np.zeros((3, 64, 8)))


def test_rare_contexts_escape_to_the_order_zero_model():
    from pcdet_ext.algorithms.bitstream.models import CONTEXT_MIN
    models = ProbabilityModels.empty(GEO, 2, (16,))
    codes = np.zeros((100, 2), dtype=np.int64)
    codes[:CONTEXT_MIN - 1, 0] = 5  # previous code 5 seen too rarely, 0 often
    codes[:, 1] = np.arange(100) % 16
    models.observe(None, {16: codes})
    table = models.conditional("previous", 1, 16)  # [k, k]: row = codebook 0's code
    assert np.allclose(table[5], models.code_probs(1, 16)) and not np.allclose(table[0], models.code_probs(1, 16))
    assert models.conditional("previous", 0, 16) is None and np.allclose(table.sum(1), 1)


def test_state_without_context_tables_still_decodes_with_order_zero():
    state = MODELS.to_state()
    for key in ("pair_counts", "spatial_counts", "spatial_codebooks"):
        del state[key]
    old = ProbabilityModels.from_state(state)
    assert old.pair_counts is None and old.conditional("previous", 1, 64) is None and not old.uses_spatial(64)
    mid = old.identifier(np.zeros((3, 64, 8)))
    cells, codes = frame()
    out = decode_frame(encode_frame(cells, codes, 64, old, mid), old, mid, 3, 64)
    assert np.array_equal(out.codes, codes[np.argsort(cells)])


def _broken(edit):
    state = MODELS.to_state()
    edit(state)
    return state


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["pair_counts"].__setitem__("64", np.zeros((3, 64, 32), dtype=int).tolist()),
     r"pair_counts\['64'\] has shape \(3, 64, 32\), expected \(3, 64, 64\)"),
    (lambda s: s["pair_counts"].pop("16"), r"pair_counts sizes \[64\] differ from code_counts sizes \[16, 64\]"),
    (lambda s: s["spatial_counts"].__setitem__("16", np.zeros((3, 16, 16), dtype=int).tolist()),
     r"spatial_counts\['16'\] has shape \(3, 16, 16\), expected \(3, 17, 16\)"),
    (lambda s: s.pop("spatial_codebooks"), r"'spatial_codebooks' must map each size k"),
    (lambda s: s["spatial_codebooks"].__setitem__("64", [0, 2, 1]), r"spatial_codebooks\['64'\] must hold 0/1"),
    (lambda s: s["spatial_codebooks"].__setitem__("64", [0, 1]), r"spatial_codebooks\['64'\] has shape"),
    (lambda s: s["code_counts"].__setitem__("16", (-np.ones((3, 16), dtype=int)).tolist()),
     r"code_counts\['16'\] must hold non-negative integer counts"),
    (lambda s: s["code_counts"].__setitem__("16", np.full((3, 16), 0.5).tolist()),
     r"code_counts\['16'\] must hold non-negative integer counts"),
    (lambda s: s["code_counts"].__setitem__("16", [[1, 2], [3]]), r"code_counts\['16'\] is not a rectangular table"),
    (lambda s: s.pop("code_counts"), r"'code_counts' must map each size k"),
    (lambda s: s.__setitem__("child_counts", [[1, 2]]), r"child_counts has shape \(1, 2\)"),
    (lambda s: s.__setitem__("geometry", [1, 2]), r"'geometry' must be"),
])
def test_malformed_model_tables_are_refused_naming_the_key(edit, match):
    with pytest.raises(BitstreamError, match=match):
        ProbabilityModels.from_state(_broken(edit))


def smooth_codes(rng, geo, n, k, follow=0.85):
    """Codes of a dense grid where most cells repeat their neighbours' code (as neighbouring pillars
    of real BEV features do), each codebook its own piecewise-constant field."""
    rows, cols = np.indices((geo.height, geo.width))
    codes = np.zeros((geo.height * geo.width, n), dtype=np.int64)
    for c in range(n):
        field = rng.integers(0, k, (geo.height // 8 + 1, geo.width // 8 + 1))[rows // 8, cols // 8].ravel()
        codes[:, c] = np.where(rng.random(len(field)) < follow, field, rng.integers(0, k, len(field)))
    return codes


def spatial_and_plain(rng, n=3, sizes=SIZES, frames=8):
    spatial = ProbabilityModels.empty(GEO, n, sizes)
    plain = ProbabilityModels.empty(GEO, n, sizes, context=False)
    for _ in range(frames):
        occ = lidar_like_occupancy(rng)
        cells = np.flatnonzero(occ.ravel())
        by_k = {k: smooth_codes(rng, GEO, n, k)[cells] for k in sizes}
        rng.shuffle(order := np.arange(len(cells)))  # rows in any order, matched by cells
        for models in (spatial, plain):
            models.observe(occ, {k: v[order] for k, v in by_k.items()}, cells=cells[order])
    return spatial, plain


def test_phase_neighbours_point_at_earlier_phases_only():
    from pcdet_ext.algorithms.bitstream.contexts import PHASE_NEIGHBOURS
    for phase, offsets in enumerate(PHASE_NEIGHBOURS):
        r, c = phase // 2, phase % 2
        for dr, dc in offsets:
            assert ((r + dr) % 2) * 2 + (c + dc) % 2 < phase, (phase, dr, dc)


def test_spatial_contexts_cut_bytes_on_smooth_codes_and_stay_lossless():
    rng = np.random.default_rng(11)
    spatial, plain = spatial_and_plain(rng)
    assert spatial.uses_spatial(64) and spatial.spatial_codebooks(64).all()
    occ = lidar_like_occupancy(rng)
    cells = np.flatnonzero(occ.ravel())
    sizes = {}
    for k in SIZES:
        codes = smooth_codes(rng, GEO, 3, k)[cells]
        for name, models in (("spatial", spatial), ("order-0", plain)):
            mid = models.identifier(np.zeros((3, 64, 8)))
            for n in (1, 3):
                perm = rng.permutation(len(cells))
                data = encode_frame(cells[perm], codes[perm, :n], k, models, mid)
                out = decode_frame(data, models, mid, 3, 64)
                assert np.array_equal(out.cells, cells) and np.array_equal(out.codes, codes[:, :n])  # bit-exact
            hdr = read_header(data)
            sizes[name, k] = 4 * hdr["code_words"]
            ideal = code_bits(codes, k, models, cells=cells)
            assert 4 * hdr["code_words"] * 8 <= ideal * 1.02 + 64  # the coder charges what the model says
    for k in SIZES:
        assert sizes["spatial", k] < 0.8 * sizes["order-0", k], sizes
    # dense mode: every cell, the same contexts
    codes = smooth_codes(rng, GEO, 2, 16)
    mid = spatial.identifier(np.zeros((3, 64, 8)))
    dense = encode_frame(np.arange(len(codes)), codes, 16, spatial, mid, dense=True)
    assert np.array_equal(decode_frame(dense, spatial, mid, 3, 64).codes, codes)


def test_spatial_tables_are_not_chosen_where_they_do_not_help():
    rng = np.random.default_rng(4)
    models = ProbabilityModels.empty(GEO, 3, (64,))
    for _ in range(6):  # codebook 1 follows codebook 0, no spatial structure anywhere
        occ = lidar_like_occupancy(rng)
        models.observe(occ, {64: correlated_codes(rng, int(occ.sum()), 3, 64)})
    assert not models.spatial_codebooks(64)[1]  # the previous-code context stays
    again = ProbabilityModels.from_state(models.to_state())
    assert np.array_equal(again.spatial_codebooks(64), models.spatial_codebooks(64))


def test_codebooks_with_and_without_the_spatial_context_in_one_frame():
    """Codebook 0 spatially smooth, codebook 2 following codebook 1's code: the first is coded in
    phases, the last in one pass; lossless, at the model's bits; a version-1 frame is refused."""
    rng = np.random.default_rng(8)

    def codes_of(cells):
        codes = correlated_codes(rng, len(cells), 3, 64)  # 1 -> 2 follows; 1 is i.i.d. once 0 is replaced
        codes[:, 1] = np.minimum(rng.geometric(0.1, size=len(cells)) - 1, 63)
        codes[:, 2] = np.where(rng.random(len(cells)) < 0.6, (codes[:, 1] * 7 + 3) % 64, rng.integers(0, 64, len(cells)))
        codes[:, 0] = smooth_codes(rng, GEO, 1, 64)[cells, 0]
        return codes
    models = ProbabilityModels.empty(GEO, 3, (64,))
    for _ in range(8):
        occ = lidar_like_occupancy(rng)
        cells = np.flatnonzero(occ.ravel())
        models.observe(occ, {64: codes_of(cells)}, cells=cells)
    flags = models.spatial_codebooks(64).tolist()
    assert flags[0] and not flags[2], flags
    mid = models.identifier(np.zeros(3))
    cells = np.flatnonzero(lidar_like_occupancy(rng).ravel())
    codes = codes_of(cells)
    data = encode_frame(cells, codes, 64, models, mid)
    assert np.array_equal(decode_frame(data, models, mid, 3, 64).codes, codes)
    assert 4 * read_header(data)["code_words"] * 8 <= code_bits(codes, 64, models, cells=cells) * 1.02 + 64
    old = bytearray(data)
    old[4] = 1  # format version 1 coded every codebook in phases
    old[HEADER.size - 4:HEADER.size] = zlib.crc32(bytes(old[:HEADER.size - 4]) + bytes(old[HEADER.size:])).to_bytes(4, "little")
    with pytest.raises(BitstreamError, match="unsupported format version 1"):
        decode_frame(bytes(old), models, mid, 3, 64)


def test_a_server_refuses_frames_of_another_mode_or_an_untrained_cell():
    models = fitted_models()
    occ = lidar_like_occupancy(np.random.default_rng(8))
    cells = np.flatnonzero(occ.ravel())
    codes = np.zeros((len(cells), 2), dtype=np.int64)
    sparse = encode_frame(cells, codes, 16, models, b"m" * 8)
    trained = [(1, 16), (2, 16), (1, 64)]
    assert len(decode_frame(sparse, models, b"m" * 8, 3, 64, dense=False, cells=trained).cells) == len(cells)
    with pytest.raises(BitstreamError, match="a sparse frame for a dense model"):
        decode_frame(sparse, models, b"m" * 8, 3, 64, dense=True, cells=trained)
    with pytest.raises(BitstreamError, match=r"\(n, k\) = \(2, 16\) is not a cell this model was trained"):
        decode_frame(sparse, models, b"m" * 8, 3, 64, dense=False, cells=[(1, 16), (1, 64)])
    dense = encode_frame(np.arange(GEO.height * GEO.width), np.zeros((GEO.height * GEO.width, 1), dtype=np.int64),
                         64, models, b"m" * 8, dense=True)
    with pytest.raises(BitstreamError, match="a dense frame for a sparse model"):
        decode_frame(dense, models, b"m" * 8, 3, 64, dense=False, cells=trained)
