"""The OpenPCDet-style recipe over the runner (fine-tuning, Phase 1 / 2 pretraining): epochs with
OpenPCDet's schedules, gradient clipping, AMP (``--use_amp`` / ``OPTIMIZATION.USE_AMP``), scalar
logging every ``--logger_iter_interval`` steps and ``checkpoint_epoch_<n>.pth`` cadence."""
from __future__ import annotations

from typing import Sequence

from pcdet_ext.engine.checkpointing import checkpoint_state, save_epoch
from pcdet_ext.engine.loop.hooks import ScalarLogHook, ScheduleHook
from pcdet_ext.engine.loop.runner import Hook, Runner


class EpochCheckpoints(Hook):
    """Rank 0 saves ``checkpoint_epoch_<n>.pth`` every ``--ckpt_save_interval`` epochs and after the last,
    keeping ``--max_ckpt_save_num``."""

    def __init__(self, run):
        self.run = run

    def after_epoch(self, runner: Runner, epoch: int, mean_loss: float) -> None:
        run, trained = self.run, epoch + 1
        if run.info.is_main and (trained % run.args.ckpt_save_interval == 0 or trained == run.total_epochs):
            state = checkpoint_state(run.model, run.optimizer, trained, runner.iteration, run.cfg, runner.scaler)
            run.logger.info("saved %s", save_epoch(state, run.ckpt_dir, trained, run.args.max_ckpt_save_num))


def train_model(run, hooks: Sequence[Hook] = ()) -> int:
    """Epochs ``run.start_epoch .. run.total_epochs - 1`` of a :class:`~pcdet_ext.engine.startup.prepare.TrainingRun`;
    ``hooks`` run after logging and before the epoch checkpoint (e.g. the teacher update, validation).
    Returns the final iteration count."""
    optim_cfg = run.cfg.OPTIMIZATION
    runner = Runner(run.model, run.optimizer, grad_clip=optim_cfg.get("GRAD_NORM_CLIP", 10),
                    is_main=run.info.is_main, iteration=run.start_iter, amp=run.amp, scaler=run.scaler,
                    hooks=[ScheduleHook(run.scheduler, run.warmup, optim_cfg.get("WARMUP_EPOCH", 0)),
                           ScalarLogHook(run.writer, getattr(run.args, "logger_iter_interval", 1)), *hooks,
                           EpochCheckpoints(run)])
    runner.fit(run.train_loader, range(run.start_epoch, run.total_epochs),
               max_iters=getattr(run.args, "max_iters_per_epoch", None), sampler=run.sampler)
    return runner.iteration
