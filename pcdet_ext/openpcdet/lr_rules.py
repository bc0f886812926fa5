"""Per-group learning rates (``OPTIMIZATION.DIFFERENTIAL_LR`` / ``PARAM_GROUPS``) that a fork's stock
OpenPCDet optimizer would silently drop: this package's ``build_optimizer`` marks the model it built
an optimizer for, and the R-MAE detectors refuse to train when the global config asks for such rules
and their model carries no mark (a fork whose ``tools/train.py`` was not served pcdet_ext's builders)."""
from __future__ import annotations

from typing import Callable, Optional, Set

import torch.nn as nn

MARK = "_pcdet_ext_param_groups"
REGROUP = "_pcdet_ext_regroup"


def mark(model: nn.Module, regroup: Optional[Callable[[Set[str]], None]] = None) -> None:
    """Record that ``model`` (or the module it wraps) got its optimizer from pcdet_ext's builder;
    ``regroup(loaded_names)``: how that optimizer re-assigns its groups once pretrained weights load."""
    target = getattr(model, "module", model)
    setattr(target, MARK, True)
    setattr(target, REGROUP, regroup)


def pretrained_loaded(model: nn.Module, keys: Set[str]) -> None:
    """``model`` loaded the state keys ``keys`` from a pretrained checkpoint (OpenPCDet's
    ``load_params_from_file``): an optimizer built before, with LOADED_ONLY rules, regroups now."""
    regroup = getattr(model, REGROUP, None)
    if regroup is not None:
        regroup({n for n, _ in model.named_parameters()} & set(keys))


def wants_rules(optim_cfg) -> bool:
    """Whether ``OPTIMIZATION`` asks for per-group multipliers (the builder's rule)."""
    optim_cfg = optim_cfg or {}
    differential = optim_cfg.get("DIFFERENTIAL_LR")
    return bool(optim_cfg.get("PARAM_GROUPS")) if differential is None else bool(differential)


def unserved(model: nn.Module) -> Optional[str]:
    """Why ``model`` must not train, or None: the global OpenPCDet config it was built from (a fork's
    stock train.py) asks for per-group learning rates and no pcdet_ext builder made its optimizer."""
    try:
        from pcdet.config import cfg
    except ImportError:
        return None
    if cfg.get("MODEL") is not getattr(model, "model_cfg", None) or not wants_rules(cfg.get("OPTIMIZATION")):
        return None
    if getattr(model, MARK, False):
        return None
    return ("OPTIMIZATION.DIFFERENTIAL_LR / PARAM_GROUPS: this config asks for per-group learning rates, but the "
            "optimizer was built by OpenPCDet's own train_utils.optimization, which trains every group at 1x; add "
            "`import pcdet_ext` at the top of your tools/train.py (it serves pcdet_ext's build_optimizer / "
            "build_scheduler there) or build it with pcdet_ext.engine.optimization.build_optimizer")
