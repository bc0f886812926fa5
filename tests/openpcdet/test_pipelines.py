"""Unmodified OpenPCDet builds, trains and evaluates on CPU through pcdet_ext's CPU runtime."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tier2 import REPO, seed_everything, set_voxelization
from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
from pcdet_ext.engine.loop.runner import train_steps
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.evaluation import evaluate_model


def pcdet_cfg(rel: str):
    import pcdet
    return cfg_from_yaml_file(Path(pcdet.__file__).resolve().parent.parent / "tools" / "cfgs" / rel)


def kitti_pointpillar_cfg():
    cfg = pcdet_cfg("kitti_models/pointpillar.yaml")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]"], cfg)
    set_voxelization(cfg, [0.16, 0.16, 4], 6000)
    return cfg


def test_pointpillars_kitti_train_step_eval_and_metric(synthetic_kitti, stock_optimization):
    build_optimizer = stock_optimization.build_optimizer
    seed_everything()
    cfg = kitti_pointpillar_cfg()
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)  # adam_onecycle: fastai OptimWrapper
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, tb_dict = train_steps(model, train_loader, optimizer, steps=1)
    assert np.isfinite(losses[0]) and losses[0] > 0 and "rpn_loss_cls" in tb_dict
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone_2d") for k in changed) and any(k.startswith("dense_head") for k in changed)
    det_annos, result_str, result_dict = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES)
    assert len(det_annos) == len(test_set) == 2
    assert "Car AP@0.70, 0.70, 0.70" in result_str and "Car_3d/moderate_R40" in result_dict
    assert all(0 <= v <= 100 for v in result_dict.values())


def test_pointpillars_4class_custom_train_step_eval_and_metric(synthetic_isarc, stock_optimization):
    build_optimizer = stock_optimization.build_optimizer
    seed_everything()
    cfg = cfg_from_yaml_file(REPO / "cfgs/custom_models/pointpillar_isarc_4class.yaml")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[-40.96, -40.96, -6, 40.96, 40.96, 10]"], cfg)
    set_voxelization(cfg, [0.32, 0.32, 16], 6000)
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, synthetic_isarc)
    assert train_set.class_names == ["dumptruck", "excavator", "grader", "roller"]
    model = builders.build_model(cfg, train_set)
    assert model.dense_head.conv_cls.out_channels == (4 * 2) * 4  # (4 classes x 2 rotations) anchors x 4 scores
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)
    losses, _ = train_steps(model, train_loader, optimizer, steps=1)
    assert np.isfinite(losses[0]) and losses[0] > 0
    det_annos, result_str, result_dict = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES)
    assert len(det_annos) == 2
    for name, kitti_name in (("dumptruck", "Truck"), ("excavator", "Car"), ("grader", "Cyclist"),
                             ("roller", "Pedestrian")):  # scored under MAP_CLASS_TO_KITTI, reported as its own
        assert f"{name} AP" in result_str and f"{kitti_name} AP" not in result_str
        assert f"{name}_3d/moderate_R40" in result_dict


@pytest.mark.parametrize("cfg_name", ["second", "voxelnext"])
def test_sparse_voxel_backbones_forward_backward_eval(synthetic_kitti, cfg_name):
    from pcdet.models import detectors
    if cfg_name == "voxelnext" and "VoxelNeXt" not in detectors.__all__:
        pytest.skip("this OpenPCDet has no VoxelNeXt (added after v0.6.0)")
    seed_everything()
    cfg = pcdet_cfg("kitti_models/second.yaml") if cfg_name == "second" else \
        cfg_from_yaml_file(REPO / "cfgs/kitti_models/voxelnext_kitti.yaml")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -25.6, -3, 51.2, 25.6, 1]"], cfg)
    set_voxelization(cfg, [0.1, 0.1, 0.1], 12000)
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    losses, _ = train_steps(model, train_loader, optimizer, steps=1)
    assert np.isfinite(losses[0])
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("backbone_3d")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()  # eval-mode sparse convs with bias (VoxelNeXt's SparseBasicBlock) run on CPU
    batch = next(iter(test_loader))
    from pcdet.models import load_data_to_gpu
    load_data_to_gpu(batch)
    with torch.no_grad():
        pred_dicts, _ = model(batch)
    assert len(pred_dicts) == 2 and all(p["pred_boxes"].shape[1] == 7 for p in pred_dicts)


def test_onecycle_checkpoint_round_trip_under_weights_only(synthetic_kitti, stock_optimization, tmp_path):
    """OpenPCDet's own save_checkpoint with adam_onecycle, loaded by its own loaders on torch >= 2.6."""
    build_optimizer, build_scheduler = stock_optimization.build_optimizer, stock_optimization.build_scheduler
    from train_utils.train_utils import checkpoint_state, save_checkpoint
    from pcdet.utils import common_utils
    seed_everything()
    cfg = kitti_pointpillar_cfg()
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)
    scheduler, _ = build_scheduler(optimizer, total_iters_each_epoch=len(train_loader), total_epochs=2,
                                   last_epoch=-1, optim_cfg=cfg.OPTIMIZATION)
    scheduler.step(1)
    train_steps(model, train_loader, optimizer, steps=1)
    save_checkpoint(checkpoint_state(model, optimizer, epoch=1, it=3), filename=str(tmp_path / "checkpoint_epoch_1"))
    ckpt = tmp_path / "checkpoint_epoch_1.pth"
    state = torch.load(ckpt, weights_only=True)  # numpy scalars in optimizer_state load
    assert isinstance(state["optimizer_state"], dict) and state["epoch"] == 1
    fresh = builders.build_model(cfg, train_set)
    fresh_opt = build_optimizer(fresh, cfg.OPTIMIZATION)
    logger = common_utils.create_logger()
    it, epoch = fresh.load_params_with_optimizer(str(ckpt), to_cpu=True, optimizer=fresh_opt, logger=logger)
    assert (it, epoch) == (3, 1)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_kitti_metric_cpu_iou_matches_cuda_simulator():
    from pcdet.datasets.kitti.kitti_object_eval_python import eval as kitti_eval
    from pcdet.datasets.kitti.kitti_object_eval_python import rotate_iou
    rng = np.random.default_rng(0)
    boxes = np.c_[rng.uniform(-3, 3, (40, 2)), rng.uniform(0.5, 4, (40, 2)), rng.uniform(-3, 3, 40)].astype(np.float32)
    query = boxes[::-1] + np.float32(0.3)
    for criterion in (-1, 0, 1):
        ref = rotate_iou.rotate_iou_gpu_eval(boxes, query, criterion)  # numba.cuda on the simulator
        ours = kitti_eval.rotate_iou_gpu_eval(boxes, query, criterion)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
