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


def build_model(cfg, dataset) -> torch.nn.Module:
    require_pcdet("pcdet_ext.engine")
    from pcdet.models import build_network
    return build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
