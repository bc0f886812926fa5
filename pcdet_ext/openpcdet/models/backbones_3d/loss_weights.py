"""Loss weights of the R-MAE + CMAE models, given in ``MODEL.BACKBONE_3D`` or in a top-level
``LOSS_CONFIG`` (users' configs; a weight given in both places must agree), and what each means:

* pretraining (``PRETRAINING: True``): ``RMAE_WEIGHT``, ``TEACHER_STUDENT_WEIGHT`` and (Phase 2)
  ``MLFR_WEIGHT``, ``VOXEL_CONTRASTIVE_WEIGHT``, ``FRAME_CONTRASTIVE_WEIGHT`` weight their terms; no
  detection head trains, so ``DETECTION_WEIGHT`` may only be 0; Phase 1 has no Phase 2 terms, so
  their weights may only be 0;
* detection (``PRETRAINING: False``, fine-tuning): ``DETECTION_WEIGHT`` (default 1, > 0) weights the
  dense head's loss; the pretraining weights have no effect (a printed note says so).
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Optional

from pcdet_ext.config import ConfigError, NoneType, Opt, agree, from_cfg

PRETRAINING_WEIGHTS = ("RMAE_WEIGHT", "TEACHER_STUDENT_WEIGHT", "MLFR_WEIGHT", "VOXEL_CONTRASTIVE_WEIGHT",
                       "FRAME_CONTRASTIVE_WEIGHT")
PHASE2_WEIGHTS = PRETRAINING_WEIGHTS[2:]
LOSS_KEYS = PRETRAINING_WEIGHTS + ("DETECTION_WEIGHT",)
WHERE = "MODEL.BACKBONE_3D"
DETECTION_WEIGHT = Opt(None, (float, NoneType), lo=0.0,
                       note="fine-tuning: weight of the dense head's loss (default 1); pretraining: no head, only 0")
# Phase 1's spec of the Phase 2 weights: accepted (users' configs carry them), only 0
PHASE1_ABSENT = {k: Opt(None, (float, NoneType), lo=0.0, note="a Phase 2 term: Phase 1 has none, only 0 is accepted")
                 for k in PHASE2_WEIGHTS}


def fold_loss_config(loss_cfg: Optional[Mapping], backbone_cfg, spec: Mapping[str, Opt],
                     where: str = "LOSS_CONFIG") -> None:
    """A top-level ``LOSS_CONFIG`` (keys :data:`LOSS_KEYS`, checked with ``spec``) into ``backbone_cfg``,
    where the backbone reads them; the same key in both places with different values is an error."""
    if loss_cfg is None:
        return
    cfg = from_cfg(loss_cfg, {k: spec[k] for k in LOSS_KEYS}, where)
    for key in loss_cfg:
        backbone_cfg[key] = agree(f"{WHERE}.{key}", backbone_cfg.get(key), f"{where}.{key}", cfg[key])


def global_loss_config(section) -> Optional[Mapping]:
    """The top-level ``LOSS_CONFIG`` of OpenPCDet's global ``cfg`` when ``section`` is that config's
    ``MODEL`` or ``MODEL.BACKBONE_3D`` (a fork's stock train.py loads into it and builds from it)."""
    try:
        from pcdet.config import cfg as global_cfg
    except ImportError:
        return None
    model = global_cfg.get("MODEL") or {}
    return global_cfg.get("LOSS_CONFIG") if section is model or section is model.get("BACKBONE_3D") else None


def check_weights(cfg: Mapping, pretraining: bool, phase2: bool) -> None:
    """The rules between the weights and the mode (see the module docstring)."""
    det = cfg.get("DETECTION_WEIGHT")
    if pretraining and det:
        raise ConfigError(f"{WHERE}.DETECTION_WEIGHT (or LOSS_CONFIG.DETECTION_WEIGHT): {det}, but pretraining "
                          "(PRETRAINING: True) trains no detection head; only 0 is meaningful here")
    if not pretraining and det is not None and det <= 0:
        raise ConfigError(f"{WHERE}.DETECTION_WEIGHT (or LOSS_CONFIG.DETECTION_WEIGHT): {det}, but fine-tuning "
                          "(PRETRAINING: False) trains the dense head by this weight; expected a value > 0")
    if pretraining and not phase2:
        for key in PHASE2_WEIGHTS:
            if cfg.get(key):
                raise ConfigError(f"{WHERE}.{key} (or LOSS_CONFIG.{key}): {cfg[key]}, but RMAECMAEBackbonePhase1 has "
                                  "no such term; only 0 is accepted (Phase 2 is RMAECMAEBackbonePhase2)")


def detection_weight(cfg: Mapping) -> float:
    """The dense head's loss weight in detection mode."""
    det = cfg.get("DETECTION_WEIGHT")
    return 1.0 if det is None else float(det)


def notes(raw: Mapping, spec: Mapping[str, Opt], pretraining: bool, where: str = WHERE,
          sections: Iterable[tuple] = ()) -> List[str]:
    """One line per key given in ``raw`` whose Opt has a note (accepted for compatibility: what it means
    here), in ``raw`` and in its ``sections`` (``(key, spec)`` of nested sections); in detection mode
    one line listing the given pretraining weights, which have no effect there."""
    out: List[str] = []
    skip = set() if pretraining else set(LOSS_KEYS)  # in detection mode: the one line below
    for key, opt in spec.items():
        if opt.note and key in raw and key not in skip:
            out.append(f"note: {where}.{key} accepted: {opt.note}")
    for key, sub_spec in sections:
        sub = raw.get(key) or {}
        out += [f"note: {where}.{key}.{k} accepted: {o.note}" for k, o in sub_spec.items() if o.note and k in sub]
    given = [k for k in PRETRAINING_WEIGHTS if raw.get(k) is not None]
    if not pretraining and given:
        out.append(f"note: {where} (or LOSS_CONFIG) {', '.join(given)} accepted: no effect with PRETRAINING: False "
                   f"(fine-tuning trains the dense head's loss x DETECTION_WEIGHT {detection_weight(raw):g} only)")
    return out


def print_notes(lines: List[str]) -> None:
    """Print ``lines`` once per job (rank 0 under torch.distributed)."""
    import torch.distributed as dist
    if lines and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print("\n".join(lines), flush=True)

