"""The one training loop: every recipe (progressive RQ stages, pretraining, fine-tuning, demos,
benchmarks) runs its iterations here and adds behaviour through hooks.

An iteration: ``before_step`` hooks (e.g. the LR schedule), forward through OpenPCDet's ``model_fn``
(or the given ``forward``; under ``torch.autocast`` with ``amp``), a finite-loss check (the one
device-to-host copy of a step), and when the runner trains: zero grad, backward (through the
``GradScaler`` with ``amp``), gradient all-reduce when asked (a model not wrapped in DDP), unscale,
clipping, optimizer step; then ``after_step`` hooks (e.g. the EMA teacher, logging). An epoch: ``before_epoch`` hooks, the
iterations with a tqdm bar, ``after_epoch`` hooks (validation, early stopping via ``runner.stop``,
checkpoints).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from pcdet_ext.engine.optimization import group_lrs
from pcdet_ext.utils.console import progress

Forward = Callable[[torch.nn.Module, Dict[str, Any]], Tuple[torch.Tensor, Dict[str, Any], Dict[str, Any]]]


@dataclass
class Step:
    """What one iteration produced; ``index`` counts iterations over the whole run (after this one)."""
    index: int
    epoch: int
    loss: float
    tb_dict: Dict[str, Any]      # values may be 0-dim tensors: read them when logging
    disp_dict: Dict[str, Any]
    grad_norm: Optional[torch.Tensor]
    iter_time: float
    data_time: float
    trained: bool


class Hook:
    """Override what a recipe needs; every method gets the runner (model, optimizer, counters)."""

    def before_epoch(self, runner: "Runner", epoch: int) -> None:
        pass

    def before_step(self, runner: "Runner") -> None:
        pass

    def after_step(self, runner: "Runner", step: Step) -> None:
        pass

    def after_epoch(self, runner: "Runner", epoch: int, mean_loss: float) -> None:
        pass


def openpcdet_forward() -> Forward:
    """OpenPCDet's ``model_fn`` (moves the batch to the model's device, ``loss = ret_dict['loss'].mean()``)."""
    from pcdet.models import model_fn_decorator
    return model_fn_decorator()


@dataclass
class Runner:
    """``train`` False runs the forward only, under ``no_grad`` (e.g. an EMA warm-up, where the
    forward updates the codebooks); ``world_size`` > 1 all-reduces gradients (a model not wrapped in
    DDP); ``is_main`` shows the progress bars. ``amp``: mixed precision as OpenPCDet's ``--use_amp``
    (autocast fp16 on CUDA, bf16 on CPU; the loss in fp32) with ``scaler`` (:func:`grad_scaler`)."""
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    hooks: List[Hook] = field(default_factory=list)
    forward: Optional[Forward] = None
    grad_clip: float = 10.0
    train: bool = True
    world_size: int = 1
    is_main: bool = True
    iteration: int = 0
    epoch: int = 0
    stop: bool = False
    last: Optional[Step] = None
    amp: bool = False
    scaler: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = openpcdet_forward()

    def _call(self, name: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def step(self, batch: Dict[str, Any], data_time: float = 0.0) -> Step:
        """One iteration on ``batch``."""
        start = time.time()
        self._call("before_step")
        grad_norm = None
        if self.train:
            self.optimizer.zero_grad()
            loss, tb_dict, disp_dict = self._forward(batch)
            value = self._finite(loss, tb_dict)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            params = [p for p in self.model.parameters() if p.grad is not None]
            if self.world_size > 1:
                import torch.distributed as dist
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip).detach()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skipped when the unscaled gradients are not finite
                self.scaler.update()
            else:
                self.optimizer.step()
        else:
            with torch.no_grad():
                loss, tb_dict, disp_dict = self._forward(batch)
            value = self._finite(loss, tb_dict)
        self.iteration += 1
        out = Step(self.iteration, self.epoch, value, tb_dict, disp_dict, grad_norm, time.time() - start + data_time,
                   data_time, self.train)
        self.last = out
        self._call("after_step", out)
        return out

    def _forward(self, batch: Dict[str, Any]):
        """The forward, under autocast with ``amp``; the loss returned in fp32."""
        if not self.amp:
            return self.forward(self.model, batch)
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
            loss, tb_dict, disp_dict = self.forward(self.model, batch)
        return loss.float(), tb_dict, disp_dict

    def _finite(self, loss: torch.Tensor, tb_dict: Dict[str, Any]) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at epoch {self.epoch}, iteration {self.iteration} "
                                     f"(terms: {tb_dict})")
        return value

    def run_epoch(self, loader: Iterable, epoch: int, max_iters: Optional[int] = None, desc: Optional[str] = None,
                  leave: bool = False) -> float:
        """One pass over ``loader`` (at most ``max_iters`` iterations) between the epoch hooks; returns
        the mean loss."""
        self.epoch = epoch
        self.model.train()
        self._call("before_epoch", epoch)
        total = len(loader) if max_iters is None else min(max_iters, len(loader))
        bar = progress(total=total, leave=leave, desc=desc or f"epoch {epoch}", main=self.is_main)
        losses: List[float] = []
        end = time.time()
        for i, batch in enumerate(loader):
            if i >= total:
                break
            step = self.step(batch, data_time=time.time() - end)
            end = time.time()
            losses.append(step.loss)
            lr = max(group_lrs(self.optimizer).values()) if self.optimizer is not None else 0.0
            bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{lr:.2e}", **step.disp_dict)
            bar.update()
        bar.close()
        mean = sum(losses) / max(len(losses), 1)
        self._call("after_epoch", epoch, mean)
        return mean

    def fit(self, loader: Iterable, epochs: Sequence[int], max_iters: Optional[int] = None, sampler=None,
            desc: str = "epochs") -> None:
        """``run_epoch`` for each of ``epochs`` until a hook sets ``stop``."""
        self.stop = False
        for epoch in progress(epochs, desc=desc, main=self.is_main):
            if sampler is not None:
                sampler.set_epoch(epoch)
            self.run_epoch(loader, epoch, max_iters)
            if self.stop:
                break

    def run_steps(self, loader: Iterable, steps: int, desc: str = "train") -> List[float]:
        """``steps`` iterations, cycling ``loader``; returns the losses."""
        losses: List[float] = []
        self.model.train()
        it = iter(loader)
        bar = progress(total=steps, desc=desc, main=self.is_main)
        for _ in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            losses.append(self.step(batch).loss)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        bar.close()
        return losses


def grad_scaler(amp: bool, device: str, init_scale: float = 2.0 ** 16) -> Optional[Any]:
    """OpenPCDet's GradScaler (``OPTIMIZATION.LOSS_SCALE_FP16`` the initial scale) when ``amp``, else None
    (``torch.amp.GradScaler`` from torch 2.3; before it, ``torch.cuda.amp``'s)."""
    if not amp:
        return None
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device, init_scale=init_scale)
    return torch.cuda.amp.GradScaler(init_scale=init_scale)


def train_steps(model, loader, optimizer, steps: int = 1, scheduler=None, grad_clip: float = 10.0,
                progress: bool = False, hooks: Sequence[Hook] = ()) -> Tuple[List[float], Dict]:
    """``steps`` iterations of the :class:`Runner` (cycling the loader),
    the schedule set to step ``i`` before step ``i``, then ``hooks``. Returns the losses and the last
    step's ``tb_dict``."""
    from pcdet_ext.engine.loop.hooks import ScheduleHook  # hooks import this module
    runner = Runner(model, optimizer, hooks=[ScheduleHook(scheduler), *hooks], grad_clip=grad_clip, is_main=progress)
    losses = runner.run_steps(loader, steps)
    return losses, runner.last.tb_dict if runner.last is not None else {}
