"""Rate-distortion training of a trained RQ bottleneck against the coder it is sent with.

Entropy-constrained VQ training (Chou, Lookabaugh & Gray 1989) with the frozen detector's loss as
the distortion. Each round (1) trains every codebook of one cell (n, k) together on the detection
loss (+ the VQ pull), the codes of every batch chosen as the edge will choose them: distortion +
lambda x the bits the coder spends on each code under the current context models (order-0,
previous-code and spatial contexts; ``bitstream.rate_choice``); (2) refits those models on the codes
that choice now makes on the fitting frames. Codes the choice avoids grow rarer and dearer, the
popular ones cheaper, and the codebooks move to the features they are chosen for under the rate
term: the codes themselves become cheaper, not only their choice at encode time. The result is a
model for that cell and lambda (training the entries of a nested prefix moves the smaller cells too).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Sequence

import numpy as np
import torch

from pcdet_ext.algorithms.bitstream import ProbabilityModels
from pcdet_ext.algorithms.bitstream.rate_choice import ContextRate
from pcdet_ext.deploy.runtime import fit_probability_models
from pcdet_ext.engine.loop.runner import train_steps
from pcdet_ext.engine.recipes.progressive_rq.evaluate import operating_point


@contextlib.contextmanager
def joint_cell(quantizer, n: int, k: int) -> Iterator[List[torch.nn.Parameter]]:
    """Within: gradient mode at exactly (n, k) (no operating-point sampling), every active codebook
    (and an adapter) trainable, no entry new (no EMA update, no dead-entry restart: the rate term
    makes some entries rare on purpose). Yields the trainable parameters; restores the quantizer's
    mode, active cell, freezing and stage starts after."""
    q = quantizer
    saved = (q.freeze_earlier, q.operating_point_training, q.mode, q.stage_start.clone())
    q.freeze_earlier, q.operating_point_training = False, False  # before operating_point applies the freezing
    try:
        with operating_point(q, n, k):
            q.set_mode("gradient")
            q.stage_start.copy_(q.trained_size)
            yield [p for p in q.parameters() if p.requires_grad]
    finally:
        q.freeze_earlier, q.operating_point_training = saved[0], saved[1]
        q.set_mode(saved[2])
        q.stage_start.copy_(saved[3])
        q._apply_freezing()


def rate_distortion_train(model, loader, dataset, frames: Sequence[np.ndarray], models: ProbabilityModels,
                          n: int, k: int, rate_lambda: float, sizes: Sequence[int], rounds: int = 2,
                          steps: int = 100, lr: float = 5e-4, log: logging.Logger = None) -> ProbabilityModels:
    """``rounds`` x (``steps`` training iterations over ``loader`` with codes chosen at
    ``rate_lambda`` under the current models, then the models refitted on ``frames`` with that
    choice, at every k of ``sizes``). Trains ``model``'s codebooks in place; returns the last
    models (the ones its codes are sent with: encode at ``rate_lambda`` under them)."""
    if rate_lambda <= 0:
        raise ValueError(f"rate-distortion training needs a rate lambda > 0, got {rate_lambda}")
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got {rounds} and {steps}")
    log = log or logging.getLogger(__name__)
    q = model.quantizer
    for r in range(rounds):
        with joint_cell(q, n, k) as params:
            q.set_rate(rate_lambda, ContextRate(models), in_training=True)
            try:
                optimizer = torch.optim.Adam(params, lr=lr)
                losses, _ = train_steps(model, loader, optimizer, steps=steps, progress=True)
            finally:
                q.set_rate(0.0)
        models = refit_rate_aware(model, dataset, frames, models, rate_lambda, sizes)
        log.info("rate-distortion (%d, %d) lambda %g round %d/%d: loss %.4f -> %.4f over %d steps, models refitted "
                 "on %d frames", n, k, rate_lambda, r + 1, rounds, losses[0], float(np.mean(losses[-10:])), steps,
                 len(frames))
    return models


def refit_rate_aware(model, dataset, frames: Sequence[np.ndarray], models: ProbabilityModels, rate_lambda: float,
                     sizes: Sequence[int], rounds: int = 1) -> ProbabilityModels:
    """The control without training: the models refitted ``rounds`` times on the codes the
    rate-aware choice makes under the previous models (codebooks unchanged)."""
    q = model.quantizer
    for _ in range(rounds):
        q.set_rate(rate_lambda, ContextRate(models))
        try:
            models = fit_probability_models(model, dataset, frames, sizes)
        finally:
            q.set_rate(0.0)
    return models
