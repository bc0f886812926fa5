"""The portable rANS coder against constriction's range coder (the coder of bitstream versions 1-2) on
the same symbols: every frame's occupancy and code streams, coded by both under the same probability
tables, on real KITTI frames, sparse and dense, at (1, 16), (3, 64), (5, 256).

    pip install constriction      # only for this comparison
    python benchmarks/bench_coder.py [--ckpt RQ_CKPT_WITH_MODELS]

Without --ckpt: a full-grid KITTI PointPillarRQ 5 x 256 whose quantizer is fitted to --fit_frames raw
scans (../shared/data/kitti_raw_2011_09_26), bitstream models fitted on the same scans, tested on the
11 kitti_mini frames. Prints total bytes of both (ratio rANS / constriction) and median encode /
decode ms of the whole stream pair.
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import pcdet_ext  # noqa: F401  (OpenPCDet registration)
from pcdet_ext.algorithms.bitstream import codec
from pcdet_ext.algorithms.bitstream.contexts import Layout
from pcdet_ext.algorithms.bitstream.rans import TOTAL, RansDecoder, RansEncoder
from pcdet_ext.deploy import runtime

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
CELLS = [(1, 16), (3, 64), (5, 256)]


class RangeEncoder:
    """constriction's queue range coder behind the rANS encoder's interface (same probabilities)."""

    def __init__(self):
        import constriction
        self.c = constriction
        self.enc = constriction.stream.queue.RangeEncoder()
        self.family = constriction.stream.model.Categorical(perfect=False)

    def encode(self, symbols, cdf, rows=None):
        probs = np.diff(cdf, axis=1) / TOTAL
        rows = np.zeros(len(symbols), dtype=np.int64) if rows is None else rows
        if len(symbols):
            self.enc.encode(np.asarray(symbols, dtype=np.int32), self.family, probs[rows])

    def finish(self):
        return self.enc.get_compressed()


class RangeDecoder:
    def __init__(self, words):
        import constriction
        self.dec = constriction.stream.queue.RangeDecoder(words)
        self.family = constriction.stream.model.Categorical(perfect=False)

    def decode(self, cdf, rows):
        if not len(rows):
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.dec.decode(self.family, np.diff(cdf, axis=1)[rows] / TOTAL), dtype=np.int64)


def streams(encoder_cls, cells, codes, k, models, dense):
    """(occupancy words, code words) of one frame, cells ascending."""
    geo = models.geometry
    occ_words = np.zeros(0, dtype=np.uint32)
    if not dense:
        occ = np.zeros(geo.height * geo.width, dtype=bool)
        occ[cells] = True
        enc = encoder_cls()
        codec._encode_occupancy(enc, occ.reshape(geo.height, geo.width), models)
        occ_words = enc.finish()
    enc = encoder_cls()
    codec._encode_codes(enc, codes, k, models, Layout.of(cells, geo.height, geo.width, models.uses_spatial(k)))
    return occ_words, enc.finish()


def read_back(decoder_cls, words, cells, n, k, models, dense):
    geo = models.geometry
    if not dense:
        dec = decoder_cls(words[0])
        assert np.array_equal(np.flatnonzero(codec._decode_occupancy(dec, models).ravel()), cells)
    layout = Layout.of(cells, geo.height, geo.width, models.uses_spatial(k))
    return codec._decode_codes(decoder_cls(words[1]), len(cells), n, k, models, layout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit_frames", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--test_dir", default=str(SHARED / "kitti_mini/training/velodyne"))
    args = p.parse_args()
    torch.manual_seed(0)
    fit = [runtime.read_points(f, 4) for f in sorted((SHARED / "kitti_raw_2011_09_26/velodyne").glob("*.bin"))
           [:args.fit_frames]]
    test = [runtime.read_points(f, 4) for f in sorted(Path(args.test_dir).glob("*.bin"))]
    print(f"{'mode':>6} {'cell':>9} {'rANS B':>9} {'range B':>9} {'ratio':>6} {'enc ms':>14} {'dec ms':>14}")
    state = None
    for mode in ("sparse", "dense"):
        model, dataset, _ = runtime.load_split_model("cfgs/kitti_models/pointpillar_rq.yaml",
                                                     ["MODEL.RQ_BOTTLENECK.MODE", mode])
        if state is None:
            runtime.fit_quantizer_to_frames(model, dataset, fit, [16, 64, 256], steps=args.steps)
            state = model.state_dict()
        model.load_state_dict(state)
        models = runtime.fit_probability_models(model, dataset, fit, [16, 64, 256])
        geo = models.geometry
        with torch.no_grad():
            frames = [runtime.head_features(model, dataset, pts, geo) for pts in test]
        for n, k in CELLS:
            model.quantizer.set_active(n, k)
            totals, times = {}, {}
            for name, enc_cls, dec_cls in (("rans", RansEncoder, RansDecoder), ("range", RangeEncoder, RangeDecoder)):
                size, enc_ms, dec_ms = 0, [], []
                for feats, cells in frames:
                    order = np.argsort(cells)
                    codes, cells_sorted = model.quantizer.encode(feats).numpy()[order], np.asarray(cells)[order]
                    t0 = time.perf_counter()
                    words = streams(enc_cls, cells_sorted, codes, k, models, mode == "dense")
                    t1 = time.perf_counter()
                    assert np.array_equal(read_back(dec_cls, words, cells_sorted, n, k, models, mode == "dense"), codes)
                    t2 = time.perf_counter()
                    size += 4 * (len(words[0]) + len(words[1])) + codec.HEADER.size
                    enc_ms.append((t1 - t0) * 1e3)
                    dec_ms.append((t2 - t1) * 1e3)
                totals[name], times[name] = size, (statistics.median(enc_ms), statistics.median(dec_ms))
            print(f"{mode:>6} {str((n, k)):>9} {totals['rans']:9d} {totals['range']:9d} "
                  f"{totals['rans'] / totals['range']:6.4f} {times['rans'][0]:6.1f} / {times['range'][0]:5.1f} "
                  f"{times['rans'][1]:6.1f} / {times['range'][1]:5.1f}")
    print(f"bytes: all {len(test)} frames (header included); ms: median per frame, rANS / constriction, the same "
          "symbols under the same 24-bit tables (constriction: one categorical per symbol)")


if __name__ == "__main__":
    main()
