"""The README's command blocks run in sequence as written: every file or folder a command reads (a config's
DATA_PATH, an experiment's dataset.dir and pretrained_weight, --pretrained_model, --ckpt, --rq_ckpt,
--data_path) is one that an earlier command writes, by the one path rule (pcdet_ext.paths)."""
import re
import shlex
from pathlib import Path

import yaml

from pcdet_ext.engine.startup.args import load_config, output_dir
from pcdet_ext.engine.recipes.progressive_rq import schema
from tier2 import REPO, has_voxelnext

TRAINERS = ("train.py", "train_rmae_cmae_phase1.py", "train_rmae_cmae_phase2.py", "scripts/dist_train.sh")


def readme_commands(text: str):
    """``(tool, {flag: [values]})`` for every ``python tools/...`` / ``bash tools/...`` line of the bash blocks."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) < 2 or words[0] not in ("python", "bash") or not words[1].startswith("tools/"):
                continue
            words = [w for w in words if w != "&"]
            tool, flags, key = words[1][len("tools/"):], {"": []}, ""
            for w in words[2:]:
                if w.startswith("--"):
                    key = w
                    flags.setdefault(key, [])
                else:
                    flags[key].append(w)
            yield tool, flags


def _one(flags, name, default=None):
    return flags[name][0] if flags.get(name) else default


def readme() -> str:
    """The README; where OpenPCDet has no VoxelNeXt (v0.6.0), with the SECOND variants of its R-MAE configs
    (what the README tells those users to run: same paths otherwise)."""
    text = (REPO / "README.md").read_text()
    return text if has_voxelnext() else text.replace("rmae_cmae_isarc_4class_", "rmae_cmae_second_isarc_4class_")


def walk(text: str, monkeypatch):
    """Simulate the README's commands; returns the list of problems (an input nothing wrote)."""
    monkeypatch.delenv("PCDET_EXT_OUTPUT_ROOT", raising=False)
    monkeypatch.chdir(REPO)  # the README runs from the repository root
    written, datasets, problems, ran = set(), set(), [], []

    def need(path, what, tool):
        if Path(path).resolve() not in written:
            problems.append(f"{tool}: {what} {path} is written by no earlier command")

    for tool, flags in readme_commands(text):
        ran.append(tool)
        if tool == "make_synthetic_data.py":
            written.add(Path(_one(flags, "--out")).resolve())
        elif tool == "create_data.py" and flags[""][0] != "unlabelled":
            need(_one(flags, "--data_path"), "--data_path", tool)
            datasets.add(Path(_one(flags, "--out_dir", _one(flags, "--data_path"))).resolve())
        elif tool in TRAINERS or tool == "test.py":
            cfg = load_config(_one(flags, "--cfg_file"), flags.get("--set"))
            if Path(cfg.DATA_CONFIG.DATA_PATH) not in datasets:
                problems.append(f"{tool}: DATA_PATH {cfg.DATA_CONFIG.DATA_PATH} has no infos from an earlier command")
            out = output_dir(cfg, _one(flags, "--extra_tag", "default"))
            if tool == "test.py":
                need(out / "ckpt", "checkpoints", tool)
                continue
            if flags.get("--pretrained_model"):
                need(_one(flags, "--pretrained_model"), "--pretrained_model", tool)
            epochs = int(_one(flags, "--epochs", cfg.OPTIMIZATION.NUM_EPOCHS))
            written.update({out / "ckpt", out / "ckpt" / f"checkpoint_epoch_{epochs}.pth"})
        elif tool == "train_eval_rq.py":
            exp = schema.validate(yaml.safe_load(Path(_one(flags, "--config")).read_text()), check_paths=False)
            if Path(exp.dataset.dir) not in datasets:
                problems.append(f"{tool}: dataset.dir {exp.dataset.dir} has no infos from an earlier command")
            if flags.get("--rq_ckpt") or "--mode" in flags:
                need(_one(flags, "--rq_ckpt", Path(exp.logging.saved_path) / "checkpoints"), "--rq_ckpt", tool)
            else:
                need(exp.model.pretrained_weight, "model.pretrained_weight", tool)
                written.update({Path(exp.logging.saved_path) / "checkpoints",
                                Path(exp.logging.saved_path) / "checkpoints" / "global_best.pth"})
        elif tool in ("split_infer.py", "split_server.py"):
            ckpt = Path(_one(flags, "--ckpt")).resolve()
            need(ckpt, "--ckpt", tool)
            if flags.get("--data_path") and Path(_one(flags, "--data_path")).resolve() not in datasets:
                problems.append(f"{tool}: --data_path {_one(flags, '--data_path')} has no infos")
            if "--fit_models" in flags:
                written.add(ckpt.with_name(ckpt.stem + "_bitstream.pth"))
    return problems, ran


def test_readme_blocks_run_in_sequence(monkeypatch):
    problems, ran = walk(readme(), monkeypatch)
    assert {"make_synthetic_data.py", "create_data.py", "train.py", "train_eval_rq.py", "split_infer.py",
            "split_server.py", "train_rmae_cmae_phase1.py", "train_rmae_cmae_phase2.py", "scripts/dist_train.sh",
            "test.py"} <= set(ran), ran
    assert not problems, "\n".join(problems)


def test_the_walk_finds_a_folder_no_command_wrote(monkeypatch):
    """What the issue measured: the dataset block wrote data/synthetic_isarc, the configs read data/isarc."""
    text = readme().replace("--out data/isarc", "--out data/synthetic_isarc") \
        .replace("--data_path data/isarc", "--data_path data/synthetic_isarc")
    problems, _ = walk(text, monkeypatch)
    assert any(f"DATA_PATH {REPO / 'data' / 'isarc'} has no infos" in p for p in problems), problems
