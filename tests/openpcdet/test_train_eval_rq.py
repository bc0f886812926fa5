"""tools/train_eval_rq.py end to end through OpenPCDet on CPU: progressive run, eval, sweep, resume."""
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.utils.checkpoint import atomic_save, load_checkpoint
from tier2 import REPO, main_in_process, seed_everything

TOOL = str(REPO / "tools/train_eval_rq.py")
SMALL = ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]"]


@pytest.fixture(scope="module")
def pointpillars_ckpt(synthetic_kitti, tmp_path_factory):
    seed_everything(2)
    cfg = cfg_from_yaml_file(REPO / "cfgs/kitti_models/pointpillar_rq.yaml")
    cfg_from_list(SMALL, cfg)
    cfg.MODEL.NAME = "PointPillar"
    (train_set, _, _), _ = builders.build_loaders(cfg, synthetic_kitti)
    path = tmp_path_factory.mktemp("pp") / "pointpillar.pth"
    atomic_save({"model_state": builders.build_model(cfg, train_set).state_dict()}, path)
    return path


def write_config(tmp_path, data, weight, epochs=2, **training):
    cfg = {"dataset": {"name": "KITTI", "dir": str(data), "num_classes": 3},
           "model": {"n_codebook": 2, "pretrained_weight": str(weight), "cfg_file": "cfgs/kitti_models/pointpillar_rq.yaml"},
           "progressive_learning": {"embedding_schedule": [16, 64], "embedding_stage_epochs": epochs, "warmup_epochs": 1},
           "training": {"batch_size": 2, "num_workers": 0, "max_epoch": 4 * epochs, "ckpt_freq_epoch": 1, **training},
           "logging": {"use_wandb": True, "saved_path": str(tmp_path / "runs"), "log_freq": 1}}
    path = tmp_path / "split1_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_tool(*args, timeout=600, ranks=1):
    """The tool in a subprocess; ``ranks`` > 1: under torchrun with that many gloo processes."""
    env = dict(os.environ, WANDB_MODE="disabled")
    launch = [sys.executable, TOOL]
    if ranks > 1:  # one thread per rank, as dist_train.sh's torchrun sets it
        env["OMP_NUM_THREADS"] = "1"
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                  "29673", TOOL, "--launcher", "pytorch"]
    return subprocess.run([*launch, *args], capture_output=True, text=True, cwd=str(REPO), env=env, timeout=timeout)


def refused(capsys, *args) -> str:
    """stderr of a refused start of train_eval_rq (its main() in this process)."""
    code, err = main_in_process(capsys, "train_eval_rq", *args)
    assert code == 2, err[-20:]
    return "\n".join(err)


def test_progressive_run_then_eval_and_sweep(tmp_path, synthetic_kitti, pointpillars_ckpt, capsys, monkeypatch):
    """Under torchrun with 2 gloo processes, as docs/progressive_rq.md runs it (one process: the other tests):
    both ranks train every stage, rank 0 alone writes, selects and sweeps, every process exits 0."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = write_config(tmp_path, synthetic_kitti, pointpillars_ckpt, epochs=2)
    proc = run_tool("--config", str(config), "--extra_tag", "t1", "--eval_sweep", "--set", *SMALL, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "t1"
    assert len(list(run.glob("log_train_*.txt"))) == 1  # rank 0 alone writes the log
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    for c in (1, 2):
        for s in (1, 2):
            assert {ck.best_name(c, s), ck.final_name(c, s), ck.epoch_name(c, s, 1), ck.epoch_name(c, s, 2)} <= set(names)
    assert ck.GLOBAL_BEST in names and not [n for n in names if n.endswith(".tmp")]
    state = load_checkpoint(run / "checkpoints" / ck.GLOBAL_BEST)
    assert {"model_state", "optimizer_state", "stage_state", "config", "epoch", "it"} <= set(state)
    assert any(k.startswith("rq_bottleneck.quantizer.codebooks") for k in state["model_state"])
    assert "codebook 2 stage 2:  64 entries, 1 EMA warm-up + 1 gradient epochs" in proc.stderr + proc.stdout
    assert "+ vq_weight 0.25 x VQ loss (mean squared distance of each residual to its chosen entry" in proc.stderr
    assert "codebook_weight 0.1: no effect" in proc.stderr
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    sweep = json.loads((run / "eval" / "sweep.json").read_text())
    cells = [(c["num_codebooks"], c["num_embeddings"]) for c in sweep["cells"]]
    assert cells == [(1, 16), (1, 64), (2, 16), (2, 64)]
    assert all(c["kb_per_frame_fixed"] > c["kb_per_frame_entropy"] > 0 for c in sweep["cells"])
    assert (run / "eval" / "sweep.png").stat().st_size > 10000 and (run / "eval" / "sweep.csv").is_file()
    assert sweep["checkpoint"].endswith(ck.best_name(2, 2)) and "every cell from one model" in proc.stdout
    # selection (stage bests, early stopping) on held-out train frames; the sweep reports on val, which selected nothing
    assert "selection: 1 train frames held out (dataset.selection_fraction 0.1, seed 0)" in proc.stderr
    assert sweep["reported_on"] == "val split, 2 frames" and "never trained on" in sweep["selected_on"]
    assert "reported on: val split, 2 frames; the checkpoint was selected on: a held-out 10 % of the train" in proc.stdout
    ev = run_tool("--config", str(config), "--mode", "eval", "--eval_num_codebooks", "2", "--eval_num_embeddings", "16",
                  "--rq_ckpt", str(run / "checkpoints" / ck.GLOBAL_BEST), "--set", *SMALL)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "operating point: 2 codebook(s) x 16 entries" in ev.stdout and "Car AP@0.70" in ev.stdout
    assert "--eval_num_codebooks 3: this checkpoint has 2 trained codebook(s); expected 1..2" in refused(
        capsys, "--config", config, "--mode", "eval", "--eval_num_codebooks", "3",
        "--rq_ckpt", run / "checkpoints" / ck.GLOBAL_BEST, "--set", *SMALL)
    assert "evaluation.use_num_codebook 3: this checkpoint has 2" in refused(
        capsys, "--config", config, "--mode", "eval", "--rq_ckpt", run / "checkpoints" / ck.GLOBAL_BEST,
        "--set", "evaluation.use_num_codebook", "3", *SMALL)  # a value the user gave in the experiment
    assert "trained with [64] entries; expected 1..64" in refused(
        capsys, "--config", config, "--mode", "eval", "--eval_num_codebooks", "1", "--eval_num_embeddings", "256",
        "--rq_ckpt", run / "checkpoints" / ck.best_name(2, 2), "--set", *SMALL)
    other_cells = refused(capsys, "--config", config, "--mode", "eval", "--eval_sweep", "--rq_ckpt",
                          run / "checkpoints" / ck.GLOBAL_BEST, "--set", "model.n_codebook", "3",
                          "training.max_epoch", "12", *SMALL)  # 3 codebooks x 2 sizes x 2 epochs: a valid experiment
    assert other_cells.strip().splitlines()[-1].startswith(
        f"error: --rq_ckpt {run / 'checkpoints' / ck.GLOBAL_BEST} holds 2 codebook(s) x 64 entries (its run had "
        f"model.n_codebook 2), but the experiment {config} builds 3 x 64"), other_cells[-2000:]
    again = run_tool("--config", str(config), "--extra_tag", "t1", "--set", *SMALL)
    assert again.returncode == 0 and "this run is complete" in again.stderr + again.stdout
    assert "different config" in refused(capsys, "--config", config, "--extra_tag", "t1", "--set", "training.init_lr",
                                         "0.01", *SMALL)


def test_legacy_mode_trains_all_codebooks_together(tmp_path, synthetic_kitti, pointpillars_ckpt):
    config = write_config(tmp_path, synthetic_kitti, pointpillars_ckpt)
    cfg = yaml.safe_load(config.read_text())
    cfg["progressive_learning"] = {"enabled": False, "warmup_epochs": 1}
    cfg["rq_model"] = {"codebook_size": 32, "codebook_update_mode": "ema"}
    cfg["training"]["max_epoch"] = 2
    config.write_text(yaml.safe_dump(cfg))
    proc = run_tool("--config", str(config), "--extra_tag", "legacy", "--set", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "legacy: all codebooks together" in proc.stderr + proc.stdout
    ckpts = tmp_path / "runs" / "legacy" / "checkpoints"
    q = load_checkpoint(ckpts / ck.final_name(2, 1))["model_state"]
    assert q["rq_bottleneck.quantizer.trained_size"].tolist() == [32, 32]
    assert q["rq_bottleneck.quantizer.active_size"].tolist() == [32, 32]
    # EMA only: every codebook's entries move from epoch to epoch, not only the deepest one's
    first, second = (load_checkpoint(ckpts / ck.epoch_name(2, 1, e))["model_state"] for e in (1, 2))
    for c in (0, 1):
        key = f"rq_bottleneck.quantizer.codebooks.{c}"
        assert (first[key] - second[key]).abs().max() > 1e-4, c


def test_selection_frames_are_held_out_of_training_and_apart_from_val(tmp_path, synthetic_kitti, pointpillars_ckpt):
    import logging
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    config = write_config(tmp_path, synthetic_kitti, pointpillars_ckpt)
    exp, pcdet_set, _ = experiment.load_experiment(config, ["dataset.selection_fraction", "0.5", *SMALL])
    cfg = experiment.build_model_cfg(exp, pcdet_set)
    _, (train_set, loader, _), (val_set, _), (sel_set, sel_loader) = experiment.build(exp, cfg, False, logging.getLogger())
    ids = lambda ds: {info["point_cloud"]["lidar_idx"] for info in ds.kitti_infos}  # noqa: E731
    assert len(ids(sel_set)) == 2 and len(ids(train_set)) == 2 and not ids(sel_set) & ids(train_set)
    assert not ids(sel_set) & ids(val_set) and len(loader) == 1  # batch 2 over the 2 frames left
    batch = next(iter(sel_loader))
    assert set(batch["frame_id"]) == ids(sel_set)
    exp.dataset.selection = "val"
    _, (train_all, _, _), _, (sel_val, _) = experiment.build(exp, cfg, False, logging.getLogger())
    assert len(train_all) == 4 and sel_val is not None and ids(sel_val) == ids(val_set)


def test_every_interrupted_save_continues_from_the_furthest_state_that_loads(tmp_path, synthetic_kitti,
                                                                            pointpillars_ckpt):
    """A run SIGKILLed after a stage-best checkpoint but before the resume pointer, one SIGKILLed while
    writing the pointer, one stopped by a full disk, then a damaged checkpoint: each re-run of the same
    command continues from the furthest state that loads, and the last one completes the run (a damaged
    pointer: tests/test_split_schema.py)."""
    config = write_config(tmp_path, synthetic_kitti, pointpillars_ckpt, epochs=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["n_codebook"] = 1
    cfg["training"]["max_epoch"] = 4
    config.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(config), "--extra_tag", "faults", "--set", *SMALL]
    run = tmp_path / "runs" / "faults"
    env = dict(os.environ, WANDB_MODE="disabled")

    def faulty(kind, at=1):
        return subprocess.run([sys.executable, str(REPO / "tests/openpcdet/_rq_fault.py"), TOOL, *args], cwd=str(REPO),
                              env=dict(env, RQ_FAULT=kind, RQ_FAULT_AT=str(at)), capture_output=True, text=True,
                              timeout=600)

    killed = faulty("kill_before_resume")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / "checkpoints" / ck.best_name(1, 1)).is_file() and not (run / ck.RESUME).exists()
    torn = faulty("kill_writing_resume")  # continues from the checkpoints, dies writing the pointer
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-2000:]
    assert "resuming from " + str(run / "checkpoints" / "codebook_1_stage_1_") in torn.stderr
    assert list(run.glob(".resume_state.pth.*.tmp")) and not (run / ck.RESUME).exists()
    full = faulty("enospc_resume", at=2)  # the first stage's end is saved, the next epoch's pointer is not
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and lines[-1] == (
        f"error: No space left on device writing {run / ck.RESUME}; free space there and run the same command "
        "again to continue from the last saved state"), full.stderr[-2000:]
    assert "Traceback" not in full.stderr and "removed 1 temporary file(s) of interrupted saves" in full.stderr
    assert load_checkpoint(run / ck.RESUME)["stage_state"]["stage_index"] == 1  # stage 2's start: a valid pointer
    newest = max((run / "checkpoints").glob("*.pth"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])  # damaged; the epoch's other checkpoints got as far
    done = run_tool(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped: {newest}" in done.stderr
    assert "resuming from " + str(run / "checkpoints" / "codebook_1_stage_2_") in done.stderr  # not the older pointer
    assert load_checkpoint(run / ck.RESUME)["stage_state"]["done"]
    assert (run / "checkpoints" / ck.final_name(1, 2)).is_file() and not list(run.rglob("*.tmp"))
