"""R-MAE + CMAE Phase 1 pretraining of a sparse-voxel backbone (OpenPCDet flags and output layout).

    python tools/train_rmae_cmae_phase1.py \\
        --cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml \\
        --batch_size 8 --epochs 30 --extra_tag rmae_cmae_pretraining_phase1
    torchrun --nproc_per_node 4 tools/train_rmae_cmae_phase1.py --launcher pytorch --cfg_file ...

Checkpoints: output/<cfg group>/<cfg stem>/<extra_tag>/ckpt/checkpoint_epoch_N.pth (OpenPCDet
format; the --pretrained_model of the fine-tuning run). Re-running the command resumes from the
latest one; a checkpoint of a different config is refused.
"""
import argparse
import sys
from pathlib import Path

import pcdet_ext  # noqa: F401  (registers the R-MAE + CMAE classes; CPU runtime on CUDA-less torch)
from pcdet_ext.config import ConfigError
from pcdet_ext.engine.checkpointing import ResumeError, unwrap
from pcdet_ext.engine.cli import add_train_args
from pcdet_ext.engine.pretrained import PretrainedWeightsError
from pcdet_ext.engine.run import check_training_inputs, prepare_training
from pcdet_ext.engine.train_loop import train_model, train_one_epoch
from pcdet_ext.utils.checkpoint import CheckpointError
from pcdet_ext.pretraining.unlabelled import allow_unlabelled

REPO = Path(__file__).resolve().parents[1]


def check_pretraining(cfg) -> None:
    if cfg.MODEL.get("NAME") != "RMAECMAEDetectorPhase1" or not cfg.MODEL.BACKBONE_3D.get("PRETRAINING", False):
        raise ConfigError("MODEL: this tool pretrains; expected NAME RMAECMAEDetectorPhase1 with "
                          "BACKBONE_3D.PRETRAINING: True (fine-tune with tools/train.py)")


def train_one_epoch_phase1(model, optimizer, loader, scheduler, accumulated_iter: int, epoch: int, optim_cfg, info,
                           tb_log=None, max_iters=None) -> int:
    """One pretraining epoch (OpenPCDet's iteration loop, every loss term and the mask / occupancy /
    teacher statistics to tensorboard); the EMA teacher steps after every optimizer step."""
    return train_one_epoch(model, optimizer, loader, scheduler, accumulated_iter, epoch, optim_cfg, info, tb_log,
                           after_step=unwrap(model).update_teacher, max_iters=max_iters)


def main(argv=None) -> int:
    parser = add_train_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--max_iters_per_epoch", type=int, default=None, help="cap iterations per epoch (smoke runs)")
    args = parser.parse_args(argv)
    try:
        if args.preflight_only:
            check_training_inputs(args, REPO, check_pretraining)
            return 0
        run = prepare_training(args, REPO, check_cfg=check_pretraining, dataset_hook=allow_unlabelled)
    except (ConfigError, CheckpointError, ResumeError, PretrainedWeightsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run.logger.info("pretraining %s from epoch %d to %d", args.cfg_file, run.start_epoch, run.total_epochs)
    train_model(run, one_epoch=train_one_epoch_phase1)
    run.logger.info("done: checkpoints in %s", run.ckpt_dir)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
