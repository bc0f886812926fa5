"""Progressive RQ training and evaluation of PointPillarRQ (split inference).

    python tools/train_eval_rq.py --config cfgs/exp/split1_ALL.yaml                 # progressive training
    python tools/train_eval_rq.py --config cfgs/exp/split1_ALL.yaml --gpu 0 --no_wandb
    python tools/train_eval_rq.py --config cfgs/exp/split1_ALL.yaml --mode eval \\
        --eval_num_codebooks 3 --eval_num_embeddings 64 --rq_ckpt path/to/checkpoint.pth
    python tools/train_eval_rq.py --config cfgs/exp/split1_ALL.yaml --mode eval --eval_sweep
    torchrun --nproc_per_node 2 tools/train_eval_rq.py --config ... --launcher pytorch

``--set`` takes ``section.key VALUE`` pairs of the experiment schema (``training.max_epoch 10``)
and UPPER-CASE keys of the OpenPCDet model config (``DATA_CONFIG.POINT_CLOUD_RANGE [...]``).
Outputs: ``<logging.saved_path>[/<extra_tag>]/{checkpoints,tensorboard,eval}``.
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch

from pcdet_ext.config import ConfigError
from pcdet_ext.engine.checkpointing import ResumeError
from pcdet_ext.engine.startup.distributed import init_dist, leave_process_group
from pcdet_ext.engine.startup.builders import create_logger
from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.engine.recipes.progressive_rq import experiment
from pcdet_ext.engine.recipes.progressive_rq import schema
from pcdet_ext.engine.recipes.progressive_rq.evaluate import check_cell, quantizer_mismatch, run_eval
from pcdet_ext.algorithms.rate import dense_float32_kb
from pcdet_ext.deploy.sweep import format_table, sweep
from pcdet_ext.engine.recipes.progressive_rq.trainer import ProgressiveTrainer
from pcdet_ext.deploy.runtime import rq_checkpoint
from pcdet_ext.engine.recipes.progressive_rq.measured import stored_models
from pcdet_ext.utils.console import DiskFull, disk_full_is_one_line, message
from pcdet_ext.utils.checkpoint import CheckpointError, plain
from pcdet_ext.engine.startup.args import add_set_argument


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="experiment YAML (split1_ALL.yaml schema)")
    p.add_argument("--mode", choices=["train", "eval"], default=None, help="overrides training.mode")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device (hardware.gpu)")
    p.add_argument("--no_wandb", action="store_true", help="tensorboard only")
    p.add_argument("--eval_num_codebooks", type=int, default=None)
    p.add_argument("--eval_num_embeddings", type=int, default=None)
    p.add_argument("--rq_ckpt", type=Path, default=None,
                   help="checkpoint to evaluate (default: the last stage's best, which holds every trained codebook)")
    p.add_argument("--eval_sweep", action="store_true", help="evaluate every trained (codebooks, entries) cell")
    p.add_argument("--eval_lambdas", type=float, nargs="+", default=None,
                   help="with --eval_sweep: also the last cell coded rate-aware at each lambda (evaluation.rate_lambdas)")
    p.add_argument("--use_amp", action="store_true", default=None,
                   help="mixed precision (training.use_amp); the quantizer and its EMA stay fp32")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--tcp_port", type=int, default=18888, help="rendezvous port without torchrun's MASTER_PORT")
    p.add_argument("--extra_tag", default=None, help="sub-folder of logging.saved_path for this run")
    add_set_argument(p, default=[])
    return p.parse_args(argv)


def cli_values(args) -> dict:
    """The flags that set an experiment key: ``{(section, key): value}`` (None: not given)."""
    return {("training", "mode"): args.mode, ("training", "batch_size"): args.batch_size,
            ("training", "num_workers"): args.workers, ("training", "use_amp"): args.use_amp,
            ("hardware", "gpu"): args.gpu,
            ("evaluation", "use_num_codebook"): args.eval_num_codebooks,
            ("evaluation", "use_num_embedding"): args.eval_num_embeddings,
            ("evaluation", "rq_ckpt"): str(args.rq_ckpt) if args.rq_ckpt else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        exp, pcdet_set, notes = experiment.load_experiment(
            args.config, args.set_cfgs, cli_values(args), no_wandb=args.no_wandb)
        cfg = experiment.build_model_cfg(exp, pcdet_set)
        if exp.evaluation.rq_ckpt:  # before any data or model is built
            rq_checkpoint(exp.evaluation.rq_ckpt, "--rq_ckpt")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        print(f"config error: {message(exc)}", file=sys.stderr)
        return 2
    for line in notes:
        print(line, file=sys.stderr)
    if exp.training.mode == "train":
        print(schema.describe_loss(exp), file=sys.stderr)
    info = init_dist(args.launcher, args.tcp_port)
    if info.world_size == 1 and torch.cuda.is_available() and exp.hardware.gpu is not None:
        torch.cuda.set_device(exp.hardware.gpu)
    root = Path(exp.logging.saved_path) / args.extra_tag if args.extra_tag else Path(exp.logging.saved_path)
    run = ck.RunDir(root)
    if exp.training.mode == "train" and info.is_main:
        try:  # before any work: never continue another config's run in this folder
            run.resume_point(plain(exp), clean=False)
        except (FileExistsError, ResumeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = create_logger(root / f"log_{exp.training.mode}_{stamp}.txt", rank=info.rank)
    model, train, val, selection = experiment.build(exp, cfg, info.world_size > 1, log)
    names = experiment.class_names(cfg)
    if exp.training.mode == "train":
        log.info("experiment %s -> %s", args.config, root)
        model.load_pretrained_pointpillars(exp.model.pretrained_weight, log)
        try:
            with disk_full_is_one_line():
                ProgressiveTrainer(exp, model, (train, selection), cfg, run, log, info,
                                   use_wandb=exp.logging.use_wandb).fit()
        except DiskFull:
            return 2
    leave_process_group(info)  # what follows is rank 0's alone
    if not info.is_main or (exp.training.mode == "train" and not args.eval_sweep):
        return 0
    ckpt_path = Path(exp.evaluation.rq_ckpt) if exp.evaluation.rq_ckpt else run.latest_stage_best(schema.stage_plan(exp))
    if ckpt_path is None:
        print(f"error: no --rq_ckpt and no stage checkpoint under {run.checkpoints}", file=sys.stderr)
        return 2
    state = rq_checkpoint(ckpt_path, "--rq_ckpt")
    mismatch = quantizer_mismatch(model, state, ckpt_path, args.config)
    if mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return 2
    model.load_state_dict(state["model_state"])
    bitstream = stored_models(state)  # fitted by split_infer.py --fit_models: rates are then measured
    log.info("evaluating %s", ckpt_path)
    if args.eval_sweep:
        schedule = list(exp.progressive_learning.embedding_schedule) if exp.progressive_learning.enabled \
            else [exp.rq_model.codebook_size]
        try:
            lams = schema.lambdas(args.eval_lambdas, "--eval_lambdas") if args.eval_lambdas is not None \
                else exp.evaluation.rate_lambdas
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if any(lams) and bitstream is None:
            print(f"error: rate lambdas {lams} need bitstream models in {ckpt_path} (split_infer.py --fit_models)",
                  file=sys.stderr)
            return 2
        try:
            summary = sweep(model, val[0], val[1], names, schedule, run.eval, log, exp.evaluation.test_combinations,
                            checkpoint=ckpt_path, bitstream=bitstream, lambdas=lams,
                            selected_on=experiment.describe_selection(state.get("config")))
        except ValueError as exc:  # a cell the checkpoint was not trained for (named by check_cell)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_table(summary))
        print(f"wrote {run.eval / 'sweep.csv'}, {run.eval / 'sweep.json'}, {run.eval / 'sweep.png'}")
        return 0
    q = model.quantizer
    trained = q.trained_depth
    n = exp.evaluation.use_num_codebook or trained
    k = exp.evaluation.use_num_embedding or (int(q.trained_size[n - 1]) if 1 <= n <= trained else 1)
    def source(flag, value, key):  # where a value came from, for the messages
        if value is not None:
            return flag
        return f"evaluation.{key}" if getattr(exp.evaluation, key) is not None else "the default"

    try:
        warning = check_cell(q, n, k, source("--eval_num_codebooks", args.eval_num_codebooks, "use_num_codebook"),
                             source("--eval_num_embeddings", args.eval_num_embeddings, "use_num_embedding"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(warning, file=sys.stderr)
    res = run_eval(model, val[0], val[1], names, n, k, bitstream=bitstream)
    grid = val[0].grid_size
    print(res["result_str"])
    print(f"operating point: {n} codebook(s) x {k} entries; mAP (3D moderate R40) {res['mAP']:.2f}")
    if "kb_per_frame_measured" in res:
        print(f"measured rate: {res['bytes_per_frame_measured']:.0f} bytes = {res['kb_per_frame_measured']:.2f} KB per "
              f"frame (serialised frames under the checkpoint's bitstream models)")
    else:
        print("measured rate: none (no bitstream models in the checkpoint: tools/split_infer.py --fit_models); "
              "the rates below are estimates")
    print(f"rate estimates per frame: {res['pillars_per_frame']:.0f} pillars; codes {res['code_bits_fixed'] / 8192:.2f} KB "
          f"fixed-length, {res['code_bits_entropy'] / 8192:.2f} KB at their empirical entropy; occupancy "
          f"{res['occupancy_bits_fixed'] / 8192:.2f} KB raw, {res['occupancy_bits_entropy'] / 8192:.2f} KB i.i.d. "
          f"entropy bound; total {res['kb_per_frame_fixed']:.2f} KB (fixed) / {res['kb_per_frame_entropy']:.2f} KB "
          f"(entropy) vs {dense_float32_kb(int(grid[1]), int(grid[0]), q.dim):.0f} KB float32 BEV")
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.train_eval_rq
    sys.exit(main())
