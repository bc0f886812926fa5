"""Exact rotated-box geometry on the CPU (numba): BEV overlap, IoU, NMS, points in boxes.

Boxes follow OpenPCDet's convention ``[x, y, z, dx, dy, dz, heading]`` (LiDAR frame,
``heading`` counter-clockwise from +x). The BEV overlap of two rotated rectangles is
computed exactly by Sutherland-Hodgman clipping of one rectangle against the other,
in float64. Nothing here imports OpenPCDet.

Fork safety: the row-parallel kernels run on numba threads (GNU OpenMP) in the process that
imported this module, and serially in a process forked from it (DataLoader workers): GNU OpenMP
is not fork-safe, and a forked child that enters a thread pool its parent had started waits
forever in its barrier. Each such kernel is compiled twice (own cache files), picked per call.
"""
from __future__ import annotations

import math
import os
import types

import numba
import numpy as np

EPS = 1e-8
_FORKED = False


def _mark_forked() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_mark_forked)


class _ForkSafeKernel:
    """A ``prange`` kernel as two numba dispatchers: threaded, and serial (``prange`` as ``range``)
    for forked children. The serial copy gets its own qualified name, hence its own cache file."""

    def __init__(self, py_func):
        serial = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
                                    py_func.__defaults__, py_func.__closure__)
        serial.__qualname__ = py_func.__qualname__ + "_serial"
        self.parallel = numba.njit(cache=True, parallel=True)(py_func)
        self.serial = numba.njit(cache=True)(serial)
        self.__doc__ = py_func.__doc__

    def __call__(self, *args):
        return (self.serial if _FORKED else self.parallel)(*args)


@numba.njit(cache=True, inline="always")
def _corners(box, out):
    """Write the 4 BEV corners of ``box`` (counter-clockwise) into ``out[:4]``."""
    c, s = math.cos(box[6]), math.sin(box[6])
    hx, hy = 0.5 * box[3], 0.5 * box[4]
    lx = (-hx, hx, hx, -hx)
    ly = (-hy, -hy, hy, hy)
    for k in range(4):
        out[k, 0] = box[0] + c * lx[k] - s * ly[k]
        out[k, 1] = box[1] + s * lx[k] + c * ly[k]


@numba.njit(cache=True)
def _overlap_pair(a, b, poly, tmp, clip):
    """Exact intersection area of the BEV rectangles of boxes ``a`` and ``b``."""
    if a[3] <= 0.0 or a[4] <= 0.0 or b[3] <= 0.0 or b[4] <= 0.0:
        return 0.0
    ra = 0.5 * math.sqrt(a[3] * a[3] + a[4] * a[4])
    rb = 0.5 * math.sqrt(b[3] * b[3] + b[4] * b[4])
    dx, dy = a[0] - b[0], a[1] - b[1]
    if dx * dx + dy * dy >= (ra + rb) * (ra + rb):
        return 0.0
    _corners(a, poly)
    _corners(b, clip)
    n = 4
    for e in range(4):
        px, py = clip[e, 0], clip[e, 1]
        qx, qy = clip[(e + 1) % 4, 0], clip[(e + 1) % 4, 1]
        ex, ey = qx - px, qy - py
        m = 0
        for i in range(n):
            cx, cy = poly[i, 0], poly[i, 1]
            nx, ny = poly[(i + 1) % n, 0], poly[(i + 1) % n, 1]
            dc = ex * (cy - py) - ey * (cx - px)  # >= 0: inside (left of the CCW edge)
            dn = ex * (ny - py) - ey * (nx - px)
            if dc >= 0.0:
                tmp[m, 0] = cx
                tmp[m, 1] = cy
                m += 1
            if (dc >= 0.0) != (dn >= 0.0):
                t = dc / (dc - dn)
                tmp[m, 0] = cx + t * (nx - cx)
                tmp[m, 1] = cy + t * (ny - cy)
                m += 1
        n = m
        if n < 3:
            return 0.0
        for i in range(n):
            poly[i, 0] = tmp[i, 0]
            poly[i, 1] = tmp[i, 1]
    area = 0.0
    for i in range(n):
        j = (i + 1) % n
        area += poly[i, 0] * poly[j, 1] - poly[j, 0] * poly[i, 1]
    return abs(0.5 * area)


@_ForkSafeKernel
def _overlap_matrix(boxes_a, boxes_b, iou):
    n, m = boxes_a.shape[0], boxes_b.shape[0]
    out = np.zeros((n, m), dtype=np.float64)
    for i in numba.prange(n):
        poly = np.empty((16, 2))
        tmp = np.empty((16, 2))
        clip = np.empty((4, 2))
        area_a = boxes_a[i, 3] * boxes_a[i, 4]
        for j in range(m):
            ov = _overlap_pair(boxes_a[i], boxes_b[j], poly, tmp, clip)
            if iou:
                ov = ov / max(area_a + boxes_b[j, 3] * boxes_b[j, 4] - ov, EPS)
            out[i, j] = ov
    return out


@_ForkSafeKernel
def _overlap_paired(boxes_a, boxes_b, iou):
    n = boxes_a.shape[0]
    out = np.zeros(n, dtype=np.float64)
    for i in numba.prange(n):
        poly = np.empty((16, 2))
        tmp = np.empty((16, 2))
        clip = np.empty((4, 2))
        ov = _overlap_pair(boxes_a[i], boxes_b[i], poly, tmp, clip)
        if iou:
            ov = ov / max(boxes_a[i, 3] * boxes_a[i, 4] + boxes_b[i, 3] * boxes_b[i, 4] - ov, EPS)
        out[i] = ov
    return out


@numba.njit(cache=True)
def _nms_sorted(boxes, thresh, rotated):
    """Greedy NMS over boxes already sorted by descending score; returns kept indices."""
    n = boxes.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    keep = np.empty(n, dtype=np.int64)
    x = boxes[:, 0].copy()
    y = boxes[:, 1].copy()
    area = boxes[:, 3] * boxes[:, 4]
    if rotated:  # bounding-circle radius: a cheap exact reject before clipping
        ext = 0.5 * np.sqrt(boxes[:, 3] ** 2 + boxes[:, 4] ** 2)
        ext_y = ext
    else:
        ext = 0.5 * boxes[:, 3]
        ext_y = 0.5 * boxes[:, 4]
    poly = np.empty((16, 2))
    tmp = np.empty((16, 2))
    clip = np.empty((4, 2))
    cnt = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[cnt] = i
        cnt += 1
        for j in range(i + 1, n):
            if suppressed[j]:
                continue
            dx = abs(x[i] - x[j])
            dy = abs(y[i] - y[j])
            if dx >= ext[i] + ext[j] or dy >= ext_y[i] + ext_y[j]:
                continue
            if rotated:
                ov = _overlap_pair(boxes[i], boxes[j], poly, tmp, clip)
            else:
                w = min(x[i] + ext[i], x[j] + ext[j]) - max(x[i] - ext[i], x[j] - ext[j])
                h = min(y[i] + ext_y[i], y[j] + ext_y[j]) - max(y[i] - ext_y[i], y[j] - ext_y[j])
                ov = w * h
            if ov / max(area[i] + area[j] - ov, EPS) > thresh:
                suppressed[j] = True
    return keep[:cnt]


@_ForkSafeKernel
def _points_in_boxes_mask(points, boxes, margin):
    nb, npts = boxes.shape[0], points.shape[0]
    out = np.zeros((nb, npts), dtype=np.int32)
    for i in numba.prange(nb):
        c, s = math.cos(-boxes[i, 6]), math.sin(-boxes[i, 6])
        hx, hy, hz = 0.5 * boxes[i, 3] + margin, 0.5 * boxes[i, 4] + margin, 0.5 * boxes[i, 5]
        for j in range(npts):
            if abs(points[j, 2] - boxes[i, 2]) > hz:
                continue
            sx, sy = points[j, 0] - boxes[i, 0], points[j, 1] - boxes[i, 1]
            if abs(sx * c - sy * s) < hx and abs(sx * s + sy * c) < hy:
                out[i, j] = 1
    return out


@_ForkSafeKernel
def _first_box_of_points(points, boxes, margin):
    bs, npts = points.shape[0], points.shape[1]
    out = np.full((bs, npts), -1, dtype=np.int32)
    for b in numba.prange(bs):
        for j in range(npts):
            for i in range(boxes.shape[1]):
                if abs(points[b, j, 2] - boxes[b, i, 2]) > 0.5 * boxes[b, i, 5]:
                    continue
                c, s = math.cos(-boxes[b, i, 6]), math.sin(-boxes[b, i, 6])
                sx, sy = points[b, j, 0] - boxes[b, i, 0], points[b, j, 1] - boxes[b, i, 1]
                if abs(sx * c - sy * s) < 0.5 * boxes[b, i, 3] + margin and \
                        abs(sx * s + sy * c) < 0.5 * boxes[b, i, 4] + margin:
                    out[b, j] = i
                    break
    return out


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = np.ascontiguousarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"{name}: expected boxes of shape (N, 7) [x, y, z, dx, dy, dz, heading], got {boxes.shape}")
    return boxes


def bev_overlap(boxes_a: np.ndarray, boxes_b: np.ndarray, iou: bool = False) -> np.ndarray:
    """(N, M) exact BEV intersection areas (or IoU with ``iou=True``) of two box sets."""
    return _overlap_matrix(_as_boxes(boxes_a, "boxes_a"), _as_boxes(boxes_b, "boxes_b"), iou)


def bev_overlap_paired(boxes_a: np.ndarray, boxes_b: np.ndarray, iou: bool = False) -> np.ndarray:
    """(N,) exact BEV intersection areas (or IoU) of ``boxes_a[i]`` with ``boxes_b[i]``."""
    a, b = _as_boxes(boxes_a, "boxes_a"), _as_boxes(boxes_b, "boxes_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired overlap needs as many boxes in both sets, got {a.shape[0]} and {b.shape[0]}")
    return _overlap_paired(a, b, iou)


def nms_bev(boxes_sorted: np.ndarray, thresh: float, rotated: bool = True) -> np.ndarray:
    """Greedy BEV NMS on boxes sorted by descending score; returns kept positions (int64).

    A box is suppressed when its IoU with a kept, higher-scoring box is ``> thresh``.
    ``rotated=False`` uses axis-aligned rectangles (heading ignored), like ``nms_normal_gpu``.
    """
    return _nms_sorted(_as_boxes(boxes_sorted, "boxes"), float(thresh), rotated)


def points_in_boxes_mask(points: np.ndarray, boxes: np.ndarray, margin: float = 1e-2) -> np.ndarray:
    """(num_boxes, num_points) int32 mask: 1 where the point lies in the box (xy margin)."""
    pts = np.ascontiguousarray(points[:, :3], dtype=np.float64)
    return _points_in_boxes_mask(pts, _as_boxes(boxes, "boxes"), float(margin))


def first_box_of_points(points: np.ndarray, boxes: np.ndarray, margin: float = 1e-5) -> np.ndarray:
    """(B, num_points) index of the first box holding each point, -1 for none."""
    pts = np.ascontiguousarray(points[..., :3], dtype=np.float64)
    bxs = np.ascontiguousarray(boxes[..., :7], dtype=np.float64)
    if pts.ndim != 3 or bxs.ndim != 3 or pts.shape[0] != bxs.shape[0]:
        raise ValueError(f"expected points (B, N, 3) and boxes (B, T, 7), got {pts.shape} and {bxs.shape}")
    return _first_box_of_points(pts, bxs, float(margin))


def rotate_iou_eval(boxes: np.ndarray, query_boxes: np.ndarray, criterion: int = -1) -> np.ndarray:
    """Drop-in for KITTI evaluation's ``rotate_iou_gpu_eval``: boxes (N, 5) ``[x, y, w, h, angle]``.

    criterion -1: IoU; 0: overlap / area(query_boxes); 1: overlap / area(boxes); else: overlap
    (the kernel's first operand is the query box).
    KITTI's angles are clockwise-positive in this frame, hence the sign flip.
    """
    def to7(b):
        b = np.asarray(b, dtype=np.float64).reshape(-1, 5)
        out = np.zeros((len(b), 7))
        out[:, [0, 1, 3, 4]] = b[:, :4]
        out[:, 6] = -b[:, 4]
        out[:, 5] = 1.0
        return out
    a, q = to7(boxes), to7(query_boxes)
    inter = _overlap_matrix(a, q, False)
    area_a = (a[:, 3] * a[:, 4])[:, None]
    area_q = (q[:, 3] * q[:, 4])[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        if criterion == -1:
            out = inter / (area_a + area_q - inter)
        elif criterion == 0:
            out = inter / area_q
        elif criterion == 1:
            out = inter / area_a
        else:
            out = inter
    return out.astype(np.asarray(boxes).dtype)
