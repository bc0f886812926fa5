"""Sparse MLFR decoder: submanifold blocks on the teacher's sites of one scale (spconv)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from pcdet_ext.algorithms.mlfr import sinusoidal_position, teacher_site_inputs


class MLFRDecoder(nn.Module):
    """Mask token + position where the student lacks a teacher site, the student's feature where it
    has one; a linear map to ``hidden`` channels, ``blocks`` submanifold 3x3x3 conv + BN + ReLU
    blocks, a linear map back to the teacher's ``channels``. Returns (prediction [Mt, C], masked [Mt])."""

    def __init__(self, channels: int, blocks: int, key: str, hidden: int):
        super().__init__()
        import spconv.pytorch as spconv
        self.mask_token = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.mask_token, std=0.02)
        self.inp = nn.Linear(channels, hidden)
        self.blocks = spconv.SparseSequential(*[
            spconv.SparseSequential(spconv.SubMConv3d(hidden, hidden, 3, padding=1, bias=False,
                                                      indice_key=f"mlfr_{key}"),
                                    nn.BatchNorm1d(hidden), nn.ReLU()) for _ in range(blocks)])
        self.out = nn.Linear(hidden, channels)
        self.channels = channels

    def forward(self, student, teacher, spatial_shape: Sequence[int], batch_size: int):
        import spconv.pytorch as spconv
        position = sinusoidal_position(teacher.indices, spatial_shape, self.channels)
        feats, masked = teacher_site_inputs((student.features, student.indices) if student is not None else
                                            (teacher.features[:0], teacher.indices[:0]),
                                            teacher.indices, spatial_shape, self.mask_token, position)
        x = spconv.SparseConvTensor(self.inp(feats), teacher.indices.int(), list(spatial_shape), batch_size)
        return self.out(self.blocks(x).features), masked
