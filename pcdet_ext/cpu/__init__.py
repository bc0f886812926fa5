"""CPU runtime for unmodified OpenPCDet on a torch build without CUDA.

``import pcdet_ext`` calls :func:`activate` automatically when ``torch.cuda.is_available()``
is False, unless ``PCDET_EXT_CPU_RUNTIME=0``. It never runs on a CUDA machine and never
writes into the OpenPCDet checkout. What it does (all process-local):

* serves CPU versions of ``iou3d_nms_cuda`` and ``roiaware_pool3d_cuda`` and importable
  stand-ins for the other compiled ops (calling them raises ``NotImplementedError``);
* makes ``Tensor.cuda()`` a no-op and ``torch.cuda.FloatTensor(...)`` a CPU allocation;
* patches spconv's CPU backward (CUDA stream query) and eval-mode bias;
* runs KITTI evaluation's numba.cuda kernels on numba's CUDA simulator;
* substitutes ``torchvision.transforms`` when no usable torchvision is installed.

Import ``pcdet_ext`` before ``pcdet`` so the stand-ins are in place when OpenPCDet
imports its ops.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from . import compiled_ops, shims, spconv_patch

ENV_VAR = "PCDET_EXT_CPU_RUNTIME"
_STATE: Dict[str, object] = {"active": False}


def should_activate() -> bool:
    """True when CUDA is absent and ``PCDET_EXT_CPU_RUNTIME`` is not ``0``."""
    return os.environ.get(ENV_VAR, "1") != "0" and not torch.cuda.is_available()


def activate() -> Dict[str, object]:
    """Turn the CPU runtime on (idempotent). Raises on a machine where CUDA is available."""
    if torch.cuda.is_available():
        raise RuntimeError("pcdet_ext CPU runtime refused: CUDA is available, use OpenPCDet's own CUDA ops")
    if not _STATE["active"]:
        shims.enable_numba_cuda_simulator()
        compiled_ops.install_finder()
        shims.patch_cuda_calls()
        _STATE["spconv_patched"] = spconv_patch.patch_spconv()
        _STATE["torchvision_substituted"] = shims.substitute_torchvision_if_missing()
        _STATE["active"] = True
    return dict(_STATE)


def is_active() -> bool:
    return bool(_STATE["active"])
