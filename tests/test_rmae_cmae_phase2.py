"""RMAECMAEBackbonePhase2 over a tiny spconv encoder (no OpenPCDet needed)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from easydict import EasyDict

import pcdet_ext  # noqa: F401  (CPU runtime: spconv backward on CUDA-less torch)
from pcdet_ext.algorithms.momentum import cosine_momentum
from pcdet_ext.config import ConfigError
from pcdet_ext.engine.convert import convert_pretrain
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase2 import (PHASE2_ADDED_MODULES,
                                                                               RMAECMAEBackbonePhase2)

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_encoder import TinyEncoder  # noqa: E402
from test_rmae_cmae_backbone import GRID, PC_RANGE, VOXEL, batch, make as make_phase1  # noqa: E402

PHASE2_KEYS = dict(
    TEACHER_STUDENT_MODE="phase2", FEATURE_DIM=16,
    ENABLE_MLFR=True, MLFR_WEIGHT=1.0,
    MLFR_CONFIG={"ENABLE_MLFR": True, "MLFR_SCALES": ["scale_1", "scale_2"],
                 "MLFR_LOSS_WEIGHTS": {"scale_1": 0.5, "scale_2": 0.8, "scale_3": 1.0, "scale_4": 1.2}},
    ENABLE_VOXEL_CONTRASTIVE=True, VOXEL_CONTRASTIVE_WEIGHT=0.6,
    VOXEL_CONTRASTIVE_CONFIG={"CONTRASTIVE_TEMPERATURE": 0.07, "FEATURE_DIM": 16, "PROJECTION_DIM": 8,
                              "MAX_NEGATIVE_SAMPLES": 64, "ENABLE_HARD_NEGATIVE_MINING": True,
                              "HARD_NEGATIVE_RATIO": 0.3, "COORD_TOLERANCE": 0},
    ENABLE_FRAME_CONTRASTIVE=True, FRAME_CONTRASTIVE_WEIGHT=0.3,
    FRAME_CONTRASTIVE_CONFIG={"FRAME_TEMPERATURE": 0.1, "MAX_FRAME_NEGATIVES": 16, "MEMORY_BANK_SIZE": 8,
                              "MOMENTUM_UPDATE": 0.99, "FEATURE_DIM": 16, "PROJECTION_DIM": 8,
                              "ENABLE_HARD_NEGATIVE_MINING": True, "HARD_NEGATIVE_RATIO": 0.5,
                              "ENABLE_DOMAIN_SPECIFIC": True,
                              "EQUIPMENT_TYPES": ["dumptruck", "excavator", "grader", "roller"]},
    DETECTION_WEIGHT=0.0,
)


def make(total_steps=10, **kw):
    cfg = dict(NAME="RMAECMAEBackbonePhase2", ENCODER="_tiny_encoder:TinyEncoder", PRETRAINING=True,
               MASKED_RATIO=0.6, RANGE_MASK_PROBS={"NEAR": 0.2, "MID": 0.3, "FAR": 0.35}, DISTANCE_THRESHOLDS=[5, 10],
               ANGULAR_GROUP_SIZE=10, OCCUPANCY_DECODER={"TARGET_STRIDE_XY": 2, "HIDDEN_CHANNELS": 8,
                                                        "REDUCE_CHANNELS": 4, "MIN_NEGATIVES": 64},
               TEACHER_STUDENT_SCALES=["x_conv1", "x_conv2"], **PHASE2_KEYS)
    cfg.update(kw)
    torch.manual_seed(0)
    bb = RMAECMAEBackbonePhase2(model_cfg=EasyDict(cfg), input_channels=4, grid_size=GRID.copy(),
                                voxel_size=VOXEL, point_cloud_range=PC_RANGE)
    if total_steps and bb.pretraining:
        bb.set_total_steps(total_steps)
    return bb


def framed(seed=0, ids=("seq_a_000001", "seq_b_000007")):
    b = batch(seed=seed)
    b["frame_id"] = list(ids)
    return b


def test_users_phase2_keys_build_the_encoder_with_phase2_modules_apart():
    bb = make()
    assert isinstance(bb, TinyEncoder) and isinstance(bb, RMAECMAEBackbonePhase2)
    plain = set(TinyEncoder(None, 4, GRID.copy()).state_dict())
    extra = {k.split(".")[0] for k in set(bb.state_dict()) - plain}
    assert extra == {"occ_decoder", "teacher", "mask_step", *PHASE2_ADDED_MODULES} - {"balancer"}  # fixed: no params
    assert set(bb.mlfr) == {"x_conv1", "x_conv2"} and bb.phase2.MLFR.SCALE_WEIGHTS == {"x_conv1": 0.5, "x_conv2": 0.8}
    assert bb.contrast_scale == "x_conv2"  # the deepest
    assert not any(n.startswith(("teacher.", "voxel_head_teacher.", "frame_head_teacher.")) for n, _ in bb.named_parameters())
    det = make(PRETRAINING=False, MASKED_RATIO=0.0, ENABLE_TEACHER_STUDENT=False, DETECTION_WEIGHT=None)
    assert set(det.state_dict()) == plain


def test_users_keys_print_one_note_each_and_labels_never_enter(capsys):
    bb = make()
    out = capsys.readouterr().out.splitlines()
    noted = sorted(line.split(" accepted:")[0] for line in out if line.startswith("note: "))
    where = "note: MODEL.BACKBONE_3D."
    assert noted == sorted(where + k for k in (
        "DETECTION_WEIGHT", "FEATURE_DIM", "TEACHER_STUDENT_MODE", "MLFR_CONFIG.ENABLE_MLFR",
        "VOXEL_CONTRASTIVE_CONFIG.FEATURE_DIM", "VOXEL_CONTRASTIVE_CONFIG.COORD_TOLERANCE",
        "FRAME_CONTRASTIVE_CONFIG.FEATURE_DIM", "FRAME_CONTRASTIVE_CONFIG.ENABLE_DOMAIN_SPECIFIC",
        "FRAME_CONTRASTIVE_CONFIG.EQUIPMENT_TYPES")), out
    assert all("ground-truth classes never enter" in line for line in out if "DOMAIN" in line or "EQUIPMENT" in line)
    assert bb.frame_head.net[-1].out_features == 8  # FRAME_CONTRASTIVE_CONFIG.PROJECTION_DIM sizes the frame head
    # the loss is the same whatever the boxes and labels of the frames: nothing reads them
    b = framed()
    labelled = dict(b, gt_boxes=torch.tensor([[[1.0, 2.0, 0.0, 9.6, 3.5, 3.8, 0.0, 1.0]]] * 2))
    losses = []
    for batch_dict in (b, labelled):
        torch.manual_seed(0)
        m = make()
        m.train()
        m(dict(batch_dict))
        losses.append(m.get_loss()[0].item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize("kw, match", [
    (dict(DETECTION_WEIGHT=1.0), r"DETECTION_WEIGHT .*: 1.0, but pretraining \(PRETRAINING: True\) trains no detection"),
    (dict(PRETRAINING=False, MASKED_RATIO=0.0, ENABLE_TEACHER_STUDENT=False, DETECTION_WEIGHT=0.0),
     r"DETECTION_WEIGHT .*: 0.0, but fine-tuning .* expected a value > 0"),
    (dict(FRAME_CONTRASTIVE_CONFIG={"HARD_NEGATIVE_RATIO": 1.5}), r"FRAME_CONTRASTIVE_CONFIG.HARD_NEGATIVE_RATIO"),
    (dict(FRAME_CONTRASTIVE_CONFIG={"EQUIPMENT_TYPES": [1, 2]}), r"EQUIPMENT_TYPES: expected a list of class names"),
])
def test_weights_that_mean_nothing_in_their_mode_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        make(**kw)


def test_fine_tune_keys_build_a_plain_encoder_with_the_detection_weight(capsys):
    det = make(PRETRAINING=False, MASKED_RATIO=0.0, ENABLE_TEACHER_STUDENT=False, ENABLE_MLFR=False,
               MLFR_CONFIG=None, ENABLE_VOXEL_CONTRASTIVE=False, ENABLE_FRAME_CONTRASTIVE=False, MLFR_WEIGHT=0.0,
               VOXEL_CONTRASTIVE_WEIGHT=0.0, FRAME_CONTRASTIVE_WEIGHT=0.0, DETECTION_WEIGHT=0.5)
    assert set(det.state_dict()) == set(TinyEncoder(None, 4, GRID.copy()).state_dict()) and det.detection_weight == 0.5
    out = capsys.readouterr().out
    assert ("MLFR_WEIGHT, VOXEL_CONTRASTIVE_WEIGHT, FRAME_CONTRASTIVE_WEIGHT accepted: no effect with PRETRAINING: "
            "False (fine-tuning trains the dense head's loss x DETECTION_WEIGHT 0.5 only)") in out


def test_every_term_finite_logged_with_its_weight_grads_reach_student_never_teacher():
    bb = make()
    bb.train()
    bb(framed())
    loss, tb = bb.get_loss()
    terms = ("occupancy", "mlfr", "voxel_contrast", "frame_contrast")
    assert math.isfinite(loss.item()) and all(math.isfinite(tb[f"loss_{t}"]) for t in terms)
    assert tb["weight_voxel_contrast"] == 0.6 and tb["weight_frame_contrast"] == 0.3 and tb["weight_mlfr"] == 1.0
    assert 0.0 <= tb["voxel_top1"] <= 1.0 and tb["voxel_sites"] <= 64
    assert 0 < tb["mlfr_masked_share_x_conv1"] < 1
    ret = bb.forward_ret_dict
    for name in ("loss_mlfr", "loss_voxel_contrast", "loss_frame_contrast"):
        bb.zero_grad()
        ret[name].backward(retain_graph=True)
        assert bb.conv_input[0].weight.grad.abs().sum() > 0, name  # every term trains the student encoder
    bb.zero_grad()
    loss.backward()
    assert bb.mlfr["x_conv1"].mask_token.grad.abs().sum() > 0 and bb.voxel_head.net[0].weight.grad.abs().sum() > 0
    buffers = [*bb.teacher.buffers(), *bb.voxel_head_teacher.buffers(), *bb.frame_head_teacher.buffers()]
    assert all(not b.requires_grad for b in buffers)
    bb(framed(seed=5))
    again = bb.get_loss()[1]
    assert all(again[f"loss_{t}"] != pytest.approx(tb[f"loss_{t}"]) for t in terms)  # input-dependent


def _sparse(feats, idx, shape, batch_size):
    import spconv.pytorch as spconv
    return spconv.SparseConvTensor(feats, idx.int(), list(shape), batch_size)


def test_mlfr_loss_targets_exactly_the_sites_the_student_lacks():
    bb = make()
    bb.train()
    g = torch.Generator().manual_seed(3)
    shape = [16, 64, 64]
    flat = torch.randperm(16 * 64 * 64, generator=g)[:120]
    t_idx = torch.stack([torch.zeros(120, dtype=torch.long), flat // 4096, (flat // 64) % 64, flat % 64], 1)
    seen = torch.arange(120) < 70
    t_feat = torch.randn(120, 8, generator=g)
    student = {"x_conv1": _sparse(torch.randn(70, 8, generator=g), t_idx[seen], shape, 1)}
    only_scale = dict(bb.phase2.MLFR, SCALES=["x_conv1"])
    bb.phase2.MLFR = EasyDict(only_scale)

    def loss_with(teacher_feats):
        torch.manual_seed(0)
        return bb._mlfr_loss(student, {"x_conv1": _sparse(teacher_feats, t_idx, shape, 1)}, 1, {}).item()

    base = loss_with(t_feat)
    changed_masked, changed_visible = t_feat.clone(), t_feat.clone()
    changed_masked[~seen] = torch.randn(50, 8, generator=g)
    changed_visible[seen] = torch.randn(70, 8, generator=g)
    assert loss_with(changed_masked) != pytest.approx(base)
    assert loss_with(changed_visible) == pytest.approx(base)  # VISIBLE_WEIGHT 0: visible sites not scored


def test_cosine_momentum_schedule_drives_the_teacher():
    bb = make(total_steps=4, MOMENTUM_SCHEDULE={"START": 0.9, "END": 1.0})
    bb.train()
    seen = []
    for step in range(4):
        bb(framed(seed=step))
        seen.append(bb.get_loss()[1]["ema_momentum"])
        bb.update_teacher()
    assert seen == pytest.approx([cosine_momentum(s, 4, 0.9, 1.0) for s in range(4)])
    assert make(MOMENTUM_SCHEDULE={"NAME": "constant"}, TEACHER_MOMENTUM=0.95).momentum == 0.95
    assert make(total_steps=4).momentum_start == 0.999  # START defaults to TEACHER_MOMENTUM
    unset = make(total_steps=None)
    unset.train()
    with pytest.raises(RuntimeError, match="set_total_steps"):
        unset(framed())


def test_teacher_heads_start_as_the_student_and_follow_by_ema():
    bb = make(TEACHER_MOMENTUM=0.5, MOMENTUM_SCHEDULE={"NAME": "constant"})
    bb.train()
    bb(framed())
    assert torch.equal(bb.voxel_head_teacher.net[0].weight, bb.voxel_head.net[0].weight.detach())
    with torch.no_grad():
        bb.voxel_head.net[0].weight.add_(1.0)
        bb.frame_head.net[0].weight.add_(1.0)
    before_v, before_f = bb.voxel_head_teacher.net[0].weight.clone(), bb.frame_head_teacher.net[0].weight.clone()
    bb.update_teacher()
    assert torch.allclose(bb.voxel_head_teacher.net[0].weight, 0.5 * before_v + 0.5 * bb.voxel_head.net[0].weight)
    assert torch.allclose(bb.frame_head_teacher.net[0].weight, 0.99 * before_f + 0.01 * bb.frame_head.net[0].weight)


def test_frame_queue_fills_with_teacher_embeddings_in_training_only():
    bb = make()
    bb.eval()
    bb(framed())
    assert int(bb.frame_queue.pointer) == 0
    bb.train()
    bb(framed())
    assert int(bb.frame_queue.pointer) == 2 and (bb.frame_queue.sequence >= 0).sum() == 2
    assert bb.frame_queue.index[:2].tolist() == [1, 7]


def test_uncertainty_balancing_learns_a_weight_per_enabled_term():
    bb = make(LOSS_BALANCING="uncertainty", FRAME_CONTRASTIVE_WEIGHT=0.0)
    assert set(bb.balancer.log_vars) == {"occupancy", "mlfr", "voxel_contrast"}
    bb.train()
    bb(framed())
    loss, tb = bb.get_loss()
    loss.backward()
    assert all(p.grad is not None for p in bb.balancer.parameters()) and "weight_frame_contrast" not in tb


def test_with_phase2_terms_off_the_loss_is_phase1s():
    b = framed()
    p1 = make_phase1(TEACHER_STUDENT_WEIGHT=0.5)
    p2 = make(ENABLE_MLFR=False, MLFR_CONFIG=None, ENABLE_VOXEL_CONTRASTIVE=False, ENABLE_FRAME_CONTRASTIVE=False,
              TEACHER_STUDENT_WEIGHT=0.5, MOMENTUM_SCHEDULE={"NAME": "constant"})
    p1.train(), p2.train()
    p1(dict(b)), p2(dict(b))
    assert p2.get_loss()[0].item() == pytest.approx(p1.get_loss()[0].item(), rel=1e-6)


def test_convert_drops_every_phase2_module():
    bb = make()
    weights = {f"backbone_3d.{k}": v for k, v in bb.state_dict().items()}
    weights["vfe.dummy"] = torch.zeros(1)
    kept, dropped = convert_pretrain(weights)
    plain = {f"backbone_3d.{k}" for k in TinyEncoder(None, 4, GRID.copy()).state_dict()}
    assert set(kept) == plain | {"vfe.dummy"}
    assert any(".mask_token" in k for k in dropped) and any(k.startswith("backbone_3d.frame_queue.") for k in dropped)


@pytest.mark.parametrize("kw, match", [
    (dict(MLFR_CONFIG={"MLFR_SCALES": ["scale_4"]}), r"MLFR_SCALES: \['x_conv4'\] not among"),
    (dict(MLFR_CONFIG={"MLFR_SCALES": ["conv9x"]}), "MLFR_SCALES: expected scale names"),
    (dict(VOXEL_CONTRASTIVE_CONFIG={"CONTRASTIVE_TEMPERATURE": 0.0}), "CONTRASTIVE_TEMPERATURE"),
    (dict(FRAME_CONTRASTIVE_CONFIG={"FRAME_TEMPERATURE": -0.1}), "FRAME_TEMPERATURE"),
    (dict(VOXEL_CONTRASTIVE_WEIGHT=-0.6), "VOXEL_CONTRASTIVE_WEIGHT"),
    (dict(MLFR_CONFIG={"MLFR_LOSS_WEIGHTS": {"scale_2": -1}}), r"MLFR_LOSS_WEIGHTS.scale_2"),
    (dict(ENABLE_MLFR=False), "ENABLE_MLFR=False conflicts with"),
    (dict(VOXEL_CONTRASTIVE_CONFIG={"COORD_TOLERANCE": 2}), "COORD_TOLERANCE"),
    (dict(TEACHER_STUDENT_MODE="phase1"), "TEACHER_STUDENT_MODE"),
    (dict(FRAME_CONTRASTIVE_CONFIG={"MEMORY_BANK": 8}), r"unknown key\(s\) 'MEMORY_BANK'"),
    (dict(ENABLE_TEACHER_STUDENT=False), "need the teacher"),
    (dict(MOMENTUM_SCHEDULE={"START": 0.9, "END": 0.8}), "START 0.9 must be <= END 0.8"),
])
def test_bad_phase2_config_names_the_key(kw, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        make(**kw)


def _queue_worker(rank, world, port, results):
    import os
    import torch.distributed as dist
    from pcdet_ext.algorithms.contrastive import FrameQueue
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial (random) queue on every rank
        q = FrameQueue(8, 4)
        for step in range(3):  # each rank enqueues its own two frames
            q.enqueue(torch.full((2, 4), float(10 * step + rank)), torch.tensor([rank, rank]) + 10 * step)
        results[rank] = {k: v.clone() for k, v in q.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_queue_is_identical_on_two_gloo_ranks_and_holds_both_ranks_frames():
    from _subproc import run_gloo_ranks
    r = run_gloo_ranks(_queue_worker)
    assert all(torch.equal(r[0][k], r[1][k]) for k in r[0])
    assert int(r[0]["pointer"]) == (3 * 4) % 8
    assert sorted(r[0]["sequence"].tolist()) == [10, 10, 11, 11, 20, 20, 21, 21]


def test_builds_with_stock_spconv_as_on_a_cuda_machine():
    """Built on the CPU before .cuda(), where the CPU runtime's spconv fix is off (see Phase 1's test)."""
    from pcdet_ext.openpcdet.cpu.spconv_patch import stock_conv_forward
    with stock_conv_forward():
        bb = make(USE_BIAS=True)
    assert set(bb.mlfr) == {"x_conv1", "x_conv2"}
    bn = next(m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert int(bn.num_batches_tracked) == 0
