"""Optimizer / scheduler builders with per-module LR and WD multipliers (``DIFFERENTIAL_LR``,
``PARAM_GROUPS``) that survive OpenPCDet's OneCycle and cosine schedules."""
from pcdet_ext.engine.optimization.builder import (GroupedOptimWrapper, build_optimizer, build_scheduler, create_optimizer_with_differential_lr,
                      describe, group_lrs, load_optimizer_state, parse_optimization, scheduler_step)
from pcdet_ext.engine.optimization.param_groups import BACKBONE_MODULES, HEAD_MODULES, OptimConfigError

__all__ = ["GroupedOptimWrapper", "build_optimizer", "build_scheduler", "create_optimizer_with_differential_lr",
           "describe", "group_lrs", "load_optimizer_state", "parse_optimization", "scheduler_step", "BACKBONE_MODULES", "HEAD_MODULES",
           "OptimConfigError"]
