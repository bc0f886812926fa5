"""Masked-occupancy evaluation of Phase 1 pretraining over an OpenPCDet loader: AP of masked-only
cells against ray-cast free space, pooled over every frame, for one or more models and the
grow-visible baseline on the same cells (eval-mode masks are fixed, so every model sees the same
masks and targets)."""
from __future__ import annotations

from typing import Dict

import torch

from pcdet_ext.algorithms.occupancy import ap_samples, grow_visible_scores, pooled_ap
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.checkpointing import unwrap

GROW_VISIBLE = "grow-visible"


@torch.no_grad()
def masked_occupancy_ap(models: Dict[str, torch.nn.Module], loader, grow_visible: bool = True,
                        max_negatives: int = 400000) -> Dict[str, Dict[str, float]]:
    """``{name: {occ_ap, occ_ap_near, occ_ap_mid, occ_ap_far}}`` for each pretraining model (and
    ``grow-visible``); each model's training mode is restored afterwards."""
    from pcdet.models import load_data_to_gpu
    nets = {name: unwrap(m) for name, m in models.items()}
    modes = {name: m.training for name, m in nets.items()}
    samples = {name: [] for name in [*nets, *([GROW_VISIBLE] if grow_visible else [])]}
    try:
        for m in nets.values():
            m.eval()
        for i, batch in enumerate(progress(loader, desc="occupancy eval")):
            load_data_to_gpu(batch)
            first = None
            for name, m in nets.items():
                m(dict(batch))
                logits, targets = m.backbone_3d.forward_ret_dict["occupancy"]
                if first is None:
                    first = targets
                elif not torch.equal(targets.positives, first.positives):
                    raise RuntimeError("models evaluated on different masks (different masking configs?)")
                samples[name].append(ap_samples(logits, targets, max_negatives, torch.Generator().manual_seed(i)))
            if grow_visible and first is not None:
                samples[GROW_VISIBLE].append(ap_samples(grow_visible_scores(first), first, max_negatives,
                                                        torch.Generator().manual_seed(i)))
    finally:
        for name, m in nets.items():
            m.train(modes[name])
    return {name: pooled_ap(parts) for name, parts in samples.items() if parts}
