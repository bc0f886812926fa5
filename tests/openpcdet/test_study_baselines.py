"""The rate/accuracy study's baselines change exactly what they claim, on the real pipeline: the
scalar-feature baseline feeds the detector the coded features (bytes per frame measured), the point
replacement feeds it the given points, also through forked DataLoader workers."""
import numpy as np
import pytest
import torch

from pcdet_ext.algorithms.bitstream.scalar import HEADER, ScalarFeatureCoder
from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
from pcdet_ext.deploy import baselines, runtime
from pcdet_ext.engine.startup import builders
from test_split_runtime import SMALL, frames
from tier2 import REPO, seed_everything


@pytest.fixture(scope="module")
def sparse(synthetic_kitti):
    seed_everything(5)
    cfg = cfg_from_yaml_file(REPO / "cfgs/kitti_models/pointpillar_rq.yaml")
    cfg_from_list(SMALL, cfg)
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set).eval()
    models = runtime.fit_probability_models(model, test_set, frames(synthetic_kitti, "train"), [16])
    return model, test_set, test_loader, train_loader, models


def bev_input(model, loader):
    """The pillar features the BEV scatter receives, over every frame of ``loader``."""
    from pcdet.models import load_data_to_gpu
    seen, raw = [], []
    h1 = model.map_to_bev_module.register_forward_hook(lambda m, i, out: seen.append(out["pillar_features"].clone()))
    h2 = model.vfe.register_forward_hook(lambda m, i, out: raw.append(out["pillar_features"].clone()))
    try:
        with torch.no_grad():
            for batch in loader:
                load_data_to_gpu(batch)
                model(batch)
    finally:
        h1.remove()
        h2.remove()
    return torch.cat(raw), torch.cat(seen)


def test_scalar_baseline_feeds_the_coded_features_and_measures_each_frame(sparse):
    model, test_set, test_loader, train_loader, models = sparse
    feats = baselines.pillar_features(model, train_loader, 8)
    assert feats.shape[1] == model.quantizer.dim and len(feats) > 100
    results = {}
    for bits in (8, 3):
        coder, sizes = ScalarFeatureCoder.fit(feats, bits), []
        with baselines.scalar_quantized(model, coder, models, sizes):
            raw, seen = bev_input(model, test_loader)
        assert len(sizes) == len(test_set) and min(sizes) > HEADER.size
        assert torch.equal(seen, torch.from_numpy(coder.dequantize(coder.quantize(raw.numpy()))))
        results[bits] = (np.mean(sizes), float((seen - raw).abs().max()))
    assert results[8][0] > results[3][0] and 0 < results[8][1] < results[3][1]
    assert not model.rq_bottleneck._forward_hooks and not model.rq_bottleneck.bypass  # restored on exit
    raw, seen = bev_input(model, test_loader)
    assert not torch.equal(raw, seen)  # the RQ bottleneck is back


def test_dense_mode_is_refused(sparse):
    model = sparse[0]
    model.rq_cfg.MODE = "dense"
    try:
        with pytest.raises(ValueError, match="MODE sparse"):
            baselines.pillar_features(model, sparse[3], 2)
    finally:
        model.rq_cfg.MODE = "sparse"


@pytest.mark.parametrize("workers", [0, 2])
def test_replaced_points_reach_the_voxels_also_through_workers(sparse, workers):
    from torch.utils.data import DataLoader
    model, test_set, *_ = sparse
    points = baselines.frame_points(test_set)
    assert set(points) == {str(info["point_cloud"]["lidar_idx"]) for info in test_set.kitti_infos}
    lo, hi = np.array(test_set.point_cloud_range[:3]), np.array(test_set.point_cloud_range[3:])
    assert all(((p[:, :3] >= lo) & (p[:, :3] < hi)).all() for p in points.values())

    def voxel_counts(replacement):
        loader = DataLoader(test_set, batch_size=1, num_workers=workers, collate_fn=test_set.collate_batch)
        with baselines.points_replaced(test_set, replacement):
            return {str(b["frame_id"][0]): (len(b["voxels"]), float(b["voxels"].sum())) for b in loader}

    plain = {str(test_set[i]["frame_id"]): (len(test_set[i]["voxels"]), float(test_set[i]["voxels"].sum()))
             for i in range(len(test_set))}
    assert voxel_counts(points) == plain  # the captured points are exactly what the detector voxelises
    few = voxel_counts({k: p[::50] for k, p in points.items()})
    assert all(few[k][0] <= len(points[k][::50]) < plain[k][0] for k in plain)
    assert "prepare_data" not in vars(test_set)  # restored
    with pytest.raises(KeyError, match="no replacement points"):
        voxel_counts({})


def test_draco_round_trip_within_its_quantization_and_bytes_follow_bits(synthetic_kitti):
    pytest.importorskip("DracoPy")
    pts = frames(synthetic_kitti, "val")[0]
    sizes = {}
    for bits in (8, 12):
        codec = baselines.DracoCodec(bits, intensity_max=1.0)
        data = codec.encode(pts)
        out = codec.decode(data)
        sizes[bits] = len(data)
        assert out.shape == pts.shape
        extent = pts[:, :3].max(0) - pts[:, :3].min(0)
        for axis in range(3):  # same multiset of coordinates up to one quantization step of the longest side
            assert np.abs(np.sort(out[:, axis]) - np.sort(pts[:, axis])).max() <= extent.max() / 2 ** bits * 1.01
        assert np.abs(np.sort(out[:, 3]) - np.sort(pts[:, 3])).max() <= 0.5 / 255 + 1e-6
    assert sizes[8] < sizes[12] < pts.nbytes
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        baselines.DracoCodec(10, 1.0).encode(pts[:, :3])
