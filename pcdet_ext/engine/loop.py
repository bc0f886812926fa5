"""Minimal train/eval driver over OpenPCDet's dataloader, network, model_fn and evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.engine.runner import Hook, Runner
from pcdet_ext.utils.console import quiet_known_warnings


def create_logger(log_file=None, rank: int = 0):
    """OpenPCDet's logger, without stacking a second set of handlers when called twice in a process;
    the known third-party warnings are filtered from here on."""
    require_pcdet("pcdet_ext.engine")
    quiet_known_warnings()
    import logging

    from pcdet.utils import common_utils
    existing = logging.getLogger(common_utils.__name__)
    for handler in list(existing.handlers):
        existing.removeHandler(handler)
    return common_utils.create_logger(log_file, rank=rank)


def build_loaders(cfg, root: Path, batch_size: int = 2, workers: int = 0, logger=None):
    """``((train_set, train_loader, sampler), (test_set, test_loader, sampler))`` via ``build_dataloader``."""
    require_pcdet("pcdet_ext.engine")
    from pcdet.datasets import build_dataloader
    logger = logger or create_logger()
    kwargs = dict(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES, batch_size=batch_size, dist=False,
                  root_path=Path(root), workers=workers, logger=logger)
    train, test = build_dataloader(training=True, **kwargs), build_dataloader(training=False, **kwargs)
    report_dataset_class_names(test[0])
    return train, test


def build_model(cfg, dataset) -> torch.nn.Module:
    require_pcdet("pcdet_ext.engine")
    from pcdet.models import build_network
    return build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)


def train_steps(model, loader, optimizer, steps: int = 1, scheduler=None, grad_clip: float = 10.0,
                progress: bool = False, hooks: Sequence[Hook] = ()) -> Tuple[List[float], Dict]:
    """``steps`` iterations of the engine's :class:`~pcdet_ext.engine.runner.Runner` (cycling the loader),
    the schedule set to step ``i`` before step ``i``, then ``hooks``. Returns the losses and the last
    step's ``tb_dict``."""
    from pcdet_ext.engine.hooks import ScheduleHook
    runner = Runner(model, optimizer, hooks=[ScheduleHook(scheduler), *hooks], grad_clip=grad_clip, is_main=progress)
    losses = runner.run_steps(loader, steps)
    return losses, runner.last.tb_dict if runner.last is not None else {}
