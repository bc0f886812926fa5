"""Train (fine-tune) an OpenPCDet detector with pcdet_ext's optimizer builder (per-module LR that
survives OneCycle), OpenPCDet's flags, output layout and checkpoint format; evaluates at the end.

    python tools/train.py --cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml \\
        --pretrained_model output/.../ckpt/checkpoint_epoch_30.pth --batch_size 8 --extra_tag finetune
    cd tools && bash scripts/dist_train.sh 2 --cfg_file ... --pretrained_model ...   # torchrun, gloo on CPU

``--pretrained_model``: name-and-shape matched partial load, coverage per module logged, refused
when the backbone coverage is below ``--pretrained_min_coverage``.
"""
import argparse
import sys

from pcdet_ext.config import ConfigError
from pcdet_ext.engine.checkpointing import ResumeError
from pcdet_ext.engine.startup.args import add_train_args
from pcdet_ext.engine.evaluation import build_test_loader, evaluate
from pcdet_ext.engine.pretrained import PretrainedWeightsError
from pcdet_ext.engine.startup.prepare import check_training_inputs, prepare_training
from pcdet_ext.engine.recipes.epochs import train_model
from pcdet_ext.utils.console import DiskFull, disk_full_is_one_line
from pcdet_ext.utils.checkpoint import CheckpointError


def main(argv=None) -> int:
    parser = add_train_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--pretrained_min_coverage", type=float, default=0.9,
                        help="least share of backbone tensors --pretrained_model must provide")
    parser.add_argument("--max_iters_per_epoch", type=int, default=None, help="cap iterations per epoch (smoke runs)")
    parser.add_argument("--skip_eval", action="store_true", help="no evaluation after training")
    parser.add_argument("--label_fraction", type=float, default=1.0,
                        help="train on this share of the labelled frames (0 < f <= 1; gt_sampling keeps only their objects)")
    parser.add_argument("--label_seed", type=int, default=0, help="which frames --label_fraction keeps")
    args = parser.parse_args(argv)
    if not 0 < args.label_fraction <= 1:
        parser.error(f"--label_fraction {args.label_fraction}: expected 0 < fraction <= 1")
    splits = ("train",) if args.skip_eval else ("train", "test")  # the final evaluation reads the test split
    try:
        if args.preflight_only:
            check_training_inputs(args, splits=splits)
            return 0
        run = prepare_training(args, min_backbone_coverage=args.pretrained_min_coverage, splits=splits)
    except (ConfigError, CheckpointError, ResumeError, PretrainedWeightsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run.logger.info("training %s from epoch %d to %d", args.cfg_file, run.start_epoch, run.total_epochs)
    try:
        with disk_full_is_one_line():
            train_model(run)
    except DiskFull:
        return 2
    if run.info.is_main and not args.skip_eval:
        _, test_loader, _ = build_test_loader(run.cfg, args.batch_size or run.cfg.OPTIMIZATION.BATCH_SIZE_PER_GPU,
                                              args.workers, run.logger)
        evaluate(run.cfg, run.model, test_loader, run.total_epochs, run.logger,
                 run.output_dir / "eval" / "eval_with_train" / f"epoch_{run.total_epochs}")
    run.finish()
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.train
    sys.exit(main())
