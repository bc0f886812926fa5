"""Export the vehicle side of a trained PointPillarRQ as an edge bundle (:mod:`pcdet_ext.edge.bundle`):
the PillarVFE with BatchNorm folded into its linear layers and the nearest-code quantizer at each
codebook size as ONNX (TorchScript exporter, fixed opset, onnx.checker), plus the metadata."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from pcdet_ext.algorithms.bitstream import ProbabilityModels
from pcdet_ext.config import ConfigError
from pcdet_ext.deploy.runtime import trained_cells
from pcdet_ext.edge.bundle import ENCODER, FORMAT, METADATA, OPSET, VoxelConfig, quantizer_file, sha256

HANDLED_PROCESSORS = ("mask_points_and_boxes_outside_range", "shuffle_points", "transform_points_to_voxels")


def fold_batchnorm(vfe: nn.Module) -> nn.Module:
    """A copy of a PillarVFE whose PFN layers compute linear + BatchNorm (eval statistics) as one
    linear layer with bias."""
    vfe = copy.deepcopy(vfe).eval()
    for pfn in vfe.pfn_layers:
        if not pfn.use_norm:
            continue
        bn, lin = pfn.norm, pfn.linear
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Linear(lin.in_features, lin.out_features, bias=True)
        with torch.no_grad():
            fused.weight.copy_(lin.weight * scale[:, None])
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
        pfn.linear, pfn.use_norm = fused, False
        del pfn.norm
    return vfe


class PillarEncoder(nn.Module):
    """(voxels [P, T, F], num_points [P] int32, coords [P, 4] int32) -> pillar features [P, C]: PillarVFE's
    forward with the same float operations per element, written without its in-place slice assignments
    (which export as ScatterND and run several times slower)."""

    def __init__(self, vfe: nn.Module):
        super().__init__()
        self.pfn_layers = vfe.pfn_layers
        self.use_absolute_xyz, self.with_distance = vfe.use_absolute_xyz, vfe.with_distance
        self.register_buffer("scale", torch.tensor([vfe.voxel_x, vfe.voxel_y, vfe.voxel_z], dtype=torch.float32))
        self.register_buffer("offset", torch.tensor([vfe.x_offset, vfe.y_offset, vfe.z_offset], dtype=torch.float32))

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        xyz = voxels[:, :, :3]
        points_mean = xyz.sum(dim=1, keepdim=True) / num_points.type_as(voxels).view(-1, 1, 1)
        centre = coords[:, [3, 2, 1]].to(voxels.dtype).unsqueeze(1) * self.scale + self.offset
        features = [voxels if self.use_absolute_xyz else voxels[..., 3:], xyz - points_mean, xyz - centre]
        if self.with_distance:
            features.append(torch.norm(xyz, 2, 2, keepdim=True))
        features = torch.cat(features, dim=-1)
        mask = num_points.unsqueeze(1) > torch.arange(voxels.shape[1], dtype=torch.int32)
        features = features * mask.unsqueeze(-1).type_as(voxels)
        for pfn in self.pfn_layers:
            features = pfn(features)
        return features.squeeze(1)


class NearestCodes(nn.Module):
    """features [P, C] -> codes [P, depth]: the quantizer's greedy residual nearest-code assignment at
    ``k`` entries per codebook, in the same operations as ``ResidualQuantizer.encode``."""

    def __init__(self, quantizer, depth: int, k: int):
        super().__init__()
        self.adapter = copy.deepcopy(quantizer.adapter_in) if quantizer.adapter_in is not None else None
        self.register_buffer("books", torch.stack([quantizer.codebooks[c].detach()[:k] for c in range(depth)]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = features.float()
        if self.adapter is not None:
            residual = self.adapter(residual)
        codes = []
        for book in self.books:
            dist = torch.addmm(book.pow(2).sum(1).unsqueeze(0), residual, book.t(), beta=1.0, alpha=-2.0)
            idx = dist.argmin(1)
            codes.append(idx)
            residual = residual - book.index_select(0, idx)
        return torch.stack(codes, 1)


def voxel_config(dataset_cfg) -> VoxelConfig:
    """The point/voxel processing of an OpenPCDet DATA_CONFIG at test time, or a ConfigError naming
    what the lean edge does not reproduce."""
    enc = dataset_cfg.POINT_FEATURE_ENCODING
    if enc.encoding_type != "absolute_coordinates_encoding":
        raise ConfigError(f"DATA_CONFIG.POINT_FEATURE_ENCODING.encoding_type: the edge runtime reproduces "
                          f"absolute_coordinates_encoding, got {enc.encoding_type}")
    src = list(enc.src_feature_list)
    columns = [0, 1, 2] + [src.index(f) for f in enc.used_feature_list if f not in ("x", "y", "z")]
    voxel = None
    for proc in dataset_cfg.DATA_PROCESSOR:
        if proc.NAME not in HANDLED_PROCESSORS:
            raise ConfigError(f"DATA_CONFIG.DATA_PROCESSOR: '{proc.NAME}' is not reproduced by the edge runtime "
                              f"(it runs {', '.join(HANDLED_PROCESSORS)})")
        if proc.NAME == "shuffle_points" and proc.SHUFFLE_ENABLED.get("test", False):
            raise ConfigError("DATA_CONFIG.DATA_PROCESSOR shuffle_points: SHUFFLE_ENABLED.test must be False "
                              "(a shuffled frame cannot be reproduced)")
        if proc.NAME == "transform_points_to_voxels":
            voxel = proc
    if voxel is None:
        raise ConfigError("DATA_CONFIG.DATA_PROCESSOR has no transform_points_to_voxels")
    return VoxelConfig(list(dataset_cfg.POINT_CLOUD_RANGE), list(voxel.VOXEL_SIZE), int(voxel.MAX_POINTS_PER_VOXEL),
                       int(voxel.MAX_NUMBER_OF_VOXELS["test"]), columns, len(src))


def _onnx(module: nn.Module, args: tuple, path: Path, inputs: List[str], output: str, dynamic: Dict) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("exporting the edge bundle needs onnx: pip install 'pcdet_ext[export]'") from exc
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(tmp), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=[output], dynamic_axes=dynamic)
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    os.replace(tmp, path)


@torch.no_grad()
def export_bundle(model, dataset_cfg, models: ProbabilityModels, model_id: bytes, out_dir) -> Path:
    """Write the edge bundle of ``model`` (a PointPillarRQ with its checkpoint loaded) to ``out_dir``."""
    if type(model.vfe).__name__ != "PillarVFE":
        raise ConfigError(f"MODEL.VFE: the edge bundle exports PillarVFE, this model has {type(model.vfe).__name__}")
    voxels = voxel_config(dataset_cfg)
    q = model.quantizer
    cells = trained_cells(q, models)
    if not cells:
        raise ConfigError("no (n, k) cell is both trained and covered by the bitstream models: nothing to export")
    sizes = sorted({k for _, k in cells})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t, f = voxels.max_points_per_voxel, len(voxels.point_columns)
    example = (torch.rand(8, t, f), torch.full((8,), t, dtype=torch.int32), torch.zeros(8, 4, dtype=torch.int32))
    _onnx(PillarEncoder(fold_batchnorm(model.vfe)), example, out / ENCODER, ["voxels", "num_points", "coords"],
          "features", {"voxels": {0: "pillars"}, "num_points": {0: "pillars"}, "coords": {0: "pillars"},
                       "features": {0: "pillars"}})
    for k in sizes:
        depth = max(n for n, kk in cells if kk == k)
        _onnx(NearestCodes(q, depth, k), (torch.randn(8, q.dim),), out / quantizer_file(k), ["features"], "codes",
              {"features": {0: "pillars"}, "codes": {0: "pillars"}})
    files = {name: sha256(out / name) for name in [ENCODER] + [quantizer_file(k) for k in sizes]}
    meta = {"format": FORMAT, "opset": OPSET, "model_id": model_id.hex(), "mode": model.rq_cfg.MODE,
            "feature_dim": int(q.dim), "voxels": voxels.to_json(), "cells": [list(c) for c in cells],
            "files": files, "bitstream_models": models.to_state()}
    tmp = out / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out / METADATA)
    return out
