"""Turn a validated experiment config into OpenPCDet objects: model cfg, loaders, model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

from easydict import EasyDict

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.engine.preflight import check_dataset_files
from pcdet_ext.engine.progressive_rq import schema
from pcdet_ext.engine.progressive_rq.schema import ConfigError

DATASET_CLASSES = {"kitti": "KittiDataset", "custom": "CustomDataset"}


def build_model_cfg(exp: EasyDict, pcdet_set: Sequence[str] = ()) -> EasyDict:
    """The OpenPCDet config of ``model.cfg_file`` with ``--set`` overrides, and its RQ_BOTTLENECK
    filled from the experiment schema; mismatches are ConfigErrors naming the key."""
    cfg = cfg_from_yaml_file(find_config(exp.model.cfg_file))
    cfg_from_list(list(pcdet_set), cfg)
    if cfg.MODEL.NAME != "PointPillarRQ":
        raise ConfigError(f"model.cfg_file: {exp.model.cfg_file} builds {cfg.MODEL.NAME}, expected PointPillarRQ")
    expected = DATASET_CLASSES.get(exp.dataset.name.lower(), exp.dataset.name)
    if cfg.DATA_CONFIG.DATASET != expected:
        raise ConfigError(f"dataset.name: {exp.dataset.name} does not match the model config's "
                          f"DATA_CONFIG.DATASET {cfg.DATA_CONFIG.DATASET}")
    if len(cfg.CLASS_NAMES) != exp.dataset.num_classes:
        raise ConfigError(f"dataset.num_classes: {exp.dataset.num_classes}, but the model config has "
                          f"{len(cfg.CLASS_NAMES)} CLASS_NAMES {cfg.CLASS_NAMES}")
    channels = cfg.MODEL.MAP_TO_BEV.NUM_BEV_FEATURES
    if exp.rq_model.latent_shape[2] != channels:
        raise ConfigError(f"rq_model.latent_shape: {exp.rq_model.latent_shape} has {exp.rq_model.latent_shape[2]} "
                          f"channels, the model's BEV features have {channels}")
    progressive = exp.progressive_learning.enabled
    rq = cfg.MODEL.get("RQ_BOTTLENECK", EasyDict())
    rq.update({"NUM_CODEBOOKS": exp.model.n_codebook, "CODEBOOK_SIZE": schema.allocated_entries(exp),
               "EMBEDDING_SCHEDULE": list(exp.progressive_learning.embedding_schedule) if progressive
               else [exp.rq_model.codebook_size],
               "DECAY": exp.rq_model.decay, "FREEZE_EARLIER": progressive and rq.get("FREEZE_EARLIER", True),
               "LOSS_WEIGHTS": {"DET": exp.loss_weights.det_weight, "VQ": exp.loss_weights.vq_weight,
                                "CODEBOOK": exp.loss_weights.codebook_weight}})
    cfg.MODEL.RQ_BOTTLENECK = rq
    return cfg


def build(exp: EasyDict, cfg: EasyDict, dist: bool, logger: logging.Logger):
    """``(model, (train_set, train_loader, train_sampler), (val_set, val_loader))``."""
    from pcdet.datasets import build_dataloader
    from pcdet.models import build_network
    root = schema.resolve(exp.dataset.dir, Path.cwd())
    check_dataset_files(cfg.DATA_CONFIG, ("train", "test"), root=root, root_key="dataset.dir")
    train = build_dataloader(cfg.DATA_CONFIG, cfg.CLASS_NAMES, batch_size=exp.training.batch_size, dist=dist,
                             root_path=root, workers=exp.training.num_workers, logger=logger, training=True)
    val_set, val_loader, _ = build_dataloader(cfg.DATA_CONFIG, cfg.CLASS_NAMES, batch_size=exp.training.batch_size,
                                              dist=False, root_path=root, workers=exp.training.num_workers,
                                              logger=logger, training=False)
    if len(train[0]) == 0 or len(val_set) == 0:
        raise ConfigError(f"dataset.dir: {root} has no train or val infos (run tools/create_data.py first)")
    report_dataset_class_names(val_set)
    model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=train[0]).cuda()
    return model, train, (val_set, val_loader)


def class_names(cfg: EasyDict) -> List[str]:
    return list(cfg.CLASS_NAMES)
