"""Tier 2: R-MAE + CMAE Phase 2 pretraining tool (from a Phase 1 checkpoint, two gloo processes),
resume guard, conversion and fine-tune coverage, shipped configs."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcdet_ext.config import cfg_from_yaml_file
from pcdet_ext.engine.startup import builders
from pcdet_ext.utils.checkpoint import load_checkpoint
from tier2 import REPO, SMALL, has_voxelnext, phase_cfgs, seed_everything, small_cfg, tool

PHASE2_ONLY = ("mlfr.", "voxel_head", "frame_head", "frame_queue.", "balancer.")


@pytest.fixture(scope="module")
def cfgs2():
    return phase_cfgs(2)


@pytest.fixture(scope="module")
def phase2_run(cfgs2, pretrained, synthetic_isarc, tmp_path_factory):
    """Two processes (dist_train.sh 2, gloo), initialised from the Phase 1 checkpoint."""
    ckpt_dir, _ = pretrained
    out = tmp_path_factory.mktemp("phase2_out")
    res = tool("train_rmae_cmae_phase2.py", "--cfg_file", cfgs2[0], "--batch_size", "1", "--epochs", "2",
               "--workers", "0", "--extra_tag", "p2", "--tcp_port", "29661",
               "--pretrained_model", str(ckpt_dir / "checkpoint_epoch_2.pth"),
               "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               "MODEL.BACKBONE_3D.FRAME_CONTRASTIVE_CONFIG.MEMORY_BANK_SIZE", "8",
               out_root=out, launcher=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return out / "output/custom_models" / Path(cfgs2[0]).stem / "p2"


def test_phase2_pretraining_from_phase1_logs_every_term_and_coverage(phase2_run):
    log = next(phase2_run.glob("train_*.log")).read_text()
    assert "world size 2" in log and "teacher momentum: cosine from 0.9960 over 4 steps" in log
    rows = {line.split()[0]: line for line in log.splitlines() if "/" in line and "%)" in line}
    assert rows["backbone_3d"].rstrip().endswith("(100.0 %)")  # encoder, occupancy decoder, teacher from Phase 1
    assert "(  0.0 %)" in rows["backbone_3d.mlfr"] and "(  0.0 %)" in rows["backbone_3d.voxel_head"]
    state = load_checkpoint(phase2_run / "ckpt/checkpoint_epoch_2.pth")
    keys = state["model_state"]
    assert state["it"] == 4 and int(keys["backbone_3d.mask_step"]) == 4  # the step counter restarted at 0
    assert any(".mask_token" in k for k in keys) and "backbone_3d.frame_queue.keys" in keys
    assert int((keys["backbone_3d.frame_queue.sequence"] >= 0).sum()) == 8  # both ranks' frames, 4 steps x 2
    assert list((phase2_run / "tensorboard").iterdir())


def test_phase1_checkpoint_as_phase2_resume_names_the_differing_keys(cfgs2, pretrained, synthetic_isarc, tmp_path):
    ckpt_dir, _ = pretrained
    res = tool("train_rmae_cmae_phase2.py", "--cfg_file", cfgs2[0], "--batch_size", "2", "--epochs", "3",
               "--ckpt", str(ckpt_dir / "checkpoint_epoch_2.pth"), "--extra_tag", "resume",
               "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL, out_root=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "written by a different config" in res.stderr and "MODEL.NAME" in res.stderr
    assert "MODEL.BACKBONE_3D.ENABLE_MLFR" in res.stderr
    assert not list(tmp_path.glob("output/**/ckpt/*.pth"))


def test_queue_not_a_multiple_of_the_global_batch_is_refused(cfgs2, synthetic_isarc, tmp_path):
    res = tool("train_rmae_cmae_phase2.py", "--cfg_file", cfgs2[0], "--batch_size", "2", "--epochs", "2",
               "--extra_tag", "q", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               "MODEL.BACKBONE_3D.FRAME_CONTRASTIVE_CONFIG.MEMORY_BANK_SIZE", "7", out_root=tmp_path)
    assert res.returncode == 2
    assert ("error: MODEL.BACKBONE_3D.FRAME_CONTRASTIVE_CONFIG.MEMORY_BANK_SIZE 7 must be a multiple of the global "
            "batch size 2") in res.stderr
    assert not list(tmp_path.glob("output/**/ckpt/*.pth"))


def test_convert_drops_phase2_modules_and_finetune_loads_the_whole_backbone(cfgs2, phase2_run, synthetic_isarc,
                                                                           tmp_path):
    ckpt = phase2_run / "ckpt/checkpoint_epoch_2.pth"
    conv = tmp_path / "backbone.pth"
    res = subprocess.run([sys.executable, str(REPO / "tools/convert_pretrain_ckpt.py"), "--ckpt", str(ckpt),
                          "--out", str(conv), "--cfg_file", cfgs2[1], "--set", *SMALL],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = next(line for line in res.stdout.splitlines() if line.strip().startswith("backbone_3d"))
    assert "(100.0 %)" in row, res.stdout
    kept = load_checkpoint(conv)["model_state"]
    assert not any(k.startswith("backbone_3d." + m) for k in kept for m in PHASE2_ONLY)
    assert not any("mask_token" in k or ".teacher." in k for k in kept)
    seed_everything()
    cfg = small_cfg(cfgs2[1], synthetic_isarc)
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_isarc)
    model = builders.build_model(cfg, train_set)
    model.load_params_from_file(str(ckpt), logger=_quiet(), to_cpu=True)  # the stock loader, as dist_train.sh
    pretrained_state = load_checkpoint(ckpt)["model_state"]
    backbone = [k for k in model.state_dict() if k.startswith("backbone_3d.")]
    assert backbone and all(np.array_equal(model.state_dict()[k].numpy(), pretrained_state[k].numpy())
                            for k in backbone)


def _quiet():
    import logging
    logger = logging.getLogger("phase2_finetune")
    logger.addHandler(logging.NullHandler())
    return logger


@pytest.mark.parametrize("rel", ["cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase2.yaml",
                                 "cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase2.yaml",
                                 "cfgs/custom_models/rmae_cmae_second_isarc_4class_pretraining_phase2.yaml",
                                 "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase2.yaml",
                                 "cfgs/kitti_models/rmae_cmae_kitti_pretraining_phase2.yaml",
                                 "cfgs/kitti_models/rmae_cmae_kitti_finetune_phase2.yaml"])
def test_shipped_phase2_configs_build(rel):
    if "second" not in rel and not has_voxelnext():
        pytest.skip("VoxelNeXt config; this OpenPCDet (v0.6.0) has no VoxelNeXt")
    from pcdet_ext.engine.pretrained import build_model_without_data
    from pcdet_ext.engine.startup.preflight import check_config
    cfg = cfg_from_yaml_file(REPO / rel)
    check_config(cfg)
    model = build_model_without_data(cfg)
    pretraining = cfg.MODEL.BACKBONE_3D.PRETRAINING
    assert type(model).__name__ == "RMAECMAEDetectorPhase2" and model.pretraining == pretraining
    if pretraining:
        bb = model.backbone_3d
        assert set(bb.mlfr) == {"x_conv2", "x_conv3", "x_conv4"} and bb.contrast_scale == "x_conv4"
        assert bb.phase2.MLFR.SCALE_WEIGHTS == {"x_conv2": 0.8, "x_conv3": 1.0, "x_conv4": 1.2}


def test_users_loss_config_with_phase2_weights_is_folded_in(synthetic_isarc):
    from pcdet_ext.engine.startup.preflight import apply_loss_config
    cfg = small_cfg("cfgs/custom_models/rmae_cmae_second_isarc_4class_pretraining_phase2.yaml", synthetic_isarc)
    cfg.LOSS_CONFIG = {"RMAE_WEIGHT": 1.0, "TEACHER_STUDENT_WEIGHT": 0.0, "MLFR_WEIGHT": 1.0,
                       "VOXEL_CONTRASTIVE_WEIGHT": 0.6, "DETECTION_WEIGHT": 1.0}
    apply_loss_config(cfg)
    assert cfg.MODEL.BACKBONE_3D.DETECTION_WEIGHT == 1.0
    cfg.LOSS_CONFIG["MLFR_WEIGHT"] = 2.0
    from pcdet_ext.config import ConfigError
    with pytest.raises(ConfigError, match=r"MODEL.BACKBONE_3D.MLFR_WEIGHT=1.0 conflicts with LOSS_CONFIG.MLFR_WEIGHT=2.0"):
        apply_loss_config(cfg)
