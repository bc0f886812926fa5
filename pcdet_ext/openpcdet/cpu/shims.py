"""Shims that let unmodified OpenPCDet run on a torch build without CUDA, each as narrow as it can be.

* ``Tensor.cuda`` / ``torch.cuda.<T>Tensor``: a no-op / a CPU allocation only when called from
  OpenPCDet (``pcdet``, its ``tools/``), from ``pcdet_ext`` or from the main script; any other caller
  gets torch's own behaviour (on CUDA-less torch: its "not compiled with CUDA" error).
* numba's CUDA simulator: switched on only while OpenPCDet modules that compile ``numba.cuda`` kernels
  at import run their import; ``NUMBA_ENABLE_CUDASIM`` is not left in the environment of children.
* torchvision: a transforms-only substitute is served only when no torchvision is installed, and only
  when something imports it.

All changes go through a :class:`~pcdet_ext.openpcdet.cpu.ledger.Ledger`, so :func:`pcdet_ext.openpcdet.cpu.deactivate`
undoes them.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings
from typing import Iterator, Optional

import torch

from pcdet_ext.openpcdet.cpu.ledger import Ledger

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_IN_SCOPE_MODULES = ("pcdet", "pcdet_ext")
LEGACY_TENSOR_TYPES = (("FloatTensor", torch.float32), ("DoubleTensor", torch.float64), ("LongTensor", torch.int64),
                       ("IntTensor", torch.int32), ("BoolTensor", torch.bool), ("ByteTensor", torch.uint8))


def _openpcdet_tools_dir() -> Optional[str]:
    pcdet = sys.modules.get("pcdet")
    path = getattr(pcdet, "__file__", None)
    return os.path.join(os.path.dirname(os.path.dirname(path)), "tools") + os.sep if path else None


def called_from_openpcdet(depth: int = 1) -> bool:
    """Whether the first frame outside torch, ``depth`` frames above the caller, belongs to OpenPCDet
    (``pcdet.*`` or a file of its ``tools/``), to ``pcdet_ext`` or to the ``__main__`` script."""
    frame = sys._getframe(depth + 1)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return False
    name = frame.f_globals.get("__name__", "")
    if name in ("__main__", "__mp_main__") or name.split(".", 1)[0] in _IN_SCOPE_MODULES:
        return True
    tools = _openpcdet_tools_dir()
    return tools is not None and os.path.abspath(frame.f_code.co_filename).startswith(tools)


def patch_cuda_calls(ledger: Ledger) -> None:
    """``.cuda()`` (tensors, hence modules) stays on the CPU and ``torch.cuda.<T>Tensor(size)`` allocates
    on the CPU, for OpenPCDet's callers (``load_data_to_gpu``, anchors, ``model.cuda()``,
    ``iou3d_nms_utils``); every other caller reaches torch's own method."""
    stock_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        if called_from_openpcdet():
            return self
        return stock_cuda(self, *args, **kwargs)
    cuda.__doc__ = "pcdet_ext CPU runtime: a no-op for OpenPCDet's callers, torch's Tensor.cuda otherwise."
    ledger.setattr(torch.Tensor, "cuda", cuda)
    for name, dtype in LEGACY_TENSOR_TYPES:
        ledger.setattr(torch.cuda, name, _legacy_tensor_type(dtype, getattr(torch.cuda, name, None), name))


def _legacy_tensor_type(dtype: torch.dtype, stock, name: str):
    def ctor(*args, **kwargs):
        if not called_from_openpcdet():
            if stock is None:
                raise TypeError(f"torch.cuda.{name} is not available: torch was not compiled with CUDA")
            return stock(*args, **kwargs)
        if len(args) == 1 and isinstance(args[0], (torch.Size, tuple, list)):
            return torch.empty(tuple(args[0]), dtype=dtype)
        if args and all(isinstance(a, int) for a in args):
            return torch.empty(args, dtype=dtype)
        return torch.tensor(*args, dtype=dtype, **kwargs)
    ctor.__name__ = name
    return ctor


@contextlib.contextmanager
def numba_cuda_simulator() -> Iterator[None]:
    """``numba.cuda`` imports as its simulator inside this block (OpenPCDet's KITTI ``rotate_iou`` compiles
    CUDA kernels at import); the environment variable and numba's config are restored afterwards."""
    import numba
    old = os.environ.get("NUMBA_ENABLE_CUDASIM")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    numba.config.reload_config()
    try:
        if "numba.cuda.device_init" in sys.modules:
            warnings.warn("numba.cuda was imported (real driver) before OpenPCDet's KITTI evaluation: its CUDA "
                          "kernels need a GPU; import pcdet_ext before numba.cuda to use the simulator on CPU.",
                          RuntimeWarning, stacklevel=3)
        else:
            importlib.import_module("numba.cuda")
        yield
    finally:
        if old is None:
            os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
        else:
            os.environ["NUMBA_ENABLE_CUDASIM"] = old
        numba.config.reload_config()


def _torchvision_substitute() -> types.ModuleType:
    """The only part of torchvision OpenPCDet's data path touches: ``transforms`` used by
    ``data_processor.image_normalize`` (ToTensor, Normalize, Compose)."""
    tv = types.ModuleType("torchvision", "pcdet_ext substitute: torchvision.transforms.{Compose,ToTensor,Normalize} only")
    tr = types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class ToTensor:
        def __call__(self, pic):
            arr = torch.as_tensor(pic)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            arr = arr.permute(2, 0, 1).contiguous()
            return arr.float().div(255.0) if arr.dtype == torch.uint8 else arr.float()

    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
            self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

        def __call__(self, x):
            return (x - self.mean) / self.std

    tr.Compose, tr.ToTensor, tr.Normalize = Compose, ToTensor, Normalize

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchvision.{name} is not available: pcdet_ext only substitutes "
                          "torchvision.transforms (no torchvision is installed)")
    tv.__getattr__ = missing
    tv.__path__ = []  # a package, so that ``import torchvision.transforms`` resolves
    tv.transforms = tr
    tv.PCDET_EXT_SUBSTITUTE = True
    return tv


class TorchvisionSubstituteFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the substitute for ``torchvision`` and ``torchvision.transforms`` (installed only when no
    torchvision is installed)."""

    def __init__(self) -> None:
        self.finder = self  # the ledger removes the modules whose loader names this finder
        self._module: Optional[types.ModuleType] = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname in ("torchvision", "torchvision.transforms"):
            return importlib.machinery.ModuleSpec(fullname, self, origin="pcdet_ext.openpcdet.cpu",
                                                  is_package=fullname == "torchvision")
        return None

    def create_module(self, spec):
        self._module = self._module or _torchvision_substitute()
        return self._module if spec.name == "torchvision" else self._module.transforms

    def exec_module(self, module):
        return None


def serve_torchvision_substitute(ledger: Ledger) -> bool:
    """Install the substitute's import hook when no torchvision is installed. Returns whether it was."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    ledger.insert_finder(TorchvisionSubstituteFinder())
    return True
