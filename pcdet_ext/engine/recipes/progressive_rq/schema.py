"""The ``split1_ALL.yaml`` experiment schema: defaults, validation, the stage plan (pure python).

Decisions (documented in docs/progressive_rq.md):

* ``training.max_epoch`` is the epoch budget of the whole run. Progressive mode runs
  ``num_stages = n_codebook x len(embedding_schedule)`` stages of
  ``min(embedding_stage_epochs, max_epoch // num_stages)`` epochs each (the first
  ``warmup_epochs`` of them EMA warm-up). Legacy mode runs one stage of ``max_epoch`` epochs.
* ``rq_model.codebook_size`` is the entry count of the legacy (non-progressive) mode. In
  progressive mode the schedule overrides it: entries allocated = ``max(embedding_schedule)``.
* ``training.patience``: gradient epochs without a new best validation mAP before the stage's
  learning rate is divided by 10 (again after every further ``patience`` such epochs).
  ``training.early_stopping_patience``: such epochs, counted from the plateau's first LR cut, before
  the stage stops, so the cut always gets that long to act (``patience == early_stopping_patience ==
  5``: cut after 5, stop after 10). When ``early_stopping_patience < patience`` the cut never comes
  (a printed note says so) and the stage stops after ``early_stopping_patience`` epochs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from easydict import EasyDict

from pcdet_ext.config import ConfigError, NoneType, Opt, agree, from_cfg, unknown_keys_error
from pcdet_ext.paths import from_yaml

POS = dict(lo=0, lo_open=True)   # > 0
NONNEG = dict(lo=0)              # >= 0
# accepted keys that change nothing here: Opt.note says what the tool does instead (printed by notes())
FIXED = "the final model (the last stage's best checkpoint) is what is evaluated"
SWEEP = "--eval_sweep evaluates every trained cell of the final model"
CODEBOOK_NOTE = ("no effect on training (the original script logged that term without gradient); vq_weight weights "
                 "the pull of the codebooks")

# section -> key -> Opt: default, types, choices and bounds in one place; cross-key rules in _check_values
SCHEMA: Dict[str, Dict[str, Opt]] = {
    "dataset": {"name": Opt("KITTI", (str,)), "dir": Opt(types=(str,), required=True),
                "num_classes": Opt(3, (int,), **POS),
                # frames that choose stage bests / early stopping: a held-out part of train, or val itself
                "selection": Opt("train_holdout", (str,), choices=("train_holdout", "val")),
                "selection_fraction": Opt(0.1, (float,), lo=0, hi=1, lo_open=True, hi_open=True)},
    "model": {"pre_trained_model": Opt("pointpillar", (str,), choices=("pointpillar", "pointpillars")),
              "n_codebook": Opt(5, (int,), **POS), "pretrained_weight": Opt(None, (str, NoneType)),
              "cfg_file": Opt("cfgs/kitti_models/pointpillar_rq.yaml", (str,))},
    "progressive_learning": {"enabled": Opt(True, (bool,)), "embedding_schedule": Opt([16, 32, 64, 128, 256], (list,)),
                             "embedding_stage_epochs": Opt(20, (int,), **POS), "warmup_epochs": Opt(2, (int,), **NONNEG),
                             "pretrain_ema_limit": Opt(None, (int, NoneType), lo=1)},
    "training": {"mode": Opt("train", (str,), choices=("train", "eval")), "batch_size": Opt(6, (int,), **POS),
                 "num_workers": Opt(4, (int,), **NONNEG), "max_epoch": Opt(100, (int,), **POS),
                 "init_lr": Opt(0.001, (float,), **POS), "ckpt_freq_epoch": Opt(20, (int,), **POS),
                 "patience": Opt(5, (int,), **POS), "early_stopping_patience": Opt(5, (int,), **POS),
                 "use_amp": Opt(False, (bool,))},
    "rq_model": {"latent_shape": Opt([496, 432, 64], (list,)), "code_shape": Opt([496, 432, 1], (list,)),
                 "codebook_size": Opt(64, (int,), **POS), "decay": Opt(0.99, (float,), lo=0, hi=1, lo_open=True, hi_open=True),
                 "codebook_update_mode": Opt("loss", (str,), choices=("loss", "ema"))},
    "loss_weights": {"vq_weight": Opt(0.25, (float,), **NONNEG),
                     "codebook_weight": Opt(0.1, (float,), note=CODEBOOK_NOTE, **NONNEG),
                     "det_weight": Opt(0.8, (float,), **NONNEG)},
    "evaluation": {
        "enabled": Opt(False, (bool,), note="evaluation runs with --mode eval, or with --eval_sweep after training"),
        "use_num_codebook": Opt(None, (int, NoneType), lo=1), "use_num_embedding": Opt(None, (int, NoneType), lo=1),
        "rq_ckpt": Opt(None, (str, NoneType)), "test_combinations": Opt(None, (list, NoneType)),
        "specific_evaluations": Opt(None, (list, NoneType)), "weights_path": Opt(None, (str, NoneType)),
        "rate_lambdas": Opt(None, (list, NoneType)),
        "use_full_kitti_eval": Opt(None, (str, bool, NoneType), note="the tool always runs OpenPCDet's full KITTI evaluation"),
        "checkpoint_dir": Opt(None, (str, bool, NoneType), note="checkpoints are read from <logging.saved_path>/checkpoints"),
        "eval_all_codebook_stages": Opt(None, (str, bool, NoneType), note=SWEEP),
        "eval_stage_models": Opt(None, (str, bool, NoneType), note=SWEEP),
        "eval_final_model": Opt(None, (str, bool, NoneType), note=FIXED),
        "use_final_checkpoints_only": Opt(None, (str, bool, NoneType), note=FIXED),
        "use_last_stage_for_all": Opt(None, (str, bool, NoneType),
                                      note="every cell is evaluated from the last stage's best checkpoint"),
        "eval_compression_analysis": Opt(None, (str, bool, NoneType),
                                         note="the rate table (fixed-length / entropy KB per frame) is always printed"),
        "visualize_codebook_hierarchy": Opt(None, (str, bool, NoneType),
                                            note="not produced; the sweep writes sweep.png (rate vs accuracy)")},
    "logging": {"use_wandb": Opt(True, (bool,)), "wandb_project": Opt("pcdet_ext_rq", (str,)),
                "wandb_name": Opt(None, (str, NoneType)), "log_freq": Opt(8, (int,), **POS),
                "saved_path": Opt("../progressive_rq_logs", (str,)), "save_stage_weights": Opt(True, (bool,)),
                "save_detailed_results": Opt(None, (bool, NoneType), note="the sweep always writes sweep.csv and sweep.json")},
    "hardware": {"gpu": Opt(0, (int, NoneType))},
}
# keys that name files or folders: relative in a YAML file -> <root>/tools, given with --set or a flag -> the
# working directory (pcdet_ext.paths); made absolute once, when the experiment is loaded
PATH_KEYS = (("dataset", "dir"), ("model", "pretrained_weight"), ("logging", "saved_path"),
             ("evaluation", "rq_ckpt"), ("evaluation", "weights_path"))
# users' experiment and evaluation files: top-level keys, and free-form sections accepted and reported
TOP_LEVEL = {"seed": Opt(None, (int, NoneType)), "save_stage_weights": Opt(None, (bool, NoneType))}
FREE_SECTIONS = ("hyperparameters", "pre-trained_model", "wandb")


def validate(raw: Dict[str, Any], check_paths: bool = True) -> EasyDict:
    """Fill defaults and check every key; raises :class:`ConfigError` before any work starts. A relative
    path in ``raw`` (:data:`PATH_KEYS`) is one written in a YAML file (:func:`pcdet_ext.paths.from_yaml`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    known = list(SCHEMA) + list(TOP_LEVEL) + list(FREE_SECTIONS)
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise unknown_keys_error("experiment config (sections)", unknown, known)
    raw = _none_strings(raw)
    cfg = EasyDict({section: from_cfg(raw.get(section), keys, section) for section, keys in SCHEMA.items()})
    top = from_cfg({k: raw[k] for k in TOP_LEVEL if k in raw}, TOP_LEVEL, "experiment config")
    cfg.seed = top.seed
    if top.save_stage_weights is not None:  # a top-level save_stage_weights is logging.save_stage_weights
        given = (raw.get("logging") or {}).get("save_stage_weights")
        cfg.logging.save_stage_weights = agree("logging.save_stage_weights", given, "save_stage_weights",
                                               top.save_stage_weights)
    ev = cfg.evaluation
    ev.rq_ckpt = agree("evaluation.rq_ckpt", ev.rq_ckpt, "evaluation.weights_path", ev.weights_path)
    ev.test_combinations = cells(agree("evaluation.test_combinations", ev.test_combinations,
                                       "evaluation.specific_evaluations", ev.specific_evaluations))
    ev.rate_lambdas = lambdas(ev.rate_lambdas, "evaluation.rate_lambdas")
    for section, key in PATH_KEYS:
        if isinstance(cfg[section][key], str) and cfg[section][key]:
            cfg[section][key] = str(from_yaml(cfg[section][key]))
    _check_values(cfg)
    if check_paths:
        _check_paths(cfg)
    return cfg


def _none_strings(raw: Dict[str, Any]) -> Dict[str, Any]:
    """YAML ``None`` written as a string (``pretrain_ema_limit: None``) read as null."""
    def fix(v):
        return None if isinstance(v, str) and v.strip().lower() in ("none", "null", "~") else v
    return {k: ({kk: fix(vv) for kk, vv in v.items()} if isinstance(v, dict) else fix(v)) for k, v in raw.items()}


def cells(value) -> Optional[List[List[int]]]:
    """``[[codebooks, entries], ...]`` from ``evaluation.test_combinations`` (None: every trained cell)."""
    if value is None:
        return None
    ok = isinstance(value, list) and all(isinstance(c, (list, tuple)) and len(c) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c) for c in value)
    if not ok or not value:
        raise ConfigError(f"evaluation.test_combinations: expected a list of [codebooks, entries] pairs of "
                          f"positive ints, got {value!r}")
    return [list(c) for c in value]


def lambdas(value, where: str) -> List[float]:
    """Rate-aware coding lambdas (numbers >= 0; none: []) for the sweep's rate/accuracy curve."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"{where}: expected a list of numbers >= 0 (distortion per bit, in units of the frame's "
                          f"mean squared feature norm), got {value!r}")
    return [float(v) for v in value]


def notes(raw: Dict[str, Any], cfg: EasyDict) -> List[str]:
    """One line per accepted key that changes nothing here (what the tool does instead), per free-form
    section, and for a max_epoch that shortens the stages."""
    out = [f"note: section {s!r} accepted; not used by this tool" for s in FREE_SECTIONS if s in raw]
    for section, keys in SCHEMA.items():
        for key, opt in keys.items():
            if opt.note and (raw.get(section) or {}).get(key) is not None:
                out.append(f"note: {section}.{key} accepted: {opt.note}")
    tr = cfg.training
    if tr.early_stopping_patience < tr.patience:
        out.append(f"note: training.early_stopping_patience {tr.early_stopping_patience} < patience {tr.patience}: "
                   f"a stage stops before its learning rate is ever cut")
    pl = cfg.progressive_learning
    if pl.enabled and stage_epochs(cfg) < pl.embedding_stage_epochs:
        out.append(f"note: training.max_epoch {cfg.training.max_epoch} over {num_stages(cfg)} stages leaves "
                   f"{stage_epochs(cfg)} epochs per stage, not embedding_stage_epochs {pl.embedding_stage_epochs} "
                   f"(raise max_epoch to {num_stages(cfg) * pl.embedding_stage_epochs} for the full plan)")
    return out


def describe_loss(cfg: EasyDict) -> str:
    """What each loss weight does in gradient epochs (printed at start-up)."""
    w = cfg.loss_weights
    return (f"loss = det_weight {w.det_weight:g} x detection loss (OpenPCDet's head loss through the frozen tail) "
            f"+ vq_weight {w.vq_weight:g} x VQ loss (mean squared distance of each residual to its chosen entry: "
            f"pulls the trainable codebooks to the features, and commits an adapter when there is one); "
            f"codebook_weight {w.codebook_weight:g}: no effect (the original script logged that term without "
            f"gradient). EMA warm-up epochs train by EMA, not by this loss")


def _check_values(cfg: EasyDict) -> None:
    """The rules between keys (each key's own type and range are its Opt's)."""
    sched = cfg.progressive_learning.embedding_schedule
    if not sched or not all(isinstance(s, int) and not isinstance(s, bool) for s in sched):
        raise ConfigError(f"progressive_learning.embedding_schedule: expected a list of ints, got {sched!r}")
    if any(b <= a for a, b in zip(sched, sched[1:])) or sched[0] < 1:
        raise ConfigError(f"progressive_learning.embedding_schedule: expected strictly increasing sizes >= 1, got {sched}")
    if sched[-1] > 256:
        raise ConfigError(f"progressive_learning.embedding_schedule: sizes above 256 are not supported, got {sched}")
    pl = cfg.progressive_learning
    ema_only = cfg.rq_model.codebook_update_mode == "ema"
    if pl.warmup_epochs >= pl.embedding_stage_epochs and not ema_only:
        raise ConfigError(f"progressive_learning.warmup_epochs: expected 0 <= warmup_epochs < embedding_stage_epochs "
                          f"({pl.embedding_stage_epochs}), got {pl.warmup_epochs}")
    for key in ("latent_shape", "code_shape"):
        shape = cfg.rq_model[key]
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ConfigError(f"rq_model.{key}: expected 3 positive ints [H, W, C], got {shape}")
    latent, code = cfg.rq_model.latent_shape, cfg.rq_model.code_shape
    if list(code) != [latent[0], latent[1], 1]:
        raise ConfigError(f"rq_model.code_shape: {list(code)}, but one code per BEV cell and codebook of "
                          f"rq_model.latent_shape {list(latent)} is {[latent[0], latent[1], 1]}")
    if stage_epochs(cfg) < pl.warmup_epochs + 1 and pl.enabled and not ema_only:
        raise ConfigError(f"training.max_epoch: {cfg.training.max_epoch} epochs over {num_stages(cfg)} stages leaves "
                          f"{stage_epochs(cfg)} per stage, fewer than warmup_epochs + 1 = {pl.warmup_epochs + 1}")


def _check_paths(cfg: EasyDict) -> None:
    data = Path(cfg.dataset.dir)
    if not data.is_dir():
        raise ConfigError(f"dataset.dir: {data} is not a directory")
    if cfg.training.mode == "train":
        if cfg.model.pretrained_weight is None:
            raise ConfigError("model.pretrained_weight: required for training (the trained PointPillars "
                              "checkpoint whose frozen head and tail surround the bottleneck)")
        weight = Path(cfg.model.pretrained_weight)
        if not weight.is_file():
            raise ConfigError(f"model.pretrained_weight: {weight} does not exist")


def set_overrides(cfg_dict: Dict[str, Any], pairs: List[str]) -> Dict[str, Any]:
    """Apply ``section.key VALUE`` overrides (YAML-parsed values) to a raw config dict."""
    if len(pairs) % 2:
        raise ConfigError(f"--set takes KEY VALUE pairs, got an odd number of items: {pairs}")
    out = copy.deepcopy(cfg_dict)
    for key, raw in zip(pairs[0::2], pairs[1::2]):
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in SCHEMA or parts[1] not in SCHEMA[parts[0]]:
            raise ConfigError(f"--set {key}: not a key of the experiment schema (section.key)")
        out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw)
    return out


def plateau_cut(bad_epochs: int, patience: int) -> bool:
    """Divide the stage's LR by 10 now? After every ``patience`` gradient epochs in a row without a new
    best validation mAP (the best counts EMA epochs too); ``patience`` 0 acts as 1."""
    return bad_epochs >= 1 and bad_epochs % max(patience, 1) == 0


def early_stop(bad_epochs: int, patience: int, early_stopping_patience: int) -> bool:
    """Stop the stage now? After ``early_stopping_patience`` gradient epochs without a new best counted
    from the plateau's first LR cut (after ``patience`` of them), or from the best when
    ``early_stopping_patience < patience`` (no cut comes first). Takes precedence over a cut due in the
    same epoch."""
    first_cut = max(patience, 1)
    return bad_epochs >= (first_cut if first_cut <= early_stopping_patience else 0) + early_stopping_patience


# ---- the stage plan -----------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    codebook: int          # 1-based, as in the checkpoint names
    stage: int             # 1-based index within the codebook's schedule
    num_embeddings: int
    warmup_epochs: int     # EMA warm-up epochs
    gradient_epochs: int

    @property
    def epochs(self) -> int:
        return self.warmup_epochs + self.gradient_epochs


def num_stages(cfg: EasyDict) -> int:
    if not cfg.progressive_learning.enabled:
        return 1
    return cfg.model.n_codebook * len(cfg.progressive_learning.embedding_schedule)


def stage_epochs(cfg: EasyDict) -> int:
    if not cfg.progressive_learning.enabled:
        return cfg.training.max_epoch
    return min(cfg.progressive_learning.embedding_stage_epochs, cfg.training.max_epoch // num_stages(cfg))


def allocated_entries(cfg: EasyDict) -> int:
    if cfg.progressive_learning.enabled:
        return max(cfg.progressive_learning.embedding_schedule)
    return cfg.rq_model.codebook_size


def stage_plan(cfg: EasyDict) -> List[Stage]:
    """Every stage in order. Legacy mode: one stage, all codebooks at ``codebook_size``."""
    pl = cfg.progressive_learning
    if not pl.enabled:
        warm = cfg.training.max_epoch if cfg.rq_model.codebook_update_mode == "ema" else \
            min(pl.warmup_epochs, cfg.training.max_epoch - 1)
        return [Stage(cfg.model.n_codebook, 1, cfg.rq_model.codebook_size, warm, cfg.training.max_epoch - warm)]
    per = stage_epochs(cfg)
    warm = per if cfg.rq_model.codebook_update_mode == "ema" else pl.warmup_epochs  # EMA only: no gradient epochs
    return [Stage(c, s, k, warm, per - warm)
            for c in range(1, cfg.model.n_codebook + 1)
            for s, k in enumerate(pl.embedding_schedule, 1)]


def describe_plan(cfg: EasyDict) -> str:
    plan = stage_plan(cfg)
    lines = [f"stage plan ({'progressive' if cfg.progressive_learning.enabled else 'legacy: all codebooks together'}), "
             f"{sum(s.epochs for s in plan)} epochs of max_epoch={cfg.training.max_epoch}, "
             f"{allocated_entries(cfg)} entries allocated per codebook:"]
    for st in plan:
        lines.append(f"  codebook {st.codebook} stage {st.stage}: {st.num_embeddings:3d} entries, "
                     f"{st.warmup_epochs} EMA warm-up + {st.gradient_epochs} gradient epochs")
    if cfg.progressive_learning.enabled and cfg.rq_model.codebook_size != allocated_entries(cfg):
        lines.append(f"  (rq_model.codebook_size={cfg.rq_model.codebook_size} applies to legacy mode only; "
                     f"the schedule sets the sizes here)")
    return "\n".join(lines)
