"""Masked-occupancy evaluation of Phase 1 / 2 pretraining over an OpenPCDet loader: AP of masked-only
cells against every ray-cast free cell, for one or more models and the grow-visible baseline on the
same cells (eval-mode masks are fixed, so every model sees the same masks and targets).

The AP comes from fixed-size score histograms on the model's device
(:class:`~pcdet_ext.algorithms.occupancy.OccupancyAP`): memory does not grow with the split, and under
torch.distributed every process evaluates its own shard (:func:`shard_loader`) and the counts are
summed, so no rank waits on another through the whole split."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from pcdet_ext.algorithms.occupancy import HeightRangePrior, OccupancyAP, OccupancyTargets, grow_visible_scores
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.checkpointing import unwrap

GROW_VISIBLE = "grow-visible"
Scorer = Callable[[OccupancyTargets], torch.Tensor]


@torch.no_grad()
def fit_height_range_prior(model: torch.nn.Module, loader) -> HeightRangePrior:
    """The scene-blind baseline counted on ``loader``'s frames (their eval-mode masks and targets, from
    ``model``'s forward; the model's weights do not enter the counts)."""
    from pcdet.models import load_data_to_gpu
    net = unwrap(model)
    mode = net.training
    prior = HeightRangePrior()
    try:
        net.eval()
        for batch in progress(loader, desc="height x range prior"):
            load_data_to_gpu(batch)
            net(dict(batch))
            prior.observe(net.backbone_3d.forward_ret_dict["occupancy"][1])
    finally:
        net.train(mode)
    return prior


@torch.no_grad()
def masked_occupancy_ap(models: Dict[str, torch.nn.Module], loader, grow_visible: bool = True,
                        is_main: bool = True, baselines: Optional[Dict[str, Scorer]] = None
                        ) -> Dict[str, Dict[str, float]]:
    """``{name: {occ_ap, occ_ap_near, occ_ap_mid, occ_ap_far}}`` for each pretraining model (and
    ``grow-visible`` and each of ``baselines``: {name: targets -> scores}) over ``loader`` (this
    process's shard; the counts are summed over every process of the default group); each model's
    training mode is restored afterwards."""
    from pcdet.models import load_data_to_gpu
    nets = {name: unwrap(m) for name, m in models.items()}
    modes = {name: m.training for name, m in nets.items()}
    scorers = {**({GROW_VISIBLE: grow_visible_scores} if grow_visible else {}), **(baselines or {})}
    meters = {name: OccupancyAP() for name in [*nets, *scorers]}
    try:
        for m in nets.values():
            m.eval()
        for batch in progress(loader, desc="occupancy eval", main=is_main):
            load_data_to_gpu(batch)
            first = None
            for name, m in nets.items():
                m(dict(batch))
                logits, targets = m.backbone_3d.forward_ret_dict["occupancy"]
                if first is None:
                    first = targets
                elif not torch.equal(targets.positives, first.positives):
                    raise RuntimeError("models evaluated on different masks (different masking configs?)")
                meters[name].add(logits, targets)
            if first is not None:
                for name, scorer in scorers.items():
                    meters[name].add(scorer(first), first)
    finally:
        for name, m in nets.items():
            m.train(modes[name])
    for meter in meters.values():
        meter.all_reduce()
    return {name: meter.result() for name, meter in meters.items()}


def shard_loader(loader, rank: int, world_size: int):
    """``loader``'s dataset and settings over frames ``rank, rank + world_size, ...`` (every frame
    exactly once over all processes, none padded in twice)."""
    if world_size <= 1:
        return loader
    indices = list(range(rank, len(loader.dataset), world_size))
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices,
                                       num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                       pin_memory=loader.pin_memory, drop_last=False, timeout=loader.timeout,
                                       worker_init_fn=loader.worker_init_fn)
