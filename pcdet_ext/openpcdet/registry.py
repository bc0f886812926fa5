"""Registration of pcdet_ext's classes into OpenPCDet's registries.

OpenPCDet's registries are module-level dicts named ``__all__`` indexed by a config's
``NAME``; inserting a class there (and ``setattr`` on the module for ``import *``) is all
it takes. This package keeps its classes the same way, in the ``__all__`` dicts of the packages
listed in :data:`OUR_REGISTRIES` (next to the classes), and copies them over.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

from pcdet_ext.openpcdet.locator import require_pcdet

# registry key -> OpenPCDet module holding that registry's ``__all__``
REGISTRY_MODULES: Dict[str, str] = {
    "detectors": "pcdet.models.detectors",
    "vfe": "pcdet.models.backbones_3d.vfe",
    "backbones_3d": "pcdet.models.backbones_3d",
    "map_to_bev": "pcdet.models.backbones_2d.map_to_bev",
    "backbones_2d": "pcdet.models.backbones_2d",
    "dense_heads": "pcdet.models.dense_heads",
    "roi_heads": "pcdet.models.roi_heads",
    "datasets": "pcdet.datasets",
}

# registry key -> the pcdet_ext package whose ``__all__`` dict holds the classes for that registry
OUR_REGISTRIES: Dict[str, str] = {
    "detectors": "pcdet_ext.openpcdet.models.detectors",
    "backbones_3d": "pcdet_ext.openpcdet.models.backbones_3d",
}


class RegistryClashError(ValueError):
    """A name is already registered in OpenPCDet to a different class."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_class(registry: str, name: str, cls: type, override: bool = False) -> bool:
    """Register ``cls`` as ``name`` in one OpenPCDet registry. Returns True if it was added or
    replaced, False if that exact class was already there (idempotent)."""
    if registry not in REGISTRY_MODULES:
        raise KeyError(f"unknown registry {registry!r}; expected one of {sorted(REGISTRY_MODULES)}")
    require_pcdet(f"registering {name} into OpenPCDet")
    module = importlib.import_module(REGISTRY_MODULES[registry])
    table = module.__all__
    current = table.get(name)
    if current is cls:
        return False
    if current is not None and not override:
        raise RegistryClashError(
            f"{REGISTRY_MODULES[registry]}.__all__[{name!r}] is already {_qualname(current)}; refusing to "
            f"replace it with {_qualname(cls)} (pass override=True to replace it)")
    table[name] = cls
    setattr(module, name, cls)
    return True


def registered_classes() -> List[Tuple[str, str, type]]:
    """``(registry, NAME, class)`` for every class this package registers (imports OpenPCDet)."""
    require_pcdet("pcdet_ext.register()")
    return [(registry, name, cls) for registry, package in OUR_REGISTRIES.items()
            for name, cls in importlib.import_module(package).__all__.items()]


def register(override: bool = False) -> Dict[str, List[str]]:
    """Register every class of :func:`registered_classes`; returns {registry: [names]}. Idempotent."""
    done: Dict[str, List[str]] = {}
    for registry, name, cls in registered_classes():
        register_class(registry, name, cls, override=override)
        done.setdefault(registry, []).append(name)
    return done
