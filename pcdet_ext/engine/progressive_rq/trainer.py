"""Progressive RQ training of a PointPillarRQ through OpenPCDet's dataloaders and evaluation.

For codebook c = 1..n, for each entry count k of the schedule: EMA warm-up epochs, then gradient
epochs; validation (KITTI metric) after every epoch; a plateau LR schedule and early stopping
inside the stage; best/final weights per stage; the best weights of a stage carry into the next.
Every epoch the full state goes to ``resume_state.pth`` (atomically), so re-running the same
command after a kill continues at the same codebook, stage, epoch and optimizer state.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from pcdet_ext import __version__
from pcdet_ext.engine.launch import DistInfo
from pcdet_ext.utils.checkpoint import load_checkpoint, plain
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.progressive_rq import checkpoints as ck
from pcdet_ext.engine.progressive_rq import schema
from pcdet_ext.engine.progressive_rq.evaluate import run_eval


class Logger:
    """tensorboardX always (rank 0), wandb when asked for and installed."""

    def __init__(self, run: ck.RunDir, exp, use_wandb: bool, main: bool, log: logging.Logger):
        self.main, self.wandb, self.tb = main, None, None
        if not main:
            return
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(run.tensorboard))
        if use_wandb:
            try:
                import wandb
            except ImportError:
                log.warning("logging.use_wandb is set but wandb is not installed; logging to tensorboard only")
                return
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=exp.logging.wandb_project, name=exp.logging.wandb_name,
                                    config=plain(exp), dir=str(run.root), mode=mode, resume="allow")

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if not self.main:
            return
        for key, val in values.items():
            self.tb.add_scalar(key, val, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class ProgressiveTrainer:
    def __init__(self, exp, model, loaders, pcdet_cfg, run: ck.RunDir, log: logging.Logger,
                 dist_info: DistInfo, use_wandb: bool):
        self.exp, self.model, self.run, self.log, self.dist = exp, model, run, log, dist_info
        self.pcdet_cfg = plain(pcdet_cfg)
        self.class_names = list(pcdet_cfg.CLASS_NAMES)
        (self.train_set, self.train_loader, self.train_sampler), (self.val_set, self.val_loader) = loaders
        self.plan = schema.stage_plan(exp)
        self.fingerprint = ck.fingerprint(plain(exp))
        self.writer = Logger(run, exp, use_wandb, dist_info.is_main, log)
        self.q = model.quantizer
        self.global_step = 0
        self.epochs_done = 0
        self.global_best = -math.inf

    # ---- helpers --------------------------------------------------------------------------
    def _broadcast(self, value: float) -> float:
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def _trainable(self) -> List[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _state(self, optimizer, stage_idx: int, next_epoch: int, best: float, bad: int,
               done: bool = False) -> Dict[str, Any]:
        st = self.plan[stage_idx] if stage_idx < len(self.plan) else self.plan[-1]
        return {"model_state": self.model.state_dict(), "optimizer_state": optimizer.state_dict() if optimizer else None,
                "scheduler_state": None,  # kept for the layout: plateau cuts live in the optimizer's LR
                "epoch": self.epochs_done, "it": self.global_step, "version": f"pcdet_ext+{__version__}",
                "stage_state": {"stage_index": stage_idx, "codebook": st.codebook, "stage": st.stage,
                                "num_embeddings": st.num_embeddings, "next_epoch": next_epoch,
                                "stage_best_map": best, "bad_epochs": bad, "global_best_map": self.global_best,
                                "done": done},
                "config": plain(self.exp), "pcdet_cfg": self.pcdet_cfg, "fingerprint": self.fingerprint}

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> None:
        if self.exp.seed is not None:  # the experiment's global seed (identical on every rank)
            seed_everything(int(self.exp.seed))
        resume = self.run.check_reusable(self.fingerprint) if self.dist.is_main else None
        if self.dist.world_size > 1:
            obj = [resume]
            dist.broadcast_object_list(obj, 0)
            resume = obj[0]
        start_stage, start_epoch, best, bad, opt_state = 0, 0, -math.inf, 0, None
        if resume is not None:
            ss = resume["stage_state"]
            if ss["done"]:
                self.log.info("this run is complete (%s); nothing to train", self.run.root / ck.RESUME)
                self.writer.close()
                return
            self.model.load_state_dict(resume["model_state"])
            start_stage, start_epoch = ss["stage_index"], ss["next_epoch"]
            best, bad, self.global_best = ss["stage_best_map"], ss["bad_epochs"], ss["global_best_map"]
            self.global_step, self.epochs_done = resume["it"], resume["epoch"]
            opt_state = resume["optimizer_state"]
            self.log.info("resuming from %s: codebook %d stage %d (%d entries) epoch %d, step %d",
                          self.run.root / ck.RESUME, ss["codebook"], ss["stage"], ss["num_embeddings"],
                          start_epoch + 1, self.global_step)
        self.log.info(schema.describe_plan(self.exp))
        for idx in range(start_stage, len(self.plan)):
            # a stage resumed at epoch 0 was never started (the state was saved at the previous stage's end)
            fresh = resume is None or idx != start_stage or start_epoch == 0
            self._fit_stage(idx, start_epoch if not fresh else 0, best if not fresh else -math.inf,
                            bad if not fresh else 0, None if fresh else opt_state, fresh)
        if self.dist.is_main:
            self.run.save_resume(self._state(None, len(self.plan) - 1, 0, -math.inf, 0, done=True))
        self.writer.close()
        self.log.info("done: global best mAP %.2f (%s)", self.global_best, self.run.ckpt(ck.GLOBAL_BEST))

    def _start(self, idx: int) -> None:
        """Progressive: open codebook c at k entries. Legacy: open every codebook at full size
        (the model is built with FREEZE_EARLIER False then, so all of them train)."""
        st = self.plan[idx]
        legacy = not self.exp.progressive_learning.enabled
        for c in (range(st.codebook) if legacy else [st.codebook - 1]):
            self.q.start_stage(c, st.num_embeddings)

    def _fit_stage(self, idx, first_epoch, best, bad, opt_state, fresh) -> None:
        st = self.plan[idx]
        if fresh:
            self._start(idx)
        params = self._trainable()
        optimizer = torch.optim.Adam(params, lr=self.exp.training.init_lr)
        if opt_state is not None:  # the learning rate (after any plateau cuts) is in the optimizer state
            optimizer.load_state_dict(opt_state)
        best_state = None
        best_file = self.run.ckpt(ck.best_name(st.codebook, st.stage))
        if not fresh and best_file.is_file():  # resumed mid-stage: the stage's best weights so far
            best_state = load_checkpoint(best_file)["model_state"]
        bar = progress(range(first_epoch, st.epochs), main=self.dist.is_main,
                       desc=f"codebook {st.codebook} stage {st.stage} k={st.num_embeddings}")
        for epoch in bar:
            phase = "ema" if epoch < st.warmup_epochs else "gradient"
            self.q.set_mode(phase)
            train_loss = self._train_epoch(st, epoch, phase, optimizer)
            val = self._validate(st)
            m = val["mAP"]
            self.epochs_done += 1
            improved = m > best
            if improved:
                best, bad = m, 0
                best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            elif phase == "gradient":
                bad += 1
            if phase == "gradient" and not improved and schema.plateau_cut(bad, self.exp.training.patience):
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
                self.log.info("codebook %d stage %d: %d epochs without a new best mAP: LR -> %.2e", st.codebook,
                              st.stage, bad, optimizer.param_groups[0]["lr"])
            self.global_best = max(self.global_best, m)
            self.writer.scalars({"val/mAP": m, "val/loss": val.get("loss", float("nan")), "val/best_mAP": best,
                                 "val/global_best_mAP": self.global_best, "train/epoch_loss": train_loss,
                                 "stage/codebook_idx": st.codebook, "stage/stage_idx": st.stage,
                                 "stage/embed_size": st.num_embeddings}, self.global_step)
            bar.set_postfix(phase=phase, mAP=f"{m:.2f}", best=f"{best:.2f}")
            stop = phase == "gradient" and bad >= self.exp.training.early_stopping_patience
            if self.dist.is_main:
                state = self._state(optimizer, idx, epoch + 1, best, bad)
                if (epoch + 1) % self.exp.training.ckpt_freq_epoch == 0:
                    self.run.save(ck.epoch_name(st.codebook, st.stage, epoch + 1), state)
                if improved:
                    self.run.save(ck.best_name(st.codebook, st.stage), state)
                if improved and m >= self.global_best:
                    self.run.save(ck.GLOBAL_BEST, state)
                if stop or epoch + 1 == st.epochs:
                    if self.exp.logging.save_stage_weights:
                        self.run.save(ck.final_name(st.codebook, st.stage), state)
                    nxt = self._state(None, idx + 1, 0, -math.inf, 0) if idx + 1 < len(self.plan) else None
                    if best_state is not None:  # the next stage starts from this stage's best weights
                        self.model.load_state_dict(best_state)
                        if nxt is not None:
                            nxt["model_state"] = self.model.state_dict()
                    if nxt is not None:
                        self.run.save_resume(nxt)
                else:
                    self.run.save_resume(state)
            self._barrier()
            if stop:
                self.log.info("early stop: codebook %d stage %d after epoch %d (best mAP %.2f)",
                              st.codebook, st.stage, epoch + 1, best)
                break
        if best_state is not None and not self.dist.is_main:
            self.model.load_state_dict(best_state)

    def _train_epoch(self, st, epoch: int, phase: str, optimizer) -> float:
        from pcdet.models import load_data_to_gpu
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self.epochs_done)
        self.model.train()
        total, count = 0.0, 0
        bar = progress(self.train_loader, main=self.dist.is_main, desc=f"epoch {epoch + 1}/{st.epochs} ({phase})",
                       leave=False)
        limit = self.exp.progressive_learning.pretrain_ema_limit if phase == "ema" else None
        for i, batch in enumerate(bar):
            if limit is not None and i >= limit:  # pretrain_ema_limit: batches per EMA warm-up epoch
                break
            t0 = time.time()
            load_data_to_gpu(batch)
            if phase == "ema":  # EMA updates happen in the forward; nothing to backpropagate
                with torch.no_grad():
                    ret, tb, _ = self.model(batch)
            else:
                ret, tb, _ = self.model(batch)
                optimizer.zero_grad()
                ret["loss"].backward()
                params = [p for p in self._trainable() if p.grad is not None]
                if self.dist.world_size > 1:
                    for p in params:
                        dist.all_reduce(p.grad)
                        p.grad /= self.dist.world_size
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimizer.step()
            self.global_step += 1
            loss = float(ret["loss"].detach())
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.global_step % self.exp.logging.log_freq == 0:
                values = {f"train/{k}": v for k, v in tb.items() if isinstance(v, (int, float))}
                values.update({"train/lr": optimizer.param_groups[0]["lr"], "train/iter_time": time.time() - t0})
                self.writer.scalars(values, self.global_step)
        return total / max(count, 1)

    def _validate(self, st) -> Dict[str, float]:
        """Validation at the stage's operating point (n = codebook, k = entries) on rank 0."""
        val = {"mAP": 0.0}
        if self.dist.is_main:
            val = run_eval(self.model, self.val_set, self.val_loader, self.class_names,
                           st.codebook, st.num_embeddings, detection_loss=True)
            self.log.info("val codebook %d stage %d k=%d: mAP %.2f, loss %.4f, %.1f KB/frame (fixed-length)",
                          st.codebook, st.stage, st.num_embeddings, val["mAP"], val.get("loss", float("nan")),
                          val["kb_per_frame_fixed"])
        val["mAP"] = self._broadcast(val["mAP"])
        return val


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
