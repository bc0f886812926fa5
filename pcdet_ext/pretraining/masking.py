"""R-MAE radial (angular-sector, range-aware) and random voxel masking, vectorised (pure torch).

Voxel centres are computed in metres from voxel indices, voxel size and point-cloud range, and
grouped by azimuth around the sensor (origin configurable). Per sample, independently:

1. sectors with voxels are visited in a random order and selected until the expected number of
   masked voxels reaches ``MASKED_RATIO`` of the sample's voxels (stage 1, R-MAE's radial masking);
2. with ``ENABLE_2STAGE_MASKING``, voxels of the selected sectors are masked with the probability of
   their range bin (``RANGE_MASK_PROBS`` NEAR / MID / FAR split at ``DISTANCE_THRESHOLDS`` metres):
   independently (``USE_BERNOULLI_MASKING``) or as exactly the expected count, chosen at random
   weighted by those probabilities; without it every voxel of a selected sector is masked.
   When the range probabilities cannot reach ``MASKED_RATIO`` even over every sector, they are
   scaled up (``min(1, lambda x p)``, order kept) until they do, so the achieved ratio is the
   configured one.

``MASK_TYPE: random`` masks ``round(MASKED_RATIO x N)`` random voxels per sample instead. Unlike the
published R-MAE code, angles are measured around the sensor (all 360 degrees occur), each sample
gets its own mask, and the randomness comes from a seeded torch generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from ..config import ConfigError, NoneType, Opt, from_cfg

RANGE_BINS = ("NEAR", "MID", "FAR")
MASKING_SPEC = {
    "MASKED_RATIO": Opt(0.8, (float,), lo=0.0, hi=1.0, hi_open=True),
    "MASK_TYPE": Opt("radial", (str,), choices=("radial", "random")),
    "NUM_ANGULAR_GROUPS": Opt(None, (int, NoneType), lo=1),
    "ANGULAR_GROUP_SIZE": Opt(None, (float, NoneType), lo=0.0, lo_open=True, hi=360.0),
    "DISTANCE_THRESHOLDS": Opt([10.0, 30.0], (list, tuple)),
    "RANGE_MASK_PROBS": Opt({"NEAR": 0.5, "MID": 0.75, "FAR": 0.9}, (dict,)),
    "USE_BERNOULLI_MASKING": Opt(True, (bool,)),
    "ENABLE_2STAGE_MASKING": Opt(True, (bool,)),
    "SENSOR_ORIGIN": Opt([0.0, 0.0], (list, tuple)),
}


@dataclass
class MaskingConfig:
    masked_ratio: float = 0.8
    mask_type: str = "radial"                       # radial | random
    angular_group_size: float = 1.0                 # degrees per sector
    distance_thresholds: Sequence[float] = (10.0, 30.0)
    range_mask_probs: Dict[str, float] = field(default_factory=lambda: {"NEAR": 0.5, "MID": 0.75, "FAR": 0.9})
    use_bernoulli: bool = True
    two_stage: bool = True
    sensor_origin: Sequence[float] = (0.0, 0.0)

    @classmethod
    def from_cfg(cls, cfg, where: str = "MODEL.BACKBONE_3D") -> "MaskingConfig":
        """From the masking keys of a config section (:data:`MASKING_SPEC`; the section's owner refuses
        keys nobody reads); every bad value is an error naming the key."""
        cfg = from_cfg({k: v for k, v in dict(cfg or {}).items() if k in MASKING_SPEC}, MASKING_SPEC, where)
        size, groups = cfg.ANGULAR_GROUP_SIZE, cfg.NUM_ANGULAR_GROUPS
        if groups is not None:
            if size is not None and abs(groups * size - 360.0) > 1e-6:
                raise ConfigError(f"{where}.NUM_ANGULAR_GROUPS x ANGULAR_GROUP_SIZE must be 360 degrees, "
                                  f"got {groups} x {size}")
            size = 360.0 / groups
        out = cls(masked_ratio=cfg.MASKED_RATIO, mask_type=cfg.MASK_TYPE,
                  angular_group_size=1.0 if size is None else size,
                  distance_thresholds=tuple(cfg.DISTANCE_THRESHOLDS), range_mask_probs=dict(cfg.RANGE_MASK_PROBS),
                  use_bernoulli=cfg.USE_BERNOULLI_MASKING, two_stage=cfg.ENABLE_2STAGE_MASKING,
                  sensor_origin=tuple(cfg.SENSOR_ORIGIN))
        out.validate()
        return out

    def validate(self) -> None:
        if not isinstance(self.masked_ratio, (int, float)) or not 0.0 <= self.masked_ratio < 1.0:
            raise ConfigError(f"MASKED_RATIO: expected a value in [0, 1), got {self.masked_ratio!r}")
        if self.mask_type not in ("radial", "random"):
            raise ConfigError(f"MASK_TYPE: expected 'radial' or 'random', got {self.mask_type!r}")
        if not 0.0 < self.angular_group_size <= 360.0:
            raise ConfigError(f"ANGULAR_GROUP_SIZE: expected degrees in (0, 360], got {self.angular_group_size}")
        th = list(self.distance_thresholds)
        if len(th) != 2 or not 0 < th[0] < th[1]:
            raise ConfigError(f"DISTANCE_THRESHOLDS: expected two increasing positive distances in metres, got {th}")
        if set(self.range_mask_probs) != set(RANGE_BINS):
            raise ConfigError(f"RANGE_MASK_PROBS: expected keys {list(RANGE_BINS)}, got {sorted(self.range_mask_probs)}")
        for key, p in self.range_mask_probs.items():
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"RANGE_MASK_PROBS.{key}: expected a probability in [0, 1], got {p!r}")
        if len(self.sensor_origin) != 2:
            raise ConfigError(f"SENSOR_ORIGIN: expected (x, y), got {self.sensor_origin}")


@dataclass
class MaskResult:
    masked: torch.Tensor                   # [N] bool, True = hidden from the student
    ratio: float                           # achieved share of masked voxels, whole batch
    ratio_per_sample: torch.Tensor         # [B]
    ratio_per_range: Dict[str, float]      # NEAR / MID / FAR

    @property
    def visible(self) -> torch.Tensor:
        return ~self.masked


def voxel_centres_xy(coords: torch.Tensor, voxel_size: Sequence[float], pc_range: Sequence[float]) -> torch.Tensor:
    """Metric (x, y) of voxel centres from OpenPCDet ``voxel_coords`` [N, 4] (batch, z, y, x)."""
    c = coords.long()
    x = (c[:, 3].double() + 0.5) * voxel_size[0] + pc_range[0]
    y = (c[:, 2].double() + 0.5) * voxel_size[1] + pc_range[1]
    return torch.stack([x, y], 1)


def _generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + sample)


def _per_sample_uniform(batch_size: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """[B, count] uniforms, row b from a generator seeded by (seed, b): reproducible per sample."""
    if batch_size == 0:
        return torch.zeros(0, count, dtype=torch.float64, device=device)
    return torch.stack([torch.rand(count, generator=_generator(seed, b, device), dtype=torch.float64, device=device)
                        for b in range(batch_size)])  # one generator per sample (B is small)


def _per_voxel_uniform(b_idx: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """One uniform per voxel; a sample's draws come from its own generator in its voxel order, so its
    mask does not depend on the other samples of the batch."""
    dev = b_idx.device
    order = torch.argsort(b_idx, stable=True)
    counts = torch.bincount(b_idx, minlength=batch_size).tolist()
    draws = [torch.rand(c, generator=_generator(seed, b, dev), dtype=torch.float64, device=dev)
             for b, c in enumerate(counts)]
    noise = torch.empty(len(b_idx), dtype=torch.float64, device=dev)
    noise[order] = torch.cat(draws) if draws else noise[:0]
    return noise


def _reachable(p: torch.Tensor, b_idx: torch.Tensor, batch_size: int, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel masking probabilities ``min(1, lambda_b * p)``: lambda_b = 1 when the range
    probabilities can reach the sample's target, else the smallest scale that does (bisection)."""
    total = p.new_zeros(batch_size).index_add_(0, b_idx, p)
    lo = p.new_ones(batch_size)
    hi = torch.where(total < target, 1.0 / p.clamp_min(1e-6).min().clamp_max(1.0), lo) if len(p) else lo
    for _ in range(50):  # 50 halvings: far below one voxel's worth
        mid = (lo + hi) / 2
        reach = p.new_zeros(batch_size).index_add_(0, b_idx, (mid[b_idx] * p).clamp_max(1.0))
        short = reach < target
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    return (hi[b_idx] * p).clamp_max(1.0)


def mask_voxels(coords: torch.Tensor, batch_size: int, voxel_size: Sequence[float], pc_range: Sequence[float],
                cfg: MaskingConfig, seed: int = 0, grid_size: Optional[Sequence[int]] = None) -> MaskResult:
    """Mask voxels of a batch; ``coords`` [N, 4] (batch, z, y, x) as OpenPCDet gives them."""
    cfg.validate()
    dev = coords.device
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"voxel_coords must be [N, 4] (batch, z, y, x), got {tuple(coords.shape)}")
    if grid_size is not None and coords.numel():
        c = coords.long()
        limits = torch.tensor([batch_size, grid_size[2], grid_size[1], grid_size[0]], device=dev)
        if (c < 0).any() or (c >= limits).any():
            raise ValueError("voxel_coords outside the grid / batch")
    n = coords.shape[0]
    f64 = dict(dtype=torch.float64, device=dev)
    b_idx = coords[:, 0].long()
    xy = voxel_centres_xy(coords, voxel_size, pc_range)
    dist = torch.hypot(xy[:, 0] - cfg.sensor_origin[0], xy[:, 1] - cfg.sensor_origin[1])
    rbin = torch.bucketize(dist, torch.tensor(list(cfg.distance_thresholds), **f64), right=True)
    noise = _per_voxel_uniform(b_idx, batch_size, seed + 17)
    counts = torch.bincount(b_idx, minlength=batch_size).double()
    target = cfg.masked_ratio * counts                                  # expected masked voxels per sample
    if cfg.mask_type == "random":
        order = torch.argsort(b_idx.double() * 2 + noise)              # random order inside each sample
        start = torch.cumsum(counts, 0) - counts
        rank = torch.empty(n, **f64)
        rank[order] = torch.arange(n, **f64) - start[b_idx[order]]
        masked = rank < torch.round(target)[b_idx]
    else:
        sectors = int(math.ceil(360.0 / cfg.angular_group_size))
        az = torch.rad2deg(torch.atan2(xy[:, 1] - cfg.sensor_origin[1], xy[:, 0] - cfg.sensor_origin[0])) + 180.0
        sector = torch.clamp((az / cfg.angular_group_size).long(), max=sectors - 1)
        key = b_idx * sectors + sector
        probs = torch.tensor([cfg.range_mask_probs[k] for k in RANGE_BINS], **f64)
        weight = _reachable(probs[rbin], b_idx, batch_size, target) if cfg.two_stage else torch.ones(n, **f64)
        w_key = torch.zeros(batch_size * sectors, **f64).index_add_(0, key, weight)
        u_key = _per_sample_uniform(batch_size, sectors, seed, dev).reshape(-1)
        order = torch.argsort(torch.arange(batch_size, device=dev).repeat_interleave(sectors).double() * 2 + u_key)
        cum = torch.cumsum(w_key[order], 0)
        sample_of = order // sectors
        before = cum - w_key[order]
        offset = torch.zeros(batch_size, **f64)
        totals = torch.zeros(batch_size, **f64).index_add_(0, sample_of, w_key[order])
        offset[1:] = torch.cumsum(totals, 0)[:-1]
        selected_sorted = (before - offset[sample_of]) < target[sample_of]
        selected = torch.zeros(batch_size * sectors, dtype=torch.bool, device=dev)
        selected[order] = selected_sorted & (w_key[order] > 0)
        in_sel = selected[key]
        if not cfg.two_stage:
            masked = in_sel
        elif cfg.use_bernoulli:
            masked = in_sel & (noise < weight)
        else:  # exactly round(expected) per sample among selected voxels, weighted by range probability
            score = torch.where(in_sel, noise.clamp_min(1e-12).log() / weight.clamp_min(1e-12),
                                torch.tensor(-math.inf, **f64))
            order_v = torch.argsort(b_idx.double() * 1e9 - score.clamp_min(-1e8))
            start = torch.cumsum(counts, 0) - counts
            rank = torch.empty(n, **f64)
            rank[order_v] = torch.arange(n, **f64) - start[b_idx[order_v]]
            masked = in_sel & (rank < torch.round(target)[b_idx])
    per_sample = torch.zeros(batch_size, **f64).index_add_(0, b_idx, masked.double()) / counts.clamp_min(1)
    per_range = {}
    for i, name in enumerate(RANGE_BINS):
        sel = rbin == i
        per_range[name] = float(masked[sel].double().mean()) if sel.any() else 0.0
    return MaskResult(masked=masked, ratio=float(masked.double().mean()) if n else 0.0,
                      ratio_per_sample=per_sample.float(), ratio_per_range=per_range)
