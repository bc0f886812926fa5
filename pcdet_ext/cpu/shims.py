"""Process-wide shims that let unmodified OpenPCDet run on a torch build without CUDA.

Each shim is applied only by :func:`pcdet_ext.cpu.activate`, which refuses to run when
CUDA is available, so none of this ever touches a GPU machine.
"""
from __future__ import annotations

import os
import sys
import types
import warnings

import torch

_ORIGINAL = {}


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    """``Tensor.cuda`` on a CUDA-less build: the tensor stays on the CPU (no copy)."""
    return self


def _legacy_tensor_type(dtype: torch.dtype):
    def ctor(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], (torch.Size, tuple, list)):
            return torch.empty(tuple(args[0]), dtype=dtype)
        if args and all(isinstance(a, int) for a in args):
            return torch.empty(args, dtype=dtype)
        return torch.tensor(*args, dtype=dtype, **kwargs)
    return ctor


def patch_cuda_calls() -> None:
    """Make ``.cuda()`` a no-op and ``torch.cuda.<T>Tensor(...)`` allocate on the CPU.

    OpenPCDet calls ``.cuda()`` on anchors and batch tensors (``load_data_to_gpu``) and
    allocates ``torch.cuda.FloatTensor`` in ``iou3d_nms_utils``.
    """
    if "Tensor.cuda" in _ORIGINAL:
        return
    _ORIGINAL["Tensor.cuda"] = torch.Tensor.cuda
    torch.Tensor.cuda = _tensor_cuda
    for name, dtype in (("FloatTensor", torch.float32), ("DoubleTensor", torch.float64),
                        ("LongTensor", torch.int64), ("IntTensor", torch.int32),
                        ("BoolTensor", torch.bool), ("ByteTensor", torch.uint8)):
        _ORIGINAL[f"torch.cuda.{name}"] = getattr(torch.cuda, name, None)
        setattr(torch.cuda, name, _legacy_tensor_type(dtype))


def enable_numba_cuda_simulator() -> None:
    """KITTI evaluation (``rotate_iou``) uses numba.cuda kernels: run them on the simulator."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:
        import numba
        numba.config.reload_config()
        cuda_mod = sys.modules.get("numba.cuda")
        if cuda_mod is not None and not getattr(numba.config, "ENABLE_CUDASIM", 0):
            warnings.warn("numba.cuda was imported before pcdet_ext: KITTI evaluation on CPU needs "
                          "NUMBA_ENABLE_CUDASIM=1 set before numba is imported.", RuntimeWarning)


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
                          "torchvision.transforms (no torchvision wheel matches this CPU torch)")
    tv.__getattr__ = missing
    tv.transforms = tr
    tv.PCDET_EXT_SUBSTITUTE = True
    return tv


def substitute_torchvision_if_missing() -> bool:
    """Insert the transforms-only substitute when ``import torchvision`` fails. Returns True if used."""
    if "torchvision" in sys.modules:
        return bool(getattr(sys.modules["torchvision"], "PCDET_EXT_SUBSTITUTE", False))
    try:
        import torchvision  # noqa: F401
        return False
    except Exception as exc:  # a missing wheel or one built for another torch: both fail here
        sys.modules.pop("torchvision", None)
        tv = _torchvision_substitute()
        tv.PCDET_EXT_REASON = f"{type(exc).__name__}: {exc}"
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms
        return True
