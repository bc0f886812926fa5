"""RMAECMAEBackbonePhase1 over a tiny spconv encoder (no OpenPCDet needed)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from easydict import EasyDict

import pcdet_ext  # noqa: F401  (CPU runtime: spconv backward on CUDA-less torch)
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import ConfigError, RMAECMAEBackbonePhase1

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_encoder import TinyEncoder  # noqa: E402

GRID = np.array([64, 64, 16])          # x, y, z voxels
VOXEL = [0.5, 0.5, 0.5]
PC_RANGE = [-16.0, -16.0, -4.0, 16.0, 16.0, 4.0]
ENCODER = "_tiny_encoder:TinyEncoder"


def make(**kw):
    cfg = dict(NAME="RMAECMAEBackbonePhase1", ENCODER=ENCODER, PRETRAINING=True, MASKED_RATIO=0.6,
               RANGE_MASK_PROBS={"NEAR": 0.2, "MID": 0.3, "FAR": 0.35}, DISTANCE_THRESHOLDS=[5, 10],
               ANGULAR_GROUP_SIZE=10, OCCUPANCY_DECODER={"TARGET_STRIDE_XY": 2, "HIDDEN_CHANNELS": 8,
                                                        "REDUCE_CHANNELS": 4, "MIN_NEGATIVES": 64},
               TEACHER_STUDENT_SCALES=["x_conv1", "x_conv2"], TEACHER_STUDENT_WEIGHT=0.5)
    cfg.update(kw)
    torch.manual_seed(0)
    return RMAECMAEBackbonePhase1(model_cfg=EasyDict(cfg), input_channels=4, grid_size=GRID.copy(),
                                  voxel_size=VOXEL, point_cloud_range=PC_RANGE)


def batch(sizes=(400, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(sizes):
        c = torch.stack([torch.full((n,), b), torch.randint(16, (n,), generator=g), torch.randint(64, (n,), generator=g),
                         torch.randint(64, (n,), generator=g)], 1)
        coords.append(torch.unique(c, dim=0))
    coords = torch.cat(coords) if coords else torch.zeros(0, 4, dtype=torch.long)
    feats = torch.rand(len(coords), 4, generator=g)
    xyz = (coords[:, [3, 2, 1]].float() + 0.5) * torch.tensor(VOXEL) + torch.tensor(PC_RANGE[:3])
    points = torch.cat([coords[:, :1].float(), xyz, feats[:, :1]], 1)  # one return per voxel centre
    return {"voxel_features": feats, "voxel_coords": coords.float(), "batch_size": len(sizes), "points": points}


def test_is_the_encoder_class_with_its_names_and_extras_apart():
    bb = make()
    assert isinstance(bb, TinyEncoder)
    plain = set(TinyEncoder(None, 4, GRID.copy()).state_dict())
    keys = set(bb.state_dict())
    assert plain <= keys
    assert {k.split(".")[0] for k in keys - plain} == {"occ_decoder", "teacher", "ts_regression", "mask_step"}
    assert not any(n.startswith("teacher.") for n, _ in bb.named_parameters())
    det = make(PRETRAINING=False, MASKED_RATIO=0.0, ENABLE_TEACHER_STUDENT=False)
    assert set(det.state_dict()) == plain


def test_pretraining_loss_finite_input_dependent_grads_reach_student_not_teacher():
    bb = make()
    bb.train()
    bb(batch())
    loss, tb = bb.get_loss()
    assert math.isfinite(loss.item()) and {"loss_occupancy", "loss_teacher_student", "occ_iou", "mask_ratio",
                                          "ts_cos_x_conv2", "ema_momentum"} <= set(tb)
    assert 0.5 < tb["mask_ratio"] < 0.7 and tb["visible_voxels"] > 0
    loss.backward()
    assert bb.conv_input[0].weight.grad.abs().sum() > 0 and bb.conv_out[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in bb.ts_regression.parameters())
    assert all(not b.requires_grad for b in bb.teacher.buffers())
    bb(batch(seed=5))
    assert bb.get_loss()[0].item() != pytest.approx(loss.item())
    assert bb._get_teacher_student_loss(bb._matched(batch(), 0)).item() == 0.0  # nothing visible: zero, in graph


def test_the_student_never_sees_a_masked_voxel():
    """Changing the features of masked voxels leaves the student's features and its occupancy logits
    unchanged; changing a visible voxel's changes them (the masking is not bypassed)."""
    from pcdet_ext.algorithms.masking import mask_voxels
    bb = make()
    bb.eval()  # validation masks: one fixed seed, so both forwards mask the same voxels
    b = batch()
    coords = b["voxel_coords"].long()
    masked = mask_voxels(coords, 2, bb.voxel_size, bb.point_cloud_range, bb.mask_cfg, seed=bb._seed(),
                         grid_size=bb.grid_size).masked
    assert 0 < int(masked.sum()) < len(masked)

    def student(feats):
        with torch.no_grad():
            out = bb(dict(b, voxel_features=feats))
        return out["multi_scale_3d_features"]["x_conv2"].features.clone(), bb.forward_ret_dict["occupancy"][0].clone()

    base = student(b["voxel_features"])
    hidden = b["voxel_features"].clone()
    hidden[masked] += 10.0
    assert all(torch.equal(x, y) for x, y in zip(student(hidden), base))
    shown = b["voxel_features"].clone()
    shown[~masked] += 10.0
    assert not torch.equal(student(shown)[0], base[0])


def test_ema_update_moves_teacher_towards_student():
    bb = make(TEACHER_MOMENTUM=0.5)
    with torch.no_grad():
        bb.conv_out[0].weight.add_(1.0)
    t_before = bb.teacher.conv_out[0].weight.clone()
    bb.update_teacher()
    assert torch.allclose(bb.teacher.conv_out[0].weight, 0.5 * t_before + 0.5 * bb.conv_out[0].weight.detach())


def test_zero_voxel_frames_do_not_break_the_batch():
    bb = make()
    bb.train()
    bb(batch(sizes=(400, 0, 200)))
    loss, tb = bb.get_loss()
    loss.backward()
    assert math.isfinite(loss.item()) and tb["visible_voxels"] > 0
    empty = make()
    empty.train()
    empty(batch(sizes=(0, 0)))
    loss, tb = empty.get_loss()
    loss.backward()  # no scan at all: nothing known (no rays), zero loss; decoder and encoder stay in the graph (DDP)
    assert loss.item() == 0.0 and tb["visible_voxels"] == 0
    assert empty.occ_decoder.logits.bias.grad is not None and empty.conv_input[0].weight.grad is not None


def test_masks_reproducible_and_step_dependent():
    a, b = make(), make()
    a.train(), b.train()
    a(batch()), b(batch())
    assert a.get_loss()[1]["masked_voxels"] == b.get_loss()[1]["masked_voxels"]
    a(batch())
    assert int(a.mask_step) == 2


@pytest.mark.parametrize("kw, match", [
    (dict(ENCODER="no_such_module:Encoder"), "ENCODER"),
    (dict(MASKED_RATIO=1.0), "MASKED_RATIO"),
    (dict(DISTANCE_THRESHOLDS=[30, 10]), "DISTANCE_THRESHOLDS"),
    (dict(RANGE_MASK_PROBS={"NEAR": 0.5, "MID": 1.5, "FAR": 0.9}), "RANGE_MASK_PROBS"),
    (dict(TEACHER_STUDENT_SCALES=["x_conv9"]), "TEACHER_STUDENT_SCALES"),
    (dict(TEACHER_MOMENTUM=2.0), "TEACHER_MOMENTUM"),
    (dict(TEACHER_BACKBONE_TYPE="resnet"), "TEACHER_BACKBONE_TYPE"),
    (dict(RMAE_WEIGHT=-1), "RMAE_WEIGHT"),
    (dict(PRETRAINING=False), "MASKED_RATIO"),
    (dict(MASKED_RATIO=0.3), "MASKED_RATIO 0.3 is unreachable with RANGE_MASK_PROBS"),
    (dict(SENSOR_ORIGIN=[0.0, 0.0, 9.0]), r"SENSOR_ORIGIN \[0.0, 0.0, 9.0\] lies outside DATA_CONFIG.POINT_CLOUD_RANGE"),
])
def test_bad_config_names_the_key(kw, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        make(**kw)


def test_no_teacher_when_disabled():
    bb = make(ENABLE_TEACHER_STUDENT=False, TEACHER_STUDENT_WEIGHT=0.0)
    assert not hasattr(bb, "teacher")
    bb.train()
    bb(batch())
    assert "loss_teacher_student" not in bb.get_loss()[1]


def test_builds_with_stock_spconv_forward_as_on_a_cuda_machine():
    """Models are built on the CPU before .cuda(); on a CUDA machine the CPU runtime's spconv fix is
    off, and stock spconv's CPU kernel refuses eval-mode convolutions with bias."""
    from pcdet_ext.openpcdet.cpu.spconv_patch import stock_conv_forward
    with stock_conv_forward():
        bb = make(USE_BIAS=True)
        probe = batch()
        bb.eval()
        with pytest.raises(AssertionError, match="cpu don't support act and bias"):  # the fixture is stock spconv
            TinyEncoder.forward(bb, dict(probe))
    assert bb.occ_decoder is not None and bb._encoded_shape == [4, 16, 16]
    bn = next(m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert int(bn.num_batches_tracked) == 0  # construction changed no statistics


def _ddp_teacher_worker(rank, world, port, results):
    import os
    import torch.distributed as dist
    from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import ignore_teachers_in_ddp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.Module()
        model.backbone_3d = make(TEACHER_STUDENT_WEIGHT=0.5)
        with torch.no_grad():  # different initial weights (student and teacher) on each rank, as without a fixed seed
            for t in list(model.parameters()) + list(model.backbone_3d.teacher.buffers()):
                if t.is_floating_point():
                    t.add_(0.01 * rank)
        model.forward = lambda batch_dict: model.backbone_3d(batch_dict)
        ignored = ignore_teachers_in_ddp(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert ignored and not any(n.startswith("backbone_3d.teacher.") for n in ddp.named_module_buffers)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            ddp(batch(seed=10 * step + rank))  # different data on each rank
            loss, _ = model.backbone_3d.get_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.backbone_3d.update_teacher()
        results[rank] = {k: v.clone() for k, v in model.backbone_3d.teacher.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_teachers_without_broadcasting_them():
    from _subproc import run_gloo_ranks
    results = run_gloo_ranks(_ddp_teacher_worker)
    t0, t1 = results[0], results[1]
    assert t0.keys() == t1.keys() and [k for k in t0 if not torch.equal(t0[k], t1[k])] == []
    assert any(k.endswith("running_mean") and float(t0[k].abs().sum()) > 0 for k in t0)  # statistics tracked too


def test_pretraining_without_the_scan_points_says_what_is_missing():
    bb = make()
    bb.train()
    b = batch()
    del b["points"]
    with pytest.raises(KeyError, match=r"batch_dict\['points'\]"):
        bb(b)


def test_scan_with_no_points_trains_through_the_batch():
    bb = make()
    bb.train()
    b = batch(sizes=(300, 200))
    b["points"] = b["points"][b["points"][:, 0] == 0]  # frame 1's points gone: no rays there, no crash
    bb(b)
    loss, tb = bb.get_loss()
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(tb["occ_ap"])
