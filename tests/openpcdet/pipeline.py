"""Small driver for tier-2 tests: OpenPCDet's own dataloader, network, optimizer and evaluation."""
from pathlib import Path

import torch

from pcdet.datasets import build_dataloader
from pcdet.models import build_network, load_data_to_gpu, model_fn_decorator
from pcdet.utils import common_utils


def loaders(cfg, root: Path, batch_size: int = 2):
    logger = common_utils.create_logger()
    train = build_dataloader(cfg.DATA_CONFIG, cfg.CLASS_NAMES, batch_size=batch_size, dist=False,
                             root_path=root, workers=0, logger=logger, training=True)
    test = build_dataloader(cfg.DATA_CONFIG, cfg.CLASS_NAMES, batch_size=batch_size, dist=False,
                            root_path=root, workers=0, logger=logger, training=False)
    return train, test


def train_steps(model, loader, optimizer, steps: int = 1):
    """Run ``steps`` optimizer steps through OpenPCDet's model_fn; returns the losses."""
    model.train()
    model_fn = model_fn_decorator()
    losses, it = [], iter(loader)
    for _ in range(steps):
        batch = next(it)
        optimizer.zero_grad()
        loss, tb_dict, _ = model_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10)
        optimizer.step()
        losses.append(float(loss))
    return losses, tb_dict


def evaluate(model, dataset, loader, class_names):
    """Predict every frame and run the dataset's KITTI-metric evaluation."""
    model.eval()
    det_annos = []
    for batch in loader:
        load_data_to_gpu(batch)
        with torch.no_grad():
            pred_dicts, _ = model(batch)
        det_annos += dataset.generate_prediction_dicts(batch, pred_dicts, class_names)
    result_str, result_dict = dataset.evaluation(det_annos, class_names, eval_metric="kitti")
    return det_annos, result_str, result_dict


def build(cfg, dataset):
    return build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
