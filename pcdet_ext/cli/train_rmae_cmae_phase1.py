"""R-MAE + CMAE Phase 1 pretraining of a sparse-voxel backbone (OpenPCDet flags and output layout).

    python tools/train_rmae_cmae_phase1.py \\
        --cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml \\
        --batch_size 8 --epochs 30 --extra_tag rmae_cmae_pretraining_phase1
    torchrun --nproc_per_node 4 tools/train_rmae_cmae_phase1.py --launcher pytorch --cfg_file ...

Checkpoints: output/<cfg group>/<cfg stem>/<extra_tag>/ckpt/checkpoint_epoch_N.pth (OpenPCDet
format; the --pretrained_model of the fine-tuning run). Re-running the command resumes from the
latest one; a checkpoint of a different config is refused. After every --val_interval epochs every
process evaluates its shard of the test split (fixed masks) and the main one logs the masked-occupancy
AP beside grow-visible.
"""
import argparse
import sys
from typing import Callable, Optional, Sequence

from pcdet_ext.config import ConfigError
from pcdet_ext.engine.checkpointing import ResumeError, checkpoint_state, save_epoch, unwrap
from pcdet_ext.engine.startup.args import add_train_args
from pcdet_ext.engine.recipes.occupancy_validation import GROW_VISIBLE, masked_occupancy_ap, shard_loader
from pcdet_ext.engine.startup.preflight import check_dataset_files
from pcdet_ext.engine.pretrained import PretrainedWeightsError
from pcdet_ext.engine.startup.prepare import check_training_inputs, prepare_training
from pcdet_ext.engine.loop.hooks import CallbackHook, EveryEpochs
from pcdet_ext.engine.recipes.epochs import train_model
from pcdet_ext.utils.console import DiskFull, disk_full_is_one_line
from pcdet_ext.utils.checkpoint import CheckpointError
from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled


def pretraining_check(detector: str) -> Callable:
    """The config check of a pretraining tool: ``MODEL.NAME`` ``detector`` with ``PRETRAINING: True``."""
    def check(cfg) -> None:
        if cfg.MODEL.get("NAME") != detector or not cfg.MODEL.BACKBONE_3D.get("PRETRAINING", False):
            raise ConfigError(f"MODEL: this tool pretrains; expected NAME {detector} with "
                              "BACKBONE_3D.PRETRAINING: True (fine-tune with tools/train.py)")
    return check


def validation_loader(run):
    """OpenPCDet's test-split loader (no augmentation), this process's shard of it under
    torch.distributed (every process validates, the AP counts are summed), or None with the reason
    logged when the split has no info files."""
    from pcdet.datasets import build_dataloader
    if run.args.val_interval <= 0:
        return None
    try:
        check_dataset_files(run.cfg.DATA_CONFIG, ("test",))
    except ConfigError as exc:
        run.logger.info("no occupancy validation: %s", exc)
        return None
    dataset, loader, _ = build_dataloader(dataset_cfg=run.cfg.DATA_CONFIG, class_names=run.cfg.CLASS_NAMES,
                                          batch_size=1, dist=False, workers=run.args.workers, logger=run.logger,
                                          training=False)
    allow_unlabelled(dataset)
    return shard_loader(loader, run.info.rank, run.info.world_size) if len(dataset) else None


def validate(run, loader, epoch: int, iteration: int) -> None:
    """Masked-occupancy AP on the test split (fixed masks) with the grow-visible baseline, on every
    process (its shard); the main one writes the log and tensorboard (``val/occ_ap*``,
    ``val/grow_visible_occ_ap*``)."""
    ap = masked_occupancy_ap({"model": run.model}, loader, is_main=run.info.is_main)
    if not run.info.is_main:
        return
    run.logger.info("epoch %d validation, AP of masked-only cells vs ray-cast free space: model %s | grow-visible %s",
                    epoch, " ".join(f"{k}={v:.3f}" for k, v in ap["model"].items()),
                    " ".join(f"{k}={v:.3f}" for k, v in ap[GROW_VISIBLE].items()))
    run.writer.scalars({prefix + key: val for prefix, row in (("val/", ap["model"]), ("val/grow_visible_", ap[GROW_VISIBLE]))
                        for key, val in row.items()}, iteration)


def recalibrate(run, iteration: int, batches: int) -> None:
    """BatchNorm statistics of the encoder and teacher re-estimated on unmasked training batches and
    written into the last epoch's checkpoint (atomically; the fine-tuning run and the converted
    teacher then start from full-density statistics)."""
    used = unwrap(run.model).recalibrate_batchnorm(run.train_loader, batches)
    state = checkpoint_state(run.model, run.optimizer, run.total_epochs, iteration, run.cfg, run.scaler)
    path = save_epoch(state, run.ckpt_dir, run.total_epochs, run.args.max_ckpt_save_num)
    run.logger.info("BatchNorm statistics of the encoder and teacher re-estimated on %d unmasked batches: %s",
                    used, path)


def pretrain(argv, detector: str, doc: str, setup: Optional[Callable] = None,
             new_modules: Sequence[str] = ()) -> int:
    """The pretraining tool of ``detector``: OpenPCDet's flags, checks, resume, the EMA teacher step
    after every optimizer step, occupancy validation. ``setup(run)`` runs before the first step
    (a ConfigError there is reported like any other); ``new_modules``: backbone parts a
    ``--pretrained_model`` need not hold."""
    parser = add_train_args(argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--max_iters_per_epoch", type=int, default=None, help="cap iterations per epoch (smoke runs)")
    parser.add_argument("--bn_recalibration_batches", type=int, default=16,
                        help="after training, re-estimate the encoder's and teacher's BatchNorm statistics on this "
                             "many unmasked training batches, into the last checkpoint (0: keep the masked-input ones)")
    parser.add_argument("--val_interval", type=int, default=1,
                        help="validate masked-occupancy AP on the test split every N epochs (0: never)")
    args = parser.parse_args(argv)
    check = pretraining_check(detector)
    try:
        if args.preflight_only:
            check_training_inputs(args, check)
            return 0
        run = prepare_training(args, check_cfg=check, dataset_hook=allow_unlabelled, new_modules=new_modules)
        if setup is not None:
            setup(run)
    except (ConfigError, CheckpointError, ResumeError, PretrainedWeightsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run.logger.info("pretraining %s from epoch %d to %d", args.cfg_file, run.start_epoch, run.total_epochs)
    val_loader = validation_loader(run)

    hooks = [CallbackHook(unwrap(run.model).update_teacher)]  # the EMA teacher steps after every optimizer step
    if val_loader is not None:
        hooks.append(EveryEpochs(args.val_interval, lambda runner, epoch: validate(run, val_loader, epoch,
                                                                                    runner.iteration)))
    try:
        with disk_full_is_one_line():
            iteration = train_model(run, hooks)
            if run.info.is_main and args.bn_recalibration_batches > 0:
                recalibrate(run, iteration, args.bn_recalibration_batches)
    except DiskFull:
        return 2
    run.logger.info("done: checkpoints in %s", run.ckpt_dir)
    run.finish()
    return 0


def main(argv=None) -> int:
    return pretrain(argv, "RMAECMAEDetectorPhase1", __doc__)


if __name__ == "__main__":  # python -m pcdet_ext.cli.train_rmae_cmae_phase1
    sys.exit(main())
