"""Tier 2: what a new user hits first, run as users run it (OpenPCDet's default DataLoader workers,
gt_sampling on, dist_train.sh, a shell without PCDET_ROOT)."""
import os
import subprocess
import sys

import pytest

from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.datasets import create_infos
from pcdet_ext.openpcdet.datasets import synthetic_writer
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.startup.args import load_config
from tier2 import CUSTOM_TEST_SCENE, REPO

SECOND_FT = "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase1.yaml"
SECOND_PT = "cfgs/custom_models/rmae_cmae_second_isarc_4class_pretraining_phase1.yaml"
SMALL = ["DATA_CONFIG.POINT_CLOUD_RANGE", "[-25.6, -25.6, -4, 25.6, 25.6, 4]",
         "DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE", "[0.2, 0.2, 0.2]"]


def run_tool(args, out_root, cwd=REPO, env_update=None, timeout=600):
    env = dict(os.environ, PCDET_EXT_OUTPUT_ROOT=str(out_root))
    env.update(env_update or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def user_config(tmp_path, base, text):
    """A user's config on top of a shipped one (under a cfgs/ folder, as OpenPCDet lays them out)."""
    path = tmp_path / "cfgs" / "custom_models" / "user.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"_BASE_CONFIG_: {REPO / base}\n{text}")
    return path


def test_training_with_default_workers_and_gt_sampling(synthetic_isarc, tmp_path):
    """OpenPCDet's default --workers (4) with gt_sampling (box kernels in every worker), two epochs (the
    workers are forked again after the parent trained); a deadlock here hangs until the timeout."""
    res = run_tool([sys.executable, str(REPO / "tools/train.py"), "--cfg_file", SECOND_FT, "--batch_size", "2",
                    "--epochs", "2", "--max_iters_per_epoch", "2", "--extra_tag", "workers", "--skip_eval",
                    "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--workers" not in res.stderr and (tmp_path / "output/custom_models" / "rmae_cmae_second_isarc_4class_finetune_phase1"
                                              / "workers/ckpt/checkpoint_epoch_2.pth").is_file()


def test_workers_share_the_parent_threads_safely(synthetic_isarc):
    """The same in-process: the parent runs the threaded kernels first (as evaluation does), then
    DataLoader workers with gt_sampling draw batches."""
    import numpy as np
    from pcdet_ext.algorithms import rotated_boxes
    cfg = load_config(SECOND_FT, ["DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL])
    rotated_boxes.bev_overlap(np.random.rand(64, 7) + 1, np.random.rand(64, 7) + 1)
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_isarc, batch_size=2, workers=2)
    assert train_loader.num_workers == 2
    batches = [b["batch_size"] for _, b in zip(range(3), train_loader)]
    assert batches == [2, 2, 2][:len(batches)] and batches


def test_typos_refused_before_any_work(tmp_path):
    cases = [(SECOND_FT, "OPTIMIZATION:\n  BACKBONE_LR_RATO: 0.1\n",
              r"OPTIMIZATION: unknown key\(s\) 'BACKBONE_LR_RATO' \(did you mean 'BACKBONE_LR_RATIO'\?\)"),
             (SECOND_PT, "MODEL:\n  BACKBONE_3D:\n    MASKED_RATO: 0.5\n",
              r"MODEL.BACKBONE_3D: unknown key\(s\) 'MASKED_RATO' \(did you mean 'MASKED_RATIO'\?\); known keys: .*'ENCODER'"),
             (SECOND_PT, "MODEL:\n  BACKBONE_3D:\n    OCCUPANCY_DECODER: {LOSSS: bce}\n",
              r"OCCUPANCY_DECODER: unknown key\(s\) 'LOSSS'"),
             (SECOND_FT, "MODEL:\n  DENSE_HEAD:\n    LOSS_CONFIG:\n      LOSS_WEIGHTS:\n        code_weights: [1, 1, 1, 1, 1, 1]\n",
              r"code_weights: 6 weights")]
    for base, text, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config(str(user_config(tmp_path, base, text)), None)


def users_rmae_config(tmp_path):
    """The shipped SECOND pretraining config written the way users' configs are: loss weights in a
    top-level LOSS_CONFIG, 36 groups of 10 degrees, TEACHER_STUDENT_MODE / FEATURE_DIM, EXPERIMENT notes."""
    text = (REPO / SECOND_PT).read_text()
    for line in ("        RMAE_WEIGHT: 1.0\n", "        TEACHER_STUDENT_WEIGHT: 0.0\n", "        ANGULAR_GROUP_SIZE: 1 "):
        assert line in text
        text = text.replace(line, "        # " if line.endswith(" ") else "")
    text = text.replace("        PRETRAINING: True\n", "        PRETRAINING: True\n        TEACHER_STUDENT_MODE: phase1\n"
                        "        FEATURE_DIM: 128\n        NUM_ANGULAR_GROUPS: 36\n        ANGULAR_GROUP_SIZE: 10\n")
    text += ("\nLOSS_CONFIG: {RMAE_WEIGHT: 0.7, TEACHER_STUDENT_WEIGHT: 0.5}\n"
             "EXPERIMENT: {NAME: baseline_r_mae, NOTES: 'sector masking, 36 groups'}\n")
    path = tmp_path / "cfgs" / "custom_models" / "users_rmae.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_users_rmae_keys_are_accepted_and_loss_config_honoured(synthetic_isarc, tmp_path, monkeypatch):
    path = users_rmae_config(tmp_path)
    cfg = load_config(str(path), ["DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL])
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_isarc)
    backbone = builders.build_model(cfg, train_set).backbone_3d
    assert (backbone.rmae_weight, backbone.ts_weight, backbone.mask_cfg.angular_group_size) == (0.7, 0.5, 10.0)
    # a fork's own train.py loads into OpenPCDet's global cfg and builds from it: LOSS_CONFIG still applies
    from pcdet.config import cfg as global_cfg, cfg_from_yaml_file
    from pcdet.models import build_network
    monkeypatch.chdir(REPO)
    global_cfg.clear()
    cfg_from_yaml_file(str(path), global_cfg)
    model = build_network(model_cfg=global_cfg.MODEL, num_class=4, dataset=train_set)
    assert (model.backbone_3d.rmae_weight, model.backbone_3d.ts_weight) == (0.7, 0.5)
    global_cfg.clear()


def test_dist_train_reports_one_line_not_tracebacks(synthetic_isarc, tmp_path):
    cfg = user_config(tmp_path, SECOND_FT, "OPTIMIZATION:\n  BACKBONE_LR_RATO: 0.1\n")
    res = run_tool(["bash", str(REPO / "tools/scripts/dist_train.sh"), "2", "--cfg_file", str(cfg),
                    "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc)], tmp_path, cwd=REPO / "tools")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "BACKBONE_LR_RATO" in lines[0], res.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_tool(["bash", str(REPO / "tools/scripts/dist_train.sh"), "2", "--cfg_file", SECOND_FT,
                    "--set", "DATA_CONFIG.DATA_PATH", str(empty)], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert f"gt_sampling DB_INFO_PATH: {empty}/custom_dbinfos_train.pkl" in lines[0]
    assert "BACKUP_DB_INFO" not in res.stderr and "ChildFailedError" not in res.stderr
    assert not (tmp_path / "output").exists()  # nothing written


def test_yaml_data_path_is_relative_to_tools_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SECOND_FT, None)
    assert cfg.DATA_CONFIG.DATA_PATH == str(REPO / "data" / "isarc")
    cfg = load_config(SECOND_FT, ["DATA_CONFIG.DATA_PATH", "mine"])  # a command-line path: the shell's
    assert cfg.DATA_CONFIG.DATA_PATH == str(tmp_path / "mine")


def test_create_data_in_a_new_shell_reads_pcdet_env(tmp_path):
    """tools/setup_env.sh leaves .pcdet_env; a new shell has no PCDET_ROOT."""
    if not os.environ.get("PCDET_ROOT"):
        pytest.skip("OpenPCDet is installed, not named by PCDET_ROOT: nothing for .pcdet_env to carry")
    root = synthetic_writer.write_custom(tmp_path / "set", num_frames=3, seed=3, val_fraction=0.34, spec=CUSTOM_TEST_SCENE)
    (tmp_path / ".pcdet_env").write_text(f"export PCDET_ROOT={os.environ['PCDET_ROOT']}\n")
    env = {k: v for k, v in os.environ.items() if k != "PCDET_ROOT"}
    res = subprocess.run([sys.executable, str(REPO / "tools/create_data.py"), "custom", "--data_path", str(root),
                          "--cfg_file", str(REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml"), "--class_names",
                          *synthetic_writer.CONSTRUCTION_CLASSES], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "custom_infos_train.pkl").is_file() and "Traceback" not in res.stderr
