"""Drop-in ``build_optimizer`` / ``build_scheduler`` for OpenPCDet with per-group multipliers that
hold at every step of every schedule.

OpenPCDet's OneCycle / cosine schedules assign one scalar ``optimizer.lr`` (and ``mom``) per
iteration and its fastai ``OptimWrapper`` broadcasts that scalar to every group, erasing per-group
learning rates after the first step. :class:`GroupedOptimWrapper` keeps the fastai interface and
maths (Adam, momentum via ``betas[0]``, decoupled weight decay ``p *= 1 - wd * lr`` on every
trainable parameter, BatchNorm included) but multiplies the scalar by each group's ``lr_mult`` /
``wd_mult``. ``adam`` / ``sgd`` use plain torch optimizers whose LambdaLR scales each group's own
base LR, so the ratios hold there natively.
"""
from __future__ import annotations

import inspect
import logging
import math
import warnings
from functools import partial
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from easydict import EasyDict

from pcdet_ext.config import ConfigError, NoneType, Opt, from_cfg
from pcdet_ext.engine.optimization.param_groups import OptimConfigError, assign_groups, format_table, parse_rules
from pcdet_ext.openpcdet.lr_rules import mark

OPTIMIZERS = ("adam", "sgd", "adam_onecycle", "adam_cosineanneal")
_POS = dict(lo=0.0, lo_open=True)
# Every OPTIMIZATION key stock OpenPCDet reads (tools/ and its configs), then this package's.
OPTIMIZATION_SPEC = {
    "OPTIMIZER": Opt(required=True, types=(str,), choices=OPTIMIZERS),
    "LR": Opt(required=True, types=(float,), **_POS),
    "BATCH_SIZE_PER_GPU": Opt(None, (int, NoneType), lo=1),
    "NUM_EPOCHS": Opt(None, (int, NoneType), lo=1),
    "WEIGHT_DECAY": Opt(0.0, (float,), lo=0.0),
    "MOMENTUM": Opt(0.9, (float,), lo=0.0, hi=1.0),
    "MOMS": Opt([0.95, 0.85], (list, tuple)),
    "BETAS": Opt([0.9, 0.99], (list, tuple)),
    "PCT_START": Opt(0.4, (float,), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    "DIV_FACTOR": Opt(10.0, (float,), **_POS),
    "DECAY_STEP_LIST": Opt([], (list, tuple)),
    "LR_DECAY": Opt(0.1, (float,), **_POS),
    "LR_CLIP": Opt(1e-7, (float,), lo=0.0),
    "LR_WARMUP": Opt(False, (bool,)),
    "WARMUP_EPOCH": Opt(1, (int,), lo=0),
    "WARMUP_ITER": Opt(None, (int, NoneType), lo=0),
    "GRAD_NORM_CLIP": Opt(10.0, (float,), **_POS),
    "USE_AMP": Opt(False, (bool,), note="OpenPCDet master's AMP switch; pcdet_ext's training loop runs fp32"),
    "LOSS_SCALE_FP16": Opt(None, (float, NoneType), note="OpenPCDet master's AMP loss scale; unused in fp32"),
    "DIFFERENTIAL_LR": Opt(None, (bool, NoneType)),
    "BACKBONE_LR_RATIO": Opt(None, (float, NoneType), **_POS),
    "DENSE_HEAD_LR_RATIO": Opt(None, (float, NoneType), **_POS),
    "BACKBONE_LOADED_ONLY": Opt(False, (bool,)),
    "PARAM_GROUPS": Opt(None, (dict, NoneType)),
}


def parse_optimization(optim_cfg) -> EasyDict:
    """``OPTIMIZATION`` validated (unknown keys, e.g. ``BACKBONE_LR_RATO``, are errors naming the known
    ones), typed, with OpenPCDet's defaults filled in."""
    try:
        return from_cfg(optim_cfg, OPTIMIZATION_SPEC, "OPTIMIZATION")
    except ConfigError as exc:
        raise OptimConfigError(str(exc)) from None


class GroupedOptimWrapper:
    """fastai-style wrapper (OpenPCDet's ``OptimWrapper`` interface) over a torch optimizer whose
    param groups carry ``name``, ``lr_mult`` and ``wd_mult``."""

    def __init__(self, opt: torch.optim.Optimizer, lr: float, wd: float, true_wd: bool = True):
        self.opt, self.true_wd = opt, true_wd
        self.lr, self.wd = lr, wd

    @property
    def param_groups(self) -> List[Dict]:
        return self.opt.param_groups

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, val: float) -> None:
        self._lr = float(val)
        for g in self.opt.param_groups:
            g["lr"] = self._lr * g["lr_mult"]

    @property
    def mom(self) -> float:
        g = self.opt.param_groups[0]
        return g["betas"][0] if "betas" in g else g["momentum"]

    @mom.setter
    def mom(self, val: float) -> None:
        for g in self.opt.param_groups:
            if "betas" in g:
                g["betas"] = (float(val), g["betas"][1])
            else:
                g["momentum"] = float(val)

    @property
    def wd(self) -> float:
        return self._wd

    @wd.setter
    def wd(self, val: float) -> None:
        self._wd = float(val)
        for g in self.opt.param_groups:
            g["wd"] = self._wd * g["wd_mult"]
            g["weight_decay"] = 0.0 if self.true_wd else g["wd"]

    @torch.no_grad()
    def step(self) -> None:
        if self.true_wd:
            for g in self.opt.param_groups:
                if g["wd"] and g["params"]:
                    torch._foreach_mul_(g["params"], 1.0 - g["wd"] * g["lr"])
        self.opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        load_optimizer_state(self.opt, state)


def load_optimizer_state(opt: torch.optim.Optimizer, state: Dict) -> None:
    """Load an optimizer state saved by the same builder; a different group structure is an error."""
    saved = [(g.get("name"), len(g["params"])) for g in state.get("param_groups", [])]
    now = [(g.get("name"), len(g["params"])) for g in opt.param_groups]
    if saved != now:
        raise ValueError(f"optimizer_state has param groups {saved} but this model/config builds {now} "
                         "(a checkpoint from another config or optimizer grouping)")
    opt.load_state_dict(state)


def build_optimizer(model: nn.Module, optim_cfg, loaded: Optional[Set[str]] = None):
    """``OPTIMIZATION`` -> optimizer (``adam``, ``sgd``: torch; ``adam_onecycle``,
    ``adam_cosineanneal``: :class:`GroupedOptimWrapper`). ``loaded``: names of parameters loaded
    from ``--pretrained_model`` (for LOADED_ONLY rules)."""
    optim_cfg = parse_optimization(optim_cfg)
    name = optim_cfg.OPTIMIZER
    rules = parse_rules(optim_cfg, model)
    groups = assign_groups(model, rules, loaded)
    if not groups:
        raise OptimConfigError("the model has no trainable parameters")
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    torch_groups = _torch_groups(groups, lr, wd)
    if name == "adam":
        optimizer = torch.optim.Adam(torch_groups, lr=lr)
    elif name == "sgd":
        optimizer = torch.optim.SGD(torch_groups, lr=lr, momentum=float(optim_cfg.MOMENTUM))
    else:
        optimizer = GroupedOptimWrapper(torch.optim.Adam(torch_groups, lr=lr, betas=tuple(optim_cfg.BETAS)), lr=lr,
                                        wd=wd, true_wd=True)
    # LOADED_ONLY rules without the loaded names (a fork's stock train.py loads --pretrained_model after
    # building the optimizer): regroup when the model reports what it loaded
    later = loaded is None and any(r.loaded_only for r in rules)
    mark(model, partial(_regroup, optimizer, model, rules, lr, wd) if later else None)
    return optimizer


def _torch_groups(groups, lr: float, wd: float) -> List[Dict]:
    return [{"params": g.params, "name": g.name, "lr_mult": g.lr_mult, "wd_mult": g.wd_mult,
             "lr": lr * g.lr_mult, "weight_decay": wd * g.wd_mult} for g in groups]


def _regroup(optimizer, model: nn.Module, rules, lr: float, wd: float, loaded: Set[str]) -> None:
    """Re-assign the parameter groups of ``optimizer`` (before its first step) now that the names of the
    parameters loaded from a pretrained checkpoint are known (LOADED_ONLY rules)."""
    inner = inner_optimizer(optimizer)
    if any(inner.state.values()):
        raise RuntimeError("pretrained weights loaded after the optimizer's first step: LOADED_ONLY rules cannot "
                           "apply any more; load --pretrained_model before training starts")
    inner.param_groups.clear()
    for group in _torch_groups(assign_groups(model, rules, loaded), lr, wd):
        inner.add_param_group(group)
    if isinstance(optimizer, GroupedOptimWrapper):  # each group's lr / wd from the current scalars
        optimizer.lr, optimizer.wd = optimizer.lr, optimizer.wd


create_optimizer_with_differential_lr = build_optimizer


def build_scheduler(optimizer, total_iters_each_epoch: int, total_epochs: int, last_epoch: int, optim_cfg
                    ) -> Tuple[object, Optional[object]]:
    """OpenPCDet's schedules (OneCycle, CosineAnnealing from its ``tools/train_utils``; LambdaLR
    step decay with optional cosine warm-up) -> ``(lr_scheduler, lr_warmup_scheduler)``."""
    from pcdet_ext.openpcdet.locator import pcdet_tools_module
    fastai = pcdet_tools_module("train_utils/optimization")
    optim_cfg = parse_optimization(optim_cfg)
    total_steps = total_iters_each_epoch * total_epochs
    name = optim_cfg.OPTIMIZER
    if name in ("adam_onecycle", "adam_cosineanneal") and int(total_steps * optim_cfg.PCT_START) < 1:
        raise OptimConfigError(f"OPTIMIZATION.PCT_START: {optim_cfg.PCT_START} x {total_steps} iterations is under one "
                               f"iteration; OpenPCDet's {name} schedule needs more iterations (epochs x batches)")
    if name == "adam_onecycle":
        return fastai.OneCycle(optimizer, total_steps, optim_cfg.LR, list(optim_cfg.MOMS), optim_cfg.DIV_FACTOR,
                               optim_cfg.PCT_START), None
    if name == "adam_cosineanneal":
        return fastai.CosineAnnealing(optimizer, total_steps, total_epochs, optim_cfg.LR, list(optim_cfg.MOMS),
                                      optim_cfg.PCT_START, optim_cfg.WARMUP_ITER), None
    decay_steps = [x * total_iters_each_epoch for x in optim_cfg.DECAY_STEP_LIST]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_step_decay, decay_steps, optim_cfg.LR_DECAY, optim_cfg.LR_CLIP / optim_cfg.LR),
        last_epoch=last_epoch)
    warmup = None
    if optim_cfg.LR_WARMUP:
        # OpenPCDet's CosineWarmupLR (T_max: upstream calls len() on an int) with one absolute eta_min
        # would give every group the same LR; this is its curve relative to each group's own LR.
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
            _cosine_warmup, optim_cfg.WARMUP_EPOCH * total_iters_each_epoch, 1.0 / optim_cfg.DIV_FACTOR))
    return scheduler, warmup


def _cosine_warmup(total: int, start: float, it: int) -> float:
    """OpenPCDet's CosineWarmupLR factor: from ``start`` to 1 over ``total`` iterations."""
    return start + (1.0 - start) * (1.0 - math.cos(math.pi * it / total)) / 2


def _step_decay(decay_steps: List[int], decay: float, clip: float, it: int) -> float:
    factor = 1.0
    for step in decay_steps:
        if it >= step:
            factor *= decay
    return max(factor, clip)


def scheduler_step(scheduler, accumulated_iter: int, epoch: int) -> None:
    """Advance any of the schedules above to iteration ``accumulated_iter`` (OpenPCDet's fastai
    schedules take ``(it)`` on v0.6.0, ``(it, epoch)`` on master; torch schedulers are set in
    closed form)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.last_epoch = accumulated_iter - 1
        with warnings.catch_warnings():  # set in closed form before each step: not the misuse torch warns of
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
    elif "epoch" in inspect.signature(scheduler.step).parameters:
        scheduler.step(accumulated_iter, epoch)
    else:
        scheduler.step(accumulated_iter)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    return optimizer.opt if isinstance(optimizer, GroupedOptimWrapper) else optimizer


def group_lrs(optimizer) -> Dict[str, float]:
    """Current LR of each named group (for tensorboard)."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(inner_optimizer(optimizer).param_groups)}


def describe(optimizer, logger: Optional[logging.Logger] = None) -> str:
    """The start-up table (group, #tensors, #params, LR, WD); logged when ``logger`` is given."""
    rows = []
    for g in inner_optimizer(optimizer).param_groups:
        wd = g.get("wd", g.get("weight_decay", 0.0))
        rows.append({"name": g.get("name", "?"), "tensors": len(g["params"]),
                     "numel": sum(p.numel() for p in g["params"]), "lr": g["lr"], "wd": wd})
    table = format_table(rows)
    if logger is not None:
        logger.info("optimizer param groups:\n%s", table)
    return table
