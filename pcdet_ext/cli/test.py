"""Evaluate checkpoints of an OpenPCDet-layout run (rank 0, one process).

    python tools/test.py --cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml \\
        --ckpt output/custom_models/.../ckpt/checkpoint_epoch_80.pth
    python tools/test.py --cfg_file ... --extra_tag finetune --eval_all    # every checkpoint not yet evaluated

``--eval_all`` evaluates what is pending in ``ckpt/`` (recorded in eval/eval_all_default/
eval_list_val.txt) and returns when nothing is left, instead of upstream's endless wait.
"""
import argparse
import sys
from pathlib import Path

from pcdet_ext.config import ConfigError
from pcdet_ext.engine.startup.args import add_set_argument, load_config, output_dir
from pcdet_ext.engine.evaluation import build_test_loader, evaluate, load_for_eval, mark_done, pending_checkpoints
from pcdet_ext.engine.startup.builders import create_logger
from pcdet_ext.utils.checkpoint import CheckpointError, load_checkpoint, model_state_of


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", required=True)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--extra_tag", default="default")
    p.add_argument("--ckpt", default=None, help="one checkpoint to evaluate")
    p.add_argument("--ckpt_dir", default=None, help="with --eval_all (default: the run's ckpt/)")
    p.add_argument("--eval_all", action="store_true")
    p.add_argument("--eval_tag", default="default")
    p.add_argument("--save_to_file", action="store_true")
    p.add_argument("--infer_time", action="store_true")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none", help="accepted; evaluation runs on rank 0")
    p.add_argument("--tcp_port", type=int, default=18888)
    add_set_argument(p, default=None)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.cfg_file, args.set_cfgs)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = output_dir(cfg, args.extra_tag)
    if not args.ckpt and not args.eval_all:
        print("error: give --ckpt PATH or --eval_all", file=sys.stderr)
        return 2
    try:
        if args.ckpt:  # before any data or model is built
            model_state_of(load_checkpoint(args.ckpt), args.ckpt, "--ckpt", expected="an OpenPCDet checkpoint")
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: --ckpt: {exc}" if isinstance(exc, FileNotFoundError) else f"error: {exc}", file=sys.stderr)
        return 2
    eval_root = out / "eval" / ("eval_all_" + args.eval_tag if args.eval_all else "epoch_eval") / args.eval_tag
    eval_root.mkdir(parents=True, exist_ok=True)
    logger = create_logger(eval_root / "log_eval.txt")
    from pcdet.models import build_network
    try:
        test_set, loader, _ = build_test_loader(cfg, args.batch_size or cfg.OPTIMIZATION.BATCH_SIZE_PER_GPU,
                                                args.workers, logger)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=test_set)
    if args.ckpt:
        todo, record = [Path(args.ckpt)], None
    else:
        record = eval_root / "eval_list_val.txt"
        todo = pending_checkpoints(Path(args.ckpt_dir) if args.ckpt_dir else out / "ckpt", record)
        if not todo:
            logger.info("every checkpoint is already evaluated (%s)", record)
    for path in todo:
        try:
            epoch = load_for_eval(model, path, logger)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        evaluate(cfg, model, loader, epoch, logger, eval_root / f"epoch_{epoch}", args.save_to_file, args.infer_time)
        if record is not None:
            mark_done(record, path)
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.test
    sys.exit(main())
