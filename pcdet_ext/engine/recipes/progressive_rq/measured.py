"""Rates measured, not estimated: frames of a batch serialised exactly as the edge sends them under a
checkpoint's fitted bitstream models."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import ProbabilityModels, encode_frame

STATE_KEY = "bitstream_models"  # where a checkpoint carries its fitted models


def stored_models(state: Dict) -> Optional[ProbabilityModels]:
    """The bitstream models a checkpoint carries (``split_infer.py --fit_models``), or None."""
    return ProbabilityModels.from_state(state[STATE_KEY]) if STATE_KEY in state else None


def codebook_array(quantizer) -> np.ndarray:
    return torch.stack([cb.detach().cpu() for cb in quantizer.codebooks]).numpy()


def batch_cells(batch: Dict, width: int) -> np.ndarray:
    coords = batch["voxel_coords"].long().cpu().numpy()
    return coords[:, 2] * width + coords[:, 3]


class FrameBytes:
    """Measured rate: every predicted frame of a batch serialised exactly as the edge sends it, at the
    quantizer's active (n, k), under the stored models; ``sizes`` collects the byte counts."""

    def __init__(self, model, models: ProbabilityModels, k: int, grid_size: Sequence[int]):
        geo = models.geometry
        if (geo.height, geo.width) != (int(grid_size[1]), int(grid_size[0])):
            raise ValueError(f"bitstream models were fitted on a {geo.height} x {geo.width} grid, the model config "
                             f"has {int(grid_size[1])} x {int(grid_size[0])}")
        self.models, self.k, self.dense = models, k, model.rq_cfg.MODE == "dense"
        self.model_id = models.identifier(codebook_array(model.quantizer))
        self.sizes: List[int] = []

    def add(self, batch: Dict) -> None:
        codes = batch["rq_codes"].cpu().numpy()
        cells_per_frame = self.models.geometry.height * self.models.geometry.width
        if self.dense:
            frames = [(np.arange(cells_per_frame), codes[b * cells_per_frame:(b + 1) * cells_per_frame])
                      for b in range(int(batch["batch_size"]))]
        else:
            cells, sample = batch_cells(batch, self.models.geometry.width), batch["voxel_coords"][:, 0].long().cpu().numpy()
            frames = [(cells[sample == b], codes[sample == b]) for b in range(int(batch["batch_size"]))]
        self.sizes += [len(encode_frame(c, x, self.k, self.models, self.model_id, dense=self.dense)) for c, x in frames]
