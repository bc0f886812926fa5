"""Differential-LR optimizer builder: grouping rules, wrapper maths, bad input (pure torch)."""
import logging

import pytest
import torch
import torch.nn as nn
from easydict import EasyDict

from pcdet_ext.engine.pretrained import PretrainedWeightsError, load_pretrained
from pcdet_ext.engine.optimization import GroupedOptimWrapper, OptimConfigError, build_optimizer, group_lrs
from pcdet_ext.engine.optimization.builder import load_optimizer_state


class Owner(nn.Module):
    """A non-leaf module owning a parameter directly (lost by OpenPCDet's leaf flattening)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.conv = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.vfe = nn.Linear(3, 3)
        self.backbone_3d = Owner()
        self.backbone_2d = nn.Linear(3, 3)
        self.dense_head = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
        self.roi_head = nn.Linear(3, 3)

    def forward(self, x):
        x = self.backbone_2d(self.backbone_3d.bn(self.backbone_3d.conv(self.vfe(x)) * self.backbone_3d.scale))
        return self.dense_head(x).sum() + self.roi_head(x).sum()


def cfg(**kw):
    base = dict(OPTIMIZER="adam_onecycle", LR=0.01, WEIGHT_DECAY=0.01, MOMENTUM=0.9, DIFFERENTIAL_LR=True,
                BACKBONE_LR_RATIO=0.1, DENSE_HEAD_LR_RATIO=2.0)
    base.update(kw)
    return EasyDict(base)


def test_every_parameter_in_exactly_one_group_with_seed_ratios():
    model = Detector()
    opt = build_optimizer(model, cfg())
    groups = opt.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.backbone_3d.scale for g in groups for p in g["params"])
    lrs = group_lrs(opt)
    assert lrs["backbone_3d"] == pytest.approx(0.001) and lrs["vfe"] == pytest.approx(0.001)
    assert lrs["dense_head"] == pytest.approx(0.02) and lrs["default"] == pytest.approx(0.01)
    assert [g["name"] for g in groups if "roi_head.weight" in []] == []


def test_scalar_lr_and_mom_keep_ratios_and_decoupled_decay():
    model = Detector()
    opt = build_optimizer(model, cfg())
    for lr in (0.003, 0.0001, 0.05):
        opt.lr, opt.mom = lr, 0.87  # what OpenPCDet's OneCycle does every iteration
        lrs = group_lrs(opt)
        assert lrs["backbone_3d"] / lrs["default"] == pytest.approx(0.1)
        assert lrs["dense_head"] / lrs["default"] == pytest.approx(2.0)
        assert all(g["betas"][0] == 0.87 for g in opt.param_groups)
    w = model.dense_head[0].weight.detach().clone()
    opt.zero_grad()
    opt.step()  # no gradients: only the decoupled decay acts, with the group's own lr
    assert torch.allclose(model.dense_head[0].weight, w * (1 - 0.01 * 0.1))


def test_param_groups_longest_prefix_wd_mult_and_plain_optimizers():
    model = Detector()
    c = cfg(OPTIMIZER="sgd", DIFFERENTIAL_LR=True, BACKBONE_LR_RATIO=None, DENSE_HEAD_LR_RATIO=None,
            PARAM_GROUPS={"backbone_3d": {"LR_MULT": 0.5}, "backbone_3d.conv": {"LR_MULT": 0.25, "WD_MULT": 0.0001}})
    opt = build_optimizer(model, c)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone_3d.conv"]["lr"] == pytest.approx(0.0025)
    assert by_name["backbone_3d.conv"]["weight_decay"] == pytest.approx(1e-6)
    assert any(p is model.backbone_3d.scale for p in by_name["backbone_3d"]["params"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    for _ in range(3):
        model(torch.randn(4, 3)).backward()
        opt.step()
        sched.step()
        assert by_name["backbone_3d.conv"]["lr"] / by_name["default"]["lr"] == pytest.approx(0.25)
    assert isinstance(build_optimizer(model, cfg(OPTIMIZER="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(model, cfg()), GroupedOptimWrapper)


@pytest.mark.parametrize("kw, match", [
    (dict(OPTIMIZER="lamb"), "OPTIMIZER"),
    (dict(BACKBONE_LR_RATIO=0.0), "BACKBONE_LR_RATIO"),
    (dict(DENSE_HEAD_LR_RATIO=-1), "DENSE_HEAD_LR_RATIO"),
    (dict(PARAM_GROUPS={"backbone_3d": {"LR_MULT": 0.5}}), "conflicts"),
    (dict(PARAM_GROUPS={"neck": {"LR_MULT": 0.5}}), "matches no trainable parameter"),
    (dict(PARAM_GROUPS={"vfe": {"LR": 0.5}}), "unknown key"),
    (dict(BACKBONE_LR_RATO=0.1), r"OPTIMIZATION: unknown key\(s\) 'BACKBONE_LR_RATO' \(did you mean 'BACKBONE_LR_RATIO'"),
    (dict(LR="fast"), r"OPTIMIZATION.LR: expected float, got str"),
])
def test_bad_optimizer_config_is_a_clear_error(kw, match):
    with pytest.raises(OptimConfigError, match=match):
        build_optimizer(Detector(), cfg(**kw))


def test_agreeing_seed_and_param_groups_are_accepted():
    opt = build_optimizer(Detector(), cfg(PARAM_GROUPS={"backbone_3d": {"LR_MULT": 0.1, "WD_MULT": 0.5}}))
    g = {g["name"]: g for g in opt.param_groups}["backbone_3d"]
    assert g["lr_mult"] == 0.1 and g["wd_mult"] == 0.5


def test_loaded_only_and_resume_group_structure():
    model = Detector()
    loaded = {"backbone_3d.conv.weight", "backbone_3d.conv.bias"}
    opt = build_optimizer(model, cfg(BACKBONE_LOADED_ONLY=True), loaded)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for p in by_name["backbone_3d"]["params"]} == {id(model.backbone_3d.conv.weight),
                                                                 id(model.backbone_3d.conv.bias)}
    assert any(p is model.backbone_3d.scale for p in by_name["default"]["params"])
    state = opt.state_dict()
    again = build_optimizer(model, cfg(BACKBONE_LOADED_ONLY=True), loaded)
    again.load_state_dict(state)
    other = build_optimizer(model, cfg(DIFFERENTIAL_LR=False))
    with pytest.raises(ValueError, match="param groups"):
        load_optimizer_state(other.opt, state)


def test_pretrained_coverage_report_and_refusals(tmp_path):
    model = Detector()
    good = tmp_path / "good.pth"
    torch.save({"model_state": {k: v + 1 for k, v in Detector().state_dict().items() if not k.startswith("dense")}},
               good)
    loaded = load_pretrained(model, good)
    assert "backbone_3d.scale" in loaded and "dense_head.0.weight" not in loaded
    assert torch.equal(model.backbone_3d.scale, torch.load(good)["model_state"]["backbone_3d.scale"])
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_pretrained(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="junk.pth: not a torch.save file"):
        load_pretrained(model, tmp_path / "junk.pth")
    other = tmp_path / "other.pth"
    torch.save({"model_state": {"backbone_3d.conv.weight": torch.zeros(7, 7), "vfe.weight": torch.zeros(3, 3)}}, other)
    before = model.vfe.weight.detach().clone()
    with pytest.raises(PretrainedWeightsError, match="vfe has only 1/2 tensors"):
        load_pretrained(model, other)
    assert torch.equal(model.vfe.weight, before)  # nothing copied when refused
    head_only = tmp_path / "head.pth"
    torch.save({"model_state": {"dense_head.0.weight": torch.zeros(3, 3)}}, head_only)
    with pytest.raises(PretrainedWeightsError, match="none of this model's backbone modules"):
        load_pretrained(model, head_only)



def test_pretrained_rows_for_new_modules_and_run_state_never_loaded(tmp_path):
    model = Detector()
    model.backbone_3d.head = nn.Linear(3, 3)  # new to this model (a Phase 2 head on a Phase 1 checkpoint)
    model.backbone_3d.register_buffer("mask_step", torch.zeros((), dtype=torch.long))
    old = {k: v + 1 for k, v in Detector().state_dict().items()}
    old["backbone_3d.mask_step"] = torch.tensor(7)
    path = tmp_path / "old.pth"
    torch.save({"model_state": old}, path)
    with pytest.raises(PretrainedWeightsError, match="backbone_3d has only 8/10"):  # the head counts against coverage
        load_pretrained(model, path)
    records = []
    logger = logging.getLogger("pretrained_rows")
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    logger.setLevel(logging.INFO)
    loaded = load_pretrained(model, path, logger=logger, new_modules=["backbone_3d.head"])
    assert "backbone_3d.scale" in loaded and int(model.backbone_3d.mask_step) == 0
    table = {line.split()[0]: line for line in records[0].splitlines()[1:]}
    assert "(100.0 %)" in table["backbone_3d"] and "0/2" in table["backbone_3d.head"]

def test_fork_drop_in_file_serves_the_same_builder():
    import importlib.util
    from pathlib import Path

    import pcdet_ext.engine.optimization as ours
    path = Path(__file__).resolve().parents[1] / "tools/train_utils/optimization/differential_lr.py"
    spec = importlib.util.spec_from_file_location("differential_lr_dropin", path)  # not as train_utils.*
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.create_optimizer_with_differential_lr is ours.build_optimizer
    assert module.build_scheduler is ours.build_scheduler
