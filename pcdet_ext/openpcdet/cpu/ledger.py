"""A record of every process change the CPU runtime makes, so that :func:`pcdet_ext.openpcdet.cpu.deactivate`
can undo each one exactly (attributes, environment variables, ``sys.modules`` entries, import hooks)."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Tuple

_ABSENT = object()


class Ledger:
    """Apply changes through this object; :meth:`undo` reverts them in reverse order."""

    def __init__(self) -> None:
        self._undo: List[Tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def names(self) -> List[str]:
        """What is changed now, in the order it was changed (for logs and tests)."""
        return [name for name, _ in self._undo]

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``; undo restores the old value, or deletes the attribute when
        ``obj`` did not hold it itself (a class inheriting ``name`` gets its base's back)."""
        own = vars(obj).get(name, _ABSENT)
        setattr(obj, name, value)

        def undo() -> None:
            if own is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, own)
        self._undo.append((f"{getattr(obj, '__name__', type(obj).__name__)}.{name}", undo))

    def setenv(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value

        def undo() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._undo.append((f"os.environ[{name!r}]", undo))

    def add_module(self, name: str, module: Any) -> None:
        """Put ``module`` into ``sys.modules``; undo removes it (or puts the previous one back)."""
        old = sys.modules.get(name, _ABSENT)
        sys.modules[name] = module

        def undo() -> None:
            if sys.modules.get(name) is module:
                if old is _ABSENT:
                    del sys.modules[name]
                else:
                    sys.modules[name] = old
        self._undo.append((f"sys.modules[{name!r}]", undo))

    def insert_finder(self, finder: Any) -> None:
        """Put an import hook first on ``sys.meta_path``; undo removes it and every module it created
        (those whose loader names it as ``finder``)."""
        sys.meta_path.insert(0, finder)

        def undo() -> None:
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            for name in [n for n, m in sys.modules.items() if getattr(getattr(m, "__spec__", None), "loader", None)
                         is not None and getattr(m.__spec__.loader, "finder", None) is finder]:
                del sys.modules[name]
        self._undo.append((f"sys.meta_path[{type(finder).__name__}]", undo))

    def on_undo(self, name: str, fn: Callable[[], None]) -> None:
        """Register a custom undo step."""
        self._undo.append((name, fn))

    def undo(self) -> None:
        """Revert every change, newest first; the ledger is empty afterwards."""
        while self._undo:
            _, fn = self._undo.pop()
            fn()
