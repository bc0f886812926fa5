"""Phase 1 / Phase 2 pretraining checkpoint weights -> encoder weights for fine-tuning
(tools/convert_pretrain_ckpt.py)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import ADDED_MODULES
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase2 import PHASE2_ADDED_MODULES

PRETRAIN_STATE = ("backbone_3d.mask_step", "global_step")


def convert_pretrain(weights: Dict[str, torch.Tensor], use: str = "student"
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Keep ``backbone_3d.<encoder>`` from the student, or from ``backbone_3d.teacher`` renamed onto
    the student's names, plus every non-backbone module (e.g. ``vfe``); drop the decoders (occupancy,
    MLFR with its mask tokens), teacher, projection heads, frame queue, loss balancer, masking state and
    the pretraining step counter. Returns ``(kept, dropped_keys)``."""
    if use not in ("student", "teacher"):
        raise ValueError(f"--use: expected 'student' or 'teacher', got {use!r}")
    extra = tuple(f"backbone_3d.{m}." for m in ADDED_MODULES + PHASE2_ADDED_MODULES) + PRETRAIN_STATE
    teacher = {k[len("backbone_3d.teacher."):]: v for k, v in weights.items() if k.startswith("backbone_3d.teacher.")}
    if use == "teacher" and not teacher:
        raise ValueError("--use teacher: the checkpoint has no backbone_3d.teacher.* (ENABLE_TEACHER_STUDENT was off)")
    kept, dropped = {}, []
    for key, val in weights.items():
        if key.startswith(extra) or key in extra:
            dropped.append(key)
        elif use == "teacher" and key.startswith("backbone_3d."):
            name = key[len("backbone_3d."):]
            if name not in teacher:
                raise ValueError(f"--use teacher: teacher has no {name!r} (student and teacher encoders differ)")
            kept[key] = teacher[name]
        else:
            kept[key] = val
    if not any(k.startswith("backbone_3d.") for k in kept):
        raise ValueError("no backbone_3d.* weights in the checkpoint: not an R-MAE pretraining checkpoint")
    return kept, dropped
