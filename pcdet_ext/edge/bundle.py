"""The edge bundle: what the vehicle side needs, written by ``tools/export_edge.py``, read here.

A directory with ``edge_bundle.json`` (voxelisation parameters, the (n, k) cells it may send, the
bitstream models, the model id, and the SHA-256 of every ONNX file) and the ONNX graphs: the pillar
encoder (PillarVFE, BatchNorm folded) and one nearest-code quantizer per codebook size k. Every
problem (a missing file, a graph that is not the one the metadata names, a field out of range) is a
:class:`BundleError` naming the file and what was expected.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from pcdet_ext.algorithms.bitstream import BitstreamError, ProbabilityModels

FORMAT = 1
METADATA = "edge_bundle.json"
KEYS = {"format", "opset", "model_id", "mode", "feature_dim", "voxels", "cells", "files", "bitstream_models"}
ENCODER = "pillar_encoder.onnx"
OPSET = 17
FRAME_SUFFIX = ".rqf"  # a saved frame: <scan name>.rqf (the lean edge and tools/split_infer.py alike)


def quantizer_file(k: int) -> str:
    return f"quantizer_k{k}.onnx"


class BundleError(ValueError):
    """An edge bundle that cannot be used as it is (the message names the file)."""


@dataclass
class VoxelConfig:
    """OpenPCDet's point/voxel processing for one config: range [x0, y0, z0, x1, y1, z1] (m), voxel
    size (m), the caps, which columns of a point file the model reads and how many a record holds."""
    point_cloud_range: np.ndarray
    voxel_size: np.ndarray
    max_points_per_voxel: int
    max_voxels: int
    point_columns: List[int]
    file_columns: int = 4

    def __post_init__(self):
        self.point_cloud_range = np.asarray(self.point_cloud_range, dtype=np.float32)
        self.voxel_size = np.asarray(self.voxel_size, dtype=np.float32)

    @property
    def grid_size(self) -> np.ndarray:
        """[nx, ny, nz] cells, rounded as spconv rounds them (float32)."""
        extent = self.point_cloud_range[3:] - self.point_cloud_range[:3]
        return np.round(extent / self.voxel_size).astype(np.int64)

    def to_json(self) -> Dict[str, object]:
        return {"point_cloud_range": self.point_cloud_range.tolist(), "voxel_size": self.voxel_size.tolist(),
                "max_points_per_voxel": self.max_points_per_voxel, "max_voxels": self.max_voxels,
                "point_columns": list(self.point_columns), "file_columns": self.file_columns}


@dataclass
class EdgeBundle:
    """A loaded, verified bundle."""
    root: Path
    voxels: VoxelConfig
    dense: bool
    feature_dim: int
    cells: List[Tuple[int, int]]
    models: ProbabilityModels
    model_id: bytes
    files: Dict[str, str]

    @classmethod
    def load(cls, root) -> "EdgeBundle":
        root = Path(root)
        meta_path = root / METADATA
        if not meta_path.is_file():
            raise BundleError(f"{meta_path}: missing (an edge bundle holds {METADATA}, written by tools/export_edge.py)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path}: not JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BundleError(f"{meta_path}: bundle format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                              f"this runtime reads format {FORMAT}")
        if set(meta) != KEYS:
            raise BundleError(f"{meta_path}: unknown keys {sorted(set(meta) - KEYS)}, missing keys "
                              f"{sorted(KEYS - set(meta))} (expected exactly {sorted(KEYS)})")
        if meta["mode"] not in ("sparse", "dense"):
            raise BundleError(f"{meta_path}: mode must be 'sparse' or 'dense', got {meta['mode']!r}")
        try:
            voxels = VoxelConfig(**meta["voxels"])
            cells = [(int(n), int(k)) for n, k in meta["cells"]]
            model_id = bytes.fromhex(meta["model_id"])
            models = ProbabilityModels.from_state(meta["bitstream_models"])
            bundle = cls(root, voxels, meta["mode"] == "dense", int(meta["feature_dim"]), cells, models, model_id,
                         dict(meta["files"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, BitstreamError):
                raise BundleError(f"{meta_path}: {exc}") from exc
            raise BundleError(f"{meta_path}: malformed field ({type(exc).__name__}: {exc})") from exc
        bundle._check(meta_path)
        return bundle

    def _check(self, meta_path: Path) -> None:
        v, geo = self.voxels, self.models.geometry
        if v.point_cloud_range.shape != (6,) or v.voxel_size.shape != (3,) or not np.isfinite(v.point_cloud_range).all() \
                or not (v.voxel_size > 0).all() or not np.isfinite(v.voxel_size).all() \
                or not (v.point_cloud_range[3:] > v.point_cloud_range[:3]).all():
            raise BundleError(f"{meta_path}: voxels: expected a finite 6-value range (min < max) and 3 positive "
                              f"finite voxel sizes")
        if v.max_points_per_voxel < 1 or v.max_voxels < 1 or len(v.point_columns) < 3 \
                or not 0 <= min(v.point_columns) <= max(v.point_columns) < v.file_columns:
            raise BundleError(f"{meta_path}: voxels: caps must be >= 1 and point_columns name x, y, z at least, "
                              f"each below file_columns")
        nx, ny, _ = (int(s) for s in v.grid_size)
        if (geo.height, geo.width) != (ny, nx):
            raise BundleError(f"{meta_path}: bitstream models fitted on a {geo.height} x {geo.width} grid, the "
                              f"voxelisation gives {ny} x {nx}")
        if len(self.model_id) != 8 or not self.cells:
            raise BundleError(f"{meta_path}: expected an 8-byte model id and at least one (n, k) cell")
        for name in [ENCODER] + [quantizer_file(k) for k in self.sizes]:
            if name not in self.files:
                raise BundleError(f"{meta_path}: no SHA-256 recorded for {name}")

    @property
    def sizes(self) -> List[int]:
        return sorted({k for _, k in self.cells})

    def graph(self, name: str) -> bytes:
        """The bytes of one ONNX file, checked against the SHA-256 the metadata records."""
        path = self.root / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[name]:
            raise BundleError(f"{path}: does not match the bundle's metadata (SHA-256 differs): the file was "
                              f"replaced or comes from another export")
        return data

    def cell(self, num_codebooks: int, num_embeddings: int) -> Tuple[int, int]:
        """(n, k) if the bundle may send it, else a BundleError listing the cells it has."""
        if (num_codebooks, num_embeddings) not in self.cells:
            raise BundleError(f"({num_codebooks}, {num_embeddings}) is not a cell of {self.root}; it has "
                              f"{', '.join(map(str, self.cells))}")
        return num_codebooks, num_embeddings


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
