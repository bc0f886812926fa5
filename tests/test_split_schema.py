"""The split1_ALL.yaml experiment schema, stage plan, checkpoint names, run folder and rates."""
from pathlib import Path

import pytest
import torch
import yaml
from easydict import EasyDict

from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.engine.recipes.progressive_rq import schema
from pcdet_ext.algorithms.rate import RateMeter, binary_entropy

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
    assert cfg.rq_model.latent_shape == [496, 432, 64] and cfg.logging.saved_path == str(REPO / "progressive_rq_logs")
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
    ({"loss_weights": {"det_weight": -1}}, r"loss_weights.det_weight: expected a value in \[0, inf\), got -1"),
    ({"training": {"batch_size": 0}}, r"training.batch_size: expected a value in \(0, inf\), got 0"),
    ({"training": {"init_lr": float("nan")}}, r"training.init_lr: expected finite numbers, got nan"),
    ({"rq_model": {"decay": float("nan")}}, r"rq_model.decay: expected finite numbers, got nan"),
    ({"loss_weights": {"vq_weight": float("inf")}}, r"loss_weights.vq_weight: expected finite numbers, got inf"),
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
    """The engine's one resume rule: same run-defining config, or an error listing the differing keys;
    the furthest state that loads, the pointer or a checkpoint saved after it."""
    from pcdet_ext.engine.checkpointing import ResumeError
    from pcdet_ext.utils.checkpoint import plain
    a = plain(schema.validate(raw(tmp_path)))
    b = plain(schema.validate(raw(tmp_path, training={"num_workers": 0}, logging={"use_wandb": False})))
    c = plain(schema.validate(raw(tmp_path, training={"init_lr": 0.01})))
    run = ck.RunDir(tmp_path / "run")
    assert run.resume_point(a) is None
    state = lambda idx, nxt, **kw: {"config": a, "it": 10 * idx + nxt,  # noqa: E731
                                    "stage_state": {"stage_index": idx, "next_epoch": nxt, **kw}}
    run.save_resume(state(2, 3))
    path, got = run.resume_point(b)  # workers, logging: free
    assert path.name == ck.RESUME and got["stage_state"]["next_epoch"] == 3
    with pytest.raises(ResumeError, match=r"different config \(use another --extra_tag.*\n  training.init_lr: "
                                          r"checkpoint 0.001, config 0.01"):
        run.resume_point(c)
    run.save(ck.best_name(1, 3), state(2, 4))  # a kill after the epoch's best, before the pointer
    run.save(ck.GLOBAL_BEST, state(2, 1))
    assert run.resume_point(a)[0].name == ck.best_name(1, 3)
    run.save_resume(state(2, 5))
    assert run.resume_point(a)[0].name == ck.RESUME
    (run.root / ck.RESUME).write_bytes(b"torn")  # unreadable pointer: the furthest checkpoint that loads
    (run.checkpoints / ".resume_state.pth.x1.tmp").write_bytes(b"half")
    assert run.resume_point(a)[0].name == ck.best_name(1, 3) and not list(run.checkpoints.glob("*.tmp"))
    other = ck.RunDir(tmp_path / "other")
    other.save(ck.best_name(1, 1), {"model_state": {}})
    assert other.resume_point(a) is None  # no stage state: nothing of a run
    (other.checkpoints / ck.best_name(1, 1)).write_bytes(b"x" * 10)
    with pytest.raises(FileExistsError, match="holds 1 checkpoint file\\(s\\), none of which loads"):
        other.resume_point(a)


def test_fingerprint_ignores_logging_workers_and_where_files_are(tmp_path):
    a = schema.validate(raw(tmp_path))
    b = schema.validate(raw(tmp_path, logging={"use_wandb": False}, training={"num_workers": 1}))
    c = schema.validate(raw(tmp_path, training={"init_lr": 0.01}))
    assert ck.fingerprint(a) == ck.fingerprint(b) != ck.fingerprint(c)
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "pp.pth").write_bytes(b"x")  # the dataset and the weights moved to another disk
    moved = schema.validate(raw(tmp_path, dataset={"dir": str(tmp_path / "moved")},
                                model={"pretrained_weight": str(tmp_path / "moved" / "pp.pth")}))
    assert ck.fingerprint(moved) == ck.fingerprint(a)
    assert ck.fingerprint(schema.validate(raw(tmp_path, dataset={"selection": "val"}))) != ck.fingerprint(a)


def test_rate_meter():
    meter = RateMeter(num_codebooks=2, num_embeddings=16, grid_cells=1000)
    codes = torch.stack([torch.arange(100) % 16, torch.zeros(100, dtype=torch.long)], 1)
    meter.add(codes, torch.zeros(100, dtype=torch.long), batch_size=1)
    s = meter.summary()
    assert s["code_bits_fixed"] == 100 * 2 * 4
    assert abs(s["code_bits_entropy"] - 100 * 4.0) < 1.0  # ~uniform over 16 (4 bits) + a constant codebook (0 bits)
    assert s["occupancy_bits_fixed"] == 1000
    assert abs(s["occupancy_bits_entropy"] - 1000 * binary_entropy(0.1)) < 1e-6


def test_plateau_cuts_after_patience_bad_epochs_as_documented():
    cuts = [bad for bad in range(0, 10) if schema.plateau_cut(bad, 3)]
    assert cuts == [3, 6, 9]  # torch's ReduceLROnPlateau(patience=3) would first cut after the 4th
    assert schema.plateau_cut(1, 0) and not schema.plateau_cut(0, 0)


def _run_stage(patience, early, maps):
    """The progressive trainer's StagePolicy over gradient epochs with scripted validation mAPs: the epochs
    at which the LR was cut (and the LR after each epoch) and the epoch it stopped at."""
    from types import SimpleNamespace
    from pcdet_ext.engine.recipes.progressive_rq.trainer import StagePolicy
    scripted = iter(maps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    exp = SimpleNamespace(training=SimpleNamespace(patience=patience, early_stopping_patience=early, ckpt_freq_epoch=99),
                          logging=SimpleNamespace(save_stage_weights=False))
    stage = schema.Stage(1, 1, 16, 0, len(maps))
    model = torch.nn.Linear(1, 1)
    t = SimpleNamespace(plan=[stage], exp=exp, q=SimpleNamespace(set_mode=lambda m: None), train_sampler=None,
                        epochs_done=0, global_best=-1.0, global_step=0, model=model, dist=SimpleNamespace(is_main=False),
                        log=SimpleNamespace(info=lambda *a: None), writer=SimpleNamespace(scalars=lambda *a: None),
                        _validate=lambda st: {"mAP": next(scripted)}, _barrier=lambda: None)
    policy = StagePolicy(t, 0, optimizer, -1.0, 0, None)
    runner = SimpleNamespace(stop=False, iteration=0, train=True)
    lrs = []
    for epoch in range(len(maps)):
        policy.before_epoch(runner, epoch)
        policy.after_epoch(runner, epoch, 0.0)
        lrs.append(optimizer.param_groups[0]["lr"])
        if runner.stop:
            return lrs, epoch + 1
    return lrs, None


def test_the_lr_cut_acts_before_early_stopping_when_both_patiences_are_equal():
    flat = [10.0] + [5.0] * 20  # a best in epoch 1, then a plateau
    lrs, stopped = _run_stage(5, 5, flat)
    assert stopped == 11 and lrs[5] == pytest.approx(0.1)  # cut after 5 bad epochs, 5 more to act, then stop
    assert lrs[-1] == pytest.approx(0.1)  # no second cut in the stopping epoch
    lrs, stopped = _run_stage(2, 5, flat)
    assert stopped == 8 and lrs[2] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.01)  # first cut at 2, stop 5 later
    lrs, stopped = _run_stage(5, 3, flat)
    assert stopped == 4 and lrs[-1] == 1.0  # early_stopping_patience < patience: no cut comes
    recovering = [10.0, 5, 5, 5, 5, 5, 12.0] + [5.0] * 14  # a new best after the cut resets both counts
    lrs, stopped = _run_stage(5, 5, recovering)
    assert stopped == 17 and lrs[11] == pytest.approx(0.01)


def test_patience_notes():
    cfg = schema.validate({"dataset": {"dir": "."}, "model": {"pretrained_weight": "x"},
                           "training": {"patience": 5, "early_stopping_patience": 3}}, check_paths=False)
    assert any("early_stopping_patience 3 < patience 5" in n for n in schema.notes({}, cfg))


USERS_TRAIN = """
seed: 42
save_stage_weights: True
dataset: {name: KITTI, dir: DATA, num_classes: 3}
model: {pre_trained_model: pointpillar, n_codebook: 5, pretrained_weight: PP}
progressive_learning: {enabled: True, embedding_schedule: [16, 32, 64, 128, 256], embedding_stage_epochs: 20,
                       warmup_epochs: 2, pretrain_ema_limit: None}
training: {mode: train, batch_size: 4, num_workers: 4, max_epoch: 100, init_lr: 0.001, patience: 3}
rq_model: {latent_shape: [496, 432, 64], code_shape: [496, 432, 1], codebook_size: 256, decay: 0.99,
           codebook_update_mode: LOSS}
evaluation: {enabled: True, test_combinations: [[1, 16], [3, 64], [5, 256]], use_full_kitti_eval: True}
logging: {use_wandb: False, saved_path: runs/split1, save_detailed_results: True}
"""
USERS_EVAL = """
hyperparameters: {lr: 0.001, note: copied from training}
pre-trained_model: {name: pointpillar, path: PP}
wandb: {project: split, entity: lab}
dataset: {dir: DATA}
training: {mode: eval}
evaluation: {weights_path: runs/split1/checkpoints/global_best.pth, checkpoint_dir: runs/split1/checkpoints,
             eval_all_codebook_stages: True, eval_stage_models: False, eval_final_model: True,
             use_final_checkpoints_only: False, use_last_stage_for_all: True, eval_compression_analysis: True,
             specific_evaluations: [[2, 32]], visualize_codebook_hierarchy: False}
logging: {save_detailed_results: True}
"""


def users_file(tmp_path, text):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "pp.pth").write_bytes(b"x")
    return yaml.safe_load(text.replace("DATA", str(tmp_path / "data")).replace("PP", str(tmp_path / "pp.pth")))


def test_users_experiment_files_run_with_every_key_honoured_or_noted(tmp_path):
    train = users_file(tmp_path, USERS_TRAIN)
    cfg = schema.validate(train)
    assert cfg.seed == 42 and cfg.logging.save_stage_weights is True
    assert cfg.progressive_learning.pretrain_ema_limit is None  # the string 'None' is YAML's null
    assert cfg.rq_model.codebook_update_mode == "loss" and cfg.evaluation.test_combinations == [[1, 16], [3, 64], [5, 256]]
    notes = schema.notes(train, cfg)
    assert any("use_full_kitti_eval accepted" in n for n in notes) and any("save_detailed_results" in n for n in notes)
    assert any("max_epoch 100 over 25 stages leaves 4 epochs per stage, not embedding_stage_epochs 20" in n
               for n in notes)  # max_epoch shortening the plan is said, not silent
    evaluation = users_file(tmp_path, USERS_EVAL)
    cfg = schema.validate(evaluation)
    assert cfg.evaluation.rq_ckpt.endswith("global_best.pth") and cfg.evaluation.test_combinations == [[2, 32]]
    notes = schema.notes(evaluation, cfg)
    for section in ("hyperparameters", "pre-trained_model", "wandb"):
        assert f"section {section!r} accepted" in "\n".join(notes)
    assert sum("accepted:" in n for n in notes) >= 8


def test_ema_only_mode_and_ema_limit(tmp_path):
    cfg = schema.validate(raw(tmp_path, rq_model={"codebook_update_mode": "EMA"},
                              progressive_learning={"pretrain_ema_limit": 3, "embedding_schedule": [16],
                                                    "embedding_stage_epochs": 4},
                              model={"n_codebook": 2}, training={"max_epoch": 8}))
    plan = schema.stage_plan(cfg)
    assert [(s.warmup_epochs, s.gradient_epochs) for s in plan] == [(4, 0), (4, 0)]
    assert cfg.progressive_learning.pretrain_ema_limit == 3


@pytest.mark.parametrize("sections, match", [
    ({"evaluation": {"test_combinatons": [[1, 16]]}}, r"did you mean 'test_combinations'"),
    ({"evaluation": {"test_combinations": [[1, 0]]}}, r"test_combinations: expected a list of \[codebooks, entries\]"),
    ({"rq_model": {"codebook_update_mode": "KMEANS"}}, r"codebook_update_mode: expected one of \['loss', 'ema'\]"),
    ({"evaluation": {"rq_ckpt": "a.pth", "weights_path": "b.pth"}}, r"evaluation.rq_ckpt='a.pth' conflicts with"),
])
def test_users_keys_still_checked(tmp_path, sections, match):
    with pytest.raises(schema.ConfigError, match=match):
        schema.validate(raw(tmp_path, **sections))
    with pytest.raises(schema.ConfigError, match=r"unknown key\(s\) 'sed' \(did you mean 'seed'\?\)"):
        schema.validate({**raw(tmp_path), "sed": 1})


def _needs_openpcdet_cfgs():
    from pcdet_ext.openpcdet.locator import pcdet_tools_dir
    if pcdet_tools_dir() is None:
        pytest.skip("the RQ model config's _BASE_CONFIG_ is OpenPCDet's tools/cfgs: needs an OpenPCDet checkout")


def _exp_file(tmp_path, **sections):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw(tmp_path, **sections)))
    return path


def test_rq_keys_of_the_model_config_set_the_experiment_value(tmp_path):
    """--set MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS 3 used to be overwritten by model.n_codebook: one value now."""
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    _needs_openpcdet_cfgs()
    exp, pcdet_set, _ = experiment.load_experiment(_exp_file(tmp_path), [
        "MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS", "3", "MODEL.RQ_BOTTLENECK.DECAY", "0.95",
        "MODEL.RQ_BOTTLENECK.LOSS_WEIGHTS", "{VQ: 0.5}", "DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -40, -3, 70.4, 40, 1]"])
    assert exp.model.n_codebook == 3 and exp.rq_model.decay == 0.95 and exp.loss_weights.vq_weight == 0.5
    assert pcdet_set == ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -40, -3, 70.4, 40, 1]"]
    assert len(schema.stage_plan(exp)) == 3 * 5  # the plan follows the one value
    cfg = experiment.build_model_cfg(exp, pcdet_set)
    rq = cfg.MODEL.RQ_BOTTLENECK
    assert rq.NUM_CODEBOOKS == 3 and rq.DECAY == 0.95 and rq.LOSS_WEIGHTS.VQ == 0.5 and rq.LOSS_WEIGHTS.DET == 0.8


def test_rq_alias_and_experiment_key_disagreeing_on_the_command_line_name_both(tmp_path):
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    with pytest.raises(schema.ConfigError, match=r"--set model.n_codebook=4 conflicts with "
                                                 r"--set MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS=3"):
        experiment.load_experiment(_exp_file(tmp_path), ["model.n_codebook", "4",
                                                         "MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS", "3"])
    exp, _, _ = experiment.load_experiment(_exp_file(tmp_path), ["model.n_codebook", "3",
                                                                 "MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS", "3"])
    assert exp.model.n_codebook == 3


def test_derived_codebook_size_refused_when_it_disagrees(tmp_path):
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    _needs_openpcdet_cfgs()
    exp, pcdet_set, _ = experiment.load_experiment(_exp_file(tmp_path), ["MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE", "128"])
    with pytest.raises(schema.ConfigError, match=r"CODEBOOK_SIZE 128 conflicts with 256 entries from the largest "
                                                 r"size of progressive_learning.embedding_schedule"):
        experiment.build_model_cfg(exp, pcdet_set)
    exp, pcdet_set, _ = experiment.load_experiment(_exp_file(tmp_path), ["MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE", "256"])
    assert experiment.build_model_cfg(exp, pcdet_set).MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE == 256
    with pytest.raises(schema.ConfigError, match="progressive_learning.enabled is false"):
        experiment.load_experiment(_exp_file(tmp_path, progressive_learning={"enabled": False}),
                                   ["MODEL.RQ_BOTTLENECK.EMBEDDING_SCHEDULE", "[16, 64]"])


@pytest.mark.parametrize("sections,match", [
    ({"rq_model": {"code_shape": [496, 432, 2]}}, r"rq_model.code_shape: \[496, 432, 2\].*is \[496, 432, 1\]"),
    ({"model": {"pre_trained_model": "second"}}, r"model.pre_trained_model: expected one of \['pointpillar', 'pointpillars'\], got 'second'"),
])
def test_formerly_unread_schema_keys_are_checked(tmp_path, sections, match):
    with pytest.raises(schema.ConfigError, match=match):
        schema.validate(raw(tmp_path, **sections))


def test_evaluation_enabled_is_noted_as_accepted(tmp_path):
    r = raw(tmp_path, evaluation={"enabled": True})
    assert any("evaluation.enabled accepted" in n for n in schema.notes(r, schema.validate(r)))


def test_selection_holdout_is_deterministic_disjoint_and_leaves_training_frames():
    from types import SimpleNamespace
    from pcdet_ext.openpcdet.datasets import holdout
    held = holdout.holdout_indices(40, 0.1, seed=3)
    assert held == holdout.holdout_indices(40, 0.1, seed=3) and len(held) == 4 and len(set(held)) == 4
    assert held != holdout.holdout_indices(40, 0.1, seed=4)
    assert holdout.holdout_indices(4, 0.1, 0) and len(holdout.holdout_indices(2, 0.9, 0)) == 1  # >= 1, leaves >= 1
    with pytest.raises(schema.ConfigError, match="at least 2 training frames"):
        holdout.holdout_indices(1, 0.5, 0)
    data = SimpleNamespace(custom_infos=list(range(10)))
    holdout.keep(data, [1, 3])
    assert data.custom_infos == [1, 3]
    with pytest.raises(schema.ConfigError, match="dataset.selection: val"):
        holdout.infos_attr(SimpleNamespace(frames=[]))
    sampler = torch.utils.data.distributed.DistributedSampler(list(range(10)), num_replicas=2, rank=0)
    holdout.resize_sampler(sampler, [0, 1, 2])
    assert len(list(iter(sampler))) == 2 and sampler.total_size == 4


def test_sweep_table_names_its_unit_metric_and_frames():
    from pcdet_ext.deploy.sweep import format_table
    cell = {"num_codebooks": 2, "num_embeddings": 64, "rate_lambda": 0.0, "mAP": 9.87, "kb_per_frame_measured": 1.234,
            "kb_per_frame_fixed": 2.5, "kb_per_frame_entropy": 1.5}
    summary = {"cells": [cell], "uncompressed_mAP": 10.5, "uncompressed_kb_per_frame": 6400.0,
               "reported_on": "val split, 16 frames", "selected_on": "a held-out 10 % of the train split"}
    lines = format_table(summary).splitlines()
    assert lines[0].split()[3:5] == ["mAP", "%"] and "1.23" in lines[2].split() and "9.87" in lines[2].split()
    assert "mAP %: mean over classes of the 3D AP (KITTI metric, R40, moderate difficulty" in format_table(summary)
    assert "on the val split, 16 frames" in format_table(summary)
    assert "measured needs bitstream models" not in format_table(summary)
    unmeasured = dict(summary, cells=[dict(cell, kb_per_frame_measured=None)])
    assert "-" in format_table(unmeasured).splitlines()[2].split() and "measured needs bitstream models" in \
        format_table(unmeasured)


def test_amp_of_a_progressive_run_reaches_the_runner_and_the_resume_state(tmp_path):
    """training.use_amp (``--use_amp``): the trainer's runner trains under autocast with a GradScaler
    whose state is part of every resume state; AMP may change between runs of one experiment."""
    import logging

    from pcdet_ext.engine.recipes.progressive_rq.trainer import ProgressiveTrainer
    from pcdet_ext.engine.startup.distributed import DistInfo
    from pcdet_ext.algorithms.quantization import ResidualQuantizer

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = ResidualQuantizer(dim=4, num_codebooks=2, codebook_size=16, schedule=[16])

    cfgs = {amp: schema.validate(raw(tmp_path, training={"use_amp": amp})) for amp in (False, True)}
    assert cfgs[False].training.use_amp is False and cfgs[True].training.use_amp is True
    assert ck.run_config(cfgs[False]) == ck.run_config(cfgs[True])  # a resumed run may switch AMP
    trainers = {amp: ProgressiveTrainer(cfg, Model(), ((None, None, None), (None, None)), EasyDict(CLASS_NAMES=["Car"]),
                                        ck.RunDir(tmp_path / f"run{amp}"), logging.getLogger("t"), DistInfo(),
                                        use_wandb=False)
                for amp, cfg in cfgs.items()}
    assert trainers[False].scaler is None and "scaler_state" not in trainers[False]._state(None, 0, 0, 0.0, 0)
    state = trainers[True]._state(None, 0, 0, 0.0, 0)
    assert state["scaler_state"]["scale"] == 2.0 ** 16
