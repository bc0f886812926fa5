"""The lean edge of split inference: runs on the vehicle's ARM computer with numpy, numba and
onnxruntime only (``requirements-edge.txt``; no torch, OpenPCDet or spconv).

An edge bundle (``tools/export_edge.py``) holds the PillarVFE and the quantizer as ONNX and what the
edge needs besides; :class:`LeanEdge` turns point clouds into the same frames as the PyTorch
``EdgeRuntime``; ``python -m pcdet_ext.edge`` encodes files or a folder and sends them.
"""
from pcdet_ext.edge.bundle import BundleError, EdgeBundle, VoxelConfig
from pcdet_ext.edge.runtime import LeanEdge, PointFileError, read_scan
from pcdet_ext.edge.voxelize import Pillars, voxelize

__all__ = ["BundleError", "EdgeBundle", "LeanEdge", "Pillars", "PointFileError", "VoxelConfig", "read_scan", "voxelize"]
