"""CPU runtime for unmodified OpenPCDet on a torch build without CUDA.

``import pcdet_ext`` calls :func:`activate` automatically when ``torch.cuda.is_available()``
is False, unless ``PCDET_EXT_CPU_RUNTIME=0``. It never runs on a CUDA machine and never
writes into the OpenPCDet checkout. What it does (all process-local, all undone by
:func:`deactivate`; :func:`runtime` / :func:`suspended` scope it for a block):

* serves CPU versions of ``iou3d_nms_cuda`` and ``roiaware_pool3d_cuda`` and importable
  stand-ins for the other compiled ops (calling them raises ``NotImplementedError``);
* makes ``Tensor.cuda()`` a no-op and ``torch.cuda.FloatTensor(...)`` a CPU allocation, for
  OpenPCDet's, pcdet_ext's and the main script's calls only;
* patches spconv's CPU backward (CUDA stream query), eval-mode bias and thread race;
* imports OpenPCDet's KITTI ``rotate_iou`` with numba's CUDA simulator and evaluates with a CPU kernel;
* serves a ``torchvision.transforms`` substitute when no torchvision is installed.

Import ``pcdet_ext`` before ``pcdet`` so the stand-ins are in place when OpenPCDet
imports its ops.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List

import torch

from pcdet_ext.openpcdet.cpu import compiled_ops

from pcdet_ext.openpcdet.cpu import shims

from pcdet_ext.openpcdet.cpu import spconv_patch
from pcdet_ext.openpcdet.cpu.ledger import Ledger

ENV_VAR = "PCDET_EXT_CPU_RUNTIME"
_LEDGER = Ledger()
_STATE: Dict[str, object] = {"active": False}


def should_activate() -> bool:
    """True when CUDA is absent and ``PCDET_EXT_CPU_RUNTIME`` is not ``0``."""
    return os.environ.get(ENV_VAR, "1") != "0" and not torch.cuda.is_available()


def activate() -> Dict[str, object]:
    """Turn the CPU runtime on (idempotent). Raises on a machine where CUDA is available."""
    if torch.cuda.is_available():
        raise RuntimeError("pcdet_ext CPU runtime refused: CUDA is available, use OpenPCDet's own CUDA ops")
    if not _STATE["active"]:
        try:
            compiled_ops.install_finder(_LEDGER)
            shims.patch_cuda_calls(_LEDGER)
            _STATE["spconv_patched"] = spconv_patch.patch_spconv(_LEDGER)
            _STATE["torchvision_substituted"] = shims.serve_torchvision_substitute(_LEDGER)
        except BaseException:
            _LEDGER.undo()
            raise
        _STATE["active"] = True
    return dict(_STATE)


def deactivate() -> None:
    """Undo every change :func:`activate` made (idempotent). Stand-in modules leave ``sys.modules``;
    OpenPCDet modules that already imported one keep their reference (import them afresh for a
    clean state)."""
    _LEDGER.undo()
    _STATE.clear()
    _STATE["active"] = False


def is_active() -> bool:
    return bool(_STATE["active"])


def patched() -> List[str]:
    """The attributes, modules, environment variables and import hooks changed now."""
    return _LEDGER.names()


@contextlib.contextmanager
def runtime() -> Iterator[Dict[str, object]]:
    """The runtime on for the block; it is turned off afterwards only if this block turned it on."""
    was_active = is_active()
    state = activate()
    try:
        yield state
    finally:
        if not was_active:
            deactivate()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """The runtime off for the block (stock torch/spconv, as on a CUDA machine); back on afterwards
    if it was on."""
    was_active = is_active()
    deactivate()
    try:
        yield
    finally:
        if was_active:
            activate()
