"""A learned keep/drop of pillars (:class:`PillarGate`) on a trained PointPillarRQ in sparse mode, detector and
codebooks frozen: trained on the detection loss + ``rate_weight`` x the KB per frame the kept pillars cost
(their codes' bits under the fitted models + the measured occupancy bits of a pillar), evaluated with the
dropped pillars removed from what is coded and scattered (measured bytes: they are neither coded nor in
the occupancy). An experiment of the rate study: the edge runtime does not apply a gate.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Sequence

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import ProbabilityModels, encode_frame, read_header
from pcdet_ext.algorithms.pillar_gate import PillarGate, kept_bits
from pcdet_ext.deploy.runtime import grid_geometry, head_features
from pcdet_ext.engine.loop.runner import Hook, Runner, openpcdet_forward
from pcdet_ext.engine.recipes.progressive_rq.measured import codebook_array


def occupancy_bits_per_pillar(model, dataset, frames: Sequence[np.ndarray], models: ProbabilityModels, k: int
                              ) -> float:
    """Occupancy bits per pillar of ``frames`` as the coder writes them at the quantizer's active cell."""
    geo, model_id = grid_geometry(dataset), models.identifier(codebook_array(model.quantizer))
    bits = pillars = 0
    model.eval()
    with torch.no_grad():
        for points in frames:
            feats, cells = head_features(model, dataset, points, geo)
            data = encode_frame(cells, model.quantizer.encode(feats).cpu().numpy(), k, models, model_id)
            bits += 32 * read_header(data)["occ_words"]
            pillars += len(cells)
    return bits / max(pillars, 1)


def code_bits(models: ProbabilityModels, k: int, occupancy_bits: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """codes [N, n] -> bits [N] a pillar costs: its codes' order-0 bits under ``models`` + ``occupancy_bits``."""
    tables = [torch.from_numpy(-np.log2(models.code_probs(c, k))).float() for c in range(models.code_counts[k].shape[0])]

    def bits(codes: torch.Tensor) -> torch.Tensor:
        total = torch.full((codes.shape[0],), float(occupancy_bits), device=codes.device)
        for c in range(codes.shape[1]):
            total = total + tables[c].to(codes.device)[codes[:, c]]
        return total
    return bits


@contextlib.contextmanager
def gated(model, gate: PillarGate, bits: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Dict]:
    """Within: ``gate`` is the model's ``pillar_gate`` and scores the features entering the bottleneck. With
    the model in eval mode dropped pillars leave ``pillar_features``, ``voxel_coords`` and ``rq_codes`` (what is coded and
    scattered); in training the quantized features are multiplied by the straight-through gate and the
    yielded dict holds ``rate`` (KB per frame of the kept pillars, :func:`kept_bits`) and ``kept`` (share)."""
    if model.rq_cfg.MODE != "sparse":
        raise ValueError("keep/drop of pillars needs RQ_BOTTLENECK.MODE sparse")
    state: Dict = {}

    def before(module, args):
        state["feats"] = args[0]["pillar_features"]

    def after(module, args, batch):
        keep, gate_value = gate(state.pop("feats"), batch["voxel_coords"][:, 0].long())
        if model.training:  # the model trains (the bottleneck itself stays in eval mode: _FrozenBottleneck)
            batch["pillar_features"] = batch["pillar_features"] * gate_value[:, None]
            state["rate"] = kept_bits(gate_value, bits(batch["rq_codes"]), int(batch["batch_size"]))
        else:
            for key in ("pillar_features", "voxel_coords", "rq_codes"):
                batch[key] = batch[key][keep]
        state["kept"] = keep.float().mean().detach()
        return batch

    model.add_module("pillar_gate", gate)
    handles = [model.rq_bottleneck.register_forward_pre_hook(before), model.rq_bottleneck.register_forward_hook(after)]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
        del model.pillar_gate


class _FrozenBottleneck(Hook):
    """The quantizer stays in eval mode (no EMA update, no restart) while the model trains."""

    def before_step(self, runner: Runner) -> None:
        runner.model.rq_bottleneck.eval()


def train_gate(model, gate: PillarGate, loader, bits: Callable[[torch.Tensor], torch.Tensor], rate_weight: float,
               steps: int, lr: float = 1e-3) -> list:
    """``steps`` iterations training only ``gate`` on detection loss + ``rate_weight`` x KB per frame kept;
    returns the losses."""
    if rate_weight < 0:
        raise ValueError(f"rate_weight must be >= 0, got {rate_weight}")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    detection = openpcdet_forward()
    try:
        with gated(model, gate, bits) as state:
            def forward(m, batch):
                loss, tb_dict, disp_dict = detection(m, batch)
                tb_dict.update(kb_kept=state["rate"].detach(), kept=state["kept"])
                return loss + rate_weight * state["rate"], tb_dict, disp_dict
            optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
            return Runner(model, optimizer, hooks=[_FrozenBottleneck()], forward=forward).run_steps(loader, steps)
    finally:
        for p in frozen:
            p.requires_grad_(True)
