"""EMA teacher and multi-scale latent feature regression (CMAE-style), pure torch.

The teacher is a copy of the student encoder whose parameters are turned into buffers: it is
saved in ``state_dict`` and moved by ``.to()``, but ``parameters()`` (hence any optimizer, and
OpenPCDet's decoupled weight decay) never sees it. It is updated only by :func:`ema_update_`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def params_to_buffers_(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name (in place)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if p is None else p.detach().clone())
    return module


@torch.no_grad()
def ema_update_(teacher: nn.Module, student_params: Iterable[Tuple[str, torch.Tensor]], momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for every named student parameter (teacher buffers by name)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"TEACHER_MOMENTUM: expected a value in [0, 1], got {momentum}")
    buffers = dict(teacher.named_buffers())
    t_list, s_list = [], []
    for name, p in student_params:
        if name not in buffers:
            raise KeyError(f"teacher has no tensor {name!r} (teacher and student encoders differ)")
        t_list.append(buffers[name])
        s_list.append(p.detach())
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


@contextmanager
def estimating_batchnorm(layers: List[nn.Module]) -> Iterator[None]:
    """Inside: the BatchNorm ``layers`` start from reset statistics and average every batch that
    passes equally (``momentum=None``), in training mode; afterwards their momentum and mode are as
    before and the new statistics stay. Re-estimates statistics on other data (e.g. unmasked scans
    for an encoder whose statistics were gathered on masked ones)."""
    saved = [(m, m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        yield
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)


def _unique_mean(features: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average features of duplicate keys; returns sorted unique keys and their features."""
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    summed = features.new_zeros(len(uniq), features.shape[1]).index_add_(0, inv, features)
    count = torch.bincount(inv, minlength=len(uniq)).clamp_min(1).to(features.dtype)
    return uniq, summed / count[:, None]


def voxel_keys(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Flat int64 key of (batch, *spatial) voxel indices."""
    idx = indices.long()
    key = idx[:, 0]
    for dim, size in enumerate(spatial_shape):
        key = key * int(size) + idx[:, dim + 1]
    return key


def match_features(student: Tuple[torch.Tensor, torch.Tensor], teacher: Tuple[torch.Tensor, torch.Tensor],
                   spatial_shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher features ``(features, indices)`` at the voxel coordinates both have
    (duplicates averaged); returns aligned [K, C] tensors."""
    s_keys, s_feat = _unique_mean(student[0], voxel_keys(student[1], spatial_shape))
    t_keys, t_feat = _unique_mean(teacher[0], voxel_keys(teacher[1], spatial_shape))
    if len(t_keys) == 0 or len(s_keys) == 0:
        return s_feat[:0], t_feat[:0]
    pos = torch.searchsorted(t_keys, s_keys).clamp_max(len(t_keys) - 1)
    hit = t_keys[pos] == s_keys
    return s_feat[hit], t_feat[pos[hit]]


class FeatureRegression(nn.Module):
    """Per scale, a small predictor maps student features onto the layer-normalised teacher
    features at the same voxel coordinates (MSE); the loss is the mean over scales."""

    def __init__(self, channels: Dict[str, int], hidden: int = 128):
        super().__init__()
        self.scales = list(channels)
        self.predictors = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))
            for name, c in channels.items()})

    def forward(self, matched: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        losses = []
        for name in self.scales:
            s, t = matched[name]
            if len(s) == 0:
                continue
            target = F.layer_norm(t.detach().float(), t.shape[-1:])
            losses.append(F.mse_loss(self.predictors[name](s.float()), target))
        if not losses:  # no voxel in common at any scale: the student saw nothing the teacher saw
            return sum(p.sum() for p in self.parameters()) * 0.0
        return torch.stack(losses).mean()


@torch.no_grad()
def cosine_similarity(matched: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, float]:
    """Mean cosine similarity of raw student and teacher features per scale (for logging)."""
    return {f"ts_cos_{name}": float(F.cosine_similarity(s.float(), t.float(), dim=1).mean())
            for name, (s, t) in matched.items() if len(s)}
