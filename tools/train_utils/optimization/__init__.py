"""``from train_utils.optimization import build_optimizer, build_scheduler`` as in OpenPCDet's tools,
served by :mod:`pcdet_ext.engine.optimization` (per-module LR multipliers that survive OneCycle)."""
from pcdet_ext.engine.optimization import build_optimizer, build_scheduler  # noqa: F401
