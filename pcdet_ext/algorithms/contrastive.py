"""Voxel- and frame-level contrastive losses of CMAE-3D style pretraining (pure torch).

Voxel level: student and EMA-teacher projections of the same sites are positives; the other
sampled sites of the batch are negatives, softened by relational targets (teacher-teacher
similarities) so that look-alike sites (ground next to ground) are not pushed apart as hard
negatives. Frame level: pooled frame embeddings against a queue of earlier teacher embeddings,
with negatives from the same drive sequence masked out (consecutive frames are near-duplicates).
"""
from __future__ import annotations

import re
import zlib
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _check_temperature(name: str, t: float) -> None:
    if not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"{name}: expected a temperature > 0, got {t!r}")


def sample_sites(num: int, max_samples: int, generator: Optional[torch.Generator] = None,
                 device=None) -> torch.Tensor:
    """Indices of at most ``max_samples`` of ``num`` sites, uniformly without replacement, in random order."""
    return torch.randperm(num, generator=generator, device="cpu")[:max_samples].to(device)


def relational_targets(teacher: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """[N, N] soft targets: ``(1 - weight) x identity + weight x softmax(t t^T / temperature)``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"relational target weight: expected [0, 1], got {weight}")
    eye = torch.eye(len(teacher), device=teacher.device, dtype=teacher.dtype)
    if weight == 0.0:
        return eye
    return (1.0 - weight) * eye + weight * torch.softmax((teacher / temperature) @ teacher.t(), dim=1)


def voxel_infonce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.07,
                  relational_weight: float = 0.2, relational_temperature: float = 0.1,
                  hard_negative_ratio: Optional[float] = None) -> torch.Tensor:
    """InfoNCE between L2-normalised student [N, D] and teacher [N, D] projections of the same N
    sites (row i of each is one site), against the soft targets of :func:`relational_targets`.
    ``hard_negative_ratio``: keep only that share of each row's negatives, the most similar ones
    (the positive always stays)."""
    _check_temperature("CONTRASTIVE_TEMPERATURE", temperature)
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher projections must both be [N, D], got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    logits = (s / temperature) @ t.t()  # scale N x D, not N x N
    if hard_negative_ratio is None or len(s) <= 2:  # the common case without N x N masks: diagonal + soft part
        log_p = torch.log_softmax(logits, dim=1)
        loss = -log_p.diagonal().mean()
        if relational_weight == 0.0:
            return loss
        if not 0.0 <= relational_weight <= 1.0:
            raise ValueError(f"relational target weight: expected [0, 1], got {relational_weight}")
        soft = torch.softmax((t / relational_temperature) @ t.t(), dim=1)
        return (1.0 - relational_weight) * loss - relational_weight * (soft * log_p).sum(1).mean()
    if not 0.0 < hard_negative_ratio <= 1.0:
        raise ValueError(f"HARD_NEGATIVE_RATIO: expected (0, 1], got {hard_negative_ratio}")
    target = relational_targets(t, relational_temperature, relational_weight)
    keep = max(1, int(round(hard_negative_ratio * (len(s) - 1))))
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    neg = logits.detach().masked_fill(eye, float("-inf"))
    thresh = neg.topk(keep, dim=1).values[:, -1:]
    drop = (neg < thresh) & ~eye
    logits = logits.masked_fill(drop, float("-inf"))
    target = target.masked_fill(drop, 0.0)
    target = target / target.sum(1, keepdim=True)
    log_p = torch.log_softmax(logits, dim=1)
    return -(target * log_p.masked_fill(drop, 0.0)).sum(1).mean()


@torch.no_grad()
def top1_retrieval(student: torch.Tensor, teacher: torch.Tensor, rows: Optional[int] = None) -> float:
    """Share of sites whose nearest teacher projection (cosine, among all N) is their own; over the
    first ``rows`` sites only when given (a cheaper estimate; chance stays 1 / N)."""
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    s = s[:rows] if rows is not None else s
    return float(((s @ t.t()).argmax(1) == torch.arange(len(s), device=s.device)).float().mean())


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FrameQueue(nn.Module):
    """FIFO memory of teacher frame embeddings with their drive-sequence ids and frame indices
    (MoCo), shared by all ranks: each step every rank enqueues the gathered global batch, so the
    queues stay identical. The tools check up front that ``size`` is a multiple of the global batch;
    a shorter last batch of an epoch wraps around."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"MEMORY_BANK_SIZE: expected >= 1, got {size}")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("sequence", torch.full((size,), -1, dtype=torch.long))  # -1: never filled
        self.register_buffer("index", torch.zeros(size, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, sequence: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
        """Add ``keys`` [B, D] of frames ``sequence`` [B] (ids >= 0), ``index`` [B] (frame numbers)."""
        keys, sequence = F.normalize(keys.detach().float(), dim=1), sequence.long()
        index = torch.zeros_like(sequence) if index is None else index.long()
        if _world() > 1:
            keys, sequence, index = _gather(keys), _gather(sequence), _gather(index)
        n = len(keys)
        if n > self.size:
            raise ValueError(f"MEMORY_BANK_SIZE {self.size} is smaller than the global batch size {n}")
        slots = (self.pointer + torch.arange(n, device=self.keys.device)) % self.size  # on the device
        self.keys[slots] = keys.to(self.keys.dtype)
        self.sequence[slots] = sequence
        self.index[slots] = index
        self.pointer.add_(n).remainder_(self.size)


def check_queue_size(size: int, global_batch: int) -> None:
    """MoCo's rule: the queue holds a whole number of global batches."""
    if global_batch < 1 or size % global_batch:
        raise ValueError(f"FRAME_CONTRASTIVE_CONFIG.MEMORY_BANK_SIZE {size} must be a multiple of the global batch "
                         f"size {global_batch} (batch size per process x processes)")


def _gather(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _near_duplicates(seq_a: torch.Tensor, idx_a: torch.Tensor, seq_b: torch.Tensor, idx_b: torch.Tensor,
                     window: Optional[int]) -> torch.Tensor:
    """[A, B] True where frame a and frame b are of one sequence and (``window`` given) at most
    ``window`` frames apart."""
    same = seq_a[:, None] == seq_b[None, :]
    if window is not None:
        same &= (idx_a[:, None] - idx_b[None, :]).abs() <= window
    return same


def frame_infonce(student: torch.Tensor, teacher: torch.Tensor, sequence: torch.Tensor, queue: FrameQueue,
                  temperature: float = 0.1, max_negatives: Optional[int] = None,
                  index: Optional[torch.Tensor] = None, window: Optional[int] = None,
                  hard_negative_ratio: Optional[float] = None) -> torch.Tensor:
    """InfoNCE of frame embeddings: student [B, D] against its own teacher embedding (positive), the
    other frames of the batch and the newest ``max_negatives`` of the queue (negatives), leaving out
    near-duplicates (same ``sequence`` id and, with ``window``, at most ``window`` frame ``index``
    numbers apart: consecutive frames of a drive are not negatives) and never-filled queue slots.
    ``hard_negative_ratio``: as for voxels, keep only that share of each row's negative columns, the
    most similar ones."""
    _check_temperature("FRAME_TEMPERATURE", temperature)
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    index = torch.zeros_like(sequence) if index is None else index
    order = (queue.pointer - 1 - torch.arange(queue.size, device=s.device)) % queue.size  # newest first
    if max_negatives is not None:
        order = order[:max_negatives]
    bank, bank_seq, bank_idx = queue.keys[order], queue.sequence[order], queue.index[order]
    pos = (s * t).sum(1, keepdim=True)
    in_batch = (s @ t.t()).masked_fill(_near_duplicates(sequence, index, sequence, index, window)
                                       | torch.eye(len(s), dtype=torch.bool, device=s.device), float("-inf"))
    from_bank = (s @ bank.t()).masked_fill(_near_duplicates(sequence, index, bank_seq, bank_idx, window)
                                           | (bank_seq[None, :] < 0), float("-inf"))
    negatives = torch.cat([in_batch, from_bank], 1)
    if hard_negative_ratio is not None:
        if not 0.0 < hard_negative_ratio <= 1.0:
            raise ValueError(f"HARD_NEGATIVE_RATIO: expected (0, 1], got {hard_negative_ratio}")
        keep = max(1, int(round(hard_negative_ratio * negatives.shape[1])))
        thresh = negatives.detach().topk(keep, dim=1).values[:, -1:]
        negatives = negatives.masked_fill(negatives.detach() < thresh, float("-inf"))
    logits = torch.cat([pos, negatives], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long, device=s.device))


class ProjectionHead(nn.Module):
    """Linear-LayerNorm-ReLU-Linear projection of features [N, C] to [N, D] (SimCLR / MoCo v2 with
    LayerNorm: any N, no cross-rank statistics)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


def frame_sequence_ids(frame_ids: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence id [B], frame index [B]) from dataset frame ids: the trailing number is the frame
    index, what precedes it names the drive (``segment-123_with_camera_labels_042`` -> sequence
    ``segment-123_with_camera_labels_``, index 42; KITTI's ``000123`` -> one unnamed sequence, 123);
    sequence ids are stable across processes (CRC32 of the name)."""
    seqs, idx = [], []
    for fid in frame_ids:
        m = _TRAILING_NUMBER.match(str(fid))
        name, number = (m.group(1), int(m.group(2))) if m else (str(fid), 0)
        seqs.append(zlib.crc32(name.encode()) & 0x7FFFFFFF)
        idx.append(number)
    return torch.tensor(seqs, dtype=torch.long), torch.tensor(idx, dtype=torch.long)
