"""OpenPCDet-format training checkpoints: atomic saves, pruning, resume with a config check."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from pcdet_ext import __version__
from pcdet_ext.utils.checkpoint import atomic_save, load_checkpoint, plain

# OPTIMIZATION keys a resumed run may change (schedule length, batch size)
RESUME_FREE = ("NUM_EPOCHS", "BATCH_SIZE_PER_GPU", "USE_AMP", "LOSS_SCALE_FP16")  # a run may change these


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (another config, another optimizer grouping)."""


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def run_config(cfg) -> Dict[str, Any]:
    """The parts of a config that define a run (model, classes, optimizer): stored in checkpoints."""
    optim = {k: v for k, v in dict(cfg.OPTIMIZATION).items() if k not in RESUME_FREE}
    return plain({"CLASS_NAMES": list(cfg.CLASS_NAMES), "MODEL": cfg.MODEL, "OPTIMIZATION": optim})


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``KEY: checkpoint X, config Y`` for every differing leaf key."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: checkpoint {a.get(k, '<absent>')!r}, config {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_same_run(saved: Dict[str, Any], current: Dict[str, Any], where: str, hint: str = "") -> None:
    """The one resume rule, for OpenPCDet-style epoch checkpoints and progressive RQ run folders alike:
    a checkpoint continues a run only under the config that defines it; otherwise a ResumeError
    listing every differing key."""
    diff = config_diff(saved, current)
    if diff:
        raise ResumeError(f"{where} was written by a different config{hint}; differing keys:\n  " + "\n  ".join(diff))


def checkpoint_state(model: nn.Module, optimizer, epoch: int, it: int, cfg, scaler=None) -> Dict[str, Any]:
    """OpenPCDet's checkpoint layout, plus ``scaler_state`` (the AMP GradScaler) when training with AMP."""
    import pcdet
    model_state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    state = {"epoch": epoch, "it": it, "model_state": model_state,
             "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
             "version": f"pcdet+{pcdet.__version__}",
             "pcdet_ext": {"version": __version__, "config": run_config(cfg)}}
    if scaler is not None:
        state["scaler_state"] = scaler.state_dict()
    return state


def epoch_of(path: Path) -> int:
    m = re.fullmatch(r"checkpoint_epoch_(\d+)\.pth", path.name)
    return int(m.group(1)) if m else -1


def epoch_checkpoints(ckpt_dir: Path) -> List[Path]:
    """``checkpoint_epoch_<n>.pth`` files of ``ckpt_dir``, oldest epoch first."""
    return sorted((p for p in Path(ckpt_dir).glob("checkpoint_epoch_*.pth") if epoch_of(p) >= 0), key=epoch_of)


def save_epoch(state: Dict[str, Any], ckpt_dir: Path, epoch: int, max_keep: int) -> Path:
    """``ckpt_dir/checkpoint_epoch_<epoch>.pth`` written atomically; the oldest beyond ``max_keep`` removed."""
    path = atomic_save(state, Path(ckpt_dir) / f"checkpoint_epoch_{epoch}.pth")
    kept = epoch_checkpoints(ckpt_dir)
    for old in kept[:max(len(kept) - max_keep, 0)]:
        old.unlink()
    return path


def latest(ckpt_dir: Path) -> Optional[Path]:
    found = epoch_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resume(path: Path, model: nn.Module, optimizer, cfg, logger: Optional[logging.Logger] = None,
           scaler=None) -> Tuple[int, int]:
    """Load model, optimizer and (with AMP) the GradScaler from ``path``; returns ``(next_epoch,
    iteration)``. A checkpoint from a different config (model, classes, optimizer) is refused with the
    differing keys; one written without AMP leaves ``scaler`` at its initial scale."""
    from pcdet_ext.engine.optimization.builder import inner_optimizer, load_optimizer_state
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model_state" not in state:
        raise ResumeError(f"--ckpt {path}: not an OpenPCDet training checkpoint (no model_state)")
    saved = (state.get("pcdet_ext") or {}).get("config")
    if saved is not None:
        check_same_run(saved, run_config(cfg), f"--ckpt {path}")
    elif logger:
        logger.warning("%s has no pcdet_ext config record (written by another tool); cannot check it matches", path)
    missing, unexpected = unwrap(model).load_state_dict(state["model_state"], strict=False)
    if missing or unexpected:
        raise ResumeError(f"--ckpt {path}: model_state does not match this model "
                          f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)")
    if state.get("optimizer_state") is not None and optimizer is not None:
        try:
            load_optimizer_state(inner_optimizer(optimizer), state["optimizer_state"])
        except ValueError as exc:
            raise ResumeError(f"--ckpt {path}: {exc}") from exc
    if scaler is not None and state.get("scaler_state"):
        scaler.load_state_dict(state["scaler_state"])
    if logger:
        logger.info("resumed from %s (epoch %d, iteration %d)", path, state["epoch"], state.get("it", 0))
    return int(state["epoch"]), int(state.get("it", 0))
