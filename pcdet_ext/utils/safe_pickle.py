"""Reading OpenPCDet's dataset info pickles (``*infos*.pkl``, ``*dbinfos*.pkl``) without running code.

OpenPCDet reads them with ``pickle.load``, which calls any function a crafted file names. The tools
of this package read each info file first with :func:`load_infos`, whose unpickler admits only what
OpenPCDet infos hold: built-in containers and scalars, numpy arrays, dtypes and scalars. Anything
else (``os.system``, ``builtins.eval``, a class of some package) is refused by name before it is
called, and a truncated or corrupt file is refused too, so OpenPCDet's own loader never sees it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Union

# (module, name) an info file may reference: numpy's array / scalar reconstruction (numpy 1 and 2
# module paths) and harmless built-in types
ALLOWED = {
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("builtins", n) for n in ("set", "frozenset", "complex", "slice", "range", "bytearray", "list", "dict",
                                "tuple", "str", "bytes", "int", "float", "bool")),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes (numpy array buffers)
}


class UnsafePickleError(ValueError):
    """An info file names something outside :data:`ALLOWED`, or is not a complete pickle."""


class _InfoUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"it references {module}.{name}, which OpenPCDet dataset infos never hold "
                                "(only built-in containers and numpy arrays / scalars); refusing to load it")


def load_infos(path: Union[str, Path]) -> Any:
    """The object in ``path``, unpickled with only :data:`ALLOWED` globals; an :class:`UnsafePickleError`
    naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _InfoUnpickler(f).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError,
            MemoryError, OverflowError) as exc:
        raise UnsafePickleError(f"{path}: not a complete pickle file (truncated or corrupt: "
                                f"{type(exc).__name__}: {str(exc)[:100]})") from None
