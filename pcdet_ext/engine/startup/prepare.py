"""Shared start-up of the training tools: config, distributed init, folders, logging, data, model,
pretrained weights, optimizer, resume, DDP, schedules."""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Set

import torch

from pcdet_ext.engine.optimization import build_optimizer, build_scheduler, describe
from pcdet_ext.engine import checkpointing as ck
from pcdet_ext.config import find_config
from pcdet_ext.utils.checkpoint import load_checkpoint, model_state_of
from pcdet_ext.engine.loop.runner import grad_scaler
from pcdet_ext.engine.startup.args import load_config, output_dir
from pcdet_ext.engine.loop.hooks import ScalarWriter
from pcdet_ext.engine.startup.distributed import DistInfo, init_dist, leave_process_group
from pcdet_ext.engine.startup.builders import create_logger
from pcdet_ext.engine.startup.preflight import check_dataset_files, check_not_empty
from pcdet_ext.engine.pretrained import load_pretrained, read_weights
from pcdet_ext.openpcdet.datasets.holdout import resize_sampler
from pcdet_ext.openpcdet.datasets.label_fraction import keep_label_fraction


@dataclass
class TrainingRun:
    args: argparse.Namespace
    cfg: Any
    info: DistInfo
    output_dir: Path
    ckpt_dir: Path
    logger: Any
    writer: Any
    train_set: Any
    train_loader: Any
    sampler: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    warmup: Any
    start_epoch: int
    start_iter: int
    total_epochs: int
    loaded: Optional[Set[str]]
    amp: bool = False
    scaler: Any = None

    def finish(self) -> None:
        """Close tensorboard; under torchrun wait for every rank and leave the process group, the DDP
        wrapper (which holds the group) released first."""
        self.writer.close()
        self.model = ck.unwrap(self.model)
        leave_process_group(self.info)


def check_training_inputs(args: argparse.Namespace,
                          check_cfg: Optional[Callable[[Any], None]] = None, splits: Sequence[str] = ("train",)):
    """The config (:func:`~pcdet_ext.engine.startup.args.load_config`, plus the tool's own ``check_cfg``),
    the training dataset's files, ``--ckpt`` and ``--pretrained_model``: every error a one-line
    ConfigError / CheckpointError / PretrainedWeightsError, before any process group, data or
    output. ``splits``: the dataset splits the tool reads. Returns the config. ``--preflight_only``
    (dist_train.sh) stops here."""
    cfg = load_config(args.cfg_file, args.set_cfgs)
    if check_cfg is not None:
        check_cfg(cfg)
    check_dataset_files(cfg.DATA_CONFIG, tuple(splits))
    if args.ckpt:
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"--ckpt: {args.ckpt} does not exist")
        model_state_of(load_checkpoint(args.ckpt), args.ckpt, "--ckpt",
                       expected="an OpenPCDet training checkpoint (model_state) to resume")
    if args.pretrained_model:
        read_weights(args.pretrained_model)
    return cfg


def prepare_training(args: argparse.Namespace,
                     check_cfg: Optional[Callable[[Any], None]] = None,
                     dataset_hook: Optional[Callable[[Any], None]] = None,
                     min_backbone_coverage: float = 0.9, splits: Sequence[str] = ("train",),
                     new_modules: Sequence[str] = ()) -> TrainingRun:
    """Everything up to the first iteration; every config / checkpoint error is raised before
    anything is trained or written into an existing run. ``new_modules``: model parts (key
    prefixes) a ``--pretrained_model`` need not hold (see :func:`load_pretrained`). A start refused after
    the run folder was made removes the folder again (an existing one is left as it was)."""
    from pcdet.datasets import build_dataloader
    from pcdet.models import build_network
    from pcdet.config import log_config_to_file
    from pcdet.utils import common_utils

    cfg = check_training_inputs(args, check_cfg, splits)
    info = init_dist(args.launcher, args.tcp_port)
    batch_size = args.batch_size or cfg.OPTIMIZATION.BATCH_SIZE_PER_GPU
    total_epochs = args.epochs or cfg.OPTIMIZATION.NUM_EPOCHS
    if args.fix_random_seed:
        common_utils.set_random_seed(666 + info.rank)
    out = output_dir(cfg, args.extra_tag)
    fresh, writer = not out.exists(), None
    try:
        ckpt_dir = out / "ckpt"
        if info.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        logger = create_logger(out / f"train_{stamp}.log" if info.is_main else None, rank=info.rank)
        logger.info("world size %d, batch size per process %d, output %s", info.world_size, batch_size, out)
        for key, val in vars(args).items():
            logger.info("%-20s %s", key, val)
        log_config_to_file(cfg, logger=logger)
        if info.is_main:
            shutil.copy(find_config(args.cfg_file, what="--cfg_file"), out / Path(args.cfg_file).name)
        writer = ScalarWriter(out / "tensorboard", main=info.is_main)
        train_set, train_loader, sampler = build_dataloader(
            dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES, batch_size=batch_size, dist=info.distributed,
            workers=args.workers, logger=logger, training=True, total_epochs=total_epochs,
            seed=666 if args.fix_random_seed else None)
        check_not_empty(train_set, cfg.DATA_CONFIG, "train")
        fraction = getattr(args, "label_fraction", 1.0)
        if fraction < 1:
            total = len(train_set)
            keep_label_fraction(train_set, fraction, args.label_seed)
            resize_sampler(sampler, train_set)
            logger.info("--label_fraction %g (--label_seed %d): training on %d of %d labelled frames; gt_sampling "
                        "pastes only their objects", fraction, args.label_seed, len(train_set), total)
        if dataset_hook is not None:
            dataset_hook(train_set)
        model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=train_set)
        if args.sync_bn and info.distributed:
            model = convert_sync_batchnorm(model)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model.to(device)
        amp = bool(getattr(args, "use_amp", False) or cfg.OPTIMIZATION.get("USE_AMP", False))
        scaler = grad_scaler(amp, device.type, cfg.OPTIMIZATION.get("LOSS_SCALE_FP16", 2.0 ** 16))
        loaded = None
        if args.pretrained_model:
            loaded = load_pretrained(model, args.pretrained_model, min_backbone_coverage, logger=logger,
                                     new_modules=new_modules)
        optimizer = build_optimizer(model, cfg.OPTIMIZATION, loaded)
        describe(optimizer, logger)
        start_epoch = start_iter = 0
        ckpt = Path(args.ckpt) if args.ckpt else ck.latest(ckpt_dir)
        if args.ckpt and not ckpt.is_file():
            raise FileNotFoundError(f"--ckpt: {ckpt} does not exist")
        if ckpt is not None:
            start_epoch, start_iter = ck.resume(ckpt, model, optimizer, cfg, logger, scaler)
        if info.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank % torch.cuda.device_count()] if torch.cuda.is_available() else None)
        scheduler, warmup = build_scheduler(optimizer, len(train_loader), total_epochs, -1, cfg.OPTIMIZATION)
        logger.info("mixed precision (AMP): %s", f"on, {'fp16' if device.type == 'cuda' else 'bf16'} autocast"
                    if amp else "off")
        return TrainingRun(args, cfg, info, out, ckpt_dir, logger, writer, train_set, train_loader, sampler, model,
                           optimizer, scheduler, warmup, start_epoch, start_iter, total_epochs, loaded, amp, scaler)
    except BaseException:  # a start refused after the run folder was made leaves none behind
        if writer is not None:
            writer.close()
        if fresh and info.is_main:
            _discard(out)
        raise


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``--sync_bn``: every BatchNorm of the trained model becomes SyncBatchNorm. Frozen copies (a
    pretraining teacher, whose BatchNorm weights are buffers: :mod:`pcdet_ext.algorithms.teacher_student`)
    are left as they are: they never train, and their statistics follow the student's by EMA."""
    frozen: list = []
    for name, m in model.named_modules():
        if name and not any(name.startswith(f + ".") for f in frozen) and any(
                isinstance(x, torch.nn.modules.batchnorm._NormBase) and "weight" in x._buffers for x in m.modules()) \
                and not any(True for _ in m.parameters()):
            frozen.append(name)
    held = []
    for name in frozen:  # out of the tree while converting, then back in place
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        held.append((parent, child, parent._modules[child]))
        parent._modules[child] = torch.nn.Identity()
    try:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    finally:
        for parent, child, module in held:
            parent._modules[child] = module
    return model


def _discard(out: Path) -> None:
    """Remove ``out`` (made by a start that failed), closing the log files written there first."""
    import logging
    for log in list(logging.root.manager.loggerDict.values()):
        for h in list(getattr(log, "handlers", [])):
            if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(str(out.resolve()) + os.sep):
                h.close()
                log.removeHandler(h)
    shutil.rmtree(out, ignore_errors=True)
    for parent in out.parents:  # and the empty folders above it, up to output/ itself
        if not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()
        if parent.name == "output":
            break
