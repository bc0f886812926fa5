"""Per-module learning-rate / weight-decay multipliers from an OpenPCDet ``OPTIMIZATION`` config (pure torch).

Two ways to say it, combinable when they agree:

* seed keys: ``DIFFERENTIAL_LR: True``, ``BACKBONE_LR_RATIO`` (applies to every *backbone* module
  with parameters: ``vfe``, ``backbone_3d``, ``map_to_bev_module``, ``backbone_2d``) and
  ``DENSE_HEAD_LR_RATIO`` (``dense_head``; ``point_head`` / ``roi_head`` keep 1x);
* ``PARAM_GROUPS: {<module prefix>: {LR_MULT: .., WD_MULT: .., LOADED_ONLY: ..}}`` in the style of
  mmengine's ``custom_keys``: a parameter takes the rule of the longest prefix matching its name
  (on ``.`` boundaries); the rest form the ``default`` group (1x).

``BACKBONE_LOADED_ONLY: True`` (or ``LOADED_ONLY`` per rule) applies a rule only to parameters that
were loaded from ``--pretrained_model``; the others fall back to the next matching rule or default.
Every trainable parameter lands in exactly one group; a prefix matching no parameter is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set

import torch.nn as nn

from pcdet_ext.config import ConfigError, Opt, from_cfg

BACKBONE_MODULES = ("vfe", "backbone_3d", "map_to_bev_module", "backbone_2d")
HEAD_MODULES = ("dense_head",)
DEFAULT_GROUP = "default"
RULE_SPEC = {"LR_MULT": Opt(1.0, (float,), lo=0.0, lo_open=True), "WD_MULT": Opt(1.0, (float,), lo=0.0, lo_open=True),
             "LOADED_ONLY": Opt(False, (bool,))}


class OptimConfigError(ConfigError):
    """An OPTIMIZATION key has a value the optimizer builder cannot use."""


@dataclass
class Rule:
    prefix: str
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    loaded_only: bool = False
    source: str = "PARAM_GROUPS"


@dataclass
class ParamGroup:
    name: str
    lr_mult: float
    wd_mult: float
    names: List[str] = field(default_factory=list)
    params: List = field(default_factory=list)


def _mult(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise OptimConfigError(f"OPTIMIZATION.{key}: expected a positive multiplier, got {value!r}")
    return float(value)


def _has_params(model: nn.Module, prefix: str) -> bool:
    return any(_matches(n, prefix) for n, p in model.named_parameters() if p.requires_grad)


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def parse_rules(optim_cfg, model: nn.Module) -> List[Rule]:
    """The multiplier rules of ``optim_cfg`` (empty: one default group, OpenPCDet's behaviour)."""
    groups = optim_cfg.get("PARAM_GROUPS") or {}
    if not isinstance(groups, dict):
        raise OptimConfigError(f"OPTIMIZATION.PARAM_GROUPS: expected a mapping prefix -> {{LR_MULT, WD_MULT}}, got {groups!r}")
    differential = optim_cfg.get("DIFFERENTIAL_LR")
    if not (bool(groups) if differential is None else differential):
        return []
    rules: Dict[str, Rule] = {}
    loaded_only = bool(optim_cfg.get("BACKBONE_LOADED_ONLY", False))
    seeds = [("BACKBONE_LR_RATIO", BACKBONE_MODULES, loaded_only), ("DENSE_HEAD_LR_RATIO", HEAD_MODULES, False)]
    for key, modules, only in seeds:
        if optim_cfg.get(key) is None:
            continue
        ratio = _mult(optim_cfg.get(key), key)
        present = [m for m in modules if _has_params(model, m)]
        if not present:
            raise OptimConfigError(f"OPTIMIZATION.{key}: the model has no trainable parameters under {list(modules)}")
        for m in present:
            rules[m] = Rule(m, ratio, 1.0, only, source=key)
    for prefix, spec in groups.items():
        try:
            spec = from_cfg(spec, RULE_SPEC, f"OPTIMIZATION.PARAM_GROUPS.{prefix}")
        except ConfigError as exc:
            raise OptimConfigError(str(exc)) from None
        rule = Rule(str(prefix), spec.LR_MULT, spec.WD_MULT, spec.LOADED_ONLY)
        if not _has_params(model, rule.prefix):
            raise OptimConfigError(f"OPTIMIZATION.PARAM_GROUPS.{prefix}: matches no trainable parameter of the model")
        seeded = rules.get(rule.prefix)
        if seeded is not None and (seeded.lr_mult != rule.lr_mult or seeded.loaded_only != rule.loaded_only):
            raise OptimConfigError(
                f"OPTIMIZATION.PARAM_GROUPS.{prefix}.LR_MULT={rule.lr_mult} conflicts with "
                f"OPTIMIZATION.{seeded.source}={seeded.lr_mult} for the same module; give it once")
        rules[rule.prefix] = rule
    return sorted(rules.values(), key=lambda r: -len(r.prefix))


def assign_groups(model: nn.Module, rules: List[Rule], loaded: Optional[Set[str]] = None) -> List[ParamGroup]:
    """Every trainable parameter (including ones owned by non-leaf modules) in exactly one group,
    in rule order (longest prefix first), ``default`` last. ``loaded``: parameter names that came
    from the pretrained checkpoint (needed by LOADED_ONLY rules)."""
    if loaded is None and any(r.loaded_only for r in rules):
        loaded = set()
    groups: Dict[str, ParamGroup] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = next((r for r in rules if _matches(name, r.prefix) and (not r.loaded_only or name in loaded)), None)
        key = rule.prefix if rule else DEFAULT_GROUP
        group = groups.get(key) or groups.setdefault(
            key, ParamGroup(key, rule.lr_mult if rule else 1.0, rule.wd_mult if rule else 1.0))
        group.names.append(name)
        group.params.append(p)
    order = [r.prefix for r in rules] + [DEFAULT_GROUP]
    return [groups[k] for k in order if k in groups]


def format_table(rows: Iterable[Dict]) -> str:
    """Start-up table: group, #tensors, #params, LR, WD."""
    lines = [f"{'group':<24}{'tensors':>8}{'params':>12}{'lr':>12}{'wd':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<24}{r['tensors']:>8}{r['numel']:>12,}{r['lr']:>12.3g}{r['wd']:>10.3g}")
    return "\n".join(lines)
