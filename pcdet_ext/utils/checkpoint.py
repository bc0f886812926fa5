"""Checkpoint I/O: the numpy allow-list for ``weights_only`` loading, atomic saves.

OpenPCDet checkpoints written with ``adam_onecycle`` hold numpy scalars (lr, betas) in
``optimizer_state``. Since torch 2.6 ``torch.load`` defaults to ``weights_only=True`` and
refuses them; :func:`allow_numpy_scalars` allow-lists exactly the numpy scalar types (not
arrays, not arbitrary objects), so such checkpoints load without ``weights_only=False``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

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


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot serve: not loadable, or holding something else. One line
    naming the file and what it holds."""


def _why_not_loadable(exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds pickled Python objects ({found.group(1)}) besides tensors and plain containers; "
                "pcdet_ext loads checkpoints as state dicts only")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = (detail.group(1) if detail else (text.strip().splitlines() or [type(exc).__name__])[0]).strip()
    if len(first) > 120:  # whole words
        first = first[:120].rsplit(" ", 1)[0] + " ..."
    return f"not a torch.save file ({first})"


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the numpy scalar allow-list; a missing or unloadable
    file is a one-line :class:`CheckpointError` (FileNotFoundError for a missing one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    allow_numpy_scalars()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {_why_not_loadable(exc)}") from exc


def describe_checkpoint(state: Any) -> str:
    """What a loaded checkpoint holds, in a few words (for errors)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a checkpoint dict"
    model_state = state.get("model_state")
    if not isinstance(model_state, dict):
        return f"a dict with keys {sorted(map(str, state))[:6]} and no model_state"
    modules = sorted({k.split(".", 1)[0] for k in model_state})
    epoch = f", epoch {state['epoch']}" if "epoch" in state else ""
    return f"an OpenPCDet checkpoint{epoch} with modules {modules}"


def model_state_of(state: Any, path: Union[str, Path], flag: str = "--ckpt",
                   needs_prefix: Optional[str] = None, expected: str = "") -> Dict[str, Any]:
    """``state['model_state']``, or a :class:`CheckpointError` saying what ``path`` holds instead; with
    ``needs_prefix``, the model state must hold tensors of that module (e.g. ``rq_bottleneck.``)."""
    model_state = state.get("model_state") if isinstance(state, dict) else None
    if not isinstance(model_state, dict) or (needs_prefix and not any(k.startswith(needs_prefix) for k in model_state)):
        need = f"; expected {expected}" if expected else ""
        raise CheckpointError(f"{flag} {path}: holds {describe_checkpoint(state)}{need}")
    return model_state


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves any previous file at ``path`` intact (and at worst a ``.<name>.*.tmp``
    beside it); a failed write (a full disk) is an OSError whose ``filename`` is ``path``.
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Union[str, Path]) -> Path:
    """``obj`` as JSON (numpy scalars as numbers), written as atomically as :func:`atomic_save`."""
    text = json.dumps(obj, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: Union[str, Path], write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    return path
