"""Occupancy reconstruction of masked voxels against ray-cast free space (pure torch).

The decoder is dense at a coarse stride: the encoder's sparse output (any depth, e.g. VoxelNeXt's
2D BEV tensor or SECOND's ``conv_out``) is reduced per voxel, scattered to a BEV map with its
height cells as channels, passed through residual dilated 3x3 blocks at the encoder stride (their
receptive field spans a masked angular sector), upsampled by 2x transposed convs to
``TARGET_STRIDE_XY`` and read out as one logit per (height bin, BEV cell) at ``TARGET_STRIDE_Z``.

Targets live on that coarse grid. A cell is **positive** when it holds masked voxels and no visible
one (only the hidden geometry explains it); cells holding a visible voxel are left out of loss and
metrics (no reward for copying the input). **Negatives** are cells a LiDAR beam of the full scan
crossed before its return (:func:`ray_free_cells`; space behind a return or never reached is
unknown and never a negative): a share right next to positives (hard, near-surface free space),
the rest uniformly over the free cells. The loss (BCE or focal) averages positives and negatives
separately and weighs them equally. Metrics are threshold-free: average precision of the logits
over positives against every ray-cast free cell, overall and per range band, from fixed-size score
histograms (:class:`OccupancyAP`: constant memory, summed across processes), plus precision / recall /
IoU at logit 0. :func:`grow_visible_scores` is the baseline that learns nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcdet_ext.config import Opt, from_cfg
from pcdet_ext.algorithms.masking import rank_in_sample

BANDS = ("near", "mid", "far")


@dataclass
class OccupancyConfig:
    target_stride_xy: int = 2
    target_stride_z: int = 2
    reduce_channels: int = 16
    hidden_channels: int = 64
    context_dilations: Tuple[int, ...] = (1, 2, 4, 8)   # one residual 3x3 block each, at the encoder stride
    loss: str = "bce"                 # bce | focal
    focal_gamma: float = 2.0
    neg_per_pos: float = 2.0
    hard_neg_share: float = 0.25
    min_negatives: int = 1024
    rays_per_frame: int = 16384       # beams traced per frame for free space (0: every point)
    ray_step: float = 0.5             # sampling step along a beam, in target cells
    ray_stop: float = 1.0             # free space ends this many target cells before the return
    metric_negatives: int = 50000     # accepted, unused: the AP counts every free cell (OccupancyAP)

    @classmethod
    def from_cfg(cls, cfg) -> "OccupancyConfig":
        """From ``BACKBONE_3D.OCCUPANCY_DECODER`` (UPPER-CASE keys of the fields); errors name the key."""
        out = from_cfg(cfg, OCCUPANCY_SPEC, WHERE)
        out = cls(**{k.lower(): v for k, v in out.items()})
        out.validate()
        return out

    def validate(self) -> None:
        """Every field against :data:`OCCUPANCY_SPEC` (for configs built in code)."""
        for f in fields(self):
            OCCUPANCY_SPEC[f.name.upper()].check(f"{WHERE}.{f.name.upper()}", getattr(self, f.name))
        if not self.context_dilations or not all(isinstance(d, int) and d >= 1 for d in self.context_dilations):
            raise ValueError(f"{WHERE}.CONTEXT_DILATIONS: expected a list of positive integers, "
                             f"got {list(self.context_dilations)}")


WHERE = "MODEL.BACKBONE_3D.OCCUPANCY_DECODER"
_POS_INT = dict(types=(int,), lo=1)
_CHECKS = {"target_stride_xy": _POS_INT, "target_stride_z": _POS_INT, "reduce_channels": _POS_INT,
           "hidden_channels": _POS_INT, "min_negatives": _POS_INT, "loss": dict(types=(str,), choices=("bce", "focal")),
           "context_dilations": dict(types=(list, tuple)),
           "focal_gamma": dict(types=(float,), lo=0.0), "neg_per_pos": dict(types=(float,), lo=0.0, lo_open=True),
           "hard_neg_share": dict(types=(float,), lo=0.0, hi=1.0), "rays_per_frame": dict(types=(int,), lo=0),
           "ray_step": dict(types=(float,), lo=0.0, lo_open=True, hi=1.0),
           "ray_stop": dict(types=(float,), lo=0.0), "metric_negatives": _POS_INT}
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


class _Context(nn.Module):
    """Residual 3x3 block with dilation ``d``: BN-ReLU-conv twice, added to its input."""

    def __init__(self, channels: int, d: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


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
        layers += [_Context(hid, d) for d in cfg.context_dilations]
        for _ in range(round(math.log2(ups))):
            layers += [nn.ConvTranspose2d(hid, hid, 2, stride=2, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.logits = nn.Conv2d(hid, self.target_shape[0], 1)
        prior = 1.0 / (1.0 + cfg.neg_per_pos)  # share of positives among the cells the loss sees
        nn.init.constant_(self.logits.bias, math.log(prior / (1 - prior)))
        self.receptive_field = 3 + 4 * sum(cfg.context_dilations)  # encoder-stride cells, before upsampling

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
class CellGeometry:
    """Where target cells are: grid origin, cell size (x, y, z) in metres, sensor origin, range bands."""
    pc_min: Tuple[float, float, float]
    cell: Tuple[float, float, float]
    shape: Tuple[int, int, int, int]                 # B, Dt, Ht, Wt
    sensor: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    bands: Tuple[float, float] = (10.0, 30.0)

    @classmethod
    def of(cls, batch_size: int, full_shape: Sequence[int], voxel_size: Sequence[float], pc_range: Sequence[float],
           cfg: OccupancyConfig, sensor: Sequence[float] = (0.0, 0.0, 0.0),
           bands: Sequence[float] = (10.0, 30.0)) -> "CellGeometry":
        s_xy, s_z = cfg.target_stride_xy, cfg.target_stride_z
        cell = (voxel_size[0] * s_xy, voxel_size[1] * s_xy, voxel_size[2] * s_z)
        if len(sensor) != 3:
            raise ValueError(f"sensor: expected (x, y, z) in metres, got {tuple(sensor)}")
        sensor = tuple(float(v) for v in sensor)
        return cls(tuple(float(v) for v in pc_range[:3]), cell,
                   (batch_size, *target_shape(full_shape, s_z, s_xy)), sensor, tuple(float(b) for b in bands))

    def band(self, ids: torch.Tensor) -> torch.Tensor:
        """Range band (0 near, 1 mid, 2 far) of flat cell ids, by the horizontal distance of the centre."""
        _, dt, ht, wt = self.shape
        x = (ids % wt).double()
        y = ((ids // wt) % ht).double()
        cx = self.pc_min[0] + (x + 0.5) * self.cell[0] - self.sensor[0]
        cy = self.pc_min[1] + (y + 0.5) * self.cell[1] - self.sensor[1]
        return torch.bucketize(torch.hypot(cx, cy), torch.tensor(self.bands, dtype=torch.float64,
                                                                 device=ids.device), right=True)


def ray_free_cells(points: torch.Tensor, geometry: CellGeometry, cfg: OccupancyConfig,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flat bool [B x Dt x Ht x Wt]: target cells a beam crossed between the sensor and its return.

    ``points`` [M, >= 4] (batch, x, y, z, ...) as OpenPCDet's ``batch_dict['points']``; per frame
    ``RAYS_PER_FRAME`` random beams (all when 0) are sampled every ``RAY_STEP`` target cells from the
    sensor up to ``RAY_STOP`` cells before the return, in one vectorised pass. The sensor must lie
    inside the point-cloud range (checked where the geometry is built)."""
    b, dt, ht, wt = geometry.shape
    dev = points.device
    free = torch.zeros(b * dt * ht * wt, dtype=torch.bool, device=dev)
    if len(points) == 0:
        return free
    bidx = points[:, 0].long()
    if cfg.rays_per_frame and len(points) > cfg.rays_per_frame:  # the same number of random beams per frame
        key = torch.rand(len(points), generator=generator, dtype=torch.float64).to(dev)
        keep = rank_in_sample(-key, bidx, torch.bincount(bidx, minlength=b)) < cfg.rays_per_frame
        points, bidx = points[keep], bidx[keep]
    cell = torch.tensor(geometry.cell, dtype=torch.float32, device=dev)
    origin = torch.tensor(geometry.sensor, dtype=torch.float32, device=dev)
    start = (origin - torch.tensor(geometry.pc_min, dtype=torch.float32, device=dev)) / cell  # in cells
    ray = (points[:, 1:4].float() - origin) / cell                                            # in cells
    end = start + ray
    inside = (end >= 0).all(1) & (end[:, 0] <= wt) & (end[:, 1] <= ht) & (end[:, 2] <= dt)
    ray, bidx = ray[inside], bidx[inside]  # returns outside the range (uncropped input) trace nothing
    length = (ray * cell).norm(dim=1)
    step = cfg.ray_step * min(geometry.cell)
    n_steps = ((length - cfg.ray_stop * max(geometry.cell)) / step).floor().clamp_min(0).long()
    total = int(n_steps.sum())  # the number of samples: a shape that depends on the data
    if total == 0:
        return free
    which = torch.repeat_interleave(torch.arange(len(ray), device=dev), n_steps, output_size=total)
    k = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(n_steps, 0) - n_steps, n_steps,
                                                                  output_size=total)
    t = (k.float() + 0.5) * step / length[which].clamp_min(1e-6)
    # samples lie between the sensor and a return, both inside the range: only the far faces need a clamp
    pos = torch.addcmul(start, ray[which], t[:, None]).floor_().clamp_(min=0).int()
    x = pos[:, 0].clamp_(max=wt - 1)
    y = pos[:, 1].clamp_(max=ht - 1)
    z = pos[:, 2].clamp_(max=dt - 1)
    free[((bidx[which] * dt + z) * ht + y) * wt + x] = True
    return free


@dataclass
class OccupancyTargets:
    occupied: torch.Tensor     # [B * Dt * Ht * Wt] bool, any voxel (visible or masked)
    visible: torch.Tensor      # same, a visible voxel
    free: torch.Tensor         # same, ray-cast free space without any voxel (the known negatives)
    positives: torch.Tensor    # [P] flat cell ids: masked voxels only
    negatives: torch.Tensor    # [Q] flat cell ids: sampled free cells
    geometry: CellGeometry

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.geometry.shape


def voxel_cells(coords: torch.Tensor, geometry: CellGeometry, cfg: OccupancyConfig) -> torch.Tensor:
    """Flat target-cell id of each voxel of ``coords`` [N, 4] (b, z, y, x)."""
    _, dt, ht, wt = geometry.shape
    c = coords.long()
    return ((c[:, 0] * dt + c[:, 1] // cfg.target_stride_z) * ht + c[:, 2] // cfg.target_stride_xy) * wt \
        + c[:, 3] // cfg.target_stride_xy


def occupancy_targets(coords: torch.Tensor, masked: torch.Tensor, points: torch.Tensor, geometry: CellGeometry,
                      cfg: OccupancyConfig, generator: torch.Generator) -> OccupancyTargets:
    """Positives and sampled ray-cast negatives on the target grid from all voxel ``coords`` [N, 4]
    (b, z, y, x), their ``masked`` flags and the full scan's ``points``; random draws come from
    ``generator`` (CPU)."""
    _, dt, ht, wt = geometry.shape
    dev = coords.device
    cell = voxel_cells(coords, geometry, cfg)
    occupied = torch.zeros(math.prod(geometry.shape), dtype=torch.bool, device=dev)
    occupied[cell] = True
    visible = torch.zeros_like(occupied)
    visible[cell[~masked]] = True
    positives = torch.unique(cell[masked & ~visible[cell]])
    free = ray_free_cells(points, geometry, cfg, generator) & ~occupied
    free_ids = torch.nonzero(free).squeeze(1)
    n_neg = min(max(int(round(cfg.neg_per_pos * len(positives))), cfg.min_negatives), len(free_ids))
    n_hard = int(round(cfg.hard_neg_share * n_neg)) if len(positives) else 0
    picks = []
    if n_hard:  # free cells within one cell of a positive (near-surface free space)
        src = positives[torch.randint(len(positives), (4 * n_hard,), generator=generator).to(dev)]
        step = torch.randint(-1, 2, (4 * n_hard, 3), generator=generator).to(dev)
        x, rest = src % wt, src // wt
        y, rest = rest % ht, rest // ht
        z, b = rest % dt, rest // dt
        x, y, z = x + step[:, 2], y + step[:, 1], z + step[:, 0]
        ok = (x >= 0) & (x < wt) & (y >= 0) & (y < ht) & (z >= 0) & (z < dt)
        near = (((b * dt + z) * ht + y) * wt + x)[ok]
        picks.append(torch.unique(near[free[near]])[:n_hard])
    n_uniform = n_neg - (len(picks[0]) if picks else 0)
    if n_uniform > 0:
        picks.append(free_ids[torch.randint(len(free_ids), (n_uniform,), generator=generator).to(dev)])
    negatives = torch.cat(picks) if picks else free_ids[:0]
    return OccupancyTargets(occupied, visible, free, positives, negatives, geometry)


def occupancy_loss(logits: torch.Tensor, targets: OccupancyTargets, cfg: OccupancyConfig) -> torch.Tensor:
    """Balanced BCE / focal loss: mean over positives and mean over negatives, weighted 1/2 each (a
    frame with neither, e.g. no points at all, gives 0 with the decoder still in the graph)."""
    flat = logits.reshape(-1)

    def term(ids: torch.Tensor, label: float) -> torch.Tensor:
        z = flat[ids]
        bce = F.binary_cross_entropy_with_logits(z, torch.full_like(z, label), reduction="none")
        if cfg.loss == "focal":
            p_t = torch.exp(-bce)  # probability given to the true label
            bce = (1 - p_t) ** cfg.focal_gamma * bce
        return bce.mean()

    terms = [term(ids, label) for ids, label in ((targets.positives, 1.0), (targets.negatives, 0.0)) if len(ids)]
    if not terms:
        return 0.0 * flat.sum()
    return sum(terms) / len(terms)


def average_precision(scores: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    """Area under the precision-recall curve (steps at each distinct score, as scikit-learn's
    ``average_precision_score``); ``weights`` count each item that many times. NaN without positives."""
    if weights is None:
        weights = torch.ones_like(scores, dtype=torch.float64)
    order = torch.argsort(scores, descending=True)
    s, y, w = scores[order], labels[order].double(), weights[order].double()
    tp, fp = torch.cumsum(w * y, 0), torch.cumsum(w * (1 - y), 0)
    last = torch.ones(len(s), dtype=torch.bool, device=s.device)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    if len(tp) == 0 or tp[-1] <= 0:
        return float("nan")
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


AP_BINS = 8192      # histogram bins of :class:`OccupancyAP`
AP_LIMIT = 16.0     # logits binned over [-AP_LIMIT, AP_LIMIT]: bins 1/256 wide, integers on bin edges


class OccupancyAP:
    """Average precision of occupancy scores, positives against *every* ray-cast free cell, overall
    and per range band, from fixed-size score histograms: memory is constant in the number of frames,
    the counts stay on the scores' device and sum across processes (:meth:`all_reduce`). Scores are
    binned uniformly over [-``limit``, ``limit``] (beyond: the end bins); scores sharing a bin count as
    one tied score, as ties do in :func:`average_precision`."""

    def __init__(self, bins: int = AP_BINS, limit: float = AP_LIMIT):
        self.bins, self.limit = int(bins), float(limit)
        self.counts: Optional[torch.Tensor] = None   # [band, label (0 free, 1 positive), bin] float64

    @torch.no_grad()
    def add(self, scores: torch.Tensor, targets: OccupancyTargets, free_ids: Optional[torch.Tensor] = None) -> None:
        """Count the positives and free cells of ``targets`` at their ``scores`` (any shape holding
        every target cell); ``free_ids``: ``nonzero(targets.free)`` when already known."""
        free_ids = torch.nonzero(targets.free).squeeze(1) if free_ids is None else free_ids
        ids = torch.cat([targets.positives, free_ids])
        labels = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        labels[:len(targets.positives)] = 1
        self.add_samples(scores.reshape(-1)[ids], labels, targets.geometry.band(ids))

    @torch.no_grad()
    def add_samples(self, scores: torch.Tensor, labels: torch.Tensor, bands: torch.Tensor) -> None:
        """Count items by score, label (1 positive, 0 negative) and band index (0 .. len(BANDS) - 1)."""
        if self.counts is None:
            self.counts = self._zeros(scores.device)
        scale = self.bins / (2 * self.limit)
        b = ((scores.float().clamp(-self.limit, self.limit) + self.limit) * scale).long().clamp_(0, self.bins - 1)
        key = (bands.long() * 2 + labels.long()) * self.bins + b
        self.counts += torch.bincount(key, minlength=self.counts.numel()).view_as(self.counts)

    def all_reduce(self) -> None:
        """Sum the counts over every process of the default group (no-op without torch.distributed)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.counts is None:  # a process whose shard was empty still takes part
                nccl = dist.get_backend() == "nccl"
                self.counts = self._zeros(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
            dist.all_reduce(self.counts)

    def _zeros(self, device) -> torch.Tensor:
        return torch.zeros(len(BANDS), 2, self.bins, dtype=torch.float64, device=device)

    def result(self) -> Dict[str, float]:
        """``occ_ap`` and ``occ_ap_<band>`` (NaN where no positive was counted)."""
        counts = self.counts.cpu() if self.counts is not None else self._zeros("cpu")
        out = {"occ_ap": _histogram_ap(counts.sum(0))}
        out.update({f"occ_ap_{name}": _histogram_ap(counts[i]) for i, name in enumerate(BANDS)})
        return out


def _histogram_ap(hist: torch.Tensor) -> float:
    """AP of a [2, bins] histogram (row 0 negatives, row 1 positives), highest bin first."""
    pos, neg = hist[1].flip(0), hist[0].flip(0)
    level = (pos + neg) > 0
    tp, fp = torch.cumsum(pos, 0)[level], torch.cumsum(neg, 0)[level]
    if len(tp) == 0 or tp[-1] <= 0:
        return float("nan")
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


@torch.no_grad()
def occupancy_metrics(logits: torch.Tensor, targets: OccupancyTargets) -> Dict[str, float]:
    """AP (:class:`OccupancyAP`, every free cell) and precision / recall / IoU of ``logits > 0``,
    positives against ray-cast free cells (unknown space and cells with a visible voxel in neither)."""
    flat = logits.reshape(-1)
    free_ids = torch.nonzero(targets.free).squeeze(1)
    ap = OccupancyAP()
    ap.add(logits, targets, free_ids)
    tp = int(torch.count_nonzero(flat[targets.positives] > 0))
    fp = int(torch.count_nonzero(flat[free_ids] > 0))
    fn = len(targets.positives) - tp
    return {**ap.result(), "occ_precision": tp / max(tp + fp, 1), "occ_recall": tp / max(tp + fn, 1),
            "occ_iou": tp / max(tp + fp + fn, 1), "occ_positives": float(len(targets.positives)),
            "occ_free_cells": float(len(free_ids))}


@torch.no_grad()
def grow_visible_scores(targets: OccupancyTargets, radius: int = 4) -> torch.Tensor:
    """Baseline that learns nothing: each cell scored by its distance to the nearest visible cell
    (``radius + 1 - d`` for d = 1 .. radius dilation steps of one target cell, 0 beyond)."""
    grid = targets.visible.view(targets.shape).float()
    score = torch.zeros_like(grid)
    reached = grid.clone()
    for d in range(1, radius + 1):
        grown = F.max_pool3d(reached[:, None], 3, stride=1, padding=1)[:, 0]
        score = torch.where((grown > 0) & (reached == 0), torch.full_like(score, radius + 1 - d), score)
        reached = grown
    return score


class HeightRangePrior:
    """Scene-blind baseline: how often a cell at this height and horizontal range was a masked-voxel
    positive rather than ray-cast free space, counted over training frames (:meth:`observe`); a frame's
    cells are scored by that rate's log-odds (:meth:`scores`). It knows the sensor's layout of occupancy,
    nothing of the scene in front of it: an encoder that has learnt anything beats it."""

    def __init__(self, range_bin_m: float = 2.0, max_range_m: float = 120.0):
        self.range_bin_m, self.num_range = float(range_bin_m), int(math.ceil(max_range_m / range_bin_m)) + 1
        self.counts: Optional[torch.Tensor] = None  # [height, range bin, label (0 free, 1 positive)] float64

    def _keys(self, ids: torch.Tensor, geometry: CellGeometry) -> torch.Tensor:
        _, dt, ht, wt = geometry.shape
        x, y, z = (ids % wt).double(), ((ids // wt) % ht).double(), (ids // (wt * ht)) % dt
        cx = geometry.pc_min[0] + (x + 0.5) * geometry.cell[0] - geometry.sensor[0]
        cy = geometry.pc_min[1] + (y + 0.5) * geometry.cell[1] - geometry.sensor[1]
        r = (torch.hypot(cx, cy) / self.range_bin_m).long().clamp_(max=self.num_range - 1)
        return z * self.num_range + r

    @torch.no_grad()
    def observe(self, targets: OccupancyTargets) -> None:
        dt = targets.shape[1]
        if self.counts is None:
            self.counts = torch.zeros(dt * self.num_range, 2, dtype=torch.float64)
        elif self.counts.shape[0] != dt * self.num_range:
            raise ValueError(f"a grid of {dt} height cells after one of {self.counts.shape[0] // self.num_range}")
        free_ids = torch.nonzero(targets.free).squeeze(1)
        for label, ids in ((0, free_ids), (1, targets.positives)):
            keys = self._keys(ids, targets.geometry).cpu()
            self.counts[:, label] += torch.bincount(keys, minlength=self.counts.shape[0]).double()

    @torch.no_grad()
    def scores(self, targets: OccupancyTargets) -> torch.Tensor:
        """Log-odds (add-one smoothed) of every cell of ``targets``' grid, flat."""
        if self.counts is None:
            raise RuntimeError("HeightRangePrior.scores before any observe()")
        table = torch.log((self.counts[:, 1] + 1) / (self.counts[:, 0] + 1)).float()
        ids = torch.arange(math.prod(targets.shape), device=targets.free.device)
        return table.to(ids.device)[self._keys(ids, targets.geometry)]
