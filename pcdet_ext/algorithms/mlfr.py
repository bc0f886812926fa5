"""Multi-scale latent feature reconstruction (MLFR, CMAE-3D style) on the teacher's sites (pure torch).

At each scale the teacher (complete voxels) has sites the student (masked voxels) lacks. The
decoder input lives on the teacher's sites: the student's feature where the student has the site,
a learned mask token plus a positional encoding where it does not; the decoder predicts the
teacher's layer-normalised features, scored mainly on the sites the student never saw.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from pcdet_ext.algorithms.teacher_student import voxel_keys

LOSSES = ("smooth_l1", "cosine")


def sinusoidal_position(indices: torch.Tensor, spatial_shape: Sequence[int], dim: int) -> torch.Tensor:
    """[N, dim] sin/cos encoding of voxel coordinates (``indices`` [N, 1 + D]: batch, then D spatial,
    each normalised by its extent); ``dim`` split evenly over the D axes (the rest zero)."""
    coords = indices[:, 1:].float() / torch.tensor([float(s) for s in spatial_shape], device=indices.device)
    axes = coords.shape[1]
    per_axis = (dim // (2 * axes)) * 2
    out = coords.new_zeros(len(coords), dim)
    if per_axis == 0:
        return out
    freqs = torch.exp(torch.arange(per_axis // 2, device=coords.device) * (-math.log(1000.0) / max(per_axis // 2, 1)))
    for a in range(axes):
        angle = coords[:, a:a + 1] * freqs[None] * 2 * math.pi * 64
        out[:, a * per_axis:(a + 1) * per_axis] = torch.cat([angle.sin(), angle.cos()], 1)
    return out


def teacher_site_inputs(student: Tuple[torch.Tensor, torch.Tensor], teacher_indices: torch.Tensor,
                        spatial_shape: Sequence[int], mask_token: torch.Tensor, position: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder input on the teacher's sites [Mt, C] and ``masked`` [Mt] bool (the student lacks the
    site). ``student``: (features [Ms, C], indices [Ms, 1 + D]); ``position``: [Mt, C] encoding of
    the teacher sites, added to the mask token only."""
    s_feat, s_idx = student
    t_keys = voxel_keys(teacher_indices, spatial_shape)
    s_keys = voxel_keys(s_idx, spatial_shape)
    order = torch.argsort(s_keys)
    s_sorted = s_keys[order]
    if len(s_sorted):
        pos = torch.searchsorted(s_sorted, t_keys).clamp_max(len(s_sorted) - 1)
        hit = s_sorted[pos] == t_keys
    else:
        pos = torch.zeros_like(t_keys)
        hit = torch.zeros_like(t_keys, dtype=torch.bool)
    token = (mask_token[None].to(s_feat.dtype) + position.to(s_feat.dtype)).expand(len(t_keys), -1)
    gathered = s_feat[order[pos]] if len(s_sorted) else token
    feats = torch.where(hit[:, None], gathered, token)
    return feats, ~hit


def reconstruction_loss(pred: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor, kind: str = "smooth_l1",
                        visible_weight: float = 0.0) -> torch.Tensor:
    """Loss of ``pred`` [M, C] against the layer-normalised teacher features [M, C] (no gradient) on
    the masked sites, plus ``visible_weight`` x the loss on the visible ones."""
    if kind not in LOSSES:
        raise ValueError(f"MLFR loss: expected one of {LOSSES}, got {kind!r}")
    if visible_weight < 0:
        raise ValueError(f"MLFR visible-site weight must be >= 0, got {visible_weight}")
    target = F.layer_norm(teacher.detach().float(), teacher.shape[-1:])
    pred = pred.float()
    if kind == "cosine":
        per_site = 1.0 - F.cosine_similarity(pred, target, dim=1)
    else:
        per_site = F.smooth_l1_loss(pred, target, reduction="none").mean(1)
    hidden = masked.to(per_site.dtype)  # means over the masked / visible sites (0 where there are none),
    loss = (per_site * hidden).sum() / hidden.sum().clamp_min(1)  # with no device-to-host copy
    if visible_weight > 0:
        loss = loss + visible_weight * (per_site * (1 - hidden)).sum() / (1 - hidden).sum().clamp_min(1)
    return loss


@torch.no_grad()
def nearest_visible_baseline(student: Tuple[torch.Tensor, torch.Tensor], teacher_indices: torch.Tensor,
                             masked: torch.Tensor) -> torch.Tensor:
    """Baseline prediction for the masked teacher sites: the feature of the nearest visible student
    site of the same sample (Euclidean in voxel units); [masked sites, C]."""
    s_feat, s_idx = student
    q = teacher_indices[masked]
    out = s_feat.new_zeros(len(q), s_feat.shape[1])
    for b in torch.unique(q[:, 0]).tolist():  # one distance block per sample of the batch
        qs, ss = q[:, 0] == b, s_idx[:, 0] == b
        if not ss.any():
            continue
        d = torch.cdist(q[qs, 1:].float(), s_idx[ss, 1:].float())
        out[qs] = s_feat[ss][d.argmin(1)]
    return out
