"""R-MAE + CMAE Phase 2 figures against Phase 1 (needs OpenPCDet; CPU or GPU).

    python benchmarks/bench_phase2_pretraining.py time       # iteration time and peak memory, same batch
    python benchmarks/bench_phase2_pretraining.py evidence --train_dir DIR --eval_dir DIR --iters 100

time: the shipped 4-class pretraining configs (VoxelNeXt encoder) on one synthetic batch; reference =
a Phase 1 pretraining iteration (forward, backward, optimizer step, teacher EMA); target ratio <= 1.3.
Peak memory: growth of resident memory (CPU, sampled every ms) or torch.cuda.max_memory_allocated.
evidence: Phase 1 and Phase 2 pretrained from the same seed on the scans of --train_dir, then, on
every scan of --eval_dir with fixed masks: MLFR cosine on the masked-only teacher sites (Phase 2's
decoder) against "copy the nearest visible student feature" (Phase 2's and Phase 1's encoders);
voxel-contrast top-1 retrieval against chance (1 / sites); masked-occupancy AP of both phases.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pcdet_ext  # noqa: F401
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rmae_pretraining import RAW, REPO, RSSPeak, config, first_batch, synthetic_set, train_pretraining  # noqa: E402

PRE1 = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml"
PRE2 = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase2.yaml"


def runner_for(cfg, ds, total_steps):
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.loop.hooks import CallbackHook
    from pcdet_ext.engine.optimization import build_optimizer
    from pcdet_ext.engine.loop.runner import Runner
    torch.manual_seed(0)
    model = builders.build_model(cfg, ds)
    if hasattr(model, "set_total_steps"):
        model.set_total_steps(total_steps)
    if torch.cuda.is_available():
        model.cuda()
    model.train()
    return Runner(model, build_optimizer(model, cfg.OPTIMIZATION), hooks=[CallbackHook(model.update_teacher)])


def timed_step(runner, batch) -> float:
    b = copy.deepcopy(batch)
    t = time.perf_counter()
    runner.step(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_memory(phase: str, half: float, voxel: float) -> float:
    """In a fresh process: peak memory growth (MiB) over two pretraining steps of ``phase``."""
    import numpy as np
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp))
        cfg = config(PRE1 if phase == "1" else PRE2, root, half, voxel)
        ds, batch = first_batch(cfg, root)
        runner = runner_for(cfg, ds, 2)
        cuda = torch.cuda.is_available()
        base = torch.cuda.memory_allocated() if cuda else 0
        with RSSPeak() as meter:
            for _ in range(2):
                timed_step(runner, batch)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else meter.mib


def cmd_time(args):
    import json
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp))
        cfg1, cfg2 = config(PRE1, root, args.half, args.voxel), config(PRE2, root, args.half, args.voxel)
        ds, batch = first_batch(cfg1, root)
        runners = {"1": runner_for(cfg1, ds, args.reps + 1), "2": runner_for(cfg2, ds, args.reps + 1)}
        times = {"1": [], "2": []}
        for i in range(args.reps + 1):  # interleaved, so that machine noise hits both alike; first step dropped
            for phase, runner in runners.items():
                t = timed_step(runner, batch)
                if i:
                    times[phase].append(t)
    t1, t2 = statistics.median(times["1"]), statistics.median(times["2"])
    peaks = {}
    for phase in ("1", "2"):
        out = subprocess.run([sys.executable, __file__, "_peak", phase, str(args.half), str(args.voxel)],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        peaks[phase] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"batch of 2 frames, {int(batch['voxel_coords'].shape[0])} voxels, grid {ds.grid_size.tolist()}, "
          f"median of {args.reps} interleaved iterations, {torch.get_num_threads()} threads")
    print(f"Phase 1 pretraining (reference): {t1 * 1000:.0f} ms, peak memory growth {peaks['1']:.0f} MiB")
    print(f"Phase 2 pretraining (+ MLFR, voxel and frame contrast): {t2 * 1000:.0f} ms, {peaks['2']:.0f} MiB")
    print(f"time ratio {t2 / t1:.2f} (target <= 1.3), peak memory ratio {peaks['2'] / max(peaks['1'], 1e-6):.2f}")


@torch.no_grad()
def phase2_figures(model, loader):
    """Per eval scan (fixed masks): MLFR cosine on masked-only sites (decoder, nearest-visible
    baseline) per scale, voxel top-1 retrieval and its chance level."""
    from pcdet.models import load_data_to_gpu

    from pcdet_ext.algorithms.contrastive import top1_retrieval
    from pcdet_ext.algorithms.mlfr import nearest_visible_baseline
    bb = model.backbone_3d
    model.eval()
    rows = {"decoder": [], "nearest": [], "top1": [], "chance": []}
    for batch in loader:
        load_data_to_gpu(batch)
        model(batch)
        st, te = batch.get("multi_scale_3d_features"), batch["teacher_multi_scale_3d_features"]
        dec, near = [], []
        for s in bb.phase2.MLFR.SCALES:
            pred, masked = bb.mlfr[s](st[s], te[s], te[s].spatial_shape, int(batch["batch_size"]))
            if not masked.any():
                continue
            target = F.layer_norm(te[s].features[masked], te[s].features.shape[-1:])
            base = nearest_visible_baseline((st[s].features, st[s].indices), te[s].indices, masked)
            dec.append(F.cosine_similarity(F.layer_norm(pred[masked], pred.shape[-1:]), target).mean())
            near.append(F.cosine_similarity(F.layer_norm(base, base.shape[-1:]), target).mean())
        rows["decoder"].append(float(torch.stack(dec).mean()))
        rows["nearest"].append(float(torch.stack(near).mean()))
        s_feat, t_feat = bb._pair(st, te)
        if len(s_feat) > 1:
            rows["top1"].append(top1_retrieval(bb.voxel_head(s_feat), bb.voxel_head_teacher(t_feat)))
            rows["chance"].append(1.0 / len(s_feat))
    return {k: statistics.mean(v) for k, v in rows.items() if v}


@torch.no_grad()
def phase1_nearest(model, loader, scales):
    """Nearest-visible cosine on masked-only teacher sites with Phase 1's encoder and teacher."""
    from pcdet.models import load_data_to_gpu

    from pcdet_ext.algorithms.mlfr import nearest_visible_baseline, teacher_site_inputs
    model.eval()
    out = []
    for batch in loader:
        load_data_to_gpu(batch)
        model(batch)
        st, te = batch["multi_scale_3d_features"], batch["teacher_multi_scale_3d_features"]
        vals = []
        for s in scales:
            c = te[s].features.shape[1]
            _, masked = teacher_site_inputs((st[s].features, st[s].indices), te[s].indices, te[s].spatial_shape,
                                            te[s].features.new_zeros(c), te[s].features.new_zeros(len(te[s].indices), c))
            if masked.any():
                base = nearest_visible_baseline((st[s].features, st[s].indices), te[s].indices, masked)
                target = F.layer_norm(te[s].features[masked], (c,))
                vals.append(F.cosine_similarity(F.layer_norm(base, (c,)), target).mean())
        out.append(float(torch.stack(vals).mean()))
    return statistics.mean(out)


def cmd_evidence(args):
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.recipes.occupancy_validation import masked_occupancy_ap
    from pcdet_ext.openpcdet.datasets.create_infos import create_unlabelled
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    scans = sorted(Path(args.train_dir).glob("*.bin"))
    held = sorted(Path(args.eval_dir).glob("*.bin")) if args.eval_dir else []
    if args.eval_dir is None:  # one folder: the last quarter is held out
        scans, held = scans[:len(scans) * 3 // 4], scans[len(scans) * 3 // 4:]
    if not scans or not held:
        sys.exit("no .bin scans to train on or to evaluate on")
    if {p.resolve() for p in scans} & {p.resolve() for p in held}:
        sys.exit("evaluation scans overlap the training scans")
    ds_cfg = REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        root = create_unlabelled(scans, Path(tmp) / "train", ds_cfg, val_fraction=0.0)
        eval_root = create_unlabelled(held, Path(tmp) / "eval", ds_cfg, val_fraction=1.0)
        models = {}
        for name, path in (("phase 1", PRE1), ("phase 2", PRE2)):
            cfg = config(path, root, args.half, args.voxel)
            (ds, loader, _), _ = builders.build_loaders(cfg, root, batch_size=2, workers=args.workers)
            allow_unlabelled(ds)
            models[name] = train_pretraining(cfg, ds, loader, args.iters, desc=name)[0]
        eval_cfg = config(PRE2, eval_root, args.half, args.voxel)
        _, (eval_ds, eval_loader, _) = builders.build_loaders(eval_cfg, eval_root, batch_size=1, workers=args.workers)
        allow_unlabelled(eval_ds)
        p2 = phase2_figures(models["phase 2"], eval_loader)
        p1 = phase1_nearest(models["phase 1"], eval_loader, models["phase 2"].backbone_3d.phase2.MLFR.SCALES)
        ap = masked_occupancy_ap(models, eval_loader, grow_visible=False)
    print(f"{len(scans)} training scans, {len(held)} held-out scans, {args.iters} iterations each, batch 2")
    print(f"MLFR cosine on masked-only teacher sites: Phase 2 decoder {p2['decoder']:.3f} | nearest visible "
          f"(Phase 2 encoder) {p2['nearest']:.3f} | nearest visible (Phase 1 encoder) {p1:.3f}")
    if "top1" in p2:
        print(f"voxel-contrast top-1 retrieval: {p2['top1']:.3f} (chance {p2['chance']:.4f})")
    print(f"masked occupancy AP: Phase 1 {ap['phase 1']['occ_ap']:.3f} | Phase 2 {ap['phase 2']['occ_ap']:.3f}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_peak":
        import json
        print(json.dumps({"peak_mib": peak_memory(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))}))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["time", "evidence"])
    p.add_argument("--half", type=float, default=51.2, help="half extent of the x/y range, metres")
    p.add_argument("--voxel", type=float, default=0.2, help="x/y voxel size, metres")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--train_dir", default=str(RAW), help="scans (.bin) to pretrain on")
    p.add_argument("--eval_dir", default=None, help="held-out scans (.bin); default: the last quarter of --train_dir")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (OpenPCDet's default)")
    args = p.parse_args()
    {"time": cmd_time, "evidence": cmd_evidence}[args.what](args)


if __name__ == "__main__":
    main()
