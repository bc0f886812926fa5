"""Occupancy reconstruction of masked voxels (pure torch).

The decoder is dense at a coarse stride: the encoder's sparse output (any depth, e.g. VoxelNeXt's
2D BEV tensor or SECOND's ``conv_out``) is reduced per voxel, scattered to a BEV map with its
height cells as channels, upsampled by 2x transposed convs to ``TARGET_STRIDE_XY`` and read out as
one logit per (height bin, BEV cell) at ``TARGET_STRIDE_Z``. Unlike a submanifold decoder it
predicts cells the student never saw.

Targets live on that coarse grid. A cell is **positive** when it holds masked voxels and no visible
one (only the hidden geometry explains it); cells holding a visible voxel are left out of loss and
metrics (no reward for copying the input). **Negatives** are sampled empty cells: a share right
next to positives (hard, near-surface free space) and the rest uniformly over the grid. The loss
(BCE or focal) averages positives and negatives separately and weighs them equally, so trivially
empty space cannot dominate. Precision / recall / IoU are computed densely over every cell without
a visible voxel (positives vs all empty cells).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Opt, from_cfg


@dataclass
class OccupancyConfig:
    target_stride_xy: int = 2
    target_stride_z: int = 2
    reduce_channels: int = 16
    hidden_channels: int = 64
    loss: str = "bce"                 # bce | focal
    focal_gamma: float = 2.0
    neg_per_pos: float = 2.0
    hard_neg_share: float = 0.25
    min_negatives: int = 1024

    @classmethod
    def from_cfg(cls, cfg) -> "OccupancyConfig":
        """From ``BACKBONE_3D.OCCUPANCY_DECODER`` (UPPER-CASE keys of the fields); errors name the key."""
        out = from_cfg(cfg, OCCUPANCY_SPEC, WHERE)
        return cls(**{k.lower(): v for k, v in out.items()})

    def validate(self) -> None:
        """Every field against :data:`OCCUPANCY_SPEC` (for configs built in code)."""
        for f in fields(self):
            OCCUPANCY_SPEC[f.name.upper()].check(f"{WHERE}.{f.name.upper()}", getattr(self, f.name))


WHERE = "MODEL.BACKBONE_3D.OCCUPANCY_DECODER"
_POS_INT = dict(types=(int,), lo=1)
_CHECKS = {"target_stride_xy": _POS_INT, "target_stride_z": _POS_INT, "reduce_channels": _POS_INT,
           "hidden_channels": _POS_INT, "min_negatives": _POS_INT, "loss": dict(types=(str,), choices=("bce", "focal")),
           "focal_gamma": dict(types=(float,), lo=0.0), "neg_per_pos": dict(types=(float,), lo=0.0, lo_open=True),
           "hard_neg_share": dict(types=(float,), lo=0.0, hi=1.0)}
OCCUPANCY_SPEC = {f.name.upper(): Opt(f.default, **_CHECKS[f.name]) for f in fields(OccupancyConfig)}


def sparse_to_bev(features: torch.Tensor, indices: torch.Tensor, spatial_shape: Sequence[int],
                  batch_size: int) -> torch.Tensor:
    """Sparse voxels ``features`` [M, C] at ``indices`` [M, 4] (b, z, y, x) or [M, 3] (b, y, x) ->
    dense BEV [B, C x D, H, W] (height cells stacked as channels; empty cells 0)."""
    shape = list(spatial_shape)
    depth, (h, w) = (shape[0] if len(shape) == 3 else 1), shape[-2:]
    idx = indices.long()
    z = idx[:, 1] if idx.shape[1] == 4 else torch.zeros_like(idx[:, 0])
    dense = features.new_zeros(batch_size, depth, h, w, features.shape[1])
    dense[idx[:, 0], z, idx[:, -2], idx[:, -1]] = features
    return dense.permute(0, 4, 1, 2, 3).reshape(batch_size, -1, h, w)


class OccupancyDecoder(nn.Module):
    """Sparse encoder output (stride ``input_stride``, ``input_depth`` height cells) -> occupancy
    logits [B, Dt, Ht, Wt] on the target grid of a ``full_shape`` (D, H, W) voxel grid."""

    def __init__(self, cfg: OccupancyConfig, input_channels: int, input_depth: int, input_stride: int,
                 full_shape: Sequence[int]):
        super().__init__()
        cfg.validate()
        ups = input_stride / cfg.target_stride_xy
        if ups < 1 or ups != 2 ** round(math.log2(ups)):
            raise ValueError(f"OCCUPANCY_DECODER.TARGET_STRIDE_XY: {cfg.target_stride_xy} must be the encoder "
                             f"output stride {input_stride} divided by a power of two")
        self.cfg = cfg
        self.target_shape = target_shape(full_shape, cfg.target_stride_z, cfg.target_stride_xy)
        hid = cfg.hidden_channels
        self.reduce = nn.Linear(input_channels, cfg.reduce_channels)
        layers = [nn.Conv2d(cfg.reduce_channels * input_depth, hid, 3, padding=1, bias=False),
                  nn.BatchNorm2d(hid), nn.ReLU(inplace=True)]
        for _ in range(round(math.log2(ups))):
            layers += [nn.ConvTranspose2d(hid, hid, 2, stride=2, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.logits = nn.Conv2d(hid, self.target_shape[0], 1)
        prior = 1.0 / (1.0 + cfg.neg_per_pos)  # share of positives among the cells the loss sees
        nn.init.constant_(self.logits.bias, math.log(prior / (1 - prior)))

    def forward(self, features: torch.Tensor, indices: torch.Tensor, spatial_shape: Sequence[int],
                batch_size: int) -> torch.Tensor:
        bev = sparse_to_bev(self.reduce(features), indices, spatial_shape, batch_size)
        out = self.logits(self.body(bev))
        _, ht, wt = self.target_shape
        out = out[..., :ht, :wt]
        if out.shape[-2] < ht or out.shape[-1] < wt:  # odd grids: the encoder rounded down
            out = F.pad(out, (0, wt - out.shape[-1], 0, ht - out.shape[-2]), mode="replicate")
        return out


def target_shape(full_shape: Sequence[int], stride_z: int, stride_xy: int) -> Tuple[int, int, int]:
    d, h, w = (int(s) for s in full_shape)
    return -(-d // stride_z), -(-h // stride_xy), -(-w // stride_xy)


@dataclass
class OccupancyTargets:
    occupied: torch.Tensor     # [B * Dt * Ht * Wt] bool, any voxel (visible or masked)
    visible: torch.Tensor      # same, a visible voxel
    positives: torch.Tensor    # [P] flat cell ids: masked voxels only
    negatives: torch.Tensor    # [Q] flat cell ids: sampled empty cells
    shape: Tuple[int, int, int, int]


def occupancy_targets(coords: torch.Tensor, masked: torch.Tensor, batch_size: int, full_shape: Sequence[int],
                      cfg: OccupancyConfig, generator: torch.Generator) -> OccupancyTargets:
    """Positives and sampled negatives on the target grid from all voxel ``coords`` [N, 4]
    (b, z, y, x) and their ``masked`` flags; random draws come from ``generator`` (CPU)."""
    dt, ht, wt = target_shape(full_shape, cfg.target_stride_z, cfg.target_stride_xy)
    shape = (batch_size, dt, ht, wt)
    c = coords.long()
    cell = ((c[:, 0] * dt + c[:, 1] // cfg.target_stride_z) * ht + c[:, 2] // cfg.target_stride_xy) * wt \
        + c[:, 3] // cfg.target_stride_xy
    total = batch_size * dt * ht * wt
    occupied = torch.zeros(total, dtype=torch.bool, device=c.device)
    occupied[cell] = True
    visible = torch.zeros_like(occupied)
    visible[cell[~masked]] = True
    positives = torch.unique(cell[masked & ~visible[cell]])
    n_neg = max(int(round(cfg.neg_per_pos * len(positives))), cfg.min_negatives)
    n_hard = int(round(cfg.hard_neg_share * n_neg)) if len(positives) else 0
    # hard negatives: empty cells within one cell of a positive; uniform ones anywhere. Draw extra
    # candidates and keep the empty ones (occupancy is a few per cent of the grid).
    picks = []
    if n_hard:
        src = positives[torch.randint(len(positives), (3 * n_hard,), generator=generator).to(c.device)]
        step = torch.randint(-1, 2, (3 * n_hard, 3), generator=generator).to(c.device)
        x, rest = src % wt, src // wt
        y, rest = rest % ht, rest // ht
        z, b = rest % dt, rest // dt
        x, y, z = x + step[:, 2], y + step[:, 1], z + step[:, 0]
        ok = (x >= 0) & (x < wt) & (y >= 0) & (y < ht) & (z >= 0) & (z < dt)
        near = ((b * dt + z) * ht + y) * wt + x
        near = near[ok]
        picks.append(near[~occupied[near]][:n_hard])
    n_uniform = n_neg - (len(picks[0]) if picks else 0)
    cand = torch.randint(total, (2 * n_uniform + 64,), generator=generator).to(c.device)
    picks.append(cand[~occupied[cand]][:n_uniform])
    return OccupancyTargets(occupied, visible, positives, torch.cat(picks), shape)


def occupancy_loss(logits: torch.Tensor, targets: OccupancyTargets, cfg: OccupancyConfig) -> torch.Tensor:
    """Balanced BCE / focal loss: mean over positives and mean over negatives, weighted 1/2 each."""
    flat = logits.reshape(-1)

    def term(ids: torch.Tensor, label: float) -> torch.Tensor:
        z = flat[ids]
        y = torch.full_like(z, label)
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        if cfg.loss == "focal":
            p_t = torch.exp(-bce)  # probability given to the true label
            bce = (1 - p_t) ** cfg.focal_gamma * bce
        return bce.mean()

    neg = term(targets.negatives, 0.0)
    if len(targets.positives) == 0:
        return neg
    return 0.5 * (term(targets.positives, 1.0) + neg)


@torch.no_grad()
def occupancy_metrics(logits: torch.Tensor, targets: OccupancyTargets) -> Dict[str, float]:
    """Precision / recall / IoU of ``logits > 0`` over every cell without a visible voxel."""
    pred = logits.reshape(-1) > 0
    truth = torch.zeros_like(pred)
    truth[targets.positives] = True
    tp = int((pred & truth).sum())
    fp = int((pred & ~targets.occupied).sum())
    fn = int((~pred & truth).sum())
    return {"occ_precision": tp / max(tp + fp, 1), "occ_recall": tp / max(tp + fn, 1),
            "occ_iou": tp / max(tp + fp + fn, 1), "occ_positives": float(len(targets.positives))}
