"""The split1_ALL.yaml experiment schema, stage plan, checkpoint names, run folder and rates."""
from pathlib import Path

import pytest
import torch
import yaml

from pcdet_ext.split import checkpoints as ck
from pcdet_ext.split import schema
from pcdet_ext.split.rate import RateMeter, binary_entropy

REPO = Path(__file__).resolve().parent.parent


def raw(tmp_path, **sections):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "pp.pth").write_bytes(b"x")
    cfg = {"dataset": {"dir": str(tmp_path / "data")}, "model": {"pretrained_weight": str(tmp_path / "pp.pth")}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def test_shipped_configs_validate():
    for name in ("split1_ALL.yaml", "split1_ALL_isarc_4class.yaml"):
        cfg = schema.validate(yaml.safe_load((REPO / "cfgs/exp" / name).read_text()), check_paths=False)
        assert cfg.model.n_codebook == 5 and cfg.progressive_learning.embedding_schedule == [16, 32, 64, 128, 256]


def test_defaults_filled(tmp_path):
    cfg = schema.validate(raw(tmp_path))
    assert cfg.training.batch_size == 6 and cfg.training.max_epoch == 100 and cfg.loss_weights.det_weight == 0.8
    assert cfg.rq_model.latent_shape == [496, 432, 64] and cfg.logging.saved_path == "progressive_rq_logs"
    assert cfg.training.init_lr == 0.001 and isinstance(cfg.training.init_lr, float)


@pytest.mark.parametrize("sections,match", [
    ({"training": {"batchsize": 4}}, r"training: unknown key\(s\) 'batchsize' \(did you mean 'batch_size'\?\)"),
    ({"optimizer": {"lr": 1}}, r"experiment config \(sections\): unknown key\(s\) 'optimizer'; known keys: \['dataset'"),
    ({"training": {"batch_size": "6"}}, "training.batch_size: expected int"),
    ({"training": {"init_lr": True}}, "training.init_lr: expected float"),
    ({"progressive_learning": {"embedding_schedule": [16, 64, 32]}}, "embedding_schedule: expected strictly increasing"),
    ({"progressive_learning": {"embedding_schedule": [16, 512]}}, "above 256"),
    ({"progressive_learning": {"warmup_epochs": 20}}, r"warmup_epochs: expected 0 <= warmup_epochs < embedding_stage_epochs \(20\)"),
    ({"training": {"max_epoch": 20}}, "training.max_epoch: 20 epochs over 25 stages leaves 0 per stage"),
    ({"training": {"mode": "test"}}, "training.mode"),
    ({"rq_model": {"decay": 1.5}}, "rq_model.decay"),
    ({"loss_weights": {"det_weight": -1}}, "loss_weights.det_weight: expected >= 0"),
])
def test_bad_values_name_the_key(tmp_path, sections, match):
    with pytest.raises(schema.ConfigError, match=match):
        schema.validate(raw(tmp_path, **sections))


def test_missing_paths(tmp_path):
    cfg = raw(tmp_path)
    cfg["dataset"]["dir"] = str(tmp_path / "nope")
    with pytest.raises(schema.ConfigError, match="dataset.dir: .*nope is not a directory"):
        schema.validate(cfg)
    cfg = raw(tmp_path)
    cfg["model"]["pretrained_weight"] = str(tmp_path / "missing.pth")
    with pytest.raises(schema.ConfigError, match="model.pretrained_weight: .*missing.pth does not exist"):
        schema.validate(cfg)
    del cfg["model"]["pretrained_weight"]
    with pytest.raises(schema.ConfigError, match="model.pretrained_weight: required for training"):
        schema.validate(cfg)
    cfg["training"] = {"mode": "eval"}
    schema.validate(cfg)  # eval needs no pretrained PointPillars: the RQ checkpoint holds the model
    with pytest.raises(schema.ConfigError, match="dataset.dir: required"):
        schema.validate({"model": {}})


def test_stage_plan_arithmetic(tmp_path):
    cfg = schema.validate(raw(tmp_path, model={"n_codebook": 2},
                              progressive_learning={"embedding_schedule": [16, 64], "embedding_stage_epochs": 5,
                                                    "warmup_epochs": 2},
                              training={"max_epoch": 16}))
    plan = schema.stage_plan(cfg)
    assert [(s.codebook, s.stage, s.num_embeddings) for s in plan] == [(1, 1, 16), (1, 2, 64), (2, 1, 16), (2, 2, 64)]
    assert all(s.epochs == 4 and s.warmup_epochs == 2 and s.gradient_epochs == 2 for s in plan)  # min(5, 16 // 4)
    assert schema.allocated_entries(cfg) == 64
    text = schema.describe_plan(cfg)
    assert "16 epochs of max_epoch=16" in text and "codebook 2 stage 2:  64 entries" in text
    assert "rq_model.codebook_size=64 applies to legacy mode only" not in text  # 64 == allocated here
    legacy = schema.validate(raw(tmp_path, progressive_learning={"enabled": False}, training={"max_epoch": 7},
                                 model={"n_codebook": 3}, rq_model={"codebook_size": 128}))
    (only,) = schema.stage_plan(legacy)
    assert (only.codebook, only.num_embeddings, only.epochs, only.warmup_epochs) == (3, 128, 7, 2)


def test_set_overrides():
    out = schema.set_overrides({"training": {"max_epoch": 5}}, ["training.max_epoch", "9", "model.n_codebook", "2"])
    assert out == {"training": {"max_epoch": 9}, "model": {"n_codebook": 2}}
    with pytest.raises(schema.ConfigError, match="--set training.lr: not a key"):
        schema.set_overrides({}, ["training.lr", "1"])


def test_checkpoint_names():
    assert ck.epoch_name(2, 3, 20) == "codebook_2_stage_3_epoch_20.pth"
    assert ck.best_name(1, 5) == "codebook_1_stage_5_best.pth"
    assert ck.final_name(4, 1) == "codebook_4_stage_1_final.pth"
    assert ck.GLOBAL_BEST == "global_best.pth"


def test_run_dir_resume_and_refusal(tmp_path):
    run = ck.RunDir(tmp_path / "run")
    assert run.check_reusable("abc") is None
    run.save_resume({"fingerprint": "abc", "stage_state": {"stage_index": 2, "next_epoch": 3}})
    assert run.check_reusable("abc")["stage_state"] == {"stage_index": 2, "next_epoch": 3}
    with pytest.raises(FileExistsError, match="different config"):
        run.check_reusable("xyz")
    other = ck.RunDir(tmp_path / "other")
    other.save(ck.best_name(1, 1), {"model_state": {}})
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        other.check_reusable("abc")


def test_fingerprint_ignores_logging_and_workers(tmp_path):
    a = schema.validate(raw(tmp_path))
    b = schema.validate(raw(tmp_path, logging={"use_wandb": False}, training={"num_workers": 1}))
    c = schema.validate(raw(tmp_path, training={"init_lr": 0.01}))
    assert ck.fingerprint(a) == ck.fingerprint(b) != ck.fingerprint(c)


def test_rate_meter():
    meter = RateMeter(num_codebooks=2, num_embeddings=16, grid_cells=1000)
    codes = torch.stack([torch.arange(100) % 16, torch.zeros(100, dtype=torch.long)], 1)
    meter.add(codes, torch.zeros(100, dtype=torch.long), batch_size=1)
    s = meter.summary()
    assert s["code_bits_fixed"] == 100 * 2 * 4
    assert abs(s["code_bits_entropy"] - 100 * 4.0) < 1.0  # ~uniform over 16 (4 bits) + a constant codebook (0 bits)
    assert s["occupancy_bits_fixed"] == 1000
    assert abs(s["occupancy_bits_entropy"] - 1000 * binary_entropy(0.1)) < 1e-6
