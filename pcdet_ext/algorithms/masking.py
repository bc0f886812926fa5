"""R-MAE radial (angular-sector, range-aware) and random voxel masking, vectorised (pure torch).

Voxel centres are computed in metres from voxel indices, voxel size and point-cloud range, and
grouped by azimuth around the sensor (origin configurable) into angular groups. Per sample,
independently, ``MASKED_RATIO`` of the voxels are hidden in two stages (R-MAE: the sensor fires only
in some sectors, and within those it also loses returns by range):

1. **whole groups**: groups are visited in a random order and masked entirely until, together with
   stage 2, the expected number of masked voxels is ``MASKED_RATIO`` of the sample's voxels;
2. **by range inside the kept groups** (``ENABLE_2STAGE_MASKING``): a voxel is masked with the
   probability of its band (``RANGE_MASK_PROBS`` NEAR / MID / FAR split at ``DISTANCE_THRESHOLDS``
   metres; far masked most by default), independently (``USE_BERNOULLI_MASKING``) or as exactly
   the expected count chosen at random weighted by those probabilities.

The configured probabilities are upper bounds. At least ``WHOLE_GROUP_MIN_SHARE`` of the masked
voxels lie in whole groups (the radial character): when the probabilities as given would take more
than the rest, they are scaled down by one common factor per sample (band order and ratios kept)
and the factor is reported (``MaskResult.stage2_scale``, logged as ``mask_stage2_scale``).
A ratio that the probabilities overshoot even on a scan that is all NEAR band is a config error.
Without stage 2 whole groups alone reach the ratio (each group masked or not).

``MASK_TYPE: random`` masks ``round(MASKED_RATIO x N)`` random voxels per sample instead. Unlike the
published R-MAE code, angles are measured around the sensor (all 360 degrees occur), each sample
gets its own mask, and the group order and the voxel noise come from separate seeded streams.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from pcdet_ext.config import ConfigError, NoneType, Opt, from_cfg

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
    "WHOLE_GROUP_MIN_SHARE": Opt(0.6, (float,), lo=0.0, hi=1.0, hi_open=True),
    "SENSOR_ORIGIN": Opt([0.0, 0.0, 0.0], (list, tuple)),
}
_STREAM_GROUPS, _STREAM_VOXELS = 0, 1


@dataclass
class MaskingConfig:
    masked_ratio: float = 0.8
    mask_type: str = "radial"                       # radial | random
    angular_group_size: float = 1.0                 # degrees per group
    distance_thresholds: Sequence[float] = (10.0, 30.0)
    range_mask_probs: Dict[str, float] = field(default_factory=lambda: {"NEAR": 0.5, "MID": 0.75, "FAR": 0.9})
    use_bernoulli: bool = True
    two_stage: bool = True
    whole_group_min_share: float = 0.6
    sensor_origin: Sequence[float] = (0.0, 0.0, 0.0)   # metres; (x, y) masking angles, (x, y, z) the rays

    @property
    def sensor_xyz(self) -> Tuple[float, float, float]:
        """SENSOR_ORIGIN as (x, y, z); a given (x, y) has z = 0."""
        xyz = tuple(float(v) for v in self.sensor_origin) + (0.0,) * (3 - len(self.sensor_origin))
        return xyz[0], xyz[1], xyz[2]

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
                  whole_group_min_share=cfg.WHOLE_GROUP_MIN_SHARE, sensor_origin=tuple(cfg.SENSOR_ORIGIN))
        out.validate(where)
        return out

    def stage2_budget(self) -> float:
        """Largest expected share of a kept group's voxels stage 2 may mask so that whole groups hold at
        least ``whole_group_min_share`` of the masked voxels: r (1 - w) / (1 - w r)."""
        r, w = self.masked_ratio, self.whole_group_min_share
        return r * (1.0 - w) / (1.0 - w * r)

    def validate(self, where: str = "MODEL.BACKBONE_3D") -> None:
        """Types and ranges through :data:`MASKING_SPEC`, then what involves several keys."""
        from_cfg({"MASKED_RATIO": self.masked_ratio, "MASK_TYPE": self.mask_type,
                  "ANGULAR_GROUP_SIZE": self.angular_group_size, "DISTANCE_THRESHOLDS": self.distance_thresholds,
                  "RANGE_MASK_PROBS": self.range_mask_probs, "USE_BERNOULLI_MASKING": self.use_bernoulli,
                  "ENABLE_2STAGE_MASKING": self.two_stage, "WHOLE_GROUP_MIN_SHARE": self.whole_group_min_share,
                  "SENSOR_ORIGIN": self.sensor_origin}, MASKING_SPEC, where)
        th = list(self.distance_thresholds)
        if len(th) != 2 or not all(isinstance(t, (int, float)) for t in th) or not 0 < th[0] < th[1]:
            raise ConfigError(f"{where}.DISTANCE_THRESHOLDS: expected two increasing positive distances in metres, "
                              f"got {th}")
        probs = self.range_mask_probs
        if set(probs) != set(RANGE_BINS):
            raise ConfigError(f"{where}.RANGE_MASK_PROBS: expected keys {list(RANGE_BINS)}, got {sorted(probs)}")
        for key in RANGE_BINS:
            p = probs[key]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"{where}.RANGE_MASK_PROBS.{key}: expected a probability in [0, 1) "
                                  f"(1 would mask the whole band), got {p!r}")
        if len(self.sensor_origin) not in (2, 3) or not all(isinstance(v, (int, float)) for v in self.sensor_origin):
            raise ConfigError(f"{where}.SENSOR_ORIGIN: expected (x, y) or (x, y, z) in metres, got {self.sensor_origin}")
        if self.mask_type == "radial" and self.two_stage and self.masked_ratio > 0:
            budget, lowest = self.stage2_budget(), min(probs.values())
            if lowest > budget:
                raise ConfigError(
                    f"{where}.MASKED_RATIO {self.masked_ratio} is unreachable with RANGE_MASK_PROBS {dict(probs)}: "
                    f"stage 2 alone masks at least {lowest:.2f} of the kept groups' voxels, but keeping "
                    f"WHOLE_GROUP_MIN_SHARE {self.whole_group_min_share} of the masked voxels in whole groups "
                    f"leaves it {budget:.3f}; lower RANGE_MASK_PROBS (all <= {budget:.3f}), raise MASKED_RATIO "
                    f"or lower WHOLE_GROUP_MIN_SHARE")


@dataclass
class MaskResult:
    """The mask and its statistics; the statistics stay tensors on the voxels' device until read
    (reading one is a device-to-host copy: training logs them every ``log_interval`` steps)."""
    masked: torch.Tensor                   # [N] bool, True = hidden from the student
    ratio_per_sample: torch.Tensor         # [B]
    stats: Dict[str, torch.Tensor]         # 0-dim tensors, the names of log_dict

    @property
    def visible(self) -> torch.Tensor:
        return ~self.masked

    @property
    def ratio(self) -> float:
        """Achieved share of masked voxels, whole batch."""
        return float(self.stats["mask_ratio"])

    @property
    def whole_group_share(self) -> float:
        """Share of the masked voxels inside whole masked groups."""
        return float(self.stats["mask_whole_group_share"])

    @property
    def stage2_scale(self) -> float:
        """Mean factor applied to RANGE_MASK_PROBS (1 = as configured)."""
        return float(self.stats["mask_stage2_scale"])

    @property
    def ratio_per_range(self) -> Dict[str, float]:
        return {b: float(self.stats[f"mask_ratio_{b.lower()}"]) for b in RANGE_BINS}

    def log_dict(self) -> Dict[str, torch.Tensor]:
        """What training logs (0-dim tensors)."""
        return dict(self.stats)


def voxel_centres_xy(coords: torch.Tensor, voxel_size: Sequence[float], pc_range: Sequence[float]) -> torch.Tensor:
    """Metric (x, y) of voxel centres from OpenPCDet ``voxel_coords`` [N, 4] (batch, z, y, x)."""
    c = coords.long()
    x = (c[:, 3].double() + 0.5) * voxel_size[0] + pc_range[0]
    y = (c[:, 2].double() + 0.5) * voxel_size[1] + pc_range[1]
    return torch.stack([x, y], 1)


_GOLDEN = -0x61C8864680B583EB          # 0x9E3779B97F4A7C15 as int64
_MIX1, _MIX2 = -0x40A7B892E31B1A47, -0x6B2FB644ECCEEE15   # 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _stream_key(seed: int, sample: int, stream: int) -> int:
    """A 63-bit key per (seed, sample, stream); distinct triples give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{sample}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` by ``k`` bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _hash_uniform(keys: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) from int64 ``keys`` (splitmix64's finaliser, wrapping arithmetic):
    counter-based, so no shape or count has to reach the host."""
    z = keys + _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 11).double() * (2.0 ** -53)


def _per_sample_uniform(batch_size: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """[B, count] uniforms for the group order, row b from the (seed, b) group stream."""
    keys = torch.tensor([_stream_key(seed, b, _STREAM_GROUPS) for b in range(batch_size)], dtype=torch.long)
    counter = torch.arange(count, dtype=torch.long, device=device) * _GOLDEN
    return _hash_uniform(keys.to(device)[:, None] + counter[None, :])


def _per_voxel_uniform(b_idx: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """One uniform per voxel from its sample's voxel stream at its position among the sample's
    voxels, so a sample's mask does not depend on the other samples of the batch."""
    dev = b_idx.device
    keys = torch.tensor([_stream_key(seed, b, _STREAM_VOXELS) for b in range(batch_size)], dtype=torch.long)
    order = torch.argsort(b_idx, stable=True)
    counts = torch.bincount(b_idx, minlength=batch_size)
    start = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(b_idx)
    position[order] = torch.arange(len(b_idx), device=dev) - start[b_idx[order]]
    return _hash_uniform(keys.to(dev)[b_idx] + position * _GOLDEN)


def rank_in_sample(score: torch.Tensor, b_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """0-based rank of each item (voxel, point) by descending ``score`` among its sample's items;
    ``counts`` [B]: items per sample."""
    n = len(score)
    by_score = torch.argsort(-score, stable=True)
    order = by_score[torch.argsort(b_idx[by_score], stable=True)]        # sample first, then score
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.float64, device=score.device)
    rank[order] = torch.arange(n, dtype=torch.float64, device=score.device) - start[b_idx[order]]
    return rank


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
        inside = ((c >= 0) & (c < limits)).all()
        if dev.type == "cuda":  # checked on the device, reported at the next synchronisation
            torch._assert_async(inside)
        elif not inside:
            raise ValueError("voxel_coords outside the grid / batch")
    n = coords.shape[0]
    f64 = dict(dtype=torch.float64, device=dev)
    b_idx = coords[:, 0].long()
    xy = voxel_centres_xy(coords, voxel_size, pc_range)
    dist = torch.hypot(xy[:, 0] - cfg.sensor_origin[0], xy[:, 1] - cfg.sensor_origin[1])
    rbin = torch.bucketize(dist, torch.tensor(list(cfg.distance_thresholds), **f64), right=True)
    noise = _per_voxel_uniform(b_idx, batch_size, seed)
    counts = torch.bincount(b_idx, minlength=batch_size).double()
    target = cfg.masked_ratio * counts                                  # expected masked voxels per sample
    per_sample_sum = lambda v: torch.zeros(batch_size, **f64).index_add_(0, b_idx, v.double())  # noqa: E731
    whole = torch.zeros(n, dtype=torch.bool, device=dev)
    scale = torch.zeros(batch_size, **f64)
    if cfg.mask_type == "random":
        masked = rank_in_sample(noise, b_idx, counts) < torch.round(target)[b_idx]
    else:
        groups = int(math.ceil(360.0 / cfg.angular_group_size - 1e-9))
        az = torch.rad2deg(torch.atan2(xy[:, 1] - cfg.sensor_origin[1], xy[:, 0] - cfg.sensor_origin[0])) + 180.0
        key = b_idx * groups + torch.clamp((az / cfg.angular_group_size).long(), max=groups - 1)
        probs = torch.tensor([cfg.range_mask_probs[k] for k in RANGE_BINS], **f64)[rbin]
        q = torch.zeros(n, **f64)
        if cfg.two_stage:  # stage 2's share, scaled down only where the probabilities exceed its budget
            scale = torch.clamp(cfg.stage2_budget() * counts / per_sample_sum(probs).clamp_min(1e-12), max=1.0)
            q = scale[b_idx] * probs
        # stage 1: whole groups in random order, taken until (a) with stage 2's expected share they reach the
        # target (a group adds 1 - q per voxel) and (b) they hold WHOLE_GROUP_MIN_SHARE of the target count;
        # stage 2 then takes only what is left, so both hold per scan whatever bands the drawn groups cover
        need = target - per_sample_sum(q)
        need_whole = cfg.whole_group_min_share * target if cfg.two_stage else torch.zeros_like(target)
        size = torch.zeros(batch_size * groups, **f64).index_add_(0, key, torch.ones(n, **f64))
        gain = torch.zeros(batch_size * groups, **f64).index_add_(0, key, 1.0 - q)
        u_key = _per_sample_uniform(batch_size, groups, seed, dev).reshape(-1)
        order = torch.argsort(torch.arange(batch_size, device=dev).repeat_interleave(groups).double() * 2 + u_key)
        sample_of = order // groups

        def before(v: torch.Tensor) -> torch.Tensor:  # sum of v over the groups drawn earlier in the sample
            totals = torch.zeros(batch_size, **f64).index_add_(0, sample_of, v)
            return torch.cumsum(v, 0) - v - (torch.cumsum(totals, 0) - totals)[sample_of]
        short = (before(gain[order]) < need[sample_of]) | (before(size[order]) < need_whole[sample_of])
        selected = torch.zeros(batch_size * groups, dtype=torch.bool, device=dev)
        selected[order] = short & (size[order] > 0)
        whole = selected[key]
        masked = whole
        if cfg.two_stage:  # stage 2 makes up the groups' granularity, never above the configured probabilities
            kept = ~whole
            rest = (target - per_sample_sum(whole)).clamp_min(0.0)
            fix = rest / per_sample_sum(q * kept).clamp_min(1e-12)
            q = torch.where(kept, torch.minimum(q * fix[b_idx], probs), torch.zeros_like(q))
            scale = per_sample_sum(q) / per_sample_sum(probs * kept).clamp_min(1e-12)
            if cfg.use_bernoulli:
                extra = noise < q
            else:  # exactly round(rest) kept voxels per sample, drawn with weights q (Gumbel-top-k)
                score = torch.where(q > 0, noise.clamp_min(1e-300).log() / q.clamp_min(1e-12),
                                    torch.tensor(-math.inf, **f64))
                extra = (q > 0) & (rank_in_sample(score, b_idx, counts) < torch.round(rest)[b_idx])
            masked = whole | extra
    n_masked = masked.sum()
    in_band = torch.nn.functional.one_hot(rbin, len(RANGE_BINS)).double()          # [N, 3]
    band_masked = (in_band * masked.double()[:, None]).sum(0) / in_band.sum(0).clamp_min(1)
    present = counts > 0
    stats = {"mask_ratio": n_masked / max(n, 1),
             "mask_whole_group_share": (masked & whole).sum() / n_masked.clamp_min(1),
             "mask_stage2_scale": (scale * present).sum() / present.sum().clamp_min(1),
             **{f"mask_ratio_{b.lower()}": band_masked[i] for i, b in enumerate(RANGE_BINS)}}
    return MaskResult(masked=masked, ratio_per_sample=(per_sample_sum(masked) / counts.clamp_min(1)).float(),
                      stats=stats)
