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
import random
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from pcdet_ext import __version__
from pcdet_ext.engine.loop.hooks import ScalarLogHook, ScalarWriter
from pcdet_ext.engine.startup.distributed import DistInfo
from pcdet_ext.utils.checkpoint import plain
from pcdet_ext.engine.loop.runner import Hook, Runner, grad_scaler
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.engine.recipes.progressive_rq import schema
from pcdet_ext.engine.recipes.progressive_rq.evaluate import run_eval


class ProgressiveTrainer:
    def __init__(self, exp, model, loaders, pcdet_cfg, run: ck.RunDir, log: logging.Logger,
                 dist_info: DistInfo, use_wandb: bool):
        self.exp, self.model, self.run, self.log, self.dist = exp, model, run, log, dist_info
        self.pcdet_cfg = plain(pcdet_cfg)
        self.class_names = list(pcdet_cfg.CLASS_NAMES)
        # the selection frames (a held-out part of train, or val) choose stage bests and early stopping
        (self.train_set, self.train_loader, self.train_sampler), (self.sel_set, self.sel_loader) = loaders
        self.plan = schema.stage_plan(exp)
        self.fingerprint = ck.fingerprint(plain(exp))
        wandb_cfg = dict(project=exp.logging.wandb_project, name=exp.logging.wandb_name, config=plain(exp),
                         dir=str(run.root)) if use_wandb else None
        self.writer = ScalarWriter(run.tensorboard, dist_info.is_main, wandb_cfg, log)
        self.q = model.quantizer
        device = next(model.parameters()).device.type
        self.scaler = grad_scaler(exp.training.use_amp, device)  # AMP: the GradScaler lives for the whole run
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
                "config": plain(self.exp), "pcdet_cfg": self.pcdet_cfg, "fingerprint": self.fingerprint,
                **({"scaler_state": self.scaler.state_dict()} if self.scaler is not None else {})}

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> None:
        if self.exp.seed is not None:  # the experiment's global seed (identical on every rank)
            seed_everything(int(self.exp.seed))
        point = self.run.resume_point(plain(self.exp), self.log) if self.dist.is_main else None
        if self.dist.world_size > 1:
            obj = [point]
            dist.broadcast_object_list(obj, 0)
            point = obj[0]
        start_stage, start_epoch, best, bad, opt_state = 0, 0, -math.inf, 0, None
        resume = point[1] if point is not None else None
        if resume is not None:
            ss = resume["stage_state"]
            if ss["done"]:
                self.log.info("this run is complete (%s); nothing to train", point[0])
                self.writer.close()
                return
            self.model.load_state_dict(resume["model_state"])
            start_stage, start_epoch = ss["stage_index"], ss["next_epoch"]
            best, bad, self.global_best = ss["stage_best_map"], ss["bad_epochs"], ss["global_best_map"]
            self.global_step, self.epochs_done = resume["it"], resume["epoch"]
            opt_state = resume["optimizer_state"]
            if self.scaler is not None and resume.get("scaler_state"):
                self.scaler.load_state_dict(resume["scaler_state"])
            self.log.info("resuming from %s: codebook %d stage %d (%d entries) epoch %d, step %d", point[0],
                          ss["codebook"], ss["stage"], ss["num_embeddings"], start_epoch + 1, self.global_step)
            if self._stage_finished(start_stage, start_epoch, bad):  # killed before the next stage's start was saved
                self._carry_best(start_stage)
                start_stage, start_epoch = start_stage + 1, 0
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

    def _stage_finished(self, idx: int, next_epoch: int, bad: int) -> bool:
        """Whether stage ``idx`` had run its last epoch (or stopped early) after ``next_epoch`` epochs."""
        st, tr = self.plan[idx], self.exp.training
        return next_epoch >= st.epochs or (next_epoch > st.warmup_epochs and
                                           schema.early_stop(bad, tr.patience, tr.early_stopping_patience))

    def _carry_best(self, idx: int) -> None:
        """The best weights of finished stage ``idx`` into the model (what its end would have carried)."""
        st = self.plan[idx]
        state = ck.load_or_none(self.run.ckpt(ck.best_name(st.codebook, st.stage)), self.log)
        if state is None:
            self.log.warning("codebook %d stage %d: no readable best checkpoint; its last weights carry into the next "
                             "stage", st.codebook, st.stage)
            return
        self.model.load_state_dict(state["model_state"])

    def _start(self, idx: int) -> None:
        """Progressive: open codebook c at k entries. Legacy: open every codebook at full size
        (the model is built with FREEZE_EARLIER False then, so all of them train)."""
        st = self.plan[idx]
        if self.exp.progressive_learning.enabled:
            self.q.start_stage(st.codebook - 1, st.num_embeddings)
        else:
            self.q.start_together(st.codebook, st.num_embeddings)

    def _fit_stage(self, idx, first_epoch, best, bad, opt_state, fresh) -> None:
        st = self.plan[idx]
        if fresh:
            self._start(idx)
        optimizer = torch.optim.Adam(self._trainable(), lr=self.exp.training.init_lr)
        if opt_state is not None:  # the learning rate (after any plateau cuts) is in the optimizer state
            optimizer.load_state_dict(opt_state)
        best_state = None
        best_file = self.run.ckpt(ck.best_name(st.codebook, st.stage))
        if not fresh and best_file.is_file():  # resumed mid-stage: the stage's best weights so far
            saved = ck.load_or_none(best_file, self.log)
            if saved is None:  # damaged: the epochs still to run define the stage's best
                best = -math.inf
            else:
                best_state = saved["model_state"]
        policy = StagePolicy(self, idx, optimizer, best, bad, best_state)
        runner = Runner(self.model, optimizer, world_size=self.dist.world_size, is_main=self.dist.is_main,
                        iteration=self.global_step, amp=self.scaler is not None, scaler=self.scaler,
                        hooks=[policy, ScalarLogHook(self.writer, self.exp.logging.log_freq)])
        limit = self.exp.progressive_learning.pretrain_ema_limit  # batches per EMA warm-up epoch
        bar = progress(range(first_epoch, st.epochs), main=self.dist.is_main,
                       desc=f"codebook {st.codebook} stage {st.stage} k={st.num_embeddings}")
        for epoch in bar:
            ema = epoch < st.warmup_epochs
            runner.run_epoch(self.train_loader, epoch, max_iters=limit if ema else None,
                             desc=f"epoch {epoch + 1}/{st.epochs} ({'ema' if ema else 'gradient'})")
            bar.set_postfix(phase="ema" if ema else "gradient", mAP=f"{policy.last_map:.2f}", best=f"{policy.best:.2f}")
            if runner.stop:
                break
        if policy.best_state is not None and not self.dist.is_main:
            self.model.load_state_dict(policy.best_state)

    def _validate(self, st) -> Dict[str, float]:
        """Validation on the selection frames at the stage's operating point (n = codebook, k = entries)
        on rank 0."""
        val = {"mAP": 0.0}
        if self.dist.is_main:
            val = run_eval(self.model, self.sel_set, self.sel_loader, self.class_names,
                           st.codebook, st.num_embeddings, detection_loss=True)
            self.log.info("selection codebook %d stage %d k=%d: mAP %.2f, loss %.4f, %.1f KB/frame (fixed-length)",
                          st.codebook, st.stage, st.num_embeddings, val["mAP"], val.get("loss", float("nan")),
                          val["kb_per_frame_fixed"])
        val["mAP"] = self._broadcast(val["mAP"])
        return val


class StagePolicy(Hook):
    """One stage's epochs over the runner: EMA warm-up epochs (forward only) then gradient epochs;
    after each, validation at the stage's operating point, the plateau LR cut, early stopping
    (``runner.stop``), the stage's best / final / periodic checkpoints and the resume state; at the
    end, the stage's best weights carry into the next stage."""

    def __init__(self, trainer: "ProgressiveTrainer", idx: int, optimizer, best: float, bad: int, best_state):
        self.t, self.idx, self.optimizer = trainer, idx, optimizer
        self.st = trainer.plan[idx]
        self.best, self.bad, self.best_state, self.last_map = best, bad, best_state, -math.inf
        self.phase = "ema"

    def before_epoch(self, runner: Runner, epoch: int) -> None:
        self.phase = "ema" if epoch < self.st.warmup_epochs else "gradient"
        self.t.q.set_mode(self.phase)
        runner.train = self.phase == "gradient"  # EMA updates happen in the forward: nothing to backpropagate
        if self.t.train_sampler is not None:
            self.t.train_sampler.set_epoch(self.t.epochs_done)

    def after_epoch(self, runner: Runner, epoch: int, train_loss: float) -> None:
        t, st, optimizer = self.t, self.st, self.optimizer
        t.global_step = runner.iteration
        val = t._validate(st)
        m = self.last_map = val["mAP"]
        t.epochs_done += 1
        improved = m > self.best
        if improved:
            self.best, self.bad = m, 0
            self.best_state = {k: v.clone() for k, v in t.model.state_dict().items()}
        elif self.phase == "gradient":
            self.bad += 1
        tr = t.exp.training
        stop = self.phase == "gradient" and schema.early_stop(self.bad, tr.patience, tr.early_stopping_patience)
        if self.phase == "gradient" and not improved and not stop and schema.plateau_cut(self.bad, tr.patience):
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
            t.log.info("codebook %d stage %d: %d epochs without a new best mAP: LR -> %.2e", st.codebook,
                       st.stage, self.bad, optimizer.param_groups[0]["lr"])
        t.global_best = max(t.global_best, m)
        t.writer.scalars({"val/mAP": m, "val/loss": val.get("loss", float("nan")), "val/best_mAP": self.best,
                          "val/global_best_mAP": t.global_best, "train/epoch_loss": train_loss,
                          "stage/codebook_idx": st.codebook, "stage/stage_idx": st.stage,
                          "stage/embed_size": st.num_embeddings}, t.global_step)
        if t.dist.is_main:
            self._save(epoch, improved, m, stop or epoch + 1 == st.epochs)
        t._barrier()
        if stop:
            t.log.info("early stop: codebook %d stage %d after epoch %d (best mAP %.2f)",
                       st.codebook, st.stage, epoch + 1, self.best)
            runner.stop = True

    def _save(self, epoch: int, improved: bool, m: float, last: bool) -> None:
        t, st, idx = self.t, self.st, self.idx
        state = t._state(self.optimizer, idx, epoch + 1, self.best, self.bad)
        if (epoch + 1) % t.exp.training.ckpt_freq_epoch == 0:
            t.run.save(ck.epoch_name(st.codebook, st.stage, epoch + 1), state)
        if improved:
            t.run.save(ck.best_name(st.codebook, st.stage), state)
        if improved and m >= t.global_best:
            t.run.save(ck.GLOBAL_BEST, state)
        if not last:
            t.run.save_resume(state)
            return
        if t.exp.logging.save_stage_weights:
            t.run.save(ck.final_name(st.codebook, st.stage), state)
        nxt = t._state(None, idx + 1, 0, -math.inf, 0) if idx + 1 < len(t.plan) else None
        if self.best_state is not None:  # the next stage starts from this stage's best weights
            t.model.load_state_dict(self.best_state)
            if nxt is not None:
                nxt["model_state"] = t.model.state_dict()
        if nxt is not None:
            t.run.save_resume(nxt)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
