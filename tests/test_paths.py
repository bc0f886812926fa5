"""One path rule (pcdet_ext.paths): a relative path in any YAML file is relative to <root>/tools, one on
the command line to the working directory; config files are found from anywhere."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcdet_ext import paths
from pcdet_ext.engine.startup.args import load_config
from pcdet_ext.engine.recipes.progressive_rq import experiment

REPO = Path(__file__).resolve().parent.parent


def _experiment(folder: Path, **extra) -> Path:
    """An experiment YAML in ``folder`` written with relative paths, as users write them."""
    raw = {"dataset": {"dir": "../data/isarc"}, "model": {"pretrained_weight": "../output/pp/ckpt.pth",
                                                           "cfg_file": "cfgs/custom_models/pointpillar_rq_isarc_4class.yaml"},
           "logging": {"saved_path": "../runs/exp"}}
    raw.update(extra)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A project root holding data/isarc and a trained checkpoint; the shell sits elsewhere."""
    top = tmp_path / "project"
    (top / "tools").mkdir(parents=True)
    (top / "data" / "isarc").mkdir(parents=True)
    (top / "output" / "pp" / "ckpt").mkdir(parents=True)
    (top / "output" / "pp" / "ckpt.pth").write_bytes(b"x")
    monkeypatch.setenv(paths.ROOT_VAR, str(top))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return top


def test_project_root_is_the_variable_then_the_checkout_then_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ROOT_VAR, str(tmp_path))
    assert paths.project_root() == tmp_path.resolve() and paths.yaml_base() == tmp_path.resolve() / "tools"
    monkeypatch.delenv(paths.ROOT_VAR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "REPO_ROOT", REPO)
    assert paths.project_root() == REPO  # an editable install: this checkout
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site-packages")  # a wheel: no checkout around it
    assert paths.project_root() == tmp_path.resolve()
    assert not paths.is_checkout(tmp_path) and paths.is_checkout(REPO)


def test_a_checkout_script_names_its_checkout_unless_the_variable_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ROOT_VAR, raising=False)
    paths.use_checkout(tmp_path / "tools" / "train.py")
    assert os.environ[paths.ROOT_VAR] == str(tmp_path.resolve())
    paths.use_checkout(REPO / "tools" / "train.py")  # the first (or the user's own) setting stands
    assert os.environ[paths.ROOT_VAR] == str(tmp_path.resolve())


def test_the_same_string_means_the_same_folder_in_a_dataset_and_an_experiment_yaml(root, tmp_path):
    exp, _, _ = experiment.load_experiment(_experiment(tmp_path))
    cfg = load_config("cfgs/custom_models/pointpillar_isarc_4class.yaml", None)  # DATA_PATH: '../data/isarc'
    assert exp.dataset.dir == cfg.DATA_CONFIG.DATA_PATH == str(root / "data" / "isarc")
    # the pretrained_weight default of a run that tools/train.py wrote under <root>/output
    assert exp.model.pretrained_weight == str(root / "output" / "pp" / "ckpt.pth")
    assert exp.logging.saved_path == str(root / "runs" / "exp")


def test_command_line_paths_are_relative_to_the_working_directory(root, tmp_path):
    (Path.cwd() / "mydata").mkdir()
    exp, _, _ = experiment.load_experiment(_experiment(tmp_path), ["dataset.dir", "mydata"],
                                           {("evaluation", "rq_ckpt"): "ck.pth"})
    assert exp.dataset.dir == str(Path.cwd() / "mydata") and exp.evaluation.rq_ckpt == str(Path.cwd() / "ck.pth")
    cfg = load_config("cfgs/custom_models/pointpillar_isarc_4class.yaml", ["DATA_CONFIG.DATA_PATH", "mydata"])
    assert cfg.DATA_CONFIG.DATA_PATH == str(Path.cwd() / "mydata")


def test_a_missing_folder_is_named_as_resolved(root, tmp_path):
    with pytest.raises(experiment.ConfigError, match=f"dataset.dir: {root / 'data' / 'kitti'} is not a directory"):
        experiment.load_experiment(_experiment(tmp_path, dataset={"dir": "../data/kitti"}))


def test_config_flag_is_found_like_cfg_file_from_any_directory(root):
    exp, _, _ = experiment.load_experiment(Path("cfgs/exp/split1_ALL_isarc_4class.yaml"),
                                           ["model.pretrained_weight", str(root / "output" / "pp" / "ckpt.pth")])
    assert exp.dataset.dir == str(root / "data" / "isarc")
    with pytest.raises(FileNotFoundError, match=r"--config 'cfgs/exp/nope.yaml' not found; tried: "):
        experiment.load_experiment(Path("cfgs/exp/nope.yaml"))


def test_tools_run_from_another_directory_resolve_by_the_checkout(tmp_path):
    """tools/train_eval_rq.py from elsewhere: --config from the checkout, dataset.dir against <checkout>/tools."""
    env = {k: v for k, v in os.environ.items() if k != paths.ROOT_VAR}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_eval_rq.py"), "--config",
                           "cfgs/exp/split1_ALL.yaml", "--set", "dataset.dir", "../data/kitti_nowhere"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"dataset.dir: {tmp_path.parent.resolve() / 'data' / 'kitti_nowhere'} is not a directory" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_eval_rq.py"), "--config",
                           "cfgs/exp/split1_ALL.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"dataset.dir: {REPO / 'data' / 'kitti'} is not a directory" in proc.stderr   # or, where it is,
            or f"model.pretrained_weight: {REPO / 'output' / 'kitti_models'}" in proc.stderr), proc.stderr[-2000:]
