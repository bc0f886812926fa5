"""The main job on a small default, CPU or GPU, in a few minutes:

1. a synthetic LiDAR set (KITTI layout) and its OpenPCDet infos,
2. a small PointPillars trained on it (tools/demo_pointpillars.py; reused when its checkpoint exists),
3. a short progressive RQ schedule on that model (default 2 codebooks x [16, 64]),
4. the bitstream models fitted on the train frames, the val frames coded to real bytes,
5. the evaluation sweep: rate/accuracy table (measured bytes), CSV/JSON and the plot.

    python tools/demo_split_rq.py [--out output/split_demo] [--iters 300] [--schedule 16,64]

Every number printed comes from this run.
"""
import argparse
import sys
from pathlib import Path
from typing import Tuple

import yaml

from pcdet_ext.cli import demo_pointpillars, split_infer, train_eval_rq
from pcdet_ext.engine.recipes.progressive_rq import checkpoints as ck
from pcdet_ext.engine.recipes.progressive_rq import experiment, schema


def add_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The demo's flags (the detector's, then the RQ schedule's), output under ``out`` by default."""
    demo_pointpillars.add_arguments(parser)
    parser.set_defaults(out=out, iters=300, num_frames=64)  # 48 train, 16 val frames
    parser.add_argument("--n_codebook", type=int, default=2)
    parser.add_argument("--schedule", default="16,64")
    parser.add_argument("--stage_epochs", type=int, default=2)
    parser.add_argument("--warmup_epochs", type=int, default=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, Path("output/split_demo"))
    args = parser.parse_args(argv)
    try:
        config, bitstream = train(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    print(f"experiment config: {config}; the evaluation again: "
          f"python tools/train_eval_rq.py --config {config} --mode eval --eval_sweep --rq_ckpt {bitstream}")
    return train_eval_rq.main(["--config", str(config), "--mode", "eval", "--eval_sweep", "--rq_ckpt", str(bitstream)])


def train(args) -> Tuple[Path, Path]:
    """Steps 1-4: the detector (reused when its checkpoint exists), the progressive RQ run, the fitted
    bitstream models. Returns (experiment config, RQ checkpoint with its bitstream models); a failing
    step exits (SystemExit with its return code)."""
    ckpt = args.out / "ckpt" / f"pointpillar_{args.layout}_demo.pth"
    data = args.out / f"synthetic_{args.layout}_{args.num_frames}f_s{args.seed}"
    if not ckpt.is_file():
        data, ckpt = demo_pointpillars.run(args)
    else:
        print(f"reusing {ckpt}")
    schedule = [int(s) for s in args.schedule.split(",")]
    stages = args.n_codebook * len(schedule)
    model_cfg = write_model_cfg(args)
    exp = {"seed": args.seed, "dataset": {"name": "KITTI" if args.layout == "kitti" else "custom", "dir": str(data.resolve()),
                       "num_classes": 3 if args.layout == "kitti" else 4},
           "model": {"n_codebook": args.n_codebook, "pretrained_weight": str(ckpt.resolve()),
                     "cfg_file": str(model_cfg.resolve())},
           "progressive_learning": {"embedding_schedule": schedule, "embedding_stage_epochs": args.stage_epochs,
                                    "warmup_epochs": args.warmup_epochs},
           "training": {"batch_size": args.batch_size, "num_workers": args.workers,
                        "max_epoch": stages * args.stage_epochs, "ckpt_freq_epoch": args.stage_epochs,
                        "init_lr": 0.002},
           "rq_model": {"latent_shape": [256, 256, 64], "code_shape": [256, 256, 1]},
           "logging": {"use_wandb": False, "saved_path": str((args.out / "rq").resolve())}}
    config = args.out / "split_demo.yaml"
    config.write_text(yaml.safe_dump(exp, sort_keys=False))
    rc = train_eval_rq.main(["--config", str(config)])
    if rc:
        raise SystemExit(rc)
    return config, fit_bitstream(config, data)


def fit_bitstream(config: Path, data: Path) -> Path:
    """The bitstream models fitted on the train frames (``split_infer.py --fit_models``, which then codes
    the val frames to real bytes, one line each), so the sweep's "measured" column holds measured bytes.
    Returns the checkpoint that carries them."""
    exp, _, _ = experiment.load_experiment(config)
    best = ck.RunDir(Path(exp.logging.saved_path)).latest_stage_best(schema.stage_plan(exp))
    rc = split_infer.main(["--ckpt", str(best), "--data_path", str(data), "--fit_models", "--fit_split", "train"])
    if rc:
        raise SystemExit(rc)
    return best.with_name(best.stem + "_bitstream.pth")


def write_model_cfg(args) -> Path:
    """The RQ model config with the demo's small grid applied, written next to the experiment config,
    so that ``--config split_demo.yaml`` alone reproduces this run's model (and its evaluation)."""
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
    from pcdet_ext.utils.checkpoint import plain
    base = "cfgs/kitti_models/pointpillar_rq.yaml" if args.layout == "kitti" else \
        "cfgs/custom_models/pointpillar_rq_isarc_4class.yaml"
    cfg = cfg_from_list(demo_pointpillars.overrides(args.layout), cfg_from_yaml_file(find_config(base)))
    path = args.out / f"{Path(base).stem}_demo.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    return path


if __name__ == "__main__":  # python -m pcdet_ext.cli.demo_split_rq
    sys.exit(main())
