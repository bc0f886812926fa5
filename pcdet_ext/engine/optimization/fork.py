"""A fork's own OpenPCDet ``tools/train.py`` with ``import pcdet_ext`` added: its
``train_utils.optimization.build_optimizer`` / ``build_scheduler`` are served by this package's drop-ins,
so ``DIFFERENTIAL_LR`` / ``PARAM_GROUPS`` hold there too (stock OpenPCDet ignores them and trains at 1x).

:func:`install` (run by ``import pcdet_ext`` when OpenPCDet is importable) patches OpenPCDet's
``train_utils.optimization`` module when it is imported (an import hook), or at once when it already
is, plus the names a ``from train_utils.optimization import build_optimizer, build_scheduler`` already
bound in the ``__main__`` script, and wraps OpenPCDet's ``load_params_from_file`` so that any detector
reports what a ``--pretrained_model`` loaded (stock train.py loads it after building the optimizer; groups
with LOADED_ONLY rules are re-assigned then); every change goes through a ledger (:func:`uninstall`
undoes them).
The R-MAE detectors refuse to train when the config asks for per-group learning rates and their
optimizer was not built here (:mod:`pcdet_ext.openpcdet.lr_rules`).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Dict, Optional

from pcdet_ext.engine.optimization.builder import build_optimizer, build_scheduler
from pcdet_ext.openpcdet.cpu.ledger import Ledger
from pcdet_ext.openpcdet.lr_rules import pretrained_loaded

TARGET = "train_utils.optimization"
_LEDGER = Ledger()
_STATE: Dict[str, Any] = {"installed": False}


def _is_openpcdets(module) -> bool:
    """OpenPCDet's ``tools/train_utils/optimization`` (its fastai schedules next to the builders), not
    yet served by this package."""
    return (getattr(module, "build_optimizer", build_optimizer) is not build_optimizer
            and hasattr(module, "OneCycle") and hasattr(module, "build_scheduler"))


def _serve(module) -> None:
    """Put the drop-ins into ``module`` and into ``__main__`` where it bound the originals."""
    if not _is_openpcdets(module):
        return
    main = sys.modules.get("__main__")
    for name, ours in (("build_optimizer", build_optimizer), ("build_scheduler", build_scheduler)):
        original = getattr(module, name)
        _LEDGER.setattr(module, name, ours)
        if main is not None and getattr(main, name, None) is original:
            _LEDGER.setattr(main, name, ours)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _serve(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``train_utils.optimization`` as the other finders would, and serves the drop-ins into it
    once it has run."""

    def find_spec(self, fullname: str, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def _report_pretrained(load_params_from_file):
    """OpenPCDet's ``load_params_from_file`` (stock train.py's ``--pretrained_model``, after the optimizer
    is built), then the loaded names to the model's optimizer (:func:`~pcdet_ext.openpcdet.lr_rules.pretrained_loaded`)."""
    def wrapper(self, *args, **kwargs):
        self._pcdet_ext_pretrained_keys = set()
        try:
            out = load_params_from_file(self, *args, **kwargs)
            pretrained_loaded(self, self._pcdet_ext_pretrained_keys)
            return out
        finally:
            del self._pcdet_ext_pretrained_keys
    return wrapper


def _note_loaded(load_state_dict):
    """OpenPCDet's ``_load_state_dict`` (its shape-matched partial load), noting the keys it loaded while
    ``load_params_from_file`` runs."""
    def wrapper(self, model_state_disk, *args, **kwargs):
        state_dict, loaded = load_state_dict(self, model_state_disk, *args, **kwargs)
        if hasattr(self, "_pcdet_ext_pretrained_keys"):
            self._pcdet_ext_pretrained_keys |= set(loaded)
        return state_dict, loaded
    return wrapper


def install() -> None:
    """Serve the drop-ins to a fork's ``train_utils.optimization`` and have every OpenPCDet detector report
    what ``--pretrained_model`` loaded (for LOADED_ONLY groups); idempotent."""
    if _STATE["installed"]:
        return
    if TARGET in sys.modules:
        _serve(sys.modules[TARGET])
    else:
        _LEDGER.insert_finder(_Finder())
    from pcdet.models.detectors.detector3d_template import Detector3DTemplate
    _LEDGER.setattr(Detector3DTemplate, "load_params_from_file",
                    _report_pretrained(Detector3DTemplate.load_params_from_file))
    _LEDGER.setattr(Detector3DTemplate, "_load_state_dict", _note_loaded(Detector3DTemplate._load_state_dict))
    _STATE["installed"] = True


def uninstall() -> None:
    """Undo :func:`install` (the originals back in the module and ``__main__``)."""
    _LEDGER.undo()
    _STATE["installed"] = False

