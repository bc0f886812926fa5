"""Builders the tools, demos and tests share: OpenPCDet's logger, train / test loaders and network."""
from __future__ import annotations

from pathlib import Path

import torch

from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.openpcdet.locator import require_pcdet
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


def one_pass_loader(loader: torch.utils.data.DataLoader, steps: int) -> torch.utils.data.DataLoader:
    """``loader`` (a shuffled, non-distributed training loader) re-made so that one pass yields ``steps``
    batches of back-to-back shuffled epochs: the same dataset, batch size, collate, workers and worker
    seeding, but the workers start once. Cycling a few-frame set (a label fraction) epoch by epoch starts
    them every few steps, and on CPUs that costs as much as the steps."""
    if not isinstance(loader.sampler, torch.utils.data.RandomSampler):
        raise ValueError(f"one_pass_loader: expected a shuffled training loader (a RandomSampler), "
                         f"got a {type(loader.sampler).__name__}")
    if steps < 1:
        raise ValueError(f"one_pass_loader: steps {steps}, expected >= 1")
    sampler = torch.utils.data.RandomSampler(loader.dataset, num_samples=steps * loader.batch_size)
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=False, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn)


def build_model(cfg, dataset) -> torch.nn.Module:
    require_pcdet("pcdet_ext.engine")
    from pcdet.models import build_network
    return build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
