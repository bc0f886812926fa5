"""The engine's one training loop and its hooks, on a tiny model (no OpenPCDet: ``forward`` is given)."""
import math

import numpy as np
import pytest
import torch

from pcdet_ext.engine.loop.hooks import CallbackHook, EveryEpochs, ScalarLogHook, ScheduleHook
from pcdet_ext.engine.loop.runner import Hook, Runner


def forward(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    # the term types heads put in tb_dict: python floats, numpy scalars, one-element tensors
    return loss, {"mse": float(loss.detach()), "np_term": np.float32(1.5), "t_term": loss.detach(), "tag": "x"}, {}


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return [{"x": x[i:i + 2], "y": x[i:i + 2].sum(1, keepdim=True)} for i in range(0, n, 2)]


class Record(Hook):
    def __init__(self):
        self.events = []

    def before_epoch(self, runner, epoch):
        self.events.append(("before_epoch", epoch))

    def before_step(self, runner):
        self.events.append(("before_step", runner.iteration))

    def after_step(self, runner, step):
        self.events.append(("after_step", step.index))

    def after_epoch(self, runner, epoch, mean_loss):
        self.events.append(("after_epoch", epoch))


def test_hook_order_counters_and_learning():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    rec = Record()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[rec], forward=forward, is_main=False)
    loader = data()
    first = runner.run_epoch(loader, 0)
    for epoch in range(1, 6):
        last = runner.run_epoch(loader, epoch)
    assert runner.iteration == 6 * len(loader) and last < 0.2 * first
    assert rec.events[:4] == [("before_epoch", 0), ("before_step", 0), ("after_step", 1), ("before_step", 1)]
    assert rec.events[len(loader) * 2 + 1] == ("after_epoch", 0)


def test_forward_only_epochs_change_no_weight_and_keep_no_graph():
    model = torch.nn.Linear(3, 1)
    before = [p.clone() for p in model.parameters()]
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), forward=forward, is_main=False, train=False)
    steps = []
    runner.hooks.append(type("H", (Hook,), {"after_step": lambda self, r, s: steps.append(s)})())
    runner.run_epoch(data(), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not any(s.trained for s in steps)
    assert all(s.grad_norm is None for s in steps)


def test_non_finite_loss_stops_with_the_terms():
    model = torch.nn.Linear(3, 1)

    def bad(model, batch):
        return torch.tensor(math.nan, requires_grad=True), {"term": 1.0}, {}
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), forward=bad, is_main=False)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at epoch 0, iteration 0 \(terms: \{'term'"):
        runner.run_epoch(data(), 0)


def test_stop_from_a_hook_ends_fit_and_every_epochs_fires_on_schedule():
    model = torch.nn.Linear(3, 1)
    seen = []

    def validate(runner, epochs_done):
        seen.append(epochs_done)
        runner.stop = epochs_done == 4
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.01), forward=forward, is_main=False,
                    hooks=[EveryEpochs(2, validate)])
    runner.fit(data(), range(10))
    assert seen == [2, 4] and runner.epoch == 3


def test_schedule_set_before_each_step_and_callback_after_each_trained_step():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + it))
    lrs, calls = [], []
    spy = type("Spy", (Hook,), {"before_step": lambda self, r: lrs.append(opt.param_groups[0]["lr"])})()
    runner = Runner(model, opt, forward=forward, is_main=False,
                    hooks=[ScheduleHook(sched), spy, CallbackHook(lambda: calls.append(1))])
    losses = runner.run_steps(data(), 6)  # cycles the 4-batch loader
    assert len(losses) == 6 and len(calls) == 6
    assert lrs == pytest.approx([1.0 / (1 + i) for i in range(6)])


def test_scalar_log_hook_every_n_steps():
    class Writer:
        def __init__(self):
            self.rows = []

        def scalars(self, values, step):
            self.rows.append((step, values))
    writer = Writer()
    model = torch.nn.Linear(3, 1)
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), forward=forward, is_main=False,
                    hooks=[ScalarLogHook(writer, every=2)])
    runner.run_steps(data(), 5)
    assert [s for s, _ in writer.rows] == [2, 4]
    keys = set(writer.rows[0][1])
    assert {"train/loss", "train/mse", "train/np_term", "train/t_term", "meta_data/learning_rate/0",
            "meta_data/grad_norm", "meta_data/iter_time", "meta_data/data_time"} <= keys and "train/tag" not in keys
