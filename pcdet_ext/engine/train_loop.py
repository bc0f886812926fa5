"""Epoch / iteration loop over OpenPCDet's ``model_fn``: schedules per iteration, gradient clipping,
tqdm, tensorboardX (every tb_dict term, each param group's LR, grad norm, iteration time), checkpoints."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from pcdet_ext.engine.optimization import group_lrs, scheduler_step
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.checkpointing import checkpoint_state, save_epoch
from pcdet_ext.engine.launch import DistInfo


def train_one_epoch(model, optimizer, loader, scheduler, accumulated_iter: int, epoch: int, optim_cfg,
                    info: DistInfo, tb_log=None, after_step: Optional[Callable[[], None]] = None,
                    max_iters: Optional[int] = None, leave_pbar: bool = False) -> int:
    """One pass over ``loader`` (or ``max_iters`` iterations); returns the new iteration count.
    ``after_step`` runs after every optimizer step (e.g. the EMA teacher update)."""
    from pcdet.models import model_fn_decorator
    model_fn = model_fn_decorator()
    total = len(loader) if max_iters is None else min(max_iters, len(loader))
    bar = progress(total=total, leave=leave_pbar, desc=f"epoch {epoch}", main=info.is_main)
    clip = optim_cfg.get("GRAD_NORM_CLIP", 10)
    model.train()
    end = time.time()
    for cur, batch in enumerate(loader):
        if cur >= total:
            break
        data_time = time.time() - end
        scheduler_step(scheduler, accumulated_iter, epoch)
        optimizer.zero_grad()
        loss, tb_dict, disp_dict = model_fn(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at epoch {epoch}, iteration {accumulated_iter} "
                                     f"(terms: {tb_dict})")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        accumulated_iter += 1
        iter_time = time.time() - end
        end = time.time()
        if info.is_main:
            lrs = group_lrs(optimizer)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{max(lrs.values()):.2e}", **disp_dict)
            bar.update()
            if tb_log is not None:
                tb_log.add_scalar("train/loss", value, accumulated_iter)
                for key, val in tb_dict.items():
                    tb_log.add_scalar(f"train/{key}", float(val), accumulated_iter)
                for name, lr in lrs.items():
                    tb_log.add_scalar(f"meta_data/learning_rate/{name}", lr, accumulated_iter)
                tb_log.add_scalar("meta_data/grad_norm", float(grad_norm), accumulated_iter)
                tb_log.add_scalar("meta_data/iter_time", iter_time, accumulated_iter)
                tb_log.add_scalar("meta_data/data_time", data_time, accumulated_iter)
    bar.close()
    return accumulated_iter


def train_model(run, one_epoch: Callable[..., int] = train_one_epoch) -> int:
    """Epochs ``run.start_epoch .. run.total_epochs - 1`` of a :class:`~pcdet_ext.engine.run.TrainingRun`,
    each by ``one_epoch`` (same arguments as :func:`train_one_epoch`); rank 0 saves
    ``checkpoint_epoch_<n>.pth`` every ``--ckpt_save_interval`` epochs and after the last one.
    Returns the final iteration count."""
    args, optim_cfg, info = run.args, run.cfg.OPTIMIZATION, run.info
    it = run.start_iter
    for epoch in progress(range(run.start_epoch, run.total_epochs), desc="epochs", main=info.is_main):
        if run.sampler is not None:
            run.sampler.set_epoch(epoch)
        current = run.warmup if run.warmup is not None and epoch < optim_cfg.WARMUP_EPOCH else run.scheduler
        it = one_epoch(run.model, run.optimizer, run.train_loader, current, it, epoch, optim_cfg, info, run.tb_log,
                       max_iters=getattr(args, "max_iters_per_epoch", None))
        trained = epoch + 1
        if info.is_main and (trained % args.ckpt_save_interval == 0 or trained == run.total_epochs):
            state = checkpoint_state(run.model, run.optimizer, trained, it, run.cfg)
            run.logger.info("saved %s", save_epoch(state, run.ckpt_dir, trained, args.max_ckpt_save_num))
    return it
