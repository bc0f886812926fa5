"""Small end-to-end run on CPU or GPU: synthetic LiDAR set -> OpenPCDet infos -> PointPillars
training -> KITTI-metric evaluation -> an OpenPCDet checkpoint.

    python tools/demo_pointpillars.py                      # KITTI layout, 3 classes
    python tools/demo_pointpillars.py --layout custom      # 4-class construction set

Every number it prints comes from this run.
"""
import argparse
import sys
import shutil
import time
from pathlib import Path

import pcdet_ext
import torch

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
from pcdet_ext.openpcdet.datasets import create_infos
from pcdet_ext.openpcdet.datasets import synthetic
from pcdet_ext.openpcdet.datasets import synthetic_writer
from pcdet_ext.engine.loop.runner import train_steps
from pcdet_ext.engine.startup import builders
from pcdet_ext.engine.evaluation import evaluate_model
from pcdet_ext.engine.recipes.progressive_rq.trainer import seed_everything
from pcdet_ext.utils.checkpoint import atomic_save

LAYOUTS = {
    "kitti": dict(cfg="cfgs/kitti_models/pointpillar.yaml", range="[0, -25.6, -3, 51.2, 25.6, 1]",
                  voxel=[0.32, 0.32, 4], scene=synthetic.SceneSpec(fov_deg=70.0, max_range=45.0)),
    "custom": dict(cfg="cfgs/custom_models/pointpillar_isarc_4class.yaml",
                   range="[-51.2, -51.2, -6, 51.2, 51.2, 10]", voxel=[0.64, 0.64, 16],
                   scene=synthetic.SceneSpec(max_range=45.0, sensor=synthetic.CONSTRUCTION_SCENE.sensor)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="kitti")
    parser.add_argument("--out", type=Path, default=Path("output/demo"))
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def overrides(layout: str) -> list:
    """``--set`` pairs for the small grid this demo trains on."""
    voxel_index = 2  # DATA_PROCESSOR: mask, shuffle, transform_points_to_voxels
    return ["DATA_CONFIG.POINT_CLOUD_RANGE", LAYOUTS[layout]["range"],
            f"DATA_CONFIG.DATA_PROCESSOR.{voxel_index}.VOXEL_SIZE", str(LAYOUTS[layout]["voxel"])]


def write_dataset(data: Path, layout: str, num_frames: int, seed: int) -> None:
    """Frames and OpenPCDet infos, built beside ``data`` and renamed into place only when complete,
    so an interrupted or failed run (e.g. OpenPCDet not importable) leaves nothing a rerun would
    take for a finished set."""
    spec = LAYOUTS[layout]
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if layout == "kitti":
        synthetic_writer.write_kitti(partial, num_frames, seed, spec=spec["scene"])
        create_infos.create_kitti(partial, workers=1)
    else:
        synthetic_writer.write_custom(partial, num_frames, seed, spec=spec["scene"])
        create_infos.create_custom(partial, synthetic_writer.CONSTRUCTION_CLASSES,
                                   dataset_cfg=find_config("cfgs/dataset_configs/custom_dataset_isarc.yaml"), workers=1)
    partial.rename(data)


def run(args) -> tuple:
    """Data, infos, training, evaluation, checkpoint. Returns (data root, checkpoint path)."""
    seed_everything(args.seed)  # python, numpy (OpenPCDet's augmentations) and torch: every run alike
    spec = LAYOUTS[args.layout]
    data = args.out / f"synthetic_{args.layout}_{args.num_frames}f_s{args.seed}"
    if not data.is_dir():
        write_dataset(data, args.layout, args.num_frames, args.seed)
    cfg = cfg_from_yaml_file(find_config(spec["cfg"]))
    cfg_from_list(overrides(args.layout), cfg)
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(
        cfg, data, args.batch_size, args.workers)
    model = builders.build_model(cfg, train_set).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.iters, pct_start=0.3)
    t0 = time.time()
    losses, _ = train_steps(model, train_loader, optimizer, args.iters, scheduler, progress=True)
    train_s = time.time() - t0
    k = max(1, len(losses) // 10)
    print(f"trained {args.iters} iterations in {train_s:.0f} s: loss {sum(losses[:k]) / k:.3f} (first {k}) -> "
          f"{sum(losses[-k:]) / k:.3f} (last {k})")
    _, result_str, result = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES)
    print(result_str)
    ckpt = atomic_save({"epoch": 1, "it": args.iters, "model_state": model.state_dict(),
                        "optimizer_state": optimizer.state_dict(), "version": f"pcdet_ext+{pcdet_ext.__version__}"},
                       args.out / "ckpt" / f"pointpillar_{args.layout}_demo.pth")
    print(f"checkpoint: {ckpt}")
    return data, ckpt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.demo_pointpillars
    sys.exit(main())
