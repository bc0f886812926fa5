"""Checkpoint I/O: the numpy allow-list for ``weights_only`` loading, atomic saves.

OpenPCDet checkpoints written with ``adam_onecycle`` hold numpy scalars (lr, betas) in
``optimizer_state``. Since torch 2.6 ``torch.load`` defaults to ``weights_only=True`` and
refuses them; :func:`allow_numpy_scalars` allow-lists exactly the numpy scalar types (not
arrays, not arbitrary objects), so such checkpoints load without ``weights_only=False``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

_SCALAR_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                  np.uint8, np.bool_)
_DONE = False


def allow_numpy_scalars() -> None:
    """Allow-list numpy scalars (and their dtypes) for ``torch.load(weights_only=True)``. Idempotent."""
    global _DONE
    if _DONE:
        return
    try:
        scalar = np._core.multiarray.scalar
    except AttributeError:  # numpy < 2
        scalar = np.core.multiarray.scalar
    safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    safe += [type(np.dtype(t)) for t in _SCALAR_DTYPES]
    torch.serialization.add_safe_globals(safe)
    _DONE = True


def plain(obj: Any) -> Any:
    """EasyDicts / tuples to plain dicts / lists, so configs stored in checkpoints load with weights_only."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the numpy scalar allow-list and a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    allow_numpy_scalars()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path} is not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves any previous file at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
