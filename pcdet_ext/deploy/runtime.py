"""Edge and server sides of split inference for a trained PointPillarRQ.

Edge: points -> OpenPCDet's point/voxel processing -> PillarVFE -> quantizer codes -> bytes.
Server: bytes -> codes -> code vectors -> PointPillarScatter -> 2D backbone -> head ->
post-processing -> boxes. Both load from an OpenPCDet config and a checkpoint (the checkpoint
must carry the bitstream's probability models: ``fit_probability_models`` adds them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import GridGeometry, ProbabilityModels, decode_frame, encode_frame
from pcdet_ext.algorithms.bitstream.rate_choice import ContextRate, cell_positions
from pcdet_ext.openpcdet.datasets.validation import DatasetFormatError, check_velodyne
from pcdet_ext.engine.recipes.progressive_rq.measured import STATE_KEY, batch_cells, codebook_array
from pcdet_ext.utils.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_state_of
from pcdet_ext.utils.console import progress

def grid_geometry(dataset, levels: int = 4) -> GridGeometry:
    """BEV grid of an OpenPCDet dataset: rows = y cells, cols = x cells, sensor at the origin."""
    nx, ny = int(dataset.grid_size[0]), int(dataset.grid_size[1])
    pc, vs = dataset.point_cloud_range, dataset.voxel_size
    return GridGeometry(height=ny, width=nx, sensor_row=float(-pc[1] / vs[1]), sensor_col=float(-pc[0] / vs[0]),
                        cell_m=float(vs[0]), levels=levels)


def _batch(dataset, points: np.ndarray, frame_id: str = "0") -> Dict:
    from pcdet.models import load_data_to_gpu
    data = dataset.prepare_data({"points": points, "frame_id": frame_id})
    batch = dataset.collate_batch([data])
    load_data_to_gpu(batch)
    return batch


def head_features(model, dataset, points: np.ndarray, geo: GridGeometry) -> Tuple[torch.Tensor, np.ndarray]:
    """What the edge quantizes and which cells it covers: the non-empty pillars (sparse mode) or
    every cell of the scattered pseudo-image (dense mode, raster order)."""
    batch = model.vfe(_batch(dataset, points))
    if model.rq_cfg.MODE == "dense":
        bev = model.map_to_bev_module(batch)["spatial_features"][0]
        return bev.permute(1, 2, 0).reshape(-1, bev.shape[0]), np.arange(geo.height * geo.width)
    return batch["pillar_features"], batch_cells(batch, geo.width)


@torch.no_grad()
def fit_probability_models(model, dataset, frames: Sequence[np.ndarray], sizes: Sequence[int],
                           context: bool = True) -> ProbabilityModels:
    """Learn occupancy contexts and per-codebook code statistics (at every k of ``sizes``, all
    trained codebooks; with ``context`` also given the previous codebook's code and given a
    neighbouring pillar's code) from training frames, on exactly what the edge codes (rate-aware
    codes when the quantizer chooses them so: :meth:`ResidualQuantizer.set_rate`)."""
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import operating_point
    q = model.quantizer
    geo = grid_geometry(dataset)
    depth = q.trained_depth or q.num_codebooks
    sparse = model.rq_cfg.MODE == "sparse"
    models = ProbabilityModels.empty(geo, depth, sizes, context=context)
    model.eval()
    for points in progress(frames, desc="fitting bitstream models", unit="frame"):
        feats, cells = head_features(model, dataset, points, geo)
        occ = None
        if sparse:
            occ = np.zeros(geo.height * geo.width, dtype=bool)
            occ[cells] = True
            occ = occ.reshape(geo.height, geo.width)
        by_k, positions = {}, cell_positions(cells, geo.width) if q.rate_active else None
        for k in sizes:
            with operating_point(q, depth, k):
                by_k[int(k)] = q.encode(feats, positions).cpu().numpy()
        models.observe(occ, by_k, cells=cells)
    return models


@torch.no_grad()
def fit_quantizer_to_frames(model, dataset, frames: Sequence[np.ndarray], schedule: Sequence[int], steps: int) -> int:
    """Train the whole quantizer (every codebook, size by size) to reconstruct the pillar features of
    ``frames`` (no detection loss: for byte and speed measurements on real scans); returns how many
    feature vectors it saw."""
    from pcdet_ext.algorithms.quantization.fit import fit_progressive
    geo = grid_geometry(dataset)
    feats = torch.cat([head_features(model.eval(), dataset, points, geo)[0] for points in frames])
    with torch.enable_grad():
        fit_progressive(model.quantizer, feats, model.quantizer.num_codebooks, list(schedule), steps=steps)
    return len(feats)


def save_with_models(ckpt_path, models: ProbabilityModels, out_path) -> None:
    state = load_checkpoint(ckpt_path)
    state[STATE_KEY] = models.to_state()
    atomic_save(state, out_path)


def trained_cells(quantizer, models: ProbabilityModels) -> List[Tuple[int, int]]:
    """(n, k) with every one of the first n codebooks trained to >= k entries and bitstream models
    fitted at k: the cells an edge may send and a server accepts."""
    sizes = [int(s) for s in quantizer.trained_size.tolist()]
    return [(n, k) for k in sorted(models.code_counts) for n in range(1, quantizer.trained_depth + 1)
            if min(sizes[:n]) >= k and n <= models.code_counts[k].shape[0]]


@dataclass
class Timing:
    ms: float
    bytes: int = 0


class _Side:
    def __init__(self, model, dataset, models: ProbabilityModels):
        self.model, self.dataset, self.models = model.eval(), dataset, models
        self.q = model.quantizer
        self.geo = models.geometry
        if (self.geo.height, self.geo.width) != (int(dataset.grid_size[1]), int(dataset.grid_size[0])):
            raise ValueError(f"bitstream models were fitted on a {self.geo.height} x {self.geo.width} grid, the "
                             f"model config has {int(dataset.grid_size[1])} x {int(dataset.grid_size[0])}")
        self.model_id = models.identifier(codebook_array(self.q))
        self.dense = model.rq_cfg.MODE == "dense"
        self.cells = trained_cells(self.q, models)  # the (n, k) frames may carry

    @classmethod
    def from_checkpoint(cls, model, dataset, ckpt_path, *args):
        state = load_checkpoint(ckpt_path)
        if STATE_KEY not in state:
            raise CheckpointError(f"{ckpt_path} has no bitstream models ('{STATE_KEY}'): fit them first "
                                  "(tools/split_infer.py --fit_models)")
        model.load_state_dict(state["model_state"])
        return cls(model, dataset, ProbabilityModels.from_state(state[STATE_KEY]), *args)


class EdgeRuntime(_Side):
    """Points -> bytes at (n, k); with ``rate_lambda`` > 0 the codes are chosen rate-aware under the
    stored models, in their coding contexts (``ResidualQuantizer.set_rate``). Timing: ``head_ms``
    (OpenPCDet's point/voxel processing + PillarVFE), ``quantize_encode_ms``, ``edge_ms`` (both)."""

    def __init__(self, model, dataset, models: ProbabilityModels, num_codebooks: int, num_embeddings: int,
                 rate_lambda: float = 0.0):
        super().__init__(model, dataset, models)
        self.q.set_active(num_codebooks, num_embeddings)
        self.n, self.k = num_codebooks, num_embeddings
        self.q.set_rate(rate_lambda, ContextRate(models) if rate_lambda > 0 else None)

    @torch.no_grad()
    def encode(self, points: np.ndarray) -> Tuple[bytes, Dict[str, float]]:
        t0 = time.perf_counter()
        feats, cells = head_features(self.model, self.dataset, points, self.geo)
        t1 = time.perf_counter()
        codes = self.q.encode(feats, cell_positions(cells, self.geo.width) if self.q.rate_active else None)
        codes = codes.cpu().numpy()
        data = encode_frame(cells, codes, self.k, self.models, self.model_id, dense=self.dense)
        t2 = time.perf_counter()
        return data, {"head_ms": (t1 - t0) * 1e3, "quantize_encode_ms": (t2 - t1) * 1e3, "edge_ms": (t2 - t0) * 1e3,
                      "pillars": len(cells)}


class ServerRuntime(_Side):
    """Bytes -> OpenPCDet prediction dict (boxes, scores, labels)."""

    @torch.no_grad()
    def decode(self, data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        t0 = time.perf_counter()
        frame = decode_frame(data, self.models, self.model_id, self.q.num_codebooks, self.q.codebook_size,
                             dense=self.dense, cells=self.cells)
        feats = self.q.decode(torch.from_numpy(frame.codes))
        t1 = time.perf_counter()
        if frame.dense:
            c = feats.shape[1]
            batch = {"spatial_features": feats.reshape(1, frame.height, frame.width, c).permute(0, 3, 1, 2).contiguous(),
                     "batch_size": 1}
        elif len(frame.cells) == 0:  # nothing in range: an empty pseudo-image
            c = self.model.map_to_bev_module.num_bev_features
            batch = {"spatial_features": torch.zeros(1, c, frame.height, frame.width), "batch_size": 1}
        else:
            cells = torch.from_numpy(frame.cells)
            coords = torch.stack([torch.zeros_like(cells), torch.zeros_like(cells), cells // frame.width,
                                  cells % frame.width], 1).float()
            batch = self.model.map_to_bev_module({"pillar_features": feats, "voxel_coords": coords, "batch_size": 1})
        batch = self.model.dense_head(self.model.backbone_2d(batch))
        pred_dicts, _ = self.model.post_processing(batch)
        t2 = time.perf_counter()
        return pred_dicts[0], {"decode_ms": (t1 - t0) * 1e3, "tail_ms": (t2 - t1) * 1e3}


def boxes_payload(pred: Dict[str, torch.Tensor], class_names: List[str]) -> Dict[str, list]:
    """JSON-able detections."""
    labels = pred["pred_labels"].cpu().numpy()
    # rounded in float64: float32's round() multiplies by 1e4 and overflows on an untrained head's huge boxes
    return {"boxes": pred["pred_boxes"].cpu().double().numpy().round(4).tolist(),
            "scores": pred["pred_scores"].cpu().double().numpy().round(4).tolist(),
            "labels": [class_names[int(i) - 1] for i in labels]}


def in_process(model, dataset, points: np.ndarray, num_codebooks: int, num_embeddings: Optional[int]):
    """The reference: the whole PointPillarRQ in one process at (n, k)."""
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import operating_point
    model.eval()
    with torch.no_grad(), operating_point(model.quantizer, num_codebooks, num_embeddings):
        pred_dicts, _ = model(_batch(dataset, points))
    return pred_dicts[0]


def load_split_model(cfg_file=None, set_cfgs: Sequence[str] = (), root_path=None, ckpt=None):
    """(model, dataset, cfg) for an OpenPCDet PointPillarRQ config: ``cfg_file``, or the config a
    tools/train_eval_rq.py checkpoint carries (``pcdet_cfg``). The dataset object only provides the
    point/voxel processing and the grid (no infos needed)."""
    from pathlib import Path

    from easydict import EasyDict
    from pcdet.datasets import DatasetTemplate
    from pcdet.models import build_network
    from pcdet.utils import common_utils

    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
    if cfg_file is not None:
        if ckpt:
            rq_checkpoint(ckpt, "--ckpt")
        cfg = cfg_from_yaml_file(find_config(str(cfg_file)))
    else:
        stored = rq_checkpoint(ckpt, "--ckpt").get("pcdet_cfg") if ckpt else None
        if stored is None:
            raise ValueError(f"{ckpt} carries no OpenPCDet config (pcdet_cfg): pass --cfg_file")
        cfg = EasyDict(stored)
    cfg_from_list(list(set_cfgs), cfg)
    dataset = DatasetTemplate(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES, training=False,
                              root_path=Path(root_path) if root_path else None, logger=common_utils.create_logger())
    model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
    if type(model).__name__ != "PointPillarRQ":
        raise ValueError(f"{cfg_file} builds {type(model).__name__}, expected PointPillarRQ")
    return model, dataset, cfg


def rq_checkpoint(path, flag: str) -> dict:
    """A checkpoint holding a PointPillarRQ (``rq_bottleneck.*`` tensors), else a one-line CheckpointError."""
    state = load_checkpoint(path)
    model_state_of(state, path, flag, needs_prefix="rq_bottleneck.",
                   expected="a PointPillarRQ checkpoint written by tools/train_eval_rq.py")
    return state


def kitti_fov_points(points: np.ndarray, frame) -> np.ndarray:
    """The points of a KITTI-layout frame (``training/velodyne/<id>.bin``) inside its camera's field of
    view, as OpenPCDet's KittiDataset keeps them with ``FOV_POINTS_ONLY``: what the detector was
    trained and is evaluated on (calibration ``calib/<id>.txt``, image size ``image_2/<id>.png``)."""
    from pathlib import Path

    from pcdet.datasets.kitti.kitti_dataset import KittiDataset
    from pcdet.utils import calibration_kitti
    from skimage import io
    frame = Path(frame)
    calib_file, image_file = (frame.parents[1] / d / f"{frame.stem}{ext}" for d, ext in (("calib", ".txt"),
                                                                                         ("image_2", ".png")))
    for needed in (calib_file, image_file):
        if not needed.is_file():
            raise DatasetFormatError(f"{needed} does not exist: FOV_POINTS_ONLY crops {frame.name} to the camera's "
                                     "field of view with its calibration and image size")
    calib = calibration_kitti.Calibration(calib_file)
    shape = np.array(io.imread(image_file).shape[:2], dtype=np.int32)
    return points[KittiDataset.get_fov_flag(calib.lidar_to_rect(points[:, 0:3]), shape, calib)]


def read_points(path, num_features: int) -> np.ndarray:
    """A KITTI ``.bin`` (float32 x, y, z, intensity; a size that is not a positive multiple of 16 bytes is
    refused, as ``create_data`` refuses it) or an ``.npy`` array, cut to ``num_features``; a
    :class:`DatasetFormatError` naming the file otherwise."""
    from pathlib import Path
    path = Path(path)
    if path.suffix == ".npy":
        pts = np.load(path, allow_pickle=False)
    else:
        pts = np.fromfile(path, dtype=np.float32, count=4 * check_velodyne(path)).reshape(-1, 4)
    if pts.ndim != 2 or pts.shape[1] < num_features:
        raise DatasetFormatError(f"{path}: expected points [N, >= {num_features}], got {pts.shape}")
    return np.ascontiguousarray(pts[:, :num_features], dtype=np.float32)
