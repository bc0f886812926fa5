"""pcdet_ext: OpenPCDet plugins for split inference (RQ bottleneck) and R-MAE/CMAE pretraining.

``import pcdet_ext`` (before ``pcdet``) does three things:

1. allow-lists numpy scalars for ``torch.load(weights_only=True)`` (OpenPCDet checkpoints);
2. on a torch build without CUDA, turns on the CPU runtime (:mod:`pcdet_ext.openpcdet.cpu`) unless
   ``PCDET_EXT_CPU_RUNTIME=0``;
3. when OpenPCDet is importable (installed, or ``PCDET_ROOT``), registers this package's
   classes into OpenPCDet's registries (:func:`register`) and serves this package's
   ``build_optimizer`` / ``build_scheduler`` to a fork's ``train_utils.optimization``
   (:mod:`pcdet_ext.engine.optimization.fork`), so per-group learning rates hold in its own train.py.

Without OpenPCDet the pure-torch parts work; the OpenPCDet-facing parts raise an
ImportError saying how to provide it. Without torch (the vehicle's edge-only install,
``pcdet_ext_edge``) none of this happens and only :mod:`pcdet_ext.edge` is usable.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

__version__ = "0.2.0"


def _edge_only() -> bool:
    """The edge distribution ships no ``pcdet_ext.openpcdet``; any install without torch is edge-only."""
    if importlib.util.find_spec("pcdet_ext.openpcdet") is None:
        return True
    try:
        import torch  # noqa: F401
    except ImportError:
        return True
    return False


EDGE_ONLY = _edge_only()

if not EDGE_ONLY:
    from pcdet_ext.openpcdet import cpu
    from pcdet_ext.openpcdet.locator import OpenPCDetNotFoundError, import_pcdet, pcdet_available, require_pcdet
    from pcdet_ext.openpcdet.registry import RegistryClashError, register, register_class
    from pcdet_ext.utils.checkpoint import allow_numpy_scalars
    from pcdet_ext.utils.console import quiet_known_warnings

    __all__ = ["register", "register_class", "RegistryClashError", "OpenPCDetNotFoundError",
               "import_pcdet", "pcdet_available", "require_pcdet", "__version__"]
    allow_numpy_scalars()
    if cpu.should_activate():
        cpu.activate()

def _auto_register() -> None:
    """Register into OpenPCDet when it is importable; say why not when PCDET_ROOT names a bad checkout
    or OpenPCDet itself fails to import (the pure-torch parts keep working either way). OpenPCDet's
    import-time deprecation warnings (``torch.cuda.amp`` decorators) are filtered here only."""
    try:
        with warnings.catch_warnings():
            quiet_known_warnings()
            import_pcdet()
            register()
        from pcdet_ext.engine.optimization import fork
        fork.install()
    except OpenPCDetNotFoundError as exc:
        if os.environ.get("PCDET_ROOT"):
            warnings.warn(f"pcdet_ext: OpenPCDet not registered: {exc}", RuntimeWarning, stacklevel=3)
    except ImportError as exc:
        warnings.warn(f"pcdet_ext: OpenPCDet found but failed to import ({exc}); nothing registered",
                      RuntimeWarning, stacklevel=3)


if not EDGE_ONLY and os.environ.get("PCDET_EXT_AUTO_REGISTER", "1") != "0":
    _auto_register()
