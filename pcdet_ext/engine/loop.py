"""Minimal train/eval driver over OpenPCDet's dataloader, network, model_fn and evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.utils.console import progress as progress_bar, quiet_known_warnings


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
                progress: bool = False, on_step: Optional[Callable[[int], None]] = None) -> Tuple[List[float], Dict]:
    """Run ``steps`` optimizer steps (cycling the loader) through OpenPCDet's ``model_fn``. The
    schedule (torch or OpenPCDet's fastai ones) is set to step ``i`` before step ``i``; then
    ``on_step(i)`` runs (e.g. to inspect the learning rates)."""
    from pcdet.models import model_fn_decorator

    from pcdet_ext.engine.optimization import scheduler_step
    model.train()
    model_fn = model_fn_decorator()
    losses: List[float] = []
    tb_dict: Dict = {}
    it = iter(loader)
    bar = progress_bar(total=steps, desc="train", main=progress)
    for step in range(steps):
        if scheduler is not None:
            scheduler_step(scheduler, step, 0)
        if on_step is not None:
            on_step(step)
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        optimizer.zero_grad()
        loss, tb_dict, _ = model_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update()
    bar.close()
    return losses, tb_dict


def evaluate(model, dataset, loader, class_names, output_path: Optional[Path] = None,
             on_batch: Optional[Callable[[Dict], None]] = None):
    """Predict every frame and run the dataset's KITTI-metric evaluation; ``on_batch(batch)`` sees
    each batch after its prediction (and must leave the model in eval mode).

    Returns ``(det_annos, result_str, result_dict)`` as OpenPCDet's ``eval_one_epoch`` computes them.
    """
    from pcdet.models import load_data_to_gpu
    model.eval()
    det_annos = []
    for batch in loader:
        load_data_to_gpu(batch)
        with torch.no_grad():
            pred_dicts, _ = model(batch)
        det_annos += dataset.generate_prediction_dicts(batch, pred_dicts, class_names, output_path=output_path)
        if on_batch is not None:
            on_batch(batch)
    result_str, result_dict = dataset.evaluation(det_annos, class_names, eval_metric="kitti")
    return det_annos, result_str, result_dict
