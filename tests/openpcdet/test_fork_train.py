"""Tier 2: a fork's own, stock OpenPCDet ``tools/train.py`` with ``import pcdet_ext`` added trains with the
config's per-group learning rates, and a stock optimizer is refused before the first step."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tier2 import REPO

FINETUNE = "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase1.yaml"  # SECOND: master and v0.6.0
SMALL_DATASET = (("POINT_CLOUD_RANGE: [-70.4, -70.4, -6, 70.4, 70.4, 10]", "POINT_CLOUD_RANGE: [-25.6, -25.6, -4, 25.6, 25.6, 4]"),
                 ("VOXEL_SIZE: [0.1, 0.1, 0.2]", "VOXEL_SIZE: [0.2, 0.2, 0.2]"))


@pytest.fixture(scope="module")
def fork(synthetic_isarc, tmp_path_factory):
    """A copy of OpenPCDet's tools/ whose train.py starts with ``import pcdet_ext`` (the one line a fork
    adds), with this package's configs copied into its cfgs/ (the dataset at the test's small grid)."""
    import pcdet
    root = tmp_path_factory.mktemp("fork")
    tools = root / "tools"
    shutil.copytree(Path(pcdet.__file__).resolve().parent.parent / "tools", tools)
    train = tools / "train.py"
    train.write_text("import pcdet_ext\n" + train.read_text())
    stock = {p.relative_to(tools) for p in (tools / "cfgs").rglob("*.yaml")}
    res = subprocess.run([sys.executable, "-m", "pcdet_ext.cli.copy_cfgs", str(tools)], capture_output=True, text=True,
                         timeout=300)  # the documented way to give a fork this package's configs
    assert res.returncode == 0 and "copied" in res.stdout, res.stderr[-2000:]
    assert (tools / FINETUNE).is_file() and {p.relative_to(tools) for p in (tools / "cfgs").rglob("*.yaml")} > stock
    dataset = (tools / "cfgs/dataset_configs/custom_dataset_isarc.yaml").read_text()
    for old, new in SMALL_DATASET + (("DATA_PATH: '../data/isarc'", f"DATA_PATH: '{synthetic_isarc}'"),):
        assert old in dataset
        dataset = dataset.replace(old, new)
    (tools / "cfgs/dataset_configs/custom_dataset_isarc.yaml").write_text(dataset)
    return tools


def _pretrained_backbone(tools: Path, out: Path) -> Path:
    from pcdet.config import cfg_from_yaml_file
    from easydict import EasyDict
    from pcdet_ext.engine.pretrained import build_model_without_data
    cwd = os.getcwd()
    os.chdir(tools)  # OpenPCDet's loader resolves _BASE_CONFIG_ from tools/
    try:
        cfg = cfg_from_yaml_file(FINETUNE, EasyDict())
    finally:
        os.chdir(cwd)
    state = build_model_without_data(cfg).state_dict()
    torch.save({"model_state": {k: v for k, v in state.items() if k.startswith("backbone_3d.")}}, out)
    return out


def test_stock_train_py_trains_each_group_at_its_configured_ratio(fork, tmp_path):
    pretrained = _pretrained_backbone(fork, tmp_path / "pretrained.pth")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # OpenPCDet's default flags otherwise (4 DataLoader workers)
    res = subprocess.run([sys.executable, str(Path(__file__).parent / "_fork_first_step.py"), "--cfg_file", FINETUNE,
                          "--batch_size", "2", "--epochs", "3", "--pretrained_model", str(pretrained)],
                         cwd=fork, env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("GROUP_LRS ")), None)
    assert res.returncode == 0 and line, res.stderr[-3000:]
    lrs = dict(json.loads(line[len("GROUP_LRS "):]))
    # DIFFERENTIAL_LR: backbone 0.1x (BACKBONE_LOADED_ONLY: the loaded backbone_3d), dense head 2x, the rest 1x
    assert set(lrs) == {"backbone_3d", "dense_head", "default"}, lrs
    assert lrs["backbone_3d"] / lrs["default"] == pytest.approx(0.1) and lrs["dense_head"] / lrs["default"] == pytest.approx(2.0)
    assert lrs["default"] == pytest.approx(0.003 / 10)  # OneCycle's first step: LR / DIV_FACTOR


def test_a_stock_optimizer_is_refused_before_the_first_step(fork):
    from pcdet.config import cfg, cfg_from_yaml_file
    from pcdet_ext.config import ConfigError
    from pcdet_ext.engine.optimization import build_optimizer
    from pcdet_ext.engine.pretrained import build_model_without_data
    from pcdet_ext.openpcdet.locator import pcdet_tools_module
    stock = pcdet_tools_module("train_utils/optimization")  # OpenPCDet's own, as a fork that bypassed the hook
    cwd = os.getcwd()
    os.chdir(fork)
    try:
        cfg.clear()
        cfg_from_yaml_file(FINETUNE, cfg)  # a fork's train.py builds from OpenPCDet's global cfg
        model = build_model_without_data(cfg)
        opt = stock.build_optimizer(model, cfg.OPTIMIZATION)
        assert len({g["lr"] for g in opt.opt.param_groups if g["params"]}) == 1  # what stock would train: all at 1x
        model.train()
        with pytest.raises(ConfigError, match=r"OPTIMIZATION.DIFFERENTIAL_LR / PARAM_GROUPS: .* trains every group "
                                              r"at 1x; add `import pcdet_ext` at the top of your tools/train.py"):
            model({"batch_size": 1})
        build_optimizer(model, cfg.OPTIMIZATION)  # pcdet_ext's builder marks the model: no refusal
        from pcdet_ext.openpcdet.lr_rules import unserved
        assert unserved(model) is None
    finally:
        cfg.clear()
        os.chdir(cwd)


def test_any_detector_regroups_loaded_only_rules_after_openpcdets_pretrained_load(tmp_path):
    """Stock train.py builds the optimizer, then loads --pretrained_model: with import pcdet_ext, any
    OpenPCDet detector (here a stock PointPillar) reports what loaded and BACKBONE_LOADED_ONLY applies."""
    import logging
    from easydict import EasyDict
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    from pcdet_ext.engine.optimization import build_optimizer, group_lrs
    from pcdet_ext.engine.pretrained import build_model_without_data
    cfg = cfg_from_yaml_file(REPO / "cfgs/kitti_models/pointpillar_rq.yaml")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]"], cfg)
    cfg.MODEL.NAME = "PointPillar"
    model = build_model_without_data(cfg)
    optim = EasyDict(OPTIMIZER="adam_onecycle", LR=0.003, DIFFERENTIAL_LR=True, BACKBONE_LR_RATIO=0.1,
                     DENSE_HEAD_LR_RATIO=2.0, BACKBONE_LOADED_ONLY=True)
    optimizer = build_optimizer(model, optim)  # nothing loaded yet: the backbone trains at 1x
    assert set(group_lrs(optimizer)) == {"dense_head", "default"}
    state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone_2d.")}
    torch.save({"model_state": state}, tmp_path / "backbone_2d.pth")
    model.load_params_from_file(str(tmp_path / "backbone_2d.pth"), logger=logging.getLogger("fork"), to_cpu=True)
    lrs = group_lrs(optimizer)
    assert set(lrs) == {"backbone_2d", "dense_head", "default"}  # vfe was not loaded: it stays in default
    assert lrs["backbone_2d"] / lrs["default"] == pytest.approx(0.1) and lrs["dense_head"] / lrs["default"] == 2.0
    names = {n for g in optimizer.param_groups if g["name"] == "backbone_2d" for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert names == {n for n, _ in model.named_parameters() if n.startswith("backbone_2d.")}
