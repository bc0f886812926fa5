"""Tier 2: R-MAE + CMAE pretraining tool, conversion, fine-tuning with differential LR, torchrun/gloo."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from easydict import EasyDict

from pcdet_ext.config import cfg_from_yaml_file
from pcdet_ext.engine.loop.runner import train_steps
from pcdet_ext.engine.startup import builders
from pcdet_ext.utils.checkpoint import load_checkpoint
from tier2 import CONFIGS, RAW, REPO, SMALL, has_voxelnext, seed_everything, set_voxelization, small_cfg, tool

def test_pretraining_checkpoints_and_resume_guard(cfgs, pretrained, synthetic_isarc):
    ckpt_dir, out = pretrained
    ckpt = ckpt_dir / "checkpoint_epoch_2.pth"
    state = load_checkpoint(ckpt)  # weights_only, numpy scalars of adam_onecycle allow-listed
    assert {"epoch", "it", "model_state", "optimizer_state", "version"} <= set(state) and state["epoch"] == 2
    keys = state["model_state"]
    assert any(k.startswith("backbone_3d.teacher.") for k in keys) and "backbone_3d.occ_decoder.logits.bias" in keys
    n_opt = sum(len(g["params"]) for g in state["optimizer_state"]["param_groups"])
    n_trainable = len([k for k in keys if not k.startswith("backbone_3d.teacher.")
                       and not k.endswith(("running_mean", "running_var", "num_batches_tracked", "mask_step"))
                       and k != "global_step"])
    assert n_opt == n_trainable  # the teacher is not in the optimizer
    before = ckpt.read_bytes()
    res = tool("train_rmae_cmae_phase1.py", "--cfg_file", cfgs[0], "--batch_size", "2", "--epochs", "3",
               "--workers", "0", "--extra_tag", "t", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               "MODEL.BACKBONE_3D.MASKED_RATIO", "0.5", "MODEL.BACKBONE_3D.RANGE_MASK_PROBS.NEAR", "0.2",
               out_root=out)  # (0.5 alone is unreachable with NEAR 0.5: a config error before the resume check)
    assert res.returncode == 2 and "MODEL.BACKBONE_3D.MASKED_RATIO: checkpoint 0.8, config 0.5" in res.stderr
    assert ckpt.read_bytes() == before and not (ckpt_dir / "checkpoint_epoch_3.pth").exists()


def test_pretraining_script_on_real_unlabelled_scans(cfgs, tmp_path):
    scans = sorted(RAW.glob("*.bin"))[:4] if RAW.is_dir() else []
    if not scans:
        pytest.skip(f"real unlabelled scans absent ({RAW})")
    from pcdet_ext.openpcdet.datasets.create_infos import create_unlabelled
    root = create_unlabelled(scans, tmp_path / "raw", REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml")
    res = tool("train_rmae_cmae_phase1.py", "--cfg_file", cfgs[0], "--batch_size", "2", "--epochs", "2",
               "--workers", "0", "--extra_tag", "raw", "--set", "DATA_CONFIG.DATA_PATH", str(root), *SMALL,
               out_root=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "output/custom_models" / Path(cfgs[0]).stem / "raw"
    assert (run / "ckpt/checkpoint_epoch_2.pth").is_file() and list((run / "tensorboard").iterdir())
    log = next(run.glob("train_*.log")).read_text()
    assert "epoch 2 validation, AP of masked-only cells vs ray-cast free space: model occ_ap=" in log
    assert "| grow-visible occ_ap=" in log


def test_convert_then_finetune_loads_every_backbone_key_and_loss_falls(cfgs, pretrained, synthetic_isarc, tmp_path):
    ckpt_dir, _ = pretrained
    conv = tmp_path / "backbone.pth"
    res = subprocess.run([sys.executable, str(REPO / "tools/convert_pretrain_ckpt.py"), "--ckpt",
                          str(ckpt_dir / "checkpoint_epoch_2.pth"), "--out", str(conv), "--cfg_file", cfgs[1],
                          "--set", *SMALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = next(line for line in res.stdout.splitlines() if line.strip().startswith("backbone_3d"))
    assert "(100.0 %)" in row, res.stdout
    kept = load_checkpoint(conv)["model_state"]
    assert not any(".teacher." in k or "occ_decoder" in k for k in kept)
    teacher_out = tmp_path / "teacher.pth"
    res = subprocess.run([sys.executable, str(REPO / "tools/convert_pretrain_ckpt.py"), "--ckpt",
                          str(ckpt_dir / "checkpoint_epoch_2.pth"), "--out", str(teacher_out), "--use", "teacher"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    source = load_checkpoint(ckpt_dir / "checkpoint_epoch_2.pth")["model_state"]
    from_teacher = load_checkpoint(teacher_out)["model_state"]
    weight = next(k for k in kept if k.startswith("backbone_3d.") and k.endswith("weight"))
    assert torch.equal(from_teacher[weight], source[weight.replace("backbone_3d.", "backbone_3d.teacher.", 1)])
    assert set(from_teacher) == set(kept)
    seed_everything()
    cfg = small_cfg(cfgs[1], synthetic_isarc)
    cfg.OPTIMIZATION.LR = 0.001  # a 20-step schedule on 4 frames
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_isarc)
    model = builders.build_model(cfg, train_set)
    import logging
    records = []
    logger = logging.getLogger("coverage")
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    logger.setLevel(logging.INFO)
    model.load_params_from_file(str(ckpt_dir / "checkpoint_epoch_2.pth"), logger=logger, to_cpu=True)
    pretrained_state = load_checkpoint(ckpt_dir / "checkpoint_epoch_2.pth")["model_state"]
    backbone = [k for k in model.state_dict() if k.startswith("backbone_3d.")]
    assert backbone and all(torch.equal(model.state_dict()[k], pretrained_state[k]) for k in backbone)
    assert not any("Not updated weight backbone_3d" in r for r in records)
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler, group_lrs
    steps = 20
    loaded = {n for n, p in model.named_parameters() if n in pretrained_state and p.shape == pretrained_state[n].shape}
    optimizer = build_optimizer(model, cfg.OPTIMIZATION, loaded)
    scheduler, _ = build_scheduler(optimizer, steps, 1, -1, cfg.OPTIMIZATION)

    from pcdet_ext.engine.loop.runner import Hook

    class RatiosHold(Hook):  # runs before every step, after the schedule has set that step's LRs
        def before_step(self, runner):
            lrs = group_lrs(optimizer)
            assert lrs["backbone_3d"] / lrs["dense_head"] == pytest.approx(0.05)
            assert all(lr / lrs["dense_head"] == pytest.approx(0.5) for g, lr in lrs.items() if g == "default")

    losses, _ = train_steps(model, train_loader, optimizer, steps, scheduler, hooks=[RatiosHold()])
    assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


@pytest.mark.parametrize("name", ["adam_onecycle", "adam_cosineanneal"])
def test_fastai_schedules_keep_ratios_every_step_and_train_like_stock(stock_optimization, name):
    stock_build, stock_sched = stock_optimization.build_optimizer, stock_optimization.build_scheduler
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler, group_lrs, scheduler_step

    def model():
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.vfe, m.backbone_3d = torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        m.dense_head = torch.nn.Linear(8, 2)
        m.forward = lambda x: m.dense_head(m.backbone_3d(m.vfe(x))).pow(2).mean()
        return m

    if name == "adam_cosineanneal" and not hasattr(stock_optimization, "CosineAnnealing"):
        pytest.skip("this OpenPCDet has no adam_cosineanneal")
    optim = EasyDict(OPTIMIZER=name, LR=0.003, WEIGHT_DECAY=0.01, MOMENTUM=0.9, MOMS=[0.95, 0.85], WARMUP_ITER=5,
                     PCT_START=0.4, DIV_FACTOR=10, DECAY_STEP_LIST=[35, 45], LR_DECAY=0.1, LR_CLIP=1e-7)
    total = 40
    a, b, c = model(), model(), model()
    stock = stock_build(a, optim)
    stock_s, _ = stock_sched(stock, 10, total // 10, -1, optim)
    same = build_optimizer(b, optim)  # no multipliers: must train exactly like stock
    same_s, _ = build_scheduler(same, 10, total // 10, -1, optim)
    diff_cfg = EasyDict(optim, DIFFERENTIAL_LR=True, BACKBONE_LR_RATIO=0.1, DENSE_HEAD_LR_RATIO=2.0)
    ours = build_optimizer(c, diff_cfg)
    ours_s, _ = build_scheduler(ours, 10, total // 10, -1, diff_cfg)
    x = torch.randn(16, 4)
    for step in range(total):
        for opt, sched, m in ((stock, stock_s, a), (same, same_s, b), (ours, ours_s, c)):
            scheduler_step(sched, step, step // 10)
            opt.zero_grad()
            m(x).backward()
            opt.step()
        lrs = group_lrs(ours)
        assert lrs["vfe"] / stock.lr == pytest.approx(0.1, rel=1e-12)
        assert lrs["backbone_3d"] / stock.lr == pytest.approx(0.1, rel=1e-12)
        assert lrs["dense_head"] / stock.lr == pytest.approx(2.0, rel=1e-12)
        assert ours.mom == stock.mom and same.lr == stock.lr
        assert all(g["betas"] == stock.opt.param_groups[0]["betas"] for g in ours.param_groups)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)  # decoupled decay + Adam exactly as OpenPCDet's wrapper


def test_dist_train_two_processes_gloo_then_test_eval_all(cfgs, synthetic_isarc, tmp_path, pretrained):
    ckpt_dir, _ = pretrained
    res = tool(None, "--cfg_file", cfgs[1], "--batch_size", "1", "--epochs", "2", "--workers", "0", "--extra_tag",
               "dist", "--pretrained_model", str(ckpt_dir / "checkpoint_epoch_2.pth"), "--skip_eval",
               "--tcp_port", "29655", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               out_root=tmp_path, launcher=True)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "output/custom_models" / Path(cfgs[1]).stem / "dist"
    assert (run / "ckpt/checkpoint_epoch_2.pth").is_file()
    log = next(run.glob("train_*.log")).read_text()
    row = next(line for line in log.splitlines() if line.strip().startswith("backbone_3d") and "/" in line)
    assert "world size 2" in log and "(100.0 %)" in row
    args = ["--cfg_file", cfgs[1], "--extra_tag", "dist", "--eval_all", "--batch_size", "1", "--workers", "0",
            "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL]
    first = tool("test.py", *args, out_root=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    written = sorted(run.glob("eval/**/result.json"))  # what benchmarks/pretraining_study.py paired reads
    assert len(written) == 2, written  # one per checkpoint
    figures = json.loads(written[-1].read_text())
    assert {f"{c}_3d/moderate_R40" for c in ("dumptruck", "excavator", "grader", "roller")} <= set(figures)
    assert all(isinstance(v, float) and math.isfinite(v) for v in figures.values())
    again = tool("test.py", *args, out_root=tmp_path, timeout=120)  # upstream waits forever here
    assert again.returncode == 0 and "already evaluated" in again.stdout + again.stderr


def test_pretraining_tool_two_processes_gloo(cfgs, synthetic_isarc, tmp_path):
    res = tool("train_rmae_cmae_phase1.py", "--cfg_file", cfgs[0], "--batch_size", "1", "--epochs", "2",
               "--workers", "0", "--extra_tag", "ddp", "--tcp_port", "29657", "--set", "DATA_CONFIG.DATA_PATH",
               str(synthetic_isarc), *SMALL, out_root=tmp_path, launcher=True)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "output/custom_models" / Path(cfgs[0]).stem / "ddp"
    state = load_checkpoint(run / "ckpt/checkpoint_epoch_2.pth")
    assert state["it"] == 4  # 4 train frames / (2 processes x batch 1) x 2 epochs
    assert "world size 2" in next(run.glob("train_*.log")).read_text()


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_adam_sgd_step_schedules_keep_ratios_at_every_step(name):
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler, group_lrs, scheduler_step
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.backbone_3d, m.dense_head, m.roi_head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    optim = EasyDict(OPTIMIZER=name, LR=0.01, WEIGHT_DECAY=0.001, MOMENTUM=0.9, DECAY_STEP_LIST=[1, 2], LR_DECAY=0.1,
                     LR_CLIP=1e-7, DIV_FACTOR=10, LR_WARMUP=True, WARMUP_EPOCH=1,
                     DIFFERENTIAL_LR=True, BACKBONE_LR_RATIO=0.1, DENSE_HEAD_LR_RATIO=2.0)
    opt = build_optimizer(m, optim)
    scheduler, warmup = build_scheduler(opt, 5, 3, -1, optim)
    x, seen = torch.randn(8, 4), set()
    for it in range(15):
        epoch = it // 5
        scheduler_step(warmup if epoch < optim.WARMUP_EPOCH else scheduler, it, epoch)
        lrs = group_lrs(opt)
        assert lrs["backbone_3d"] / lrs["default"] == pytest.approx(0.1)
        assert lrs["dense_head"] / lrs["default"] == pytest.approx(2.0)
        seen.add(round(lrs["default"], 10))
        opt.zero_grad()
        (m.dense_head(m.backbone_3d(x)).sum() + m.roi_head(x).sum()).backward()
        opt.step()
    assert len(seen) > 5  # warm-up and step decay both moved the LR


def test_bad_pretrained_model_is_refused_before_training(cfgs, synthetic_isarc, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("no")
    res = tool("train.py", "--cfg_file", cfgs[1], "--pretrained_model", str(junk),
               "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL, out_root=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]  # default workers, no traceback
    assert lines[0].startswith(f"error: --pretrained_model: {junk}: not a torch.save file")
    assert not list(tmp_path.glob("output/**/ckpt/*.pth"))


def test_unknown_encoder_name_lists_what_openpcdet_has():
    from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import ConfigError, RMAECMAEBackbonePhase1
    with pytest.raises(ConfigError, match=r"ENCODER.*VoxelNeXtt.*VoxelBackBone8x"):
        RMAECMAEBackbonePhase1(model_cfg=EasyDict(ENCODER="VoxelNeXtt", PRETRAINING=True), input_channels=3,
                               grid_size=np.array([64, 64, 40]), voxel_size=[0.2] * 3,
                               point_cloud_range=[0, 0, -4, 12.8, 12.8, 4])


def test_second_style_encoder_pretraining_step(synthetic_isarc):
    seed_everything()
    cfg = small_cfg(CONFIGS["second"][0], synthetic_isarc)
    cfg.MODEL.BACKBONE_3D.TEACHER_STUDENT_WEIGHT = 0.5
    set_voxelization(cfg, [0.2, 0.2, 0.2], 20000)
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_isarc)
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    allow_unlabelled(train_set)
    model = builders.build_model(cfg, train_set)
    from pcdet.models.backbones_3d import VoxelBackBone8x
    assert isinstance(model.backbone_3d, VoxelBackBone8x)
    from pcdet.models import model_fn_decorator
    model.train()
    loss, tb, _ = model_fn_decorator()(model, next(iter(train_loader)))
    loss.backward()
    assert np.isfinite(loss.item()) and tb["loss_teacher_student"] > 0 and tb["occ_positives"] > 0
    assert model.backbone_3d.conv_input[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rel", [*CONFIGS["voxelnext"], *CONFIGS["second"],
                                 "cfgs/kitti_models/rmae_cmae_kitti_pretraining_phase1.yaml",
                                 "cfgs/kitti_models/rmae_cmae_kitti_finetune_phase1.yaml",
                                 "cfgs/kitti_models/rmae_cmae_second_kitti_pretraining_phase1.yaml",
                                 "cfgs/kitti_models/rmae_cmae_second_kitti_finetune_phase1.yaml"])
def test_shipped_configs_build(rel):
    if "second" not in rel and not has_voxelnext():
        pytest.skip("VoxelNeXt config; this OpenPCDet (v0.6.0) has no VoxelNeXt")
    from pcdet_ext.engine.pretrained import build_model_without_data
    cfg = cfg_from_yaml_file(REPO / rel)
    model = build_model_without_data(cfg)
    pretraining = cfg.MODEL.BACKBONE_3D.PRETRAINING
    assert model.pretraining == pretraining and (getattr(model, "dense_head", None) is None) == pretraining
    if pretraining:
        assert cfg.MODEL.BACKBONE_3D.TEACHER_STUDENT_WEIGHT == 0.0 and hasattr(model.backbone_3d, "teacher")
        assert "gt_sampling" in cfg.DATA_CONFIG.DATA_AUGMENTOR.DISABLE_AUG_LIST


def test_amp_pretraining_saves_and_resumes_the_grad_scaler_and_recalibrates_batchnorm(cfgs, synthetic_isarc,
                                                                                      tmp_path):
    """--use_amp (bf16 autocast on the CPU): the GradScaler's state goes into every checkpoint and a
    resumed run continues from it; the last checkpoint holds statistics re-estimated on unmasked input."""
    from pcdet_ext.utils.checkpoint import atomic_save
    args = ("--cfg_file", cfgs[0], "--batch_size", "2", "--workers", "0", "--extra_tag", "amp", "--use_amp",
            "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL)
    res = tool("train_rmae_cmae_phase1.py", *args, "--epochs", "2", out_root=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "output/custom_models" / Path(cfgs[0]).stem / "amp"
    first = run / "ckpt/checkpoint_epoch_2.pth"
    state = load_checkpoint(first)
    assert state["scaler_state"]["scale"] == 2.0 ** 16  # LOSS_SCALE_FP16's default, no overflow in bf16
    log = next(run.glob("train_*.log")).read_text()
    assert "mixed precision (AMP): on, bf16 autocast" in log
    assert "BatchNorm statistics of the encoder and teacher re-estimated on 2 unmasked batches" in log
    state["scaler_state"]["scale"] = 1234.0  # marks the state: a resumed run must continue from it
    atomic_save(state, first)
    res = tool("train_rmae_cmae_phase1.py", *args, "--epochs", "3", out_root=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(run / "ckpt/checkpoint_epoch_3.pth")["scaler_state"]["scale"] == 1234.0
