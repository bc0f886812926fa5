"""OpenPCDet's point-to-pillar step in numpy: the same pillars, points and order as
``mask_points_and_boxes_outside_range`` + spconv's ``Point2VoxelCPU3d`` (no shuffling at test time).

Points outside the x/y range are removed (bounds inclusive), then each point goes to the voxel
``floor((p - range_min) / voxel_size)`` computed in float32 (as spconv computes it) and is dropped
if that lies outside the grid. Voxels are numbered in order of their first point; a voxel beyond
``max_voxels`` and a point beyond ``max_points_per_voxel`` of its voxel are dropped, both counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from pcdet_ext.edge.bundle import VoxelConfig


@dataclass
class Pillars:
    """voxels [P, T, F] float32 (zero padded), num_points [P] int32, coords [P, 4] int32 (0, z, y, x);
    ``dropped_points``: points cut by the per-voxel cap or in voxels beyond the voxel cap,
    ``dropped_voxels``: voxels beyond the cap, ``nonfinite``: points with NaN/inf values removed."""
    voxels: np.ndarray
    num_points: np.ndarray
    coords: np.ndarray
    dropped_points: int = 0
    dropped_voxels: int = 0
    nonfinite: int = 0


@njit(cache=True, nogil=True)
def _assign(pts, lo, hi, size, grid):  # pragma: no cover - compiled
    """One pass over the points in order, as spconv's: per kept point its index, voxel (numbered by
    first appearance) and slot in that voxel; per voxel its point count and flat cell key; and the
    number of points with a NaN/inf value. A dense table of the grid maps cells to voxels."""
    n_pts, n_feat = pts.shape
    table = np.full(grid[0] * grid[1] * grid[2], -1, dtype=np.int64)
    index = np.empty(n_pts, dtype=np.int64)
    voxel = np.empty(n_pts, dtype=np.int64)
    slot = np.empty(n_pts, dtype=np.int64)
    counts = np.zeros(n_pts, dtype=np.int64)
    first_key = np.empty(n_pts, dtype=np.int64)
    kept, n_vox, nonfinite = 0, 0, 0
    for i in range(n_pts):
        finite = True
        for f in range(n_feat):
            finite &= np.isfinite(pts[i, f])
        if not finite:
            nonfinite += 1
            continue
        x, y = pts[i, 0], pts[i, 1]
        if x < lo[0] or x > hi[0] or y < lo[1] or y > hi[1]:  # mask_points_by_range: x/y, bounds kept
            continue
        key, stride, outside = 0, 1, False
        for j in range(3):
            c = np.int64(np.floor((pts[i, j] - lo[j]) / size[j]))  # float32 arithmetic, as spconv
            if c < 0 or c >= grid[j]:
                outside = True
                break
            key += c * stride
            stride *= grid[j]
        if outside:
            continue
        v = table[key]
        if v < 0:
            v = n_vox
            table[key] = v
            first_key[v] = key
            n_vox += 1
        index[kept], voxel[kept], slot[kept] = i, v, counts[v]
        counts[v] += 1
        kept += 1
    return index[:kept], voxel[:kept], slot[:kept], counts[:n_vox], first_key[:n_vox], nonfinite


def voxelize(points: np.ndarray, cfg: VoxelConfig) -> Pillars:
    """``points`` [N, >= max(point_columns) + 1] -> :class:`Pillars`."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] <= max(cfg.point_columns):
        raise ValueError(f"points must be [N, >= {max(cfg.point_columns) + 1}], got {points.shape}")
    pts = np.ascontiguousarray(points[:, cfg.point_columns], dtype=np.float32)
    grid = cfg.grid_size
    index, voxel, slot, counts, first_key, nonfinite = _assign(
        pts, cfg.point_cloud_range[:3].copy(), cfg.point_cloud_range[3:].copy(), cfg.voxel_size, grid)
    kept_voxels = min(len(counts), cfg.max_voxels)
    keep = (voxel < kept_voxels) & (slot < cfg.max_points_per_voxel)
    out = np.zeros((kept_voxels, cfg.max_points_per_voxel, pts.shape[1]), dtype=np.float32)
    out[voxel[keep], slot[keep]] = pts[index[keep]]
    first_key = first_key[:kept_voxels]
    coords = np.zeros((kept_voxels, 4), dtype=np.int32)
    coords[:, 1] = first_key // (grid[0] * grid[1])
    coords[:, 2] = first_key // grid[0] % grid[1]
    coords[:, 3] = first_key % grid[0]
    num = np.minimum(counts[:kept_voxels], cfg.max_points_per_voxel).astype(np.int32)
    return Pillars(out, num, coords, dropped_points=int(len(voxel) - keep.sum()),
                   dropped_voxels=len(counts) - kept_voxels, nonfinite=nonfinite)
