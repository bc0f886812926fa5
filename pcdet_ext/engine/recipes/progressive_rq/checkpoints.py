"""Checkpoint names and the run folder of a progressive RQ run.

Every checkpoint of a run holds its whole state (weights, optimizer, stage state, config); the resume
pointer ``resume_state.pth`` is written last. Re-running the same command continues from the newest
state that loads (the pointer, or a newer checkpoint when a kill came between them, or an older one
when the newest is damaged); temporaries of interrupted saves are removed first."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pcdet_ext.engine.checkpointing import ResumeError, check_same_run
from pcdet_ext.utils.checkpoint import CheckpointError, atomic_save, load_checkpoint


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
    hardware, workers, mode or AMP, nor where the data and the pretrained weights are stored: a moved
    dataset folder continues the run): a resumed run must have the same."""
    relevant = {k: v for k, v in cfg.items() if k not in ("evaluation", "logging", "hardware")}
    relevant["training"] = {k: v for k, v in dict(cfg["training"]).items()
                            if k not in ("num_workers", "mode", "use_amp")}
    relevant["dataset"] = {k: v for k, v in dict(cfg["dataset"]).items() if k != "dir"}
    relevant["model"] = {k: v for k, v in dict(cfg["model"]).items() if k != "pretrained_weight"}
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

    def clean_temporaries(self) -> List[Path]:
        """Remove what a killed atomic save left (``.<name>.pth.<random>.tmp``); returns them."""
        stale = [p for d in (self.root, self.checkpoints) if d.is_dir() for p in d.glob(".*.pth.*.tmp")]
        for path in stale:
            path.unlink()
        return stale

    def resume_point(self, cfg: Dict[str, Any], log=None, clean: bool = True) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The furthest state of this folder's run that loads, ``(path, state)``: ``resume_state.pth``, or a
        checkpoint written after it that got further (a run killed between a checkpoint and the resume
        pointer), or, when the pointer is missing or unreadable, the furthest checkpoint that loads. None
        when the folder holds no run. Stale temporaries are removed first. A ResumeError (differing keys
        listed) when that state is another config's run; a FileExistsError when the folder holds
        checkpoints of which none loads. ``clean``: remove stale temporaries first (the run's own start)."""
        stale = self.clean_temporaries() if clean else []
        if stale and log is not None:
            log.warning("removed %d temporary file(s) of interrupted saves: %s", len(stale),
                        ", ".join(p.name for p in stale))
        pointer = self.root / RESUME
        found = load_or_none(pointer, log) if pointer.is_file() else None
        since = pointer.stat().st_mtime_ns if found is not None else -1
        files = sorted(self.checkpoints.glob("*.pth")) if self.checkpoints.is_dir() else []
        states = [(pointer, found)] if found is not None else []
        unreadable = 0 if found is not None or not pointer.is_file() else 1
        for path in files:
            if path.stat().st_mtime_ns > since:  # only what may have got further than the pointer
                state = load_or_none(path, log)
                unreadable += state is None
                if state is not None:
                    states.append((path, state))
        states = [(path, st) for path, st in states if isinstance(st, dict) and "stage_state" in st]
        if not states:
            if unreadable:
                raise FileExistsError(f"{self.root} holds {unreadable} checkpoint file(s), none of which loads; use "
                                      "another --extra_tag or logging.saved_path")
            return None
        path, state = max(states, key=lambda ps: (progress(ps[1]), ps[0] == pointer))
        hint = " (use another --extra_tag or logging.saved_path instead of overwriting it)"
        if state.get("config") is None:
            raise ResumeError(f"{path} has no config record, so it cannot be continued{hint}")
        check_same_run(run_config(state["config"]), run_config(cfg), str(path), hint)
        return path, state



def load_or_none(path: Path, log=None) -> Optional[Any]:
    """The checkpoint at ``path``, or None (a warning logged) when it does not load."""
    try:
        return load_checkpoint(path)
    except (CheckpointError, OSError, RuntimeError) as exc:
        if log is not None:
            log.warning("skipped: %s", str(exc).splitlines()[0])
        return None


def progress(state: Dict[str, Any]) -> Tuple[int, int, int, int]:
    """How far a run had got when ``state`` was saved: (done, stage, next epoch, step)."""
    ss = state["stage_state"]
    return int(bool(ss.get("done"))), int(ss["stage_index"]), int(ss["next_epoch"]), int(state.get("it", 0))
