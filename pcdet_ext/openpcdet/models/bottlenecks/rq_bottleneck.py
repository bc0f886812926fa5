"""The RQ bottleneck as an OpenPCDet-style module: ``(model_cfg, input_channels)``, reads and
writes ``batch_dict``. Pure torch (no OpenPCDet import).

Sparse mode (default) quantizes only non-empty pillars (``pillar_features``, before the
scatter): empty BEV cells stay exactly zero and the occupancy (``voxel_coords``) is lossless side
information. Dense mode quantizes every BEV cell of ``spatial_features`` (after the scatter),
the ``latent_shape [H, W, C]`` / ``code_shape [H, W, 1]`` layout, for comparison.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from easydict import EasyDict

from pcdet_ext.config import ConfigError, NoneType, Opt, from_cfg

from pcdet_ext.algorithms.quantization import ResidualQuantizer

WHERE = "MODEL.RQ_BOTTLENECK"
RQ_SPEC = {
    "NUM_CODEBOOKS": Opt(5, (int,), lo=1),
    "CODEBOOK_SIZE": Opt(256, (int,), lo=1),
    "EMBEDDING_SCHEDULE": Opt([16, 32, 64, 128, 256], (list,)),
    "DECAY": Opt(0.99, (float,), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    "MODE": Opt("sparse", (str,), choices=("sparse", "dense")),
    "ADAPTER_DIM": Opt(None, (int, NoneType), lo=1),
    "OPERATING_POINT_TRAINING": Opt(True, (bool,)),
    "FREEZE_EARLIER": Opt(True, (bool,)),
    "DEAD_THRESHOLD": Opt(0.01, (float,), lo=0.0, hi=1.0, hi_open=True),  # share of the expected count N/k
    "FREEZE_HEAD_TAIL": Opt(True, (bool,)),
    "LOSS_WEIGHTS": Opt(None, (dict, NoneType)),
}
# the meanings of users' training script: DET x detection loss + VQ x mse(residual, quantized) (the pull of the
# codebooks, and with an adapter its commitment); CODEBOOK weighted a term without gradient there: no effect
CODEBOOK_NOTE = "no effect on training (the original script logged that term without gradient); VQ weights the pull"
LOSS_WEIGHTS_SPEC = {"DET": Opt(0.8, (float,), lo=0.0), "VQ": Opt(0.25, (float,), lo=0.0),
                     "CODEBOOK": Opt(0.1, (float,), lo=0.0, note=CODEBOOK_NOTE)}


def parse_rq_config(cfg) -> EasyDict:
    """``MODEL.RQ_BOTTLENECK`` with defaults filled in; unknown keys, wrong types and values are
    ConfigErrors naming the key."""
    out = from_cfg(cfg, RQ_SPEC, WHERE)
    out.LOSS_WEIGHTS = from_cfg(out.LOSS_WEIGHTS, LOSS_WEIGHTS_SPEC, f"{WHERE}.LOSS_WEIGHTS")
    sched = out.EMBEDDING_SCHEDULE
    if not sched or not all(isinstance(k, int) and not isinstance(k, bool) for k in sched) or \
            any(b <= a for a, b in zip(sched, sched[1:])) or sched[0] < 1 or sched[-1] > out.CODEBOOK_SIZE:
        raise ConfigError(f"{WHERE}.EMBEDDING_SCHEDULE: expected strictly increasing sizes in "
                          f"1..CODEBOOK_SIZE={out.CODEBOOK_SIZE}, got {sched}")
    return out


class RQBottleneck(nn.Module):
    """Quantizes pillar features (sparse) or the BEV pseudo-image (dense) in ``batch_dict``."""

    def __init__(self, model_cfg, input_channels: int, **kwargs):
        super().__init__()
        self.model_cfg = parse_rq_config(model_cfg)
        cfg = self.model_cfg
        self.mode = cfg.MODE
        self.input_channels = input_channels
        self.quantizer = ResidualQuantizer(
            dim=input_channels, num_codebooks=cfg.NUM_CODEBOOKS, codebook_size=cfg.CODEBOOK_SIZE, decay=cfg.DECAY,
            schedule=cfg.EMBEDDING_SCHEDULE, adapter_dim=cfg.ADAPTER_DIM,
            operating_point_training=cfg.OPERATING_POINT_TRAINING, freeze_earlier=cfg.FREEZE_EARLIER,
            dead_threshold=cfg.DEAD_THRESHOLD)
        self.bypass = False  # True: pass features through unquantized (the uncompressed reference)

    def forward(self, batch_dict: Dict) -> Dict:
        if self.bypass:
            return batch_dict
        rate = self.quantizer.rate_active  # rate-aware coding needs each row's (sample, row, column)
        if self.mode == "sparse":
            feats = batch_dict["pillar_features"]
            out = self.quantizer(feats, batch_dict["voxel_coords"][:, [0, 2, 3]].long() if rate else None)
            batch_dict["pillar_features"] = out.quantized
        else:
            bev = batch_dict["spatial_features"]  # (B, C, H, W)
            b, c, h, w = bev.shape
            positions = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij"),
                                    -1).reshape(-1, 3) if rate else None
            out = self.quantizer(bev.permute(0, 2, 3, 1).reshape(-1, c), positions)
            batch_dict["spatial_features"] = out.quantized.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        batch_dict["rq_codes"] = out.codes
        batch_dict["rq_output"] = out
        return batch_dict
