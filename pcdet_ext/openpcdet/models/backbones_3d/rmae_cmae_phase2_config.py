"""``MODEL.BACKBONE_3D`` of ``RMAECMAEBackbonePhase2``: Phase 1's keys plus the Phase 2 sections
(users' keys with their meaning; new keys with defaults so users' configs run unchanged).

Sections: ``MLFR_CONFIG`` (scales ``scale_k`` = ``x_convk``, per-scale weights, loss, decoder depth),
``VOXEL_CONTRASTIVE_CONFIG``, ``FRAME_CONTRASTIVE_CONFIG``, ``MOMENTUM_SCHEDULE``; the weights
``MLFR_WEIGHT``, ``VOXEL_CONTRASTIVE_WEIGHT``, ``FRAME_CONTRASTIVE_WEIGHT``; ``LOSS_BALANCING``.
A top-level ``LOSS_CONFIG`` may give the weights too (a value given in both places must agree;
:mod:`.loss_weights`).
"""
from __future__ import annotations

import re
from typing import Dict, List

from easydict import EasyDict

from pcdet_ext.algorithms.loss_balancing import MODES
from pcdet_ext.algorithms.mlfr import LOSSES
from pcdet_ext.config import ConfigError, NoneType, Opt, agree, from_cfg
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import BACKBONE_SPEC

DEFAULT_MLFR_SCALES = ["x_conv2", "x_conv3", "x_conv4"]
DOMAIN_NOTE = ("no effect: pretraining is self-supervised, ground-truth classes never enter it (frames are contrasted "
               "by identity and drive sequence only)")
_WEIGHT = dict(types=(float,), lo=0.0)

MLFR_SPEC = {
    "ENABLE_MLFR": Opt(None, (bool, NoneType), note="same as BACKBONE_3D.ENABLE_MLFR (they must agree)"),
    "MLFR_SCALES": Opt(None, (list, tuple, NoneType)),
    "MLFR_LOSS_WEIGHTS": Opt(None, (dict, NoneType)),
    "LOSS": Opt("smooth_l1", (str,), choices=LOSSES),
    "VISIBLE_WEIGHT": Opt(0.0, **_WEIGHT),
    "DECODER_BLOCKS": Opt(1, (int,), lo=0),
    "DECODER_CHANNELS": Opt(32, (int,), lo=1),  # at most; a scale with fewer channels keeps its own
}
VOXEL_CONTRASTIVE_SPEC = {
    "CONTRASTIVE_TEMPERATURE": Opt(0.07, (float,), lo=0.0, lo_open=True),
    "FEATURE_DIM": Opt(None, (int, NoneType), lo=1,
                       note="informational: the heads take the contrast scale's own channel count"),
    "PROJECTION_DIM": Opt(128, (int,), lo=1),
    "MAX_NEGATIVE_SAMPLES": Opt(4096, (int,), lo=2),
    "ENABLE_HARD_NEGATIVE_MINING": Opt(False, (bool,)),
    "HARD_NEGATIVE_RATIO": Opt(0.3, (float,), lo=0.0, lo_open=True, hi=1.0),
    "COORD_TOLERANCE": Opt(0, (int,), choices=(0,), note="positives are the same voxel site"),
    "RELATIONAL_WEIGHT": Opt(0.2, (float,), lo=0.0, hi=1.0),
    "RELATIONAL_TEMPERATURE": Opt(0.1, (float,), lo=0.0, lo_open=True),
    "SCALE": Opt(None, (str, NoneType)),  # default: the encoder's deepest multi-scale feature
}
FRAME_CONTRASTIVE_SPEC = {
    "FRAME_TEMPERATURE": Opt(0.1, (float,), lo=0.0, lo_open=True),
    "MAX_FRAME_NEGATIVES": Opt(1024, (int,), lo=1),
    "MEMORY_BANK_SIZE": Opt(4096, (int,), lo=1),
    "MOMENTUM_UPDATE": Opt(0.99, (float,), lo=0.0, hi=1.0),
    "PROJECTION_DIM": Opt(128, (int,), lo=1),
    "SEQUENCE_WINDOW": Opt(10, (int, NoneType), lo=0),
    "FEATURE_DIM": Opt(None, (int, NoneType), lo=1,
                       note="informational: the frame head takes the contrast scale's own channel count"),
    "ENABLE_HARD_NEGATIVE_MINING": Opt(False, (bool,)),
    "HARD_NEGATIVE_RATIO": Opt(0.3, (float,), lo=0.0, lo_open=True, hi=1.0),
    # users' configs: a label-conditioned frame contrast would leak ground truth into self-supervised
    # pretraining, so these select nothing; EQUIPMENT_TYPES must still name classes of CLASS_NAMES
    "ENABLE_DOMAIN_SPECIFIC": Opt(False, (bool,), note=DOMAIN_NOTE),
    "EQUIPMENT_TYPES": Opt(None, (list, NoneType), note=DOMAIN_NOTE + "; must be a subset of CLASS_NAMES"),
}
MOMENTUM_SPEC = {
    "NAME": Opt("cosine", (str,), choices=("cosine", "constant")),
    "START": Opt(None, (float, NoneType), lo=0.0, hi=1.0),  # default: TEACHER_MOMENTUM
    "END": Opt(1.0, (float,), lo=0.0, hi=1.0),
}
PHASE2_SPEC = {
    **BACKBONE_SPEC,
    "TEACHER_STUDENT_MODE": Opt("phase2", (str,), choices=("phase2",),
                                note="Phase 2: MLFR + hierarchical contrast (the only mode of this class)"),
    "ENABLE_MLFR": Opt(True, (bool,)),
    "MLFR_WEIGHT": Opt(1.0, **_WEIGHT),
    "MLFR_CONFIG": Opt(None, (dict, NoneType)),
    "ENABLE_VOXEL_CONTRASTIVE": Opt(True, (bool,)),
    "VOXEL_CONTRASTIVE_WEIGHT": Opt(0.6, **_WEIGHT),
    "VOXEL_CONTRASTIVE_CONFIG": Opt(None, (dict, NoneType)),
    "ENABLE_FRAME_CONTRASTIVE": Opt(True, (bool,)),
    "FRAME_CONTRASTIVE_WEIGHT": Opt(0.3, **_WEIGHT),
    "FRAME_CONTRASTIVE_CONFIG": Opt(None, (dict, NoneType)),
    "MOMENTUM_SCHEDULE": Opt(None, (dict, NoneType)),
    "LOSS_BALANCING": Opt("fixed", (str,), choices=MODES),
}
SECTIONS = (("MLFR_CONFIG", MLFR_SPEC), ("VOXEL_CONTRASTIVE_CONFIG", VOXEL_CONTRASTIVE_SPEC),
            ("FRAME_CONTRASTIVE_CONFIG", FRAME_CONTRASTIVE_SPEC), ("MOMENTUM_SCHEDULE", MOMENTUM_SPEC))
_SCALE = re.compile(r"^(?:scale_|x_conv)(\d+)$")


def scale_name(name, where: str) -> str:
    """Users' ``scale_k`` (or ``x_convk``) as the encoder's ``x_convk``."""
    m = _SCALE.match(str(name))
    if not m:
        raise ConfigError(f"{where}: expected scale names scale_1..scale_4 (= x_conv1..x_conv4), got {name!r}")
    return f"x_conv{int(m.group(1))}"


def parse_phase2_sections(cfg: EasyDict) -> EasyDict:
    """The nested Phase 2 sections of an already top-level-checked ``cfg``, validated; MLFR scales
    as ``x_convk`` with their weights (default 1.0)."""
    where = "MODEL.BACKBONE_3D"
    mlfr = from_cfg(cfg.MLFR_CONFIG, MLFR_SPEC, f"{where}.MLFR_CONFIG")
    agree(f"{where}.ENABLE_MLFR", cfg.ENABLE_MLFR, f"{where}.MLFR_CONFIG.ENABLE_MLFR", mlfr.ENABLE_MLFR)
    scales: List[str] = [scale_name(s, f"{where}.MLFR_CONFIG.MLFR_SCALES")
                         for s in (mlfr.MLFR_SCALES if mlfr.MLFR_SCALES is not None else DEFAULT_MLFR_SCALES)]
    if len(set(scales)) != len(scales) or (cfg.ENABLE_MLFR and not scales):
        raise ConfigError(f"{where}.MLFR_CONFIG.MLFR_SCALES: expected distinct scales, at least one, got {scales}")
    weights: Dict[str, float] = {}
    for key, val in (mlfr.MLFR_LOSS_WEIGHTS or {}).items():
        weights[scale_name(key, f"{where}.MLFR_CONFIG.MLFR_LOSS_WEIGHTS")] = Opt(**_WEIGHT).check(
            f"{where}.MLFR_CONFIG.MLFR_LOSS_WEIGHTS.{key}", val)
    mlfr.SCALES = scales
    mlfr.SCALE_WEIGHTS = {s: weights.get(s, 1.0) for s in scales}
    if cfg.ENABLE_MLFR and sum(mlfr.SCALE_WEIGHTS.values()) <= 0:
        raise ConfigError(f"{where}.MLFR_CONFIG.MLFR_LOSS_WEIGHTS: every configured scale weighs 0")
    frame = from_cfg(cfg.FRAME_CONTRASTIVE_CONFIG, FRAME_CONTRASTIVE_SPEC, f"{where}.FRAME_CONTRASTIVE_CONFIG")
    types = frame.EQUIPMENT_TYPES or []
    if not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{where}.FRAME_CONTRASTIVE_CONFIG.EQUIPMENT_TYPES: expected a list of class names, got {types!r}")
    return EasyDict(MLFR=mlfr, MOMENTUM=from_cfg(cfg.MOMENTUM_SCHEDULE, MOMENTUM_SPEC, f"{where}.MOMENTUM_SCHEDULE"),
                    VOXEL=from_cfg(cfg.VOXEL_CONTRASTIVE_CONFIG, VOXEL_CONTRASTIVE_SPEC,
                                   f"{where}.VOXEL_CONTRASTIVE_CONFIG"),
                    FRAME=frame)


def check_equipment_types(model_cfg, class_names) -> None:
    """``FRAME_CONTRASTIVE_CONFIG.EQUIPMENT_TYPES`` within ``class_names`` (they select nothing, but a
    name outside the classes is a mistake worth naming)."""
    types = ((model_cfg or {}).get("FRAME_CONTRASTIVE_CONFIG") or {}).get("EQUIPMENT_TYPES") or []
    bad = [t for t in types if t not in list(class_names)]
    if bad:
        raise ConfigError(f"MODEL.BACKBONE_3D.FRAME_CONTRASTIVE_CONFIG.EQUIPMENT_TYPES: {bad} not in CLASS_NAMES "
                          f"{list(class_names)}")
