"""The RQ bottleneck as an OpenPCDet-style module: ``(model_cfg, input_channels)``, reads and
writes ``batch_dict``. Pure torch (no OpenPCDet import).

Sparse mode (default) quantizes only non-empty pillars (``pillar_features``, before the
scatter): empty BEV cells stay exactly zero and the occupancy (``voxel_coords``) is lossless side
information. Dense mode quantizes every BEV cell of ``spatial_features`` (after the scatter),
the ``latent_shape [H, W, C]`` / ``code_shape [H, W, 1]`` layout, for comparison.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from easydict import EasyDict

from ...quantization import ResidualQuantizer

DEFAULTS = {
    "NUM_CODEBOOKS": 5,
    "CODEBOOK_SIZE": 256,
    "EMBEDDING_SCHEDULE": [16, 32, 64, 128, 256],
    "DECAY": 0.99,
    "MODE": "sparse",
    "ADAPTER_DIM": None,
    "OPERATING_POINT_TRAINING": True,
    "FREEZE_EARLIER": True,
    "DEAD_THRESHOLD": 1e-3,
    "FREEZE_HEAD_TAIL": True,
    "LOSS_WEIGHTS": {"DET": 0.8, "VQ": 0.25, "CODEBOOK": 0.1},
}
_TYPES = {"NUM_CODEBOOKS": int, "CODEBOOK_SIZE": int, "EMBEDDING_SCHEDULE": list, "DECAY": float,
          "MODE": str, "ADAPTER_DIM": (int, type(None)), "OPERATING_POINT_TRAINING": bool,
          "FREEZE_EARLIER": bool, "DEAD_THRESHOLD": float, "FREEZE_HEAD_TAIL": bool, "LOSS_WEIGHTS": dict}


def parse_rq_config(cfg) -> EasyDict:
    """``MODEL.RQ_BOTTLENECK`` with defaults filled in; unknown keys and wrong types are errors."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"MODEL.RQ_BOTTLENECK: unknown keys {unknown}; expected some of {sorted(DEFAULTS)}")
    out = EasyDict({**DEFAULTS, **cfg})
    for key, kind in _TYPES.items():
        val = out[key]
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            out[key] = float(val)
        elif not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            raise TypeError(f"MODEL.RQ_BOTTLENECK.{key}: expected {kind}, got {val!r}")
    weights = {**DEFAULTS["LOSS_WEIGHTS"], **out.LOSS_WEIGHTS}
    if set(weights) != set(DEFAULTS["LOSS_WEIGHTS"]) or any(float(v) < 0 for v in weights.values()):
        raise ValueError(f"MODEL.RQ_BOTTLENECK.LOSS_WEIGHTS: expected non-negative DET, VQ, CODEBOOK, got {weights}")
    out.LOSS_WEIGHTS = EasyDict({k: float(v) for k, v in weights.items()})
    if out.MODE not in ("sparse", "dense"):
        raise ValueError(f"MODEL.RQ_BOTTLENECK.MODE: expected 'sparse' or 'dense', got {out.MODE!r}")
    sched = out.EMBEDDING_SCHEDULE
    if not sched or any(b <= a for a, b in zip(sched, sched[1:])) or sched[0] < 1 or sched[-1] > out.CODEBOOK_SIZE:
        raise ValueError(f"MODEL.RQ_BOTTLENECK.EMBEDDING_SCHEDULE: expected strictly increasing sizes in "
                         f"1..CODEBOOK_SIZE={out.CODEBOOK_SIZE}, got {sched}")
    if out.NUM_CODEBOOKS < 1:
        raise ValueError(f"MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS: expected >= 1, got {out.NUM_CODEBOOKS}")
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
        if self.mode == "sparse":
            feats = batch_dict["pillar_features"]
            out = self.quantizer(feats)
            batch_dict["pillar_features"] = out.quantized
        else:
            bev = batch_dict["spatial_features"]  # (B, C, H, W)
            b, c, h, w = bev.shape
            out = self.quantizer(bev.permute(0, 2, 3, 1).reshape(-1, c))
            batch_dict["spatial_features"] = out.quantized.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        batch_dict["rq_codes"] = out.codes
        batch_dict["rq_output"] = out
        return batch_dict
