"""The runner's hooks the recipes share: LR schedule, scalar logging (tensorboardX, optional wandb),
callbacks (EMA teacher), periodic work (validation) and OpenPCDet-format epoch checkpoints."""
from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from pcdet_ext.engine.optimization import group_lrs, scheduler_step
from pcdet_ext.engine.loop.runner import Hook, Runner, Step


class ScalarWriter:
    """tensorboardX on the main process, and wandb when asked for and installed (``None`` config: off)."""

    def __init__(self, log_dir: Path, main: bool = True, wandb_cfg: Optional[Dict[str, Any]] = None,
                 log: Optional[logging.Logger] = None):
        self.tb, self.wandb = None, None
        if not main:
            return
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(log_dir=str(log_dir))
        if wandb_cfg is not None:
            try:
                import wandb
            except ImportError:
                if log is not None:
                    log.warning("wandb logging is on but wandb is not installed; logging to tensorboard only")
                return
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(mode=mode, resume="allow", **wandb_cfg)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is None:
            return
        for key, val in values.items():
            self.tb.add_scalar(key, float(val), step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class ScheduleHook(Hook):
    """Before every step, the schedule (torch or OpenPCDet's fastai ones) is set to that step; during
    the first ``warmup_epochs`` epochs ``warmup`` is used instead (OpenPCDet's WARMUP_EPOCH)."""

    def __init__(self, scheduler, warmup=None, warmup_epochs: int = 0):
        self.scheduler, self.warmup, self.warmup_epochs = scheduler, warmup, warmup_epochs

    def before_step(self, runner: Runner) -> None:
        current = self.warmup if self.warmup is not None and runner.epoch < self.warmup_epochs else self.scheduler
        if current is not None:
            scheduler_step(current, runner.iteration, runner.epoch)


class ScalarLogHook(Hook):
    """Every ``every`` iterations: ``train/loss``, every ``tb_dict`` term, each parameter group's LR,
    the gradient norm, iteration and data time. Before each step it tells every module of the model
    with a ``compute_metrics`` attribute whether this step is logged, so training-time metrics (and
    their device-to-host copies) are computed only then."""

    def __init__(self, writer: ScalarWriter, every: int = 1):
        self.writer, self.every = writer, max(int(every), 1)
        self._metric_modules = None

    def before_step(self, runner: Runner) -> None:
        if self._metric_modules is None:
            self._metric_modules = [m for m in runner.model.modules() if hasattr(m, "compute_metrics")]
        due = (runner.iteration + 1) % self.every == 0
        for m in self._metric_modules:
            m.compute_metrics = due

    def after_step(self, runner: Runner, step: Step) -> None:
        if step.index % self.every:
            return
        values = {"train/loss": step.loss}
        values.update({f"train/{k}": v for k, v in step.tb_dict.items()
                       if isinstance(v, numbers.Number) or (torch.is_tensor(v) and v.numel() == 1)})
        if runner.optimizer is not None:
            values.update({f"meta_data/learning_rate/{k}": v for k, v in group_lrs(runner.optimizer).items()})
        if step.grad_norm is not None:
            values["meta_data/grad_norm"] = step.grad_norm
        values.update({"meta_data/iter_time": step.iter_time, "meta_data/data_time": step.data_time})
        self.writer.scalars(values, step.index)


class CallbackHook(Hook):
    """``after()`` after every training step (e.g. the EMA teacher update)."""

    def __init__(self, after: Callable[[], None]):
        self.after = after

    def after_step(self, runner: Runner, step: Step) -> None:
        if step.trained:
            self.after()


class EveryEpochs(Hook):
    """``fn(runner, epochs_done)`` after every ``every`` epochs (0: never), e.g. validation."""

    def __init__(self, every: int, fn: Callable[[Runner, int], None]):
        self.every, self.fn = every, fn

    def after_epoch(self, runner: Runner, epoch: int, mean_loss: float) -> None:
        if self.every > 0 and (epoch + 1) % self.every == 0:
            self.fn(runner, epoch + 1)
