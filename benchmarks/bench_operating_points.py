"""Effect of operating-point training on the nested RQ bottleneck, on real pillar features.

Pillar features come from a trained PointPillars' PillarVFE (OpenPCDet, --ckpt, e.g. the
checkpoint tools/demo_pointpillars.py writes) applied to the real KITTI frames in --data (a
create_data.py output: train split to fit, val split to measure). The quantizer is trained
progressively (codebook by codebook, size by size, EMA warm-up then codebook-loss gradient
steps) twice: with operating-point training (sample k from the schedule per batch) and without
(train each stage only at its own size). Prints the relative reconstruction error
||x - x_hat||^2 / ||x||^2 on the val pillars for every (codebooks, entries) cell.

    python benchmarks/bench_operating_points.py --ckpt output/demo/ckpt/pointpillar_kitti_demo.pth \
        --data output/kitti_mini
"""
import argparse
import json
from pathlib import Path

import torch

import pcdet_ext  # noqa: F401
from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
from pcdet_ext.engine.startup import builders
from pcdet_ext.algorithms.quantization import ResidualQuantizer
from pcdet_ext.algorithms.quantization.fit import fit_progressive
from pcdet_ext.utils.checkpoint import load_checkpoint


def pillar_features(cfg, data, ckpt, training):
    from pcdet.models import load_data_to_gpu
    cfg.DATA_CONFIG.DATA_AUGMENTOR.DISABLE_AUG_LIST = [a.NAME for a in cfg.DATA_CONFIG.DATA_AUGMENTOR.AUG_CONFIG_LIST]
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, data, batch_size=1)
    model = builders.build_model(cfg, train_set)
    state = load_checkpoint(ckpt)["model_state"]
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("vfe.")}, strict=False)
    model.eval()
    feats = []
    for batch in (train_loader if training else test_loader):
        load_data_to_gpu(batch)
        with torch.no_grad():
            feats.append(model.vfe(batch)["pillar_features"])
    return torch.cat(feats)


def train(x, depth, schedule, op_training, steps, seed=0):
    torch.manual_seed(seed)
    q = ResidualQuantizer(dim=x.shape[1], num_codebooks=depth, codebook_size=schedule[-1], schedule=schedule,
                          operating_point_training=op_training)
    return fit_progressive(q, x, depth, schedule, steps)


def rel_err(q, x, n, k):
    q.eval()
    q.set_active(n, k)
    with torch.no_grad():
        return float((q.decode(q.encode(x)) - x).pow(2).sum() / x.pow(2).sum())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cfg_file", default="cfgs/kitti_models/pointpillar.yaml")
    parser.add_argument("--range", default="[0, -25.6, -3, 51.2, 25.6, 1]")
    parser.add_argument("--voxel", default="[0.2, 0.2, 4]")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--schedule", default="16,64,256")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        voxel = json.loads(args.voxel)
    except ValueError:
        voxel = None
    if not (isinstance(voxel, list) and len(voxel) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in voxel)):
        parser.error(f"--voxel: expected three positive sizes like [0.2, 0.2, 4], got {args.voxel!r}")
    cfg = cfg_from_yaml_file(find_config(args.cfg_file))
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", args.range], cfg)
    for proc in cfg.DATA_CONFIG.DATA_PROCESSOR:
        if proc.NAME == "transform_points_to_voxels":
            proc.VOXEL_SIZE = voxel
    for aug in cfg.DATA_CONFIG.DATA_AUGMENTOR.AUG_CONFIG_LIST:
        if aug.NAME == "gt_sampling":
            aug.USE_ROAD_PLANE = False
    x_train = pillar_features(cfg, args.data, args.ckpt, training=True)
    x_val = pillar_features(cfg, args.data, args.ckpt, training=False)
    schedule = [int(s) for s in args.schedule.split(",")]
    print(f"pillar features: {len(x_train)} train, {len(x_val)} val (real KITTI frames, {args.ckpt.name} VFE)")
    models = {flag: train(x_train, args.depth, schedule, flag, args.steps) for flag in (True, False)}
    print("relative reconstruction error on val pillars (lower is better)")
    print(f"{'cell (n, k)':>12} | {'op-training':>11} | {'stage-only':>10} | ratio")
    for n in range(1, args.depth + 1):
        for k in schedule:
            a, b = rel_err(models[True], x_val, n, k), rel_err(models[False], x_val, n, k)
            print(f"{str((n, k)):>12} | {a:11.4f} | {b:10.4f} | {a / b:5.2f}")


if __name__ == "__main__":
    main()
