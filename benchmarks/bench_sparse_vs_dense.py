"""Sparse vs dense RQ bottleneck per frame on real KITTI scans (../shared/data/kitti_mini).

Sparse: quantize the non-empty pillars only, then scatter into the BEV grid (what PointPillarRQ's
sparse mode does). Dense (reference, the seed's latent_shape [496, 432, 64]): scatter first, then
quantize every cell. 5 codebooks x 256 entries, dim 64, KITTI PointPillars grid (0.16 m).
Pillar features are random: quantization cost does not depend on their values.
    python benchmarks/bench_sparse_vs_dense.py [--data ../shared/data/kitti_mini]
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pcdet_ext.algorithms.quantization import ResidualQuantizer

RANGE = np.array([0, -39.68, -3, 69.12, 39.68, 1])
VOXEL = 0.16
NX, NY = 432, 496


def pillars(bin_path: Path) -> np.ndarray:
    pts = np.fromfile(bin_path, dtype=np.float32).reshape(-1, 4)
    keep = np.all((pts[:, :3] >= RANGE[:3]) & (pts[:, :3] < RANGE[3:]), axis=1)
    ij = np.floor((pts[keep, :2] - RANGE[:2]) / VOXEL).astype(np.int64)
    return np.unique(ij[:, 1] * NX + ij[:, 0])  # flat BEV cell ids (y * NX + x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/kitti_mini")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted((args.data / "training" / "velodyne").glob("*.bin"))
    if not files:
        raise SystemExit(f"no velodyne frames under {args.data}")
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=64, num_codebooks=5, codebook_size=256)
    q.train()
    warm = torch.randn(20000, 64)
    for c in range(5):
        q.start_stage(c, 256, warm)
    q.eval()
    q.set_active(5, 256)
    ratios, sparse_ms, dense_ms, counts = [], [], [], []
    for f in files:
        cells = torch.from_numpy(pillars(f))
        feats = torch.randn(len(cells), 64)

        def sparse():
            with torch.no_grad():
                out = q(feats).quantized
                bev = torch.zeros(NY * NX, 64)
                bev[cells] = out
            return bev

        def dense():
            with torch.no_grad():
                bev = torch.zeros(NY * NX, 64)
                bev[cells] = feats
                return q(bev).quantized

        t_s = min(_timed(sparse) for _ in range(3))
        t_d = min(_timed(dense) for _ in range(2))
        counts.append(len(cells))
        sparse_ms.append(t_s * 1e3)
        dense_ms.append(t_d * 1e3)
        ratios.append(t_d / t_s)
        print(f"{f.name}: {len(cells):6d} pillars, sparse {t_s * 1e3:7.1f} ms, dense {t_d * 1e3:7.1f} ms, "
              f"dense/sparse {t_d / t_s:5.1f}x")
    print(f"median over {len(files)} frames: {statistics.median(counts):.0f} pillars, sparse "
          f"{statistics.median(sparse_ms):.1f} ms, dense {statistics.median(dense_ms):.1f} ms, "
          f"speed-up {statistics.median(ratios):.1f}x (target >= 15x)")


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
