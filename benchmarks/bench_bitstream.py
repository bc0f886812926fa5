"""Split-inference bytes and times on real KITTI frames, sparse vs dense.

Bottleneck: a PointPillarRQ on the full KITTI grid (496 x 432, 0.16 m) whose PillarVFE comes from a
PointPillars checkpoint (--ckpt; e.g. the synthetic-data one from tools/demo_pointpillars.py), with
its 5 x 256 quantizer trained by feature reconstruction (pcdet_ext.algorithms.quantization.fit) on the pillar
features of real unlabelled scans (--train_dir, kitti_raw_2011_09_26), and the bitstream's
probability models fitted on the same scans. Measured on the real frames of --test_dir
(kitti_mini): bytes per frame (occupancy + codes) with the context code models and with order-0
models fitted on the same scans, codes against their entropy under the stored model, occupancy
against its i.i.d. entropy bound, edge quantize+encode and server decode times (context models);
then, sparse, the rate-aware curve at --lambda_cell: bytes and the decoded features' normalised MSE
at each of --lambdas (one trained model, no retraining).

    python benchmarks/bench_bitstream.py --ckpt output/demo/ckpt/pointpillar_kitti_demo.pth
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import numpy as np

import pcdet_ext  # noqa: F401
from pcdet_ext.algorithms.bitstream import read_header
from pcdet_ext.algorithms.bitstream.contexts import code_bits
from pcdet_ext.deploy import runtime
from pcdet_ext.algorithms.rate import binary_entropy
from pcdet_ext.utils.checkpoint import load_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
CELLS = [(1, 16), (3, 64), (5, 256)]


def load(mode, ckpt):
    model, dataset, _ = runtime.load_split_model("cfgs/kitti_models/pointpillar_rq.yaml",
                                                 ["MODEL.RQ_BOTTLENECK.MODE", mode])
    vfe = {k: v for k, v in load_checkpoint(ckpt)["model_state"].items() if k.startswith("vfe.")}
    model.load_state_dict(vfe, strict=False)
    return model.eval(), dataset


@torch.no_grad()
def rate_curve(model, dataset, models, server, frames, n, k, lambdas):
    """Rate-aware coding at (n, k): median bytes and the decoded features' MSE / mean ||z||^2 per lambda."""
    print(f"\nrate-aware at {(n, k)}: {'lambda':>8} {'bytes':>8} {'vs 0':>6} {'NMSE':>8} {'q+enc ms':>8} {'edge ms':>7}")
    base = None
    for lam in lambdas:
        edge = runtime.EdgeRuntime(model, dataset, models, n, k, rate_lambda=lam)
        rows = []
        for pts in frames:
            data, t = edge.encode(pts)
            feats, cells = runtime.head_features(model, dataset, pts, server.geo)
            decoded = model.quantizer.decode(torch.from_numpy(server_codes(server, data)))
            z = feats[torch.from_numpy(np.argsort(cells, kind="stable"))]
            rows.append((len(data), float((decoded - z).pow(2).sum(1).mean() / z.pow(2).sum(1).mean()),
                         t["quantize_encode_ms"], t["edge_ms"]))
        size, nmse, ms, whole = (statistics.median(col) for col in zip(*rows))
        base = base or size
        print(f"{'':>22} {lam:8g} {size:8.0f} {size / base:6.3f} {nmse:8.4f} {ms:8.1f} {whole:7.1f}")
    model.quantizer.set_rate(0.0)


def server_codes(server, data):
    return runtime.decode_frame(data, server.models, server.model_id, server.q.num_codebooks,
                                server.q.codebook_size).codes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--train_dir", default=str(SHARED / "kitti_raw_2011_09_26/velodyne"))
    p.add_argument("--test_dir", default=str(SHARED / "kitti_mini/training/velodyne"))
    p.add_argument("--train_frames", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lambda_cell", type=int, nargs=2, default=[3, 64], metavar=("N", "K"))
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.2, 1.0])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = [runtime.read_points(f, 4) for f in sorted(Path(args.train_dir).glob("*.bin"))[: args.train_frames]]
    test = [runtime.read_points(f, 4) for f in sorted(Path(args.test_dir).glob("*.bin"))]
    model, dataset = load("sparse", args.ckpt)
    torch.manual_seed(0)
    seen = runtime.fit_quantizer_to_frames(model, dataset, train, [16, 64, 256], steps=args.steps)
    print(f"quantizer 5 x 256 trained on {seen} pillar features of {len(train)} real scans; "
          f"testing on {len(test)} real KITTI frames, {args.threads} threads")
    state = model.state_dict()
    for mode in ("sparse", "dense"):
        if mode == "dense":
            model, dataset = load("dense", args.ckpt)
            model.load_state_dict(state)
        models = runtime.fit_probability_models(model, dataset, train, [16, 64, 256])
        order0 = runtime.fit_probability_models(model, dataset, train, [16, 64, 256], context=False)
        server = runtime.ServerRuntime(model, dataset, models)
        print(f"\n{mode}: {'cell':>9} {'bytes':>8} {'order-0':>8} {'ratio':>6} {'occupancy':>9} {'iid bound':>9} "
              f"{'codes':>8} {'model H':>8} {'codes/H':>7} {'q+enc ms':>8} {'edge ms':>7} {'decode ms':>9}")
        for n, k in CELLS:
            edge = runtime.EdgeRuntime(model, dataset, models, n, k)
            plain = runtime.EdgeRuntime(model, dataset, order0, n, k)
            rows = []
            for pts in test:
                edge.encode(pts)  # warm
                data, t = edge.encode(pts)
                plain_bytes = len(plain.encode(pts)[0])
                hdr = read_header(data)
                with torch.no_grad():
                    feats, cells = runtime.head_features(model, dataset, pts, server.geo)
                codes = model.quantizer.encode(feats).numpy()
                model_bits = code_bits(codes, k, models, cells=cells)
                grid = server.geo.height * server.geo.width
                occupied = t["pillars"] if mode == "sparse" else int((feats.abs().sum(1) > 0).sum())
                iid = grid * binary_entropy(occupied / grid) / 8
                t0 = time.perf_counter()
                frame = runtime.decode_frame(data, models, server.model_id, 5, 256)
                model.quantizer.decode(torch.from_numpy(frame.codes))
                dec_ms = (time.perf_counter() - t0) * 1e3
                rows.append((len(data), plain_bytes, len(data) / plain_bytes, 4 * hdr["occ_words"], iid,
                             4 * hdr["code_words"], model_bits / 8, t["quantize_encode_ms"], t["edge_ms"], dec_ms))
            med = [statistics.median(col) for col in zip(*rows)]
            print(f"{'':>6} {str((n, k)):>9} {med[0]:8.0f} {med[1]:8.0f} {med[2]:6.3f} {med[3]:9.0f} {med[4]:9.0f} "
                  f"{med[5]:8.0f} {med[6]:8.0f} {med[5] / med[6]:7.3f} {med[7]:8.1f} {med[8]:7.1f} {med[9]:9.1f}")
        if mode == "sparse":
            rate_curve(model, dataset, models, server, test, *args.lambda_cell, args.lambdas)
    print("\nmedians over frames; bytes: whole frame with the context code models (order-0: the same frame "
          "with order-0 code models; ratio: context / order-0), coded occupancy, its i.i.d. entropy bound, coded "
          "indices, their entropy under the stored model (codes/H: coded / model entropy); q+enc ms: quantize + "
          "encode (after the PillarVFE); edge ms: the whole edge (point processing + PillarVFE + quantize + encode); decode ms: bitstream decode + code vectors")


if __name__ == "__main__":
    main()
