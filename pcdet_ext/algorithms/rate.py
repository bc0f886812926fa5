"""What a frame costs on the link, from its codes and occupancy (pure torch).

* fixed-length: every code as ceil(log2 k) bits, the occupancy as a raw H x W bitmap;
* entropy: the empirical entropy of each codebook's codes over the evaluated frames, and the
  occupancy's i.i.d. (Bernoulli) entropy bound. (Actual coded bytes come from the bitstream.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch


def _entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy (bits per symbol) of a histogram."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())


def binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@dataclass
class RateMeter:
    """Accumulates codes and occupancy of evaluated frames at one (n, k) operating point."""
    num_codebooks: int
    num_embeddings: int
    grid_cells: int                               # H x W of the BEV grid (sparse) or cells coded (dense)
    sparse: bool = True
    histograms: List[torch.Tensor] = field(default_factory=list)
    frames: int = 0
    pillars: int = 0

    def __post_init__(self):
        self.histograms = [torch.zeros(self.num_embeddings, dtype=torch.long) for _ in range(self.num_codebooks)]

    def add(self, codes: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> None:
        """codes [M, n] of a batch, ``batch_index`` [M] the frame of each row."""
        if codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks, meter expects {self.num_codebooks}")
        for c in range(self.num_codebooks):
            self.histograms[c] += torch.bincount(codes[:, c].cpu(), minlength=self.num_embeddings)[: self.num_embeddings]
        self.frames += batch_size
        self.pillars += int(codes.shape[0])

    def summary(self) -> Dict[str, float]:
        frames = max(self.frames, 1)
        per_frame = self.pillars / frames
        bits_per_code = math.ceil(math.log2(self.num_embeddings)) if self.num_embeddings > 1 else 0
        code_bits_fixed = per_frame * self.num_codebooks * bits_per_code
        code_bits_entropy = per_frame * sum(_entropy_bits(h) for h in self.histograms)
        occ_fixed = self.grid_cells if self.sparse else 0
        occ_entropy = self.grid_cells * binary_entropy(per_frame / self.grid_cells) if self.sparse else 0
        return {
            "num_codebooks": self.num_codebooks, "num_embeddings": self.num_embeddings,
            "frames": self.frames, "pillars_per_frame": per_frame,
            "code_bits_fixed": code_bits_fixed, "code_bits_entropy": code_bits_entropy,
            "occupancy_bits_fixed": occ_fixed, "occupancy_bits_entropy": occ_entropy,
            "kb_per_frame_fixed": (code_bits_fixed + occ_fixed) / 8 / 1024,
            "kb_per_frame_entropy": (code_bits_entropy + occ_entropy) / 8 / 1024,
        }


def dense_float32_kb(h: int, w: int, c: int) -> float:
    """The uncompressed BEV pseudo-image a split without bottleneck would send."""
    return h * w * c * 4 / 1024
