"""``--pretrained_model``: partial, shape-matched loading with a per-module coverage report."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from pcdet_ext.engine.optimization.param_groups import BACKBONE_MODULES
from pcdet_ext.utils.checkpoint import CheckpointError, load_checkpoint


class PretrainedWeightsError(ValueError):
    """A --pretrained_model that is missing, not a checkpoint, or does not fit the model."""


def read_weights(path) -> Dict[str, torch.Tensor]:
    """Tensors of an OpenPCDet checkpoint (``model_state``) or a bare state dict (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"--pretrained_model: {path} does not exist")
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise PretrainedWeightsError(f"--pretrained_model: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("model_state"), Mapping):
        state = state["model_state"]
    elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"--pretrained_model: {path} holds no model weights (expected an OpenPCDet "
                                     "checkpoint with model_state, or a state dict)")
    return dict(state)


RUN_STATE = {"mask_step", "frame_queue"}  # pretraining step counter and memory: state of a run, not weights


def _is_run_state(key: str) -> bool:
    return not RUN_STATE.isdisjoint(key.split("."))


def coverage(model_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
             new_modules: Sequence[str] = ()) -> Tuple[Dict[str, Tuple[int, int]], Set[str]]:
    """Per top-level module ``(loaded, total)`` over the model's keys (keys under a ``new_modules``
    prefix in a row of their own), and the loadable key set (same name and shape; never the
    run state of :data:`RUN_STATE`)."""
    table: Dict[str, Tuple[int, int]] = {}
    ok: Set[str] = set()
    for key, val in model_state.items():
        if _is_run_state(key):
            continue
        module = next((m for m in new_modules if key.startswith(f"{m}.")), key.split(".", 1)[0])
        hit = key in weights and tuple(weights[key].shape) == tuple(val.shape)
        loaded, total = table.get(module, (0, 0))
        table[module] = (loaded + hit, total + 1)
        if hit:
            ok.add(key)
    return table, ok


def format_coverage(table: Mapping[str, Tuple[int, int]]) -> str:
    return "\n".join(f"  {m:<20}{a:>6}/{b:<6}({100.0 * a / max(b, 1):5.1f} %)" for m, (a, b) in table.items())


def load_pretrained(model: nn.Module, path, min_backbone_coverage: float = 0.9,
                    backbone_modules: Sequence[str] = BACKBONE_MODULES,
                    logger: Optional[logging.Logger] = None, new_modules: Sequence[str] = ()) -> Set[str]:
    """Copy every weight whose name and shape match; log the coverage per module; refuse (before
    anything is copied) when the checkpoint holds no backbone module of the model, or when a backbone
    module it holds (e.g. ``backbone_3d`` of a 3D pretraining; a SECOND's ``backbone_2d`` may be
    absent) matches below ``min_backbone_coverage``. ``new_modules``: key prefixes of parts new to
    this model (e.g. Phase 2's heads when starting from a Phase 1 checkpoint), reported in rows of
    their own and not counted in the backbone coverage. Pretraining run state (step counters, the
    frame queue) is never loaded. Returns the names of the loaded parameters."""
    weights = read_weights(path)
    own = model.state_dict()
    table, ok = coverage(own, weights, new_modules)
    provided = {k.split(".", 1)[0] for k in weights}
    checked = [m for m in backbone_modules if m in table and m in provided]  # what the checkpoint claims to hold
    report = format_coverage(table)
    if logger:
        logger.info("==> pretrained weights from %s, loaded/total per module:\n%s", path, report)
    if not checked:
        raise PretrainedWeightsError(f"--pretrained_model {path}: holds none of this model's backbone modules "
                                     f"({', '.join(m for m in backbone_modules if m in table)})\n{report}")
    for m in checked:
        hit, total = table[m]
        if hit / total < min_backbone_coverage:
            raise PretrainedWeightsError(
                f"--pretrained_model {path}: {m} has only {hit}/{total} tensors matching this model "
                f"(< {min_backbone_coverage:.0%}); wrong checkpoint or architecture?\n{report}")
    if not ok:
        raise PretrainedWeightsError(f"--pretrained_model {path}: no tensor matches this model\n{report}")
    model.load_state_dict({k: weights[k] for k in ok}, strict=False)
    params = {n for n, _ in model.named_parameters()}
    return ok & params


def build_model_without_data(cfg) -> nn.Module:
    """``build_network`` from a config alone: the grid comes from OpenPCDet's DataProcessor, no frames are read."""
    from types import SimpleNamespace

    import numpy as np
    from pcdet.datasets.processor.data_processor import DataProcessor
    from pcdet.models import build_network
    num_features = len(cfg.DATA_CONFIG.POINT_FEATURE_ENCODING.used_feature_list)
    proc = DataProcessor(cfg.DATA_CONFIG.DATA_PROCESSOR, point_cloud_range=np.array(
        cfg.DATA_CONFIG.POINT_CLOUD_RANGE, dtype=np.float32), training=False, num_point_features=num_features)
    dataset = SimpleNamespace(class_names=cfg.CLASS_NAMES, grid_size=proc.grid_size, voxel_size=proc.voxel_size,
                              point_cloud_range=proc.point_cloud_range, depth_downsample_factor=None,
                              point_feature_encoder=SimpleNamespace(num_point_features=num_features))
    return build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
