"""PointPillarRQ through OpenPCDet on CPU: frozen head/tail, training step, evaluation, pretrained loading."""
import numpy as np
import pytest
import torch

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
from pcdet_ext.engine.loop.runner import train_steps
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.evaluation import evaluate_model
from pcdet_ext.utils.checkpoint import atomic_save
from tier2 import REPO, seed_everything, set_voxelization


def rq_cfg(mode="sparse", path="cfgs/kitti_models/pointpillar_rq.yaml"):
    cfg = cfg_from_yaml_file(REPO / path)
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]",
                   "MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS", "2", "MODEL.RQ_BOTTLENECK.EMBEDDING_SCHEDULE", "[16, 64]",
                   "MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE", "64", "MODEL.RQ_BOTTLENECK.MODE", mode], cfg)
    set_voxelization(cfg, [0.16, 0.16, 4], 6000)
    return cfg


@pytest.fixture(scope="module")
def pretrained(synthetic_kitti, tmp_path_factory):
    """A PointPillars checkpoint of the same layout (random weights are enough to test loading)."""
    seed_everything(1)
    cfg = rq_cfg()
    cfg.MODEL.NAME = "PointPillar"
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    path = tmp_path_factory.mktemp("pp") / "pointpillar.pth"
    atomic_save({"model_state": model.state_dict(), "epoch": 1, "it": 0}, path)
    return path, model.state_dict()


def frozen_state(model):
    """Head (vfe, scatter) and tail (2D backbone, dense head) weights and BN statistics."""
    prefixes = ("vfe.", "map_to_bev_module.", "backbone_2d.", "dense_head.")
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_trains_only_the_bottleneck_and_evaluates(synthetic_kitti, pretrained, mode):
    seed_everything()
    cfg = rq_cfg(mode)
    cfg.MODEL.RQ_BOTTLENECK.LOSS_WEIGHTS = {"DET": 1.0, "VQ": 0.0, "CODEBOOK": 0.0}  # only detection can train
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    assert type(model).__name__ == "PointPillarRQ"
    report = model.load_pretrained_pointpillars(str(pretrained[0]))
    assert all(a == b for n, (a, b) in report.items() if n != "rq_bottleneck")
    model.quantizer.start_stage(0, 16)
    model.quantizer.set_mode("gradient")
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(any(p is q for q in model.rq_bottleneck.parameters()) for p in params)
    before = frozen_state(model)
    cb_before = model.quantizer.codebooks[0].detach().clone()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    assert not model.backbone_2d.blocks[0][2].training  # BN of the frozen tail stays in eval mode
    losses, tb = train_steps(model, train_loader, optimizer, steps=1)
    assert np.isfinite(losses[0]) and {"loss_det", "loss_vq", "loss_total", "rq_perplexity_0"} <= set(tb)
    assert tb["loss_total"] == pytest.approx(tb["loss_det"])  # VQ weight 0: the step is the detection loss's
    after = frozen_state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed  # weights and BN statistics bit-identical
    assert model.quantizer.codebooks[0].grad.abs().sum() > 0  # the detection loss reaches the codebooks
    assert not torch.equal(cb_before, model.quantizer.codebooks[0].detach())
    _, result_str, result = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES)
    assert "Car AP@0.70" in result_str


def test_loss_weights_mean_what_users_training_script_meant(synthetic_kitti, pretrained):
    """DET x detection + VQ x mse(residual, quantized) (the pull of the codebooks); CODEBOOK changes nothing."""
    from pcdet.models import load_data_to_gpu
    totals = {}
    for weights in ({"DET": 0.5, "VQ": 2.0, "CODEBOOK": 0.1}, {"DET": 0.5, "VQ": 2.0, "CODEBOOK": 7.0}):
        seed_everything()
        cfg = rq_cfg()
        cfg.MODEL.RQ_BOTTLENECK.LOSS_WEIGHTS = weights
        (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_kitti)
        model = builders.build_model(cfg, train_set)
        model.load_pretrained_pointpillars(str(pretrained[0]))
        model.quantizer.start_stage(0, 16)
        model.quantizer.set_mode("gradient")
        model.train()
        batch = train_set.collate_batch([train_set[0]])
        load_data_to_gpu(batch)
        ret, tb, _ = model(batch)
        assert tb["loss_vq"] > 0 and ret["loss"].item() == pytest.approx(0.5 * tb["loss_det"] + 2.0 * tb["loss_vq"])
        totals[weights["CODEBOOK"]] = ret["loss"].item()
    assert totals[0.1] == totals[7.0]


def test_sparse_mode_keeps_empty_cells_zero_and_exposes_codes(synthetic_kitti, pretrained):
    seed_everything()
    cfg = rq_cfg("sparse")
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    model.load_pretrained_pointpillars(str(pretrained[0]))
    model.quantizer.start_stage(0, 16)
    model.eval()
    from pcdet.models import load_data_to_gpu
    batch = next(iter(train_loader))
    load_data_to_gpu(batch)
    with torch.no_grad():
        batch = model.vfe(batch)
        batch = model.rq_bottleneck(batch)
        batch = model.map_to_bev_module(batch)
    bev = batch["spatial_features"]
    occupied = torch.zeros(bev.shape[0], bev.shape[2], bev.shape[3], dtype=torch.bool)
    c = batch["voxel_coords"].long()
    occupied[c[:, 0], c[:, 2], c[:, 3]] = True
    assert float(bev.permute(0, 2, 3, 1)[~occupied].abs().max()) == 0.0
    assert batch["rq_codes"].shape == (len(c), 1) and int(batch["rq_codes"].max()) < 16


def test_pretrained_mismatch_reports_and_fails(synthetic_kitti, pretrained, tmp_path):
    cfg = rq_cfg()
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    state = dict(pretrained[1])
    state["dense_head.conv_cls.weight"] = torch.zeros(32, 384, 1, 1)  # a 4-class head
    bad = tmp_path / "four_class.pth"
    atomic_save({"model_state": state}, bad)
    with pytest.raises(RuntimeError, match=r"dense_head': '\d+/\d+'.*dense_head.conv_cls.weight"):
        model.load_pretrained_pointpillars(str(bad))


def test_4class_config_builds(synthetic_isarc):
    cfg = cfg_from_yaml_file(REPO / "cfgs/custom_models/pointpillar_rq_isarc_4class.yaml")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", "[-40.96, -40.96, -6, 40.96, 40.96, 10]"], cfg)
    set_voxelization(cfg, [0.32, 0.32, 16], 6000)
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_isarc)
    model = builders.build_model(cfg, train_set)
    assert model.quantizer.num_codebooks == 5 and model.quantizer.codebook_size == 256
    assert model.dense_head.num_class == 4


def test_bad_rq_config():
    from pcdet_ext.config import ConfigError
    from pcdet_ext.openpcdet.models.bottlenecks import parse_rq_config
    with pytest.raises(ConfigError, match=r"MODEL.RQ_BOTTLENECK: unknown key\(s\) 'CODEBOOKS' \(did you mean 'NUM_CODEBOOKS'"):
        parse_rq_config({"CODEBOOKS": 3})
    with pytest.raises(ValueError, match="EMBEDDING_SCHEDULE: expected strictly increasing"):
        parse_rq_config({"EMBEDDING_SCHEDULE": [16, 16]})
    with pytest.raises(ValueError, match="EMBEDDING_SCHEDULE"):
        parse_rq_config({"EMBEDDING_SCHEDULE": [16, 512]})
    with pytest.raises(ValueError, match="MODE"):
        parse_rq_config({"MODE": "hybrid"})
    with pytest.raises(ConfigError, match="MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS: expected int"):
        parse_rq_config({"NUM_CODEBOOKS": "5"})


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_a_gradient_step_stays_within_its_budget_of_host_copies(synthetic_kitti, mode):
    """Budget, read from pcdet_ext's code in a steady-state step: the quantizer's finite-input check
    (NaN / inf features would corrupt the codebooks), its operating-point draw (a CPU generator: no
    device sync on a GPU) and the runner's finite-loss check. The configuration buffers are read once
    per change, dead-entry restarts have fixed shapes, statistics stay tensors until logged."""
    import sys
    sys.path.insert(0, str(REPO / "tests"))
    from _host_copies import count_host_copies
    from pcdet_ext.engine.loop.runner import Runner
    seed_everything()
    cfg = rq_cfg(mode)
    (train_set, train_loader, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    model.quantizer.start_stage(0, 16)
    model.quantizer.set_mode("gradient")
    model.train()
    runner = Runner(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3),
                    is_main=False)
    batch = next(iter(train_loader))
    for _ in range(4):  # the operating points' first draws read the entries' initialisation once each
        runner.step(dict(batch))
    with count_host_copies() as calls:
        runner.step(dict(batch))
    assert len(calls) <= 3, "\n".join(calls)
