"""The lean edge: points -> pillars (numpy/numba) -> ONNX pillar encoder -> ONNX quantizer -> rANS
bytes. Imports numpy, numba, onnxruntime and the bitstream only (no torch, OpenPCDet or spconv)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream import encode_frame
from pcdet_ext.edge.bundle import ENCODER, BundleError, EdgeBundle, quantizer_file
from pcdet_ext.edge.voxelize import voxelize


TIMING = ("voxelise_ms", "encoder_ms", "quantize_ms", "code_ms", "edge_ms")  # the parts of a frame, then all
ENCODER_CHUNK = 2048  # pillars per encoder run: bounds its [chunk, T, C] intermediates (and the arena) to ~20 MB


class PointFileError(ValueError):
    """A point file that is not float32 x, y, z, intensity records (the message names it)."""


def read_scan(path, num_columns: int = 4) -> np.ndarray:
    """A KITTI-style ``.bin`` (float32, ``num_columns`` per point) or an ``.npy`` [N, >= num_columns]."""
    path = Path(path)
    if not path.is_file():
        raise PointFileError(f"{path}: no such point file")
    if path.suffix == ".npy":
        pts = np.load(path, allow_pickle=False)
        if pts.ndim != 2 or pts.shape[1] < num_columns:
            raise PointFileError(f"{path}: expected points [N, >= {num_columns}], got {pts.shape}")
        return np.ascontiguousarray(pts, dtype=np.float32)
    size, record = path.stat().st_size, 4 * num_columns
    if size == 0 or size % record:
        raise PointFileError(f"{path}: {size} bytes is not a positive multiple of {record} (float32 x {num_columns} "
                             "per point): truncated, or not a point file")
    return np.fromfile(path, dtype=np.float32).reshape(-1, num_columns)


def _session(bundle: EdgeBundle, name: str, threads: Optional[int]):
    """An onnxruntime session of the bundle's graph ``name`` (checked against its SHA-256 first)."""
    import onnxruntime as ort
    data = bundle.graph(name)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle workers must not take the
    if threads:                                                               # cores voxelise and code run on
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"{bundle.root / name}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc


class LeanEdge:
    """Encodes point clouds to frames at one (n, k) cell of a bundle."""

    def __init__(self, bundle: EdgeBundle, num_codebooks: Optional[int] = None, num_embeddings: Optional[int] = None,
                 threads: Optional[int] = None):
        self.bundle = bundle
        n = num_codebooks if num_codebooks is not None else max(c[0] for c in bundle.cells)
        k = num_embeddings if num_embeddings is not None else max(c[1] for c in bundle.cells if c[0] == n)
        self.n, self.k = bundle.cell(n, k)
        self.encoder = _session(bundle, ENCODER, threads)
        self.quantizer = _session(bundle, quantizer_file(self.k), threads)
        self._check_graphs()

    def _check_graphs(self) -> None:
        v = self.bundle.voxels
        enc = {i.name: i.shape for i in self.encoder.get_inputs()}
        expected = {"voxels": [None, v.max_points_per_voxel, len(v.point_columns)], "num_points": [None],
                    "coords": [None, 4]}
        for name, shape in expected.items():
            got = enc.get(name)
            if got is None or len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
                raise BundleError(f"{self.bundle.root / ENCODER}: input '{name}' is {got}, the bundle's metadata "
                                  f"needs {shape}")
        q_in = self.quantizer.get_inputs()[0].shape
        if len(q_in) != 2 or q_in[1] != self.bundle.feature_dim:
            raise BundleError(f"{self.bundle.root / quantizer_file(self.k)}: input {q_in}, the bundle's encoder "
                              f"gives [P, {self.bundle.feature_dim}]")
        q_out = self.quantizer.get_outputs()[0].shape
        if len(q_out) != 2 or not isinstance(q_out[1], int) or q_out[1] < self.n:
            raise BundleError(f"{self.bundle.root / quantizer_file(self.k)}: output {q_out} holds fewer than "
                              f"{self.n} codebooks")

    def features(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
        """(features [M, C], flat cells [M], timing and counts) of what the edge quantizes."""
        t0 = time.perf_counter()
        pillars = voxelize(points, self.bundle.voxels)
        t1 = time.perf_counter()
        geo = self.bundle.models.geometry
        cells = pillars.coords[:, 2].astype(np.int64) * geo.width + pillars.coords[:, 3]
        feats = np.zeros((len(cells), self.bundle.feature_dim), dtype=np.float32)
        for start in range(0, len(cells), ENCODER_CHUNK):
            part = slice(start, start + ENCODER_CHUNK)
            feats[part] = self.encoder.run(None, {"voxels": pillars.voxels[part], "num_points": pillars.num_points[part],
                                                  "coords": pillars.coords[part]})[0]
        if self.bundle.dense:  # every cell of the scattered pseudo-image, raster order
            grid = np.zeros((geo.height * geo.width, feats.shape[1]), dtype=np.float32)
            grid[cells] = feats
            feats, cells = grid, np.arange(geo.height * geo.width)
        t2 = time.perf_counter()
        return feats, cells, {"voxelise_ms": (t1 - t0) * 1e3, "encoder_ms": (t2 - t1) * 1e3, "pillars": len(pillars.num_points),
                              "dropped_points": pillars.dropped_points, "dropped_pillars": pillars.dropped_voxels,
                              "nonfinite_points": pillars.nonfinite}

    def codes(self, feats: np.ndarray) -> np.ndarray:
        """Codes [M, n] of features [M, C] at this edge's (n, k)."""
        if not len(feats):
            return np.zeros((0, self.n), dtype=np.int64)
        return self.quantizer.run(None, {"features": np.ascontiguousarray(feats, dtype=np.float32)})[0][:, :self.n]

    def encode(self, points: np.ndarray) -> Tuple[bytes, Dict[str, float]]:
        """(frame bytes, per-part milliseconds and counts) of one point cloud [N, >= columns]."""
        feats, cells, info = self.features(points)
        t0 = time.perf_counter()
        codes = self.codes(feats)
        t1 = time.perf_counter()
        data = encode_frame(cells, codes, self.k, self.bundle.models, self.bundle.model_id, dense=self.bundle.dense)
        t2 = time.perf_counter()
        info.update(quantize_ms=(t1 - t0) * 1e3, code_ms=(t2 - t1) * 1e3, bytes=len(data))
        info["edge_ms"] = sum(info[part] for part in TIMING[:-1])
        return data, info
