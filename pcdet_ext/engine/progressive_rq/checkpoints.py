"""Checkpoint names and the run folder of a progressive RQ run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

from pcdet_ext.engine.checkpointing import ResumeError, check_same_run
from pcdet_ext.utils.checkpoint import atomic_save, load_checkpoint


def epoch_name(codebook: int, stage: int, epoch: int) -> str:
    return f"codebook_{codebook}_stage_{stage}_epoch_{epoch}.pth"


def best_name(codebook: int, stage: int) -> str:
    return f"codebook_{codebook}_stage_{stage}_best.pth"


def final_name(codebook: int, stage: int) -> str:
    return f"codebook_{codebook}_stage_{stage}_final.pth"


GLOBAL_BEST = "global_best.pth"
RESUME = "resume_state.pth"


def run_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of an experiment config that defines a training run (not evaluation, logging,
    hardware, workers or mode): a resumed run must have the same."""
    relevant = {k: v for k, v in cfg.items() if k not in ("evaluation", "logging", "hardware")}
    relevant["training"] = {k: v for k, v in dict(cfg["training"]).items() if k not in ("num_workers", "mode")}
    return json.loads(json.dumps(relevant, sort_keys=True, default=str))


def fingerprint(cfg: Dict[str, Any]) -> str:
    """A short hash of :func:`run_config` (written into the resume state, for people reading it)."""
    return hashlib.sha1(json.dumps(run_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    """``<root>/checkpoints/*.pth``, ``<root>/resume_state.pth``, ``<root>/tensorboard``, ``<root>/eval``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.eval = self.root / "eval"

    def ckpt(self, name: str) -> Path:
        return self.checkpoints / name

    def save(self, name: str, state: Dict[str, Any]) -> Path:
        return atomic_save(state, self.ckpt(name))

    def latest_stage_best(self, plan) -> Optional[Path]:
        """The best checkpoint of the last stage that has one: the run's final model, holding every
        codebook trained so far (``global_best`` may come from an early, shallower stage)."""
        for st in reversed(plan):
            path = self.ckpt(best_name(st.codebook, st.stage))
            if path.is_file():
                return path
        return None

    def resume_state(self) -> Optional[Dict[str, Any]]:
        path = self.root / RESUME
        return load_checkpoint(path) if path.is_file() else None

    def save_resume(self, state: Dict[str, Any]) -> Path:
        return atomic_save(state, self.root / RESUME)

    def check_reusable(self, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The resume state when this folder holds the run of experiment config ``cfg``; a ResumeError
        (the engine's one resume rule, differing keys listed) when it holds another config's run, a
        FileExistsError when it holds checkpoints without a resume state; None when it is fresh."""
        state = self.resume_state()
        if state is not None:
            hint = " (use another --extra_tag or logging.saved_path instead of overwriting it)"
            if state.get("config") is None:
                raise ResumeError(f"{self.root / RESUME} has no config record, so it cannot be continued{hint}")
            check_same_run(run_config(state["config"]), run_config(cfg), str(self.root / RESUME), hint)
            return state
        existing = sorted(self.checkpoints.glob("*.pth")) if self.checkpoints.is_dir() else []
        if existing:
            raise FileExistsError(f"{self.checkpoints} already holds checkpoints ({existing[0].name}, ...) without a "
                                  "resume state; use another --extra_tag or logging.saved_path")
        return None
