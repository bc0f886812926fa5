"""R-MAE + CMAE Phase 1 figures (needs OpenPCDet; CPU or GPU).

    python benchmarks/bench_rmae_pretraining.py time     # pretraining vs supervised iteration, same batch
    python benchmarks/bench_rmae_pretraining.py memory   # our occupancy decoder vs R-MAE's dense decoder
    python benchmarks/bench_rmae_pretraining.py iou --iters 60   # occupancy IoU on masked voxels, real scans

time: VoxelNeXt encoder on a synthetic 4-class batch; reference = a supervised iteration of the same
encoder + VoxelNeXtHead (forward, backward, optimizer step) on the same batch; ratio target <= 1.5.
memory: peak RSS growth (sampled every ms) of decoder forward + loss + backward, each in a fresh process, on the same
encoder output; reference = R-MAE's decoder (three dense ConvTranspose3d back to the full voxel grid,
BCE over every voxel); ratio target <= 0.5. On a GPU, torch.cuda.max_memory_allocated instead.
iou: a short pretraining run on ../shared/data/kitti_raw_2011_09_26 scans; occupancy precision /
recall / IoU on masked voxels (every cell without a visible voxel) per block of iterations.
"""
import argparse
import glob
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


def config(path, data, half, voxel):
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    cfg = cfg_from_yaml_file(path)
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", f"[{-half}, {-half}, -4, {half}, {half}, 4]",
                   "DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE", f"[{voxel}, {voxel}, 0.2]"], cfg)
    cfg.DATA_CONFIG.DATA_PATH = str(data)
    return cfg


def synthetic_set(tmp: Path) -> Path:
    from pcdet_ext.datasets import create_infos, synthetic_writer
    root = synthetic_writer.write_custom(tmp / "isarc", num_frames=6, seed=1, val_fraction=0.34)
    return create_infos.create_custom(root, synthetic_writer.CONSTRUCTION_CLASSES,
                                      dataset_cfg=REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml", workers=1)


def first_batch(cfg, root, batch_size=2):
    from pcdet_ext.engine import loop
    from pcdet_ext.pretraining.unlabelled import allow_unlabelled
    (ds, loader, _), _ = loop.build_loaders(cfg, root, batch_size=batch_size)
    allow_unlabelled(ds)
    return ds, next(iter(loader))


def step_time(cfg, ds, batch, reps):
    import copy

    from pcdet.models import model_fn_decorator
    from pcdet_ext.engine import loop
    from pcdet_ext.optimization import build_optimizer
    model = loop.build_model(cfg, ds)
    opt = build_optimizer(model, cfg.OPTIMIZATION)
    fn, times = model_fn_decorator(), []
    model.train()
    for i in range(reps + 1):
        b = copy.deepcopy(batch)
        t = time.perf_counter()
        opt.zero_grad()
        loss, _, _ = fn(model, b)
        loss.backward()
        opt.step()
        if hasattr(model, "update_teacher"):
            model.update_teacher()
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
    from pcdet_ext.pretraining.occupancy import (OccupancyConfig, OccupancyDecoder, occupancy_loss,
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
        t = occupancy_targets(d["coords"].to(dev), d["masked"].to(dev), b, full, cfg, torch.Generator().manual_seed(0))
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
    from pcdet_ext.engine import loop
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp))
        cfg = config(PRE, root, args.half, args.voxel)
        ds, batch = first_batch(cfg, root)
        model = loop.build_model(cfg, ds)
        from pcdet.models import load_data_to_gpu
        load_data_to_gpu(batch)
        model.train()
        with torch.no_grad():
            model(batch)
        enc, x4 = batch["encoded_spconv_tensor"], batch["multi_scale_3d_features"]["x_conv4"]
        coords = batch["voxel_coords"].long()
        bb = model.backbone_3d
        from pcdet_ext.pretraining.masking import mask_voxels
        mask = mask_voxels(coords.cpu(), 2, bb.voxel_size, bb.point_cloud_range, bb.mask_cfg, seed=0)
        x4_unique = torch.unique(x4.indices[:len(x4.indices)], dim=0, return_inverse=True)
        blob = Path(tmp) / "enc.pt"
        feats4 = torch.zeros(len(x4_unique[0]), x4.features.shape[1]).index_add_(0, x4_unique[1], x4.features)
        torch.save({"enc_features": enc.features, "enc_indices": enc.indices, "enc_shape": torch.tensor(enc.spatial_shape),
                    "enc_depth": torch.tensor(1), "x4_features": feats4, "x4_indices": x4_unique[0],
                    "x4_shape": torch.tensor(x4.spatial_shape), "coords": coords, "masked": mask.masked,
                    "full_shape": torch.tensor(bb.full_shape), "batch_size": torch.tensor(2)}, blob)
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


def cmd_iou(args):
    from pcdet.models import model_fn_decorator
    from pcdet_ext.datasets.create_infos import create_unlabelled
    from pcdet_ext.engine import loop
    from pcdet_ext.optimization import build_optimizer, build_scheduler, scheduler_step
    scans = sorted(glob.glob(str(Path(args.raw) / "*.bin")))
    if not scans:
        sys.exit(f"no scans in {args.raw}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = create_unlabelled([Path(s) for s in scans], Path(tmp) / "raw",
                                 REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml", val_fraction=0.0)
        cfg = config(PRE, root, args.half, args.voxel)
        ds, _ = first_batch(cfg, root)
        (ds, loader, _), _ = loop.build_loaders(cfg, root, batch_size=2)
        from pcdet_ext.pretraining.unlabelled import allow_unlabelled
        allow_unlabelled(ds)
        model = loop.build_model(cfg, ds)
        opt = build_optimizer(model, cfg.OPTIMIZATION)
        sched, _ = build_scheduler(opt, args.iters, 1, -1, cfg.OPTIMIZATION)
        fn, rows, it = model_fn_decorator(), [], iter(loader)
        model.train()
        t0 = time.time()
        for step in range(args.iters):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            scheduler_step(sched, step, 0)
            opt.zero_grad()
            loss, tb, _ = fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10)
            opt.step()
            model.update_teacher()
            rows.append((loss.item(), tb["occ_precision"], tb["occ_recall"], tb["occ_iou"]))
    print(f"{len(scans)} real scans, grid {ds.grid_size.tolist()}, batch 2, {args.iters} iterations, "
          f"{time.time() - t0:.0f} s")
    block = max(args.iters // 6, 1)
    print("iterations   loss    precision  recall  IoU (occupancy of masked voxels)")
    for s in range(0, args.iters, block):
        chunk = rows[s:s + block]
        mean = [sum(r[i] for r in chunk) / len(chunk) for i in range(4)]
        print(f"{s:>4}-{s + len(chunk) - 1:<4}  {mean[0]:.4f}  {mean[1]:.3f}      {mean[2]:.3f}   {mean[3]:.3f}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_peak":
        print(json.dumps({"peak_mib": decoder_peak(sys.argv[2], sys.argv[3])}))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["time", "memory", "iou"])
    p.add_argument("--half", type=float, default=51.2, help="half extent of the x/y range, metres")
    p.add_argument("--voxel", type=float, default=0.2, help="x/y voxel size, metres")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--raw", default=str(RAW))
    args = p.parse_args()
    {"time": cmd_time, "memory": cmd_memory, "iou": cmd_iou}[args.what](args)


if __name__ == "__main__":
    main()
