"""What a PointPillarRQ split is compared with, on the same detector and frames, bytes measured:

- scalar-quantized pillar features (:class:`ScalarFeatureCoder`: per-channel uniform, entropy-coded,
  the same occupancy coding as the RQ frames) in place of the RQ codes;
- the raw point cloud compressed with Draco (:class:`DracoCodec`), decoded and fed to the
  *uncompressed* detector (bottleneck bypassed), as an edge that sends points would.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import ProbabilityModels
from pcdet_ext.algorithms.bitstream.scalar import ScalarFeatureCoder
from pcdet_ext.engine.recipes.progressive_rq.evaluate import bypassed
from pcdet_ext.engine.recipes.progressive_rq.measured import batch_cells


def _sparse(model) -> None:
    if model.rq_cfg.MODE != "sparse":
        raise ValueError("the scalar-feature baseline quantizes pillar features: it needs RQ_BOTTLENECK.MODE sparse")


def pillar_features(model, loader, max_frames: int) -> np.ndarray:
    """The pillar features [N, C] the bottleneck receives on up to ``max_frames`` frames of ``loader``
    (model in eval mode, bottleneck bypassed): what a scalar coder is fitted on."""
    from pcdet.models import load_data_to_gpu
    _sparse(model)
    seen: List[np.ndarray] = []
    frames = 0
    hook = model.rq_bottleneck.register_forward_hook(
        lambda module, inputs, batch: seen.append(batch["pillar_features"].detach().cpu().numpy()))
    model.eval()
    try:
        with bypassed(model), torch.no_grad():
            for batch in loader:
                load_data_to_gpu(batch)
                model(batch)
                frames += int(batch["batch_size"])
                if frames >= max_frames:
                    break
    finally:
        hook.remove()
    if not seen:
        raise ValueError("no frames to fit the scalar coder on")
    return np.concatenate(seen)


@contextlib.contextmanager
def scalar_quantized(model, coder: ScalarFeatureCoder, models: ProbabilityModels, sizes: List[int]) -> Iterator[None]:
    """Within: the bottleneck is bypassed and the pillar features are replaced by their ``coder``
    reconstruction; each frame's serialised length (occupancy under ``models`` + coded symbols) is
    appended to ``sizes``."""
    _sparse(model)
    width = models.geometry.width

    def hook(module, inputs, batch: Dict) -> Dict:
        feats = batch["pillar_features"]
        symbols = coder.quantize(feats.detach().cpu().numpy())
        cells, sample = batch_cells(batch, width), batch["voxel_coords"][:, 0].long().cpu().numpy()
        sizes.extend(len(coder.encode(cells[sample == b], symbols[sample == b], models))
                     for b in range(int(batch["batch_size"])))
        batch["pillar_features"] = torch.from_numpy(coder.dequantize(symbols)).to(feats)
        return batch

    handle = model.rq_bottleneck.register_forward_hook(hook)
    try:
        with bypassed(model):
            yield
    finally:
        handle.remove()


class DracoCodec:
    """A point cloud [N, 4] (x, y, z, intensity) as Draco bytes: positions quantized to ``bits`` bits
    over the frame's bounding box, intensity to 8 bits of [0, ``intensity_max``]; the decoder returns
    the points in Draco's order."""

    def __init__(self, bits: int, intensity_max: float, compression_level: int = 7):
        import DracoPy  # noqa: F401  (an optional dependency: pip install DracoPy)
        if not 1 <= bits <= 30:
            raise ValueError(f"Draco quantization bits must be 1..30, got {bits}")
        if not intensity_max > 0:
            raise ValueError(f"intensity_max must be > 0, got {intensity_max}")
        self.bits, self.intensity_max, self.level = bits, float(intensity_max), compression_level

    def encode(self, points: np.ndarray) -> bytes:
        import DracoPy
        if points.ndim != 2 or points.shape[1] != 4:
            raise ValueError(f"DracoCodec codes [N, 4] points (x, y, z, intensity), got {points.shape}")
        intensity = np.rint(np.clip(points[:, 3] / self.intensity_max, 0, 1) * 255).astype(np.uint8)[:, None]
        return DracoPy.encode(np.ascontiguousarray(points[:, :3], np.float32), quantization_bits=self.bits,
                              compression_level=self.level, colors=intensity)

    def decode(self, data: bytes) -> np.ndarray:
        import DracoPy
        cloud = DracoPy.decode(data)
        xyz = np.asarray(cloud.points, np.float32).reshape(-1, 3)
        intensity = np.asarray(cloud.colors, np.float32).reshape(-1)[: len(xyz)] / 255 * self.intensity_max
        return np.concatenate([xyz, intensity[:, None]], 1).astype(np.float32)


def in_range(points: np.ndarray, point_cloud_range: Sequence[float]) -> np.ndarray:
    """The points inside ``POINT_CLOUD_RANGE`` (the only ones the detector uses, so the only ones sent)."""
    lo, hi = np.asarray(point_cloud_range[:3]), np.asarray(point_cloud_range[3:])
    return points[((points[:, :3] >= lo) & (points[:, :3] < hi)).all(1)]


@contextlib.contextmanager
def _prepare_data_through(dataset, edit: Callable[[Dict], Dict]) -> Iterator[None]:
    """Within: ``dataset.prepare_data`` sees ``edit(data_dict)`` (also in DataLoader workers, which fork
    with the dataset); the class's own method again on exit."""
    original = dataset.prepare_data
    dataset.prepare_data = lambda data_dict: original(edit(data_dict))
    try:
        yield
    finally:
        del dataset.prepare_data


def frame_points(dataset) -> Dict[str, np.ndarray]:
    """Each frame's points as the dataset hands them to ``prepare_data`` (after its own filters, e.g.
    KITTI's field of view), cropped to the point-cloud range: what an edge sending points sends."""
    captured: Dict[str, np.ndarray] = {}

    def capture(data_dict: Dict) -> Dict:
        captured[str(data_dict["frame_id"])] = in_range(data_dict["points"], dataset.point_cloud_range)
        return data_dict

    with _prepare_data_through(dataset, capture):
        for i in range(len(dataset)):
            dataset[i]
    return captured


def coded_points(points: Dict[str, np.ndarray], codec: DracoCodec) -> Tuple[Dict[str, np.ndarray], List[int]]:
    """Every frame encoded and decoded: (decoded points by frame id, bytes per frame)."""
    decoded, sizes = {}, []
    for frame_id, pts in points.items():
        data = codec.encode(pts)
        sizes.append(len(data))
        decoded[frame_id] = codec.decode(data)
    return decoded, sizes


def points_replaced(dataset, points: Dict[str, np.ndarray]):
    """Context manager: within, each frame's points are ``points[frame_id]`` when the dataset prepares it
    (also in its DataLoader workers, which fork with the dataset)."""
    def replace(data_dict: Dict) -> Dict:
        frame_id = str(data_dict["frame_id"])
        if frame_id not in points:
            raise KeyError(f"no replacement points for frame {frame_id}")
        return {**data_dict, "points": points[frame_id]}

    return _prepare_data_through(dataset, replace)
