"""CPU stand-ins for OpenPCDet's compiled extension modules.

OpenPCDet imports its CUDA extensions as ``pcdet.ops.<pkg>.<name>_cuda``. On a machine
without CUDA those shared objects cannot exist, so :class:`CompiledOpsFinder` serves
modules of the same names: ``iou3d_nms_cuda`` and ``roiaware_pool3d_cuda`` with the same
function signatures and output conventions (results written into the passed tensors),
and the other extensions as modules whose functions raise ``NotImplementedError``
naming the op.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import types
from typing import Callable, Dict, Optional

import numpy as np
import torch

from pcdet_ext.algorithms import rotated_boxes as rb
from pcdet_ext.openpcdet.cpu import shims
from pcdet_ext.openpcdet.cpu.ledger import Ledger


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _write(out: torch.Tensor, values: np.ndarray) -> None:
    out.copy_(torch.from_numpy(values).reshape(out.shape).to(out.dtype))


# ---- iou3d_nms_cuda -------------------------------------------------------------------
def boxes_overlap_bev_gpu(boxes_a: torch.Tensor, boxes_b: torch.Tensor, ans_overlap: torch.Tensor) -> int:
    _write(ans_overlap, rb.bev_overlap(_np(boxes_a), _np(boxes_b)))
    return 1


def boxes_iou_bev_gpu(boxes_a: torch.Tensor, boxes_b: torch.Tensor, ans_iou: torch.Tensor) -> int:
    _write(ans_iou, rb.bev_overlap(_np(boxes_a), _np(boxes_b), iou=True))
    return 1


boxes_iou_bev_cpu = boxes_iou_bev_gpu


def boxes_aligned_overlap_bev_gpu(boxes_a: torch.Tensor, boxes_b: torch.Tensor, ans_overlap: torch.Tensor) -> int:
    _write(ans_overlap, rb.bev_overlap_paired(_np(boxes_a), _np(boxes_b)))
    return 1


paired_boxes_overlap_bev_gpu = boxes_aligned_overlap_bev_gpu


def boxes_aligned_iou_bev_cpu(boxes_a: torch.Tensor, boxes_b: torch.Tensor, ans_iou: torch.Tensor) -> int:
    _write(ans_iou, rb.bev_overlap_paired(_np(boxes_a), _np(boxes_b), iou=True))
    return 1


def _nms(boxes: torch.Tensor, keep: torch.Tensor, thresh: float, rotated: bool) -> int:
    kept = rb.nms_bev(_np(boxes), thresh, rotated=rotated)
    keep[: len(kept)] = torch.from_numpy(kept).to(keep.dtype)
    return int(len(kept))


def nms_gpu(boxes: torch.Tensor, keep: torch.Tensor, nms_overlap_thresh: float) -> int:
    return _nms(boxes, keep, nms_overlap_thresh, rotated=True)


def nms_normal_gpu(boxes: torch.Tensor, keep: torch.Tensor, nms_overlap_thresh: float) -> int:
    return _nms(boxes, keep, nms_overlap_thresh, rotated=False)


# ---- roiaware_pool3d_cuda -------------------------------------------------------------
def points_in_boxes_cpu(boxes: torch.Tensor, pts: torch.Tensor, pts_indices: torch.Tensor) -> int:
    _write(pts_indices, rb.points_in_boxes_mask(_np(pts), _np(boxes), margin=1e-2))
    return 1


def points_in_boxes_gpu(boxes: torch.Tensor, pts: torch.Tensor, box_idx_of_points: torch.Tensor) -> int:
    _write(box_idx_of_points, rb.first_box_of_points(_np(pts), _np(boxes), margin=1e-5))
    return 1


_IMPLEMENTED: Dict[str, Dict[str, Callable]] = {
    "pcdet.ops.iou3d_nms.iou3d_nms_cuda": {
        f.__name__: f for f in (
            boxes_overlap_bev_gpu, boxes_iou_bev_gpu, boxes_aligned_overlap_bev_gpu,
            boxes_aligned_iou_bev_cpu, nms_gpu, nms_normal_gpu)
    } | {"boxes_iou_bev_cpu": boxes_iou_bev_cpu, "paired_boxes_overlap_bev_gpu": paired_boxes_overlap_bev_gpu},
    "pcdet.ops.roiaware_pool3d.roiaware_pool3d_cuda": {
        "points_in_boxes_cpu": points_in_boxes_cpu, "points_in_boxes_gpu": points_in_boxes_gpu},
}

_UNAVAILABLE = (
    "pcdet.ops.roipoint_pool3d.roipoint_pool3d_cuda",
    "pcdet.ops.pointnet2.pointnet2_stack.pointnet2_stack_cuda",
    "pcdet.ops.pointnet2.pointnet2_batch.pointnet2_batch_cuda",
    "pcdet.ops.bev_pool.bev_pool_ext",
    "pcdet.ops.ingroup_inds.ingroup_inds_cuda",
)

SERVED_MODULES = tuple(_IMPLEMENTED) + _UNAVAILABLE


def _missing_op(module: str, name: str) -> Callable:
    def raise_not_implemented(*args, **kwargs):
        raise NotImplementedError(
            f"{module}.{name} is a CUDA op of OpenPCDet with no CPU implementation in pcdet_ext "
            f"(CPU runtime active). Run this model on a CUDA machine with OpenPCDet's ops built "
            f"(python setup.py develop in the OpenPCDet checkout).")
    raise_not_implemented.__name__ = name
    return raise_not_implemented


def make_module(fullname: str) -> types.ModuleType:
    """Build the CPU stand-in module for one compiled OpenPCDet extension."""
    mod = types.ModuleType(fullname, f"pcdet_ext CPU stand-in for OpenPCDet's compiled {fullname}")
    mod.__dict__.update(_IMPLEMENTED.get(fullname, {}))

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(fullname, name)

    mod.__getattr__ = __getattr__
    mod.PCDET_EXT_CPU_STANDIN = True
    return mod


class _Loader(importlib.abc.Loader):
    def __init__(self, finder: "CompiledOpsFinder"):
        self.finder = finder  # the ledger removes the modules whose loader names this finder

    def create_module(self, spec):
        return make_module(spec.name)

    def exec_module(self, module):
        return None


def _patch_kitti_eval(module: types.ModuleType, ledger: Ledger) -> None:
    """KITTI evaluation computes rotated IoUs with a numba.cuda kernel, which on CPU runs on the
    (slow, pure-python) CUDA simulator; use the exact numba CPU kernel instead."""
    ledger.setattr(module, "rotate_iou_gpu_eval", rb.rotate_iou_eval)


# modules imported from the checkout as usual, then adjusted
_POST_IMPORT: Dict[str, Callable[[types.ModuleType, Ledger], None]] = {
    "pcdet.datasets.kitti.kitti_object_eval_python.eval": _patch_kitti_eval,
}
# modules that compile numba.cuda kernels at import: imported with numba's CUDA simulator on
_NEEDS_CUDA_SIMULATOR = ("pcdet.datasets.kitti.kitti_object_eval_python.rotate_iou",
                         "pcdet.datasets.once.once_eval.iou_utils")


class _WrappingLoader(importlib.abc.Loader):
    """Runs the checkout's own module, inside the CUDA simulator and/or followed by a patch."""

    def __init__(self, inner: importlib.abc.Loader, ledger: Ledger, patch=None, simulator: bool = False):
        self.inner, self.ledger, self.patch, self.simulator = inner, ledger, patch, simulator

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        with shims.numba_cuda_simulator() if self.simulator else contextlib.nullcontext():
            self.inner.exec_module(module)
        if self.patch is not None:
            self.patch(module, self.ledger)


class CompiledOpsFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that serves the CPU stand-ins ahead of the (absent) CUDA builds and adjusts the
    few checkout modules listed above; every change it makes is recorded in ``ledger``."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname in SERVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _Loader(self), origin="pcdet_ext.openpcdet.cpu")
        if fullname in _POST_IMPORT or fullname in _NEEDS_CUDA_SIMULATOR:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _WrappingLoader(spec.loader, self.ledger, _POST_IMPORT.get(fullname),
                                              fullname in _NEEDS_CUDA_SIMULATOR)
            return spec
        return None


def install_finder(ledger: Ledger) -> CompiledOpsFinder:
    """Put the finder first on ``sys.meta_path`` through ``ledger`` and return it."""
    finder = CompiledOpsFinder(ledger)
    ledger.insert_finder(finder)
    return finder
