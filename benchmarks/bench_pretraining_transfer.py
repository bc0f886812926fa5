"""Does R-MAE + CMAE pretraining transfer? Backbones from random init, Phase 1 and Phase 2, pretrained
from the same data and seed, then fine-tuned on one labelled set (needs OpenPCDet; CPU or GPU).

    python benchmarks/bench_pretraining_transfer.py                     # CPU default (<= 30 min, 2 cores)
    python benchmarks/bench_pretraining_transfer.py --seeds 0 1 2 3 4 --pretrain_iters 2000 \\
        --finetune_iters 4000 --pretrain_dir /data/scans --data_path /data/isarc --half 51.2   # a real run, GPU

Arms, per seed: (a) probe: the backbone frozen (weights and statistics), only the head trains;
(b) fine-tune with 10 % and with 100 % of the training labels (differential LR: backbone 0.1x,
head 2x, under OpenPCDet's OneCycle); (c) from each checkpoint (and from random init, the
reference of that rule), uniform LR vs the differential LR at 100 % labels. Scores on the held-out split: mean over classes of 3D AP (R40,
moderate), and the detection loss (the head's training loss on the held-out frames, batch norm in
eval mode: it still ranks arms after runs too short for any AP). Reference: the random-init arm of
the same seed. Prints a table (mean +- std
over seeds) and writes ``results.json``, ``table.md`` and ``transfer.png`` under --out.
Defaults: the synthetic 4-class set (--frames) fine-tunes, the shared real unlabelled scans
pretrain (else the set's own training frames, labels unused).
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pcdet_ext
import torch
from easydict import EasyDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rmae_pretraining import RAW, REPO, config, train_pretraining  # noqa: E402

CFG = {"voxelnext": "rmae_cmae_isarc_4class", "second": "rmae_cmae_second_isarc_4class"}
ARMS = [("random", "probe"), ("random", "10 %"), ("random", "100 %"), ("random", "100 %, uniform LR"),
        ("phase 1", "probe"), ("phase 1", "10 %"), ("phase 1", "100 %"), ("phase 1", "100 %, uniform LR"),
        ("phase 2", "probe"), ("phase 2", "10 %"), ("phase 2", "100 %"), ("phase 2", "100 %, uniform LR")]


def configs(encoder: str):
    stem = REPO / "cfgs/custom_models" / CFG[encoder]
    return {"phase 1": Path(f"{stem}_pretraining_phase1.yaml"), "phase 2": Path(f"{stem}_pretraining_phase2.yaml"),
            "finetune": Path(f"{stem}_finetune_phase1.yaml")}


def datasets(args, tmp: Path):
    """(labelled set root, pretraining set root)."""
    from pcdet_ext.openpcdet.datasets import create_infos, synthetic_writer
    from pcdet_ext.openpcdet.datasets.create_infos import create_unlabelled
    ds_cfg = REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml"
    if args.data_path:
        labelled = Path(args.data_path)
    else:
        raw = synthetic_writer.write_custom(tmp / "isarc", num_frames=args.frames, seed=11, val_fraction=0.25)
        labelled = create_infos.create_custom(raw, synthetic_writer.CONSTRUCTION_CLASSES, dataset_cfg=ds_cfg, workers=1)
    scans = sorted(Path(args.pretrain_dir).glob("*.bin")) if args.pretrain_dir else []
    pretrain = create_unlabelled(scans, tmp / "pretrain", ds_cfg, val_fraction=0.0) if scans else labelled
    return labelled, pretrain, len(scans)


def pretrained_encoders(args, cfgs, pretrain_root, seed):
    """Phase 1 and Phase 2 pretraining from one seed; the converted encoder weights of each."""
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.convert import convert_pretrain
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    out = {}
    for phase in ("phase 1", "phase 2"):
        cfg = config(cfgs[phase], pretrain_root, args.half, args.voxel)
        (ds, loader, _), _ = builders.build_loaders(cfg, pretrain_root, batch_size=args.batch_size, workers=args.workers)
        allow_unlabelled(ds)
        model = train_pretraining(cfg, ds, loader, args.pretrain_iters, desc=f"seed {seed} {phase}", seed=seed)[0]
        model.recalibrate_batchnorm(loader, 16)  # full-density statistics, as the pretraining tool leaves them
        out[phase] = convert_pretrain(model.state_dict())[0]
    return out


def subset_loader(train_set, loader, share: float, seed: int):
    """A loader over ``share`` of the training frames (at least one), OpenPCDet's collate."""
    n = max(1, int(math.ceil(share * len(train_set))))
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, idx), batch_size=loader.batch_size,
                                       shuffle=True, num_workers=loader.num_workers,
                                       persistent_workers=loader.num_workers > 0,  # one batch an epoch: fork once
                                       collate_fn=train_set.collate_batch, drop_last=False)


@torch.no_grad()
def held_out_loss(model, batch) -> float:
    """The detection loss of one evaluated batch (targets need training mode; batch norm stays in eval)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    ret, _, _ = model(dict(batch))
    model.eval()
    return float(ret["loss"])


def finetune(args, cfg, loaders, init, weights, labels: str, seed: int) -> dict:
    """One arm: build, load ``weights`` (encoder) unless random, train ``--finetune_iters``, then the
    held-out mAP and detection loss."""
    from pcdet_ext.engine.evaluation import evaluate_model
    from pcdet_ext.engine.loop.runner import train_steps
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import mean_moderate_ap
    (train_set, train_loader, _), (test_set, test_loader, _) = loaders
    torch.manual_seed(seed)
    model = builders.build_model(cfg, train_set)
    loaded = None
    if weights is not None:
        own = model.state_dict()
        take = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(take, strict=False)
        loaded = {n for n, _ in model.named_parameters() if n in take}
    optim = cfg.OPTIMIZATION
    if labels == "probe":
        for p in model.backbone_3d.parameters():
            p.requires_grad_(False)
        for m in model.backbone_3d.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.momentum = 0.0  # statistics frozen too
    if "uniform" in labels or labels == "probe":  # a probe trains only the head: one LR
        optim = EasyDict(dict(optim, DIFFERENTIAL_LR=False))
    loader = subset_loader(train_set, train_loader, 0.1, seed) if labels == "10 %" else train_loader
    opt = build_optimizer(model, optim, loaded)
    sched, _ = build_scheduler(opt, args.finetune_iters, 1, -1, optim)
    train_steps(model, loader, opt, steps=args.finetune_iters, scheduler=sched)
    model.eval()
    losses = []
    _, _, result = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES,
                                  on_batch=lambda batch: losses.append(held_out_loss(model, batch)))
    return {"mAP": mean_moderate_ap(result), "loss": statistics.mean(losses)}


def summarise(results, seeds):
    """Per arm: (init, labels, then for mAP and loss: mean, std over seeds, mean difference to the
    random-init arm with the same labels and learning-rate rule)."""
    rows = []
    for init, labels in ARMS:
        row = [init, labels]
        for metric in ("mAP", "loss"):
            vals = [results[str(s)][f"{init} | {labels}"][metric] for s in seeds]
            ref = [results[str(s)][f"random | {labels}"][metric] for s in seeds]
            row += [statistics.mean(vals), statistics.pstdev(vals), statistics.mean(v - r for v, r in zip(vals, ref))]
        rows.append(tuple(row))
    return rows


def write_outputs(out: Path, rows, results, meta):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "per_seed": results}, indent=1))
    lines = ["| init | labels | mAP (mean) | std | vs random | held-out loss (mean) | std | vs random |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {lab} | {m:.2f} | {s:.2f} | {g:+.2f} | {lm:.3f} | {ls:.3f} | {lg:+.3f} |"
              for i, lab, m, s, g, lm, ls, lg in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = {"random": "#999999", "phase 1": "#1f77b4", "phase 2": "#d62728"}
    for ax, col, label in ((axes[0], 2, "mAP (3D, R40, moderate)"), (axes[1], 5, "held-out detection loss")):
        ax.bar(range(len(rows)), [r[col] for r in rows], yerr=[r[col + 1] for r in rows], capsize=3,
               color=[colours[r[0]] for r in rows])
        ax.set_ylabel(label)
    axes[1].set_yscale("log")  # a diverged arm would flatten the others
    axes[1].set_xticks(range(len(rows)), [f"{r[0]}\n{r[1]}" for r in rows], fontsize=7)
    axes[0].set_title(f"pretraining transfer, {len(meta['seeds'])} seeds, {meta['finetune_iters']} fine-tune "
                      f"iterations")
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pretrain_iters", type=int, default=30)
    p.add_argument("--finetune_iters", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--frames", type=int, default=24, help="synthetic labelled frames (without --data_path)")
    p.add_argument("--data_path", default=None, help="a labelled OpenPCDet custom-layout set with infos")
    p.add_argument("--pretrain_dir", default=str(RAW) if RAW.is_dir() else None, help="unlabelled .bin scans")
    p.add_argument("--encoder", choices=sorted(CFG), default=None, help="default: voxelnext where OpenPCDet has it")
    p.add_argument("--half", type=float, default=25.6, help="half extent of the x/y range, metres")
    p.add_argument("--voxel", type=float, default=0.4, help="x/y voxel size, metres")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (OpenPCDet's default)")
    p.add_argument("--out", default=str(REPO / "output/bench_pretraining_transfer"))
    args = p.parse_args()
    pcdet_ext.import_pcdet()
    from pcdet.models import backbones_3d
    encoder = args.encoder or ("voxelnext" if "VoxelResBackBone8xVoxelNeXt" in backbones_3d.__all__ else "second")
    cfgs = configs(encoder)
    from pcdet_ext.engine.startup import builders
    t0 = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        labelled, pretrain_root, n_scans = datasets(args, Path(tmp))
        ft_cfg = config(cfgs["finetune"], labelled, args.half, args.voxel)
        loaders = builders.build_loaders(ft_cfg, labelled, batch_size=args.batch_size, workers=args.workers)
        for seed in args.seeds:
            enc = pretrained_encoders(args, cfgs, pretrain_root, seed)
            results[str(seed)] = {}
            for init, labels in ARMS:
                weights = None if init == "random" else enc[init]
                score = finetune(args, ft_cfg, loaders, init, weights, labels, seed)
                results[str(seed)][f"{init} | {labels}"] = score
                print(f"seed {seed} {init:<8} {labels:<18} mAP {score['mAP']:6.2f}  held-out loss {score['loss']:.3f}"
                      f"  ({time.time() - t0:.0f} s)", file=sys.stderr)
        n_train, n_test = len(loaders[0][0]), len(loaders[1][0])
    meta = {"encoder": encoder, "seeds": args.seeds, "pretrain_iters": args.pretrain_iters,
            "finetune_iters": args.finetune_iters, "train_frames": n_train, "test_frames": n_test,
            "pretrain_scans": n_scans or "the labelled set's training frames", "minutes": (time.time() - t0) / 60}
    table = write_outputs(Path(args.out), summarise(results, args.seeds), results, meta)
    print(f"{encoder}; pretraining on {meta['pretrain_scans']} scans x {args.pretrain_iters} iterations; fine-tune "
          f"{args.finetune_iters} iterations on {n_train} frames, scored on {n_test} held-out frames; "
          f"{len(args.seeds)} seeds; {meta['minutes']:.1f} min")
    print(table)
    print(f"written: {args.out}/results.json, table.md, transfer.png")


if __name__ == "__main__":
    main()
