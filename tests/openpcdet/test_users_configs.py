"""Tier 2: users' own R-MAE + CMAE configs (4-class construction set; users_configs/, written as users
publish them) run unchanged: Phase 1 and Phase 2 pretraining one epoch, the Phase 2 fine-tune from the
Phase 2 checkpoint with its whole backbone loaded, the Phase 1 fine-tune refused for its real mistake."""
from pathlib import Path

import pytest

from tier2 import SMALL, has_voxelnext, tool

USERS = Path(__file__).resolve().parent / "users_configs"


def _notes(stdout: str):
    return [line for line in stdout.splitlines() if line.startswith("note: ")]


def _only_ckpt(out: Path, name: str) -> Path:
    found = sorted(out.glob(f"output/**/ckpt/{name}"))
    assert len(found) == 1, found
    return found[0]


def test_phase1_pretraining_runs_with_its_keys_noted(synthetic_isarc, tmp_path):
    if not has_voxelnext():
        pytest.skip("the user's Phase 1 configs are VoxelNeXt's; this OpenPCDet (v0.6.0) has no VoxelNeXt")
    res = tool("train_rmae_cmae_phase1.py", "--cfg_file", str(USERS / "rmae_cmae_4class_pretraining_phase1.yaml"),
               "--batch_size", "1", "--epochs", "1", "--extra_tag", "users",
               "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL, out_root=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    noted = " ".join(_notes(res.stdout))
    for key in ("TEACHER_STUDENT_MODE", "FEATURE_DIM", "TEACHER_BACKBONE_TYPE"):
        assert f"MODEL.BACKBONE_3D.{key} accepted:" in noted, res.stdout[-2000:]
    from pcdet_ext.utils.checkpoint import load_checkpoint
    keys = load_checkpoint(_only_ckpt(tmp_path, "checkpoint_epoch_1.pth"))["model_state"]
    assert any(k.startswith("backbone_3d.ts_regression.") for k in keys)  # LOSS_CONFIG's TEACHER_STUDENT_WEIGHT 0.5


def test_phase1_finetune_is_refused_for_its_real_mistake_before_any_data(synthetic_isarc, tmp_path):
    if not has_voxelnext():
        pytest.skip("the user's Phase 1 configs are VoxelNeXt's; this OpenPCDet (v0.6.0) has no VoxelNeXt")
    res = tool("train.py", "--cfg_file", str(USERS / "rmae_cmae_4class_finetune_phase1.yaml"), "--batch_size", "1",
               "--epochs", "1", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL, out_root=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "MODEL.DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS.code_weights: 10 weights" in lines[0]
    assert "DETECTION_WEIGHT" not in lines[0] and not (tmp_path / "output").exists()


@pytest.fixture(scope="module")
def phase2_pretrained(synthetic_isarc, tmp_path_factory):
    out = tmp_path_factory.mktemp("users_phase2")
    res = tool("train_rmae_cmae_phase2.py", "--cfg_file", str(USERS / "rmae_cmae_4class_pretraining_phase2.yaml"),
               "--batch_size", "1", "--epochs", "1", "--extra_tag", "users",
               "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL, out_root=out)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, _only_ckpt(out, "checkpoint_epoch_1.pth")


def test_phase2_pretraining_runs_with_every_users_key(phase2_pretrained):
    res, _ = phase2_pretrained
    noted = " ".join(_notes(res.stdout))
    for key in ("FRAME_CONTRASTIVE_CONFIG.FEATURE_DIM", "FRAME_CONTRASTIVE_CONFIG.ENABLE_DOMAIN_SPECIFIC",
                "FRAME_CONTRASTIVE_CONFIG.EQUIPMENT_TYPES", "VOXEL_CONTRASTIVE_CONFIG.COORD_TOLERANCE",
                "DETECTION_WEIGHT"):
        assert f"MODEL.BACKBONE_3D.{key} accepted:" in noted, res.stdout[-3000:]


def test_phase2_finetune_builds_a_plain_detector_loading_the_whole_backbone(phase2_pretrained, synthetic_isarc,
                                                                          tmp_path):
    _, ckpt = phase2_pretrained
    res = tool("train.py", "--cfg_file", str(USERS / "rmae_cmae_4class_finetune_phase2.yaml"), "--batch_size", "1",
               "--epochs", "1", "--max_iters_per_epoch", "2", "--skip_eval", "--pretrained_model", str(ckpt),
               "--extra_tag", "users", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               "OPTIMIZATION.PCT_START", "0.5", out_root=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("MLFR_WEIGHT, VOXEL_CONTRASTIVE_WEIGHT, FRAME_CONTRASTIVE_WEIGHT accepted: no effect with PRETRAINING: "
            "False") in res.stdout
    log = next(tmp_path.glob("output/**/train_*.log")).read_text()
    row = next(line for line in log.splitlines() if line.strip().startswith("backbone_3d ") and "%)" in line)
    assert row.rstrip().endswith("(100.0 %)"), row
    state = _only_ckpt(tmp_path, "checkpoint_epoch_1.pth")
    from pcdet_ext.utils.checkpoint import load_checkpoint
    keys = load_checkpoint(state)["model_state"]
    assert not any(k.startswith(("backbone_3d.teacher", "backbone_3d.mlfr", "backbone_3d.frame_")) for k in keys)


def test_detection_weight_scales_the_heads_loss(synthetic_isarc):
    """LOSS_CONFIG.DETECTION_WEIGHT of a fine-tune config is what the detection loss is multiplied by."""
    import torch
    from pcdet.models import load_data_to_gpu
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.startup.preflight import check_config
    from tier2 import seed_everything, small_cfg
    losses = {}
    for weight in (1.0, 0.25):
        cfg = small_cfg(USERS / "rmae_cmae_4class_finetune_phase2.yaml", synthetic_isarc)
        cfg.LOSS_CONFIG.DETECTION_WEIGHT = weight
        check_config(cfg)
        seed_everything()
        (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_isarc)
        model = builders.build_model(cfg, train_set)
        model.train()
        batch = train_set.collate_batch([train_set[0]])
        load_data_to_gpu(batch)
        torch.manual_seed(0)
        ret, tb, _ = model(batch)
        losses[weight] = (ret["loss"].item(), tb["loss_rpn"])
    assert losses[1.0][1] == pytest.approx(losses[0.25][1])  # the same head loss
    assert losses[0.25][0] == pytest.approx(0.25 * losses[1.0][0]) and losses[1.0][0] == pytest.approx(losses[1.0][1])


def test_a_start_refused_after_the_run_folder_was_made_leaves_none(synthetic_isarc, tmp_path):
    """The schedule check comes after the data and the model: the folder made for the run goes again."""
    res = tool("train.py", "--cfg_file", str(USERS / "rmae_cmae_4class_finetune_phase2.yaml"), "--batch_size", "2",
               "--epochs", "1", "--skip_eval", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               "OPTIMIZATION.PCT_START", "0.01", out_root=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "OPTIMIZATION.PCT_START" in lines[-1] and "Traceback" not in res.stderr
    assert not (tmp_path / "output").exists()
