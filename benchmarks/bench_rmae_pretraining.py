"""R-MAE + CMAE Phase 1 figures (needs OpenPCDet; CPU or GPU).

    python benchmarks/bench_rmae_pretraining.py time     # pretraining vs supervised iteration, same batch
    python benchmarks/bench_rmae_pretraining.py memory   # our occupancy decoder vs R-MAE's dense decoder
    python benchmarks/bench_rmae_pretraining.py occupancy --train_dir DIR --eval_dir DIR --iters 200
    python benchmarks/bench_rmae_pretraining.py masking [--train_dir DIR]   # masking statistics, ray-cast cost

time: VoxelNeXt encoder on a synthetic 4-class batch; reference = a supervised iteration of the same
encoder + VoxelNeXtHead (forward, backward, optimizer step) on the same batch; ratio target <= 1.5.
memory: peak RSS growth (sampled every ms) of decoder forward + loss + backward, each in a fresh process, on the same
encoder output; reference = R-MAE's decoder (three dense ConvTranspose3d back to the full voxel grid,
BCE over every voxel); ratio target <= 0.5. On a GPU, torch.cuda.max_memory_allocated instead.
occupancy: pretrains on the scans of --train_dir (shipped config, x/y range and voxel size as below),
and, as controls, the same decoder over the untrained (frozen random) encoder, trained at doubling
budgets until its loss plateaus (--control_max_iters), and a scene-blind height x range prior (how
often a cell at that height and range was occupied in the training scans); then on every scan of
--eval_dir, with the same fixed masks: AP of masked-only cells against ray-cast free space for each and
for grow-visible (visible cells dilated by one target cell, scored by distance). Last line:
"masked occupancy AP: model x | grow-visible y | random encoder z | height x range prior w".
masking: the shipped masking on real scans (ratio, whole-group share, per-band ratios), and the
ray-cast targets' cost per frame, at the shipped config's full resolution.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pcdet_ext  # noqa: F401
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
PRE = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml"
FT = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml"
RAW = REPO.parent / "shared/data/kitti_raw_2011_09_26/velodyne"
PRIOR = "height x range prior"


def config(path, data, half, voxel):
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    cfg = cfg_from_yaml_file(path)
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", f"[{-half}, {-half}, -4, {half}, {half}, 4]",
                   "DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE", f"[{voxel}, {voxel}, 0.2]"], cfg)
    cfg.DATA_CONFIG.DATA_PATH = str(data)
    return cfg


def synthetic_set(tmp: Path) -> Path:
    from pcdet_ext.openpcdet.datasets import create_infos
    from pcdet_ext.openpcdet.datasets import synthetic_writer
    root = synthetic_writer.write_custom(tmp / "isarc", num_frames=6, seed=1, val_fraction=0.34)
    return create_infos.create_custom(root, synthetic_writer.CONSTRUCTION_CLASSES,
                                      dataset_cfg=REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml", workers=1)


def first_batch(cfg, root, batch_size=2):
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    (ds, loader, _), _ = builders.build_loaders(cfg, root, batch_size=batch_size)
    allow_unlabelled(ds)
    return ds, next(iter(loader))


def step_time(cfg, ds, batch, reps):
    import copy

    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.loop.hooks import CallbackHook
    from pcdet_ext.engine.optimization import build_optimizer
    from pcdet_ext.engine.loop.runner import Runner
    model = builders.build_model(cfg, ds)
    opt = build_optimizer(model, cfg.OPTIMIZATION)
    runner = Runner(model, opt, hooks=[CallbackHook(model.update_teacher)] if hasattr(model, "update_teacher") else [])
    model.train()
    times = []
    for i in range(reps + 1):
        b = copy.deepcopy(batch)
        t = time.perf_counter()
        runner.step(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cmd_time(args):
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp))
        pre, ft = config(PRE, root, args.half, args.voxel), config(FT, root, args.half, args.voxel)
        ds, batch = first_batch(ft, root)
        voxels = int(batch["voxel_coords"].shape[0])
        t_sup = step_time(ft, ds, batch, args.reps)
        ds_pre, _ = first_batch(pre, root)
        t_pre = step_time(pre, ds_pre, batch, args.reps)
    print(f"batch of 2 frames, {voxels} voxels, grid {ds.grid_size.tolist()}, median of {args.reps} iterations")
    print(f"supervised VoxelNeXt + VoxelNeXtHead (reference): {t_sup * 1000:.0f} ms")
    print(f"R-MAE + CMAE Phase 1 pretraining (student + teacher + decoder): {t_pre * 1000:.0f} ms")
    print(f"ratio {t_pre / t_sup:.2f} (target <= 1.5)")


class RMAEDenseDecoder(nn.Module):
    """R-MAE's decoder: three dense ConvTranspose3d from the stride-8 3D features to the full grid."""

    def __init__(self, channels, depth_scale):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose3d(channels, 32, 3, padding=1, output_padding=1, stride=2, bias=False),
            nn.BatchNorm3d(32), nn.ReLU(),
            nn.ConvTranspose3d(32, 8, 3, padding=1, output_padding=(depth_scale[0] - 1, 1, 1),
                               stride=(depth_scale[0], 2, 2), bias=False), nn.BatchNorm3d(8), nn.ReLU(),
            nn.ConvTranspose3d(8, 1, 3, padding=1, output_padding=(depth_scale[1] - 1, 1, 1),
                               stride=(depth_scale[1], 2, 2), bias=False))


class RSSPeak:
    """Peak resident memory above the level at start, sampled from /proc/self/statm every millisecond."""

    def __enter__(self):
        import os
        import threading
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mib(self):
        return (self.peak - self.base) / 2 ** 20


def decoder_peak(kind, blob):
    """Run in a fresh process: peak memory growth of one decoder forward + loss + backward."""
    from pcdet_ext.algorithms.occupancy import (CellGeometry, OccupancyConfig, OccupancyDecoder, occupancy_loss,
                                                 occupancy_targets, sparse_to_bev)
    d = torch.load(blob, weights_only=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full, b = d["full_shape"].tolist(), int(d["batch_size"])
    if kind == "ours":
        cfg = OccupancyConfig()
        feats = d["enc_features"].to(dev).requires_grad_(True)
        dec = OccupancyDecoder(cfg, feats.shape[1], int(d["enc_depth"]), 8, full).to(dev)
    else:
        feats = d["x4_features"].to(dev).requires_grad_(True)
        depth4 = int(d["x4_shape"][0])
        dec = RMAEDenseDecoder(feats.shape[1], (4, 3)).net.to(dev)
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    meter = RSSPeak().__enter__()
    if kind == "ours":
        logits = dec(feats, d["enc_indices"].to(dev), d["enc_shape"].tolist(), b)
        geo = CellGeometry.of(b, full, d["voxel_size"].tolist(), d["pc_range"].tolist(), cfg)
        t = occupancy_targets(d["coords"].to(dev), d["masked"].to(dev), d["points"].to(dev), geo, cfg,
                              torch.Generator().manual_seed(0))
        loss = occupancy_loss(logits, t, cfg)
    else:
        dense = sparse_to_bev(feats, d["x4_indices"].to(dev), d["x4_shape"].tolist(), b)
        dense = dense.view(b, feats.shape[1], depth4, *dense.shape[-2:])
        pred = dec(dense)[:, 0, :full[0], :full[1], :full[2]]
        target = torch.zeros(b, *full, device=dev)
        c = d["coords"].to(dev).long()
        target[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = 1.0
        loss = F.binary_cross_entropy_with_logits(pred, target)
    loss.backward()
    meter.__exit__(None, None, None)
    if dev.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return meter.mib


def cmd_memory(args):
    from pcdet_ext.engine.startup import builders
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp))
        cfg = config(PRE, root, args.half, args.voxel)
        ds, batch = first_batch(cfg, root)
        model = builders.build_model(cfg, ds)
        from pcdet.models import load_data_to_gpu
        load_data_to_gpu(batch)
        model.train()
        with torch.no_grad():
            model(batch)
        enc, x4 = batch["encoded_spconv_tensor"], batch["multi_scale_3d_features"]["x_conv4"]
        coords = batch["voxel_coords"].long()
        bb = model.backbone_3d
        from pcdet_ext.algorithms.masking import mask_voxels
        mask = mask_voxels(coords, 2, bb.voxel_size, bb.point_cloud_range, bb.mask_cfg, seed=0)
        x4_unique = torch.unique(x4.indices[:len(x4.indices)], dim=0, return_inverse=True)
        blob = Path(tmp) / "enc.pt"
        feats4 = torch.zeros(len(x4_unique[0]), x4.features.shape[1]).index_add_(0, x4_unique[1], x4.features)
        torch.save({"enc_features": enc.features, "enc_indices": enc.indices, "enc_shape": torch.tensor(enc.spatial_shape),
                    "enc_depth": torch.tensor(1), "x4_features": feats4, "x4_indices": x4_unique[0],
                    "x4_shape": torch.tensor(x4.spatial_shape), "coords": coords, "masked": mask.masked,
                    "full_shape": torch.tensor(bb.full_shape), "batch_size": torch.tensor(2),
                    "points": batch["points"], "voxel_size": torch.tensor(bb.voxel_size),
                    "pc_range": torch.tensor(bb.point_cloud_range)}, blob)
        peaks = {}
        for kind in ("ours", "rmae"):
            out = subprocess.run([sys.executable, __file__, "_peak", kind, str(blob)], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"batch of 2, full grid (z, y, x) {bb.full_shape}; decoder forward + loss + backward, peak growth")
    print(f"R-MAE dense full-resolution decoder (reference): {peaks['rmae']:.0f} MiB")
    print(f"pcdet_ext coarse occupancy decoder (stride 2): {peaks['ours']:.0f} MiB")
    print(f"ratio {peaks['ours'] / peaks['rmae']:.2f} (target <= 0.5)")


def train_pretraining(cfg, ds, loader, iters, freeze_encoder=False, desc="train", seed=0):
    """``iters`` pretraining steps (OpenPCDet's model_fn, the shipped schedule) from ``seed``; with
    ``freeze_encoder`` the encoder keeps its random initial weights and only the decoder learns (the
    random-encoder baseline)."""
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler
    torch.manual_seed(seed)
    model = builders.build_model(cfg, ds)
    if hasattr(model, "set_total_steps"):  # Phase 2: the teacher momentum schedule spans the run
        model.set_total_steps(iters)
    bb = model.backbone_3d
    if freeze_encoder:
        for name, p in bb.named_parameters():
            if name in bb._encoder_params:
                p.requires_grad_(False)
    opt = build_optimizer(model, cfg.OPTIMIZATION)
    sched, _ = build_scheduler(opt, iters, 1, -1, cfg.OPTIMIZATION)
    t0 = time.time()
    from pcdet_ext.engine.loop.hooks import CallbackHook
    from pcdet_ext.engine.loop.runner import train_steps
    losses, _ = train_steps(model, builders.one_pass_loader(loader, iters), opt, steps=iters, scheduler=sched,
                            progress=True, hooks=[CallbackHook(model.update_teacher)])
    final = statistics.mean(losses[-10:])
    print(f"{desc}: {iters} iterations in {time.time() - t0:.0f} s, loss {losses[0]:.3f} -> {final:.3f}",
          file=sys.stderr)
    return model, final


def train_control_to_plateau(cfg, ds, loader, iters, max_iters, tolerance=0.02):
    """The random-encoder control (only the decoder learns) at budgets iters, 2 iters, 4 iters, ... (each a
    fresh run over its own schedule) until a doubling lowers the final loss by less than ``tolerance``
    (relative) or the budget would pass ``max_iters``; returns the last model, the budgets' losses and
    whether it plateaued."""
    model, loss = train_pretraining(cfg, ds, loader, iters, freeze_encoder=True, desc="random encoder")
    history = [(iters, loss)]
    while 2 * history[-1][0] <= max_iters:
        budget = 2 * history[-1][0]
        longer, longer_loss = train_pretraining(cfg, ds, loader, budget, freeze_encoder=True,
                                                desc=f"random encoder, {budget} iterations")
        improved = (history[-1][1] - longer_loss) / max(abs(history[-1][1]), 1e-12)
        model = longer
        history.append((budget, longer_loss))
        if improved < tolerance:
            return model, history, True
    return model, history, False


def cmd_occupancy(args):
    from pcdet_ext.openpcdet.datasets.create_infos import create_unlabelled
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.recipes.occupancy_validation import fit_height_range_prior, masked_occupancy_ap
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    train = sorted(Path(args.train_dir).glob("*.bin"))
    held = sorted(Path(args.eval_dir).glob("*.bin"))
    if not train or not held:
        sys.exit(f"no .bin scans in {args.train_dir if not train else args.eval_dir}")
    overlap = {p.resolve() for p in train} & {p.resolve() for p in held}
    if overlap:
        print(f"warning: {len(overlap)} evaluation scans are also training scans", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        ds_cfg = REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml"
        root = create_unlabelled(train, Path(tmp) / "train", ds_cfg, val_fraction=0.0)
        eval_root = create_unlabelled(held, Path(tmp) / "eval", ds_cfg, val_fraction=1.0)
        cfg = config(PRE, root, args.half, args.voxel)
        (ds, loader, _), _ = builders.build_loaders(cfg, root, batch_size=2, workers=args.workers)
        allow_unlabelled(ds)
        eval_cfg = config(PRE, eval_root, args.half, args.voxel)
        _, (eval_ds, eval_loader, _) = builders.build_loaders(eval_cfg, eval_root, batch_size=1, workers=args.workers)
        allow_unlabelled(eval_ds)
        model, _ = train_pretraining(cfg, ds, loader, args.iters)
        control, history, plateau = train_control_to_plateau(cfg, ds, loader, args.iters, args.control_max_iters)
        prior = fit_height_range_prior(model, loader)
        ap = masked_occupancy_ap({"model": model, "random encoder": control}, eval_loader,
                                 baselines={PRIOR: prior.scores})
    print(f"{len(train)} training scans, {len(eval_ds)} evaluation scans, grid {ds.grid_size.tolist()}, "
          f"batch 2, {args.iters} iterations; AP of masked-only cells against ray-cast free space")
    print("random-encoder control, final loss by budget: " + ", ".join(f"{i} it {l:.3f}" for i, l in history)
          + ("" if plateau else f" (no plateau within --control_max_iters {args.control_max_iters})"))
    for name, row in ap.items():
        print(f"  {name:<21} " + "  ".join(f"{k[len('occ_ap'):].lstrip('_') or 'all'} {v:.3f}"
                                          for k, v in row.items()))
    print(f"masked occupancy AP: model {ap['model']['occ_ap']:.3f} | grow-visible {ap['grow-visible']['occ_ap']:.3f}"
          f" | random encoder {ap['random encoder']['occ_ap']:.3f} | {PRIOR} {ap[PRIOR]['occ_ap']:.3f}")


def cmd_masking(args):
    """Masking statistics of the shipped config (and 36 groups of 10 degrees) on real scans, plus the
    cost of the ray-cast targets per frame; needs no OpenPCDet."""
    import numpy as np

    from pcdet_ext.config import cfg_from_yaml_file
    from pcdet_ext.algorithms.masking import RANGE_BINS, MaskingConfig, mask_voxels
    from pcdet_ext.algorithms.occupancy import CellGeometry, OccupancyConfig, occupancy_targets
    scans = sorted(Path(args.train_dir).glob("*.bin"))
    if not scans:
        sys.exit(f"no .bin scans in {args.train_dir}")
    cfg = cfg_from_yaml_file(PRE)
    bb = cfg.MODEL.BACKBONE_3D
    pc_range = [float(v) for v in cfg.DATA_CONFIG.POINT_CLOUD_RANGE]
    voxel = [float(v) for v in cfg.DATA_CONFIG.DATA_PROCESSOR[2].VOXEL_SIZE]
    grid = np.round((np.array(pc_range[3:]) - pc_range[:3]) / voxel).astype(int)
    occ = OccupancyConfig.from_cfg(bb.OCCUPANCY_DECODER)
    frames = []
    for s in scans:
        pts = np.fromfile(s, np.float32).reshape(-1, 4)
        idx = np.floor((pts[:, :3] - pc_range[:3]) / voxel).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < grid), 1)
        vox = np.unique(idx[ok], axis=0)
        frames.append((torch.from_numpy(np.c_[np.zeros(len(vox), int), vox[:, ::-1]]),
                       torch.from_numpy(np.c_[np.zeros(ok.sum()), pts[ok, :3]]).float()))
    print(f"{len(scans)} scans, {pc_range}, voxels {voxel}, {np.mean([len(c) for c, _ in frames]):.0f} voxels/scan")
    variants = {"shipped": {}, "36 x 10 deg": {"NUM_ANGULAR_GROUPS": 36, "ANGULAR_GROUP_SIZE": 10}}
    for name, extra in variants.items():
        mcfg = MaskingConfig.from_cfg({**bb, **extra, "ANGULAR_GROUP_SIZE": extra.get("ANGULAR_GROUP_SIZE",
                                                                                 bb.get("ANGULAR_GROUP_SIZE"))})
        t0, rows = time.perf_counter(), []
        for i, (c, _) in enumerate(frames):
            r = mask_voxels(c, 1, voxel, pc_range, mcfg, seed=i, grid_size=grid.tolist())
            rows.append([r.ratio, r.whole_group_share, r.stage2_scale, *(r.ratio_per_range[b] for b in RANGE_BINS)])
        ms = (time.perf_counter() - t0) / len(frames) * 1000
        a = np.array(rows)
        print(f"{name:<12} ratio {a[:, 0].mean():.3f} ({a[:, 0].min():.3f}-{a[:, 0].max():.3f}), whole-group share "
              f"{a[:, 1].mean():.3f} (min {a[:, 1].min():.3f}), stage-2 scale {a[:, 2].mean():.2f}, near/mid/far "
              f"{a[:, 3].mean():.3f}/{a[:, 4].mean():.3f}/{a[:, 5].mean():.3f} (max band {a[:, 3:].max():.3f}); "
              f"{ms:.1f} ms/scan")
    mcfg = MaskingConfig.from_cfg(bb)
    times = []
    for i, (c, pts) in enumerate(frames):
        masked = mask_voxels(c, 1, voxel, pc_range, mcfg, seed=i).masked
        geo = CellGeometry.of(1, grid[::-1].tolist(), voxel, pc_range, occ, mcfg.sensor_xyz,
                              mcfg.distance_thresholds)
        t0 = time.perf_counter()
        occupancy_targets(c, masked, pts, geo, occ, torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
    print(f"ray-cast occupancy targets ({occ.rays_per_frame} beams/frame, target cells "
          f"{voxel[0] * occ.target_stride_xy} x {voxel[1] * occ.target_stride_xy} x {voxel[2] * occ.target_stride_z} m): "
          f"median {statistics.median(times) * 1000:.0f} ms/frame on {torch.get_num_threads()} threads")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_peak":
        print(json.dumps({"peak_mib": decoder_peak(sys.argv[2], sys.argv[3])}))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["time", "memory", "occupancy", "masking"])
    p.add_argument("--half", type=float, default=51.2, help="half extent of the x/y range, metres")
    p.add_argument("--voxel", type=float, default=0.2, help="x/y voxel size, metres")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--control_max_iters", type=int, default=1600,
                   help="occupancy: the random-encoder control doubles its budget up to this until its loss plateaus")
    p.add_argument("--train_dir", default=str(RAW), help="scans (.bin) to pretrain on / to measure masking on")
    p.add_argument("--eval_dir", default=None, help="scans (.bin) to evaluate on (occupancy; required)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (OpenPCDet's default)")
    args = p.parse_args()
    if args.what == "occupancy" and args.eval_dir is None:
        p.error("occupancy needs --eval_dir (scans it does not train on)")
    {"time": cmd_time, "memory": cmd_memory, "occupancy": cmd_occupancy, "masking": cmd_masking}[args.what](args)


if __name__ == "__main__":
    main()
