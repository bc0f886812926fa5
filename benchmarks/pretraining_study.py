"""Does R-MAE + CMAE Phase 1 pretraining help a SECOND detector trained on few labels? Paired seeds,
confidence intervals, whatever they show (needs OpenPCDet).

    python benchmarks/pretraining_study.py cpu          # CPU default (25.5 min measured on 2 cores)
    python benchmarks/pretraining_study.py paired --runs_dir output/kitti_models/rmae_cmae_second_kitti_finetune_phase1

cpu: a synthetic KITTI-layout set (--frames; 25 % held out). Phase 1 pretrains SECOND's encoder on
every training frame, labels unused (--pretrain_iters); as its gate, the same decoder over the
frozen random encoder trains for the same budget, and both are scored by masked-occupancy AP on the
held-out frames (the pretrained encoder must pass that control, else the study says so). The BatchNorm
statistics are then re-estimated on unmasked scans. Fine-tuning (--finetune_iters, batch 2, the
config's OneCycle) on --label_fraction of the labelled training frames (a subset and gt database
cut per seed, the same in every arm of that seed), arms per seed:
  rand_diff / pre_diff   random init / pretrained, differential LR (backbone 0.1x, head 2x)
  rand_flat / pre_flat   the same with one uniform LR
  rand_probe / pre_probe (--probe) the encoder frozen, weights and statistics; only the rest trains
Scores on the held-out frames: 3D AP (R40, moderate) per class and their mean, BEV mAP, and the
detection loss on held-out frames (batch norm in eval mode).

paired: the GPU study of docs/pretraining.md, already run with tools/train.py: reads
<runs_dir>/<arm>_<F>_<S>/eval/eval_with_train/epoch_*/result.json (the last epoch) for the arms
pre_diff, pre_flat, rand_diff, rand_flat, each label fraction F and seed S.

Both print and write (--out) results.json, table.md and study.png: per arm the mean and spread over
seeds, and per comparison the per-seed paired differences with their mean and a t interval.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pcdet_ext
import torch
from easydict import EasyDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rmae_pretraining import REPO, train_pretraining  # noqa: E402

PRETRAIN_CFG = REPO / "cfgs/kitti_models/rmae_cmae_second_kitti_pretraining_phase1.yaml"
FINETUNE_CFG = REPO / "cfgs/kitti_models/rmae_cmae_second_kitti_finetune_phase1.yaml"
ARMS = ("rand_diff", "pre_diff", "rand_flat", "pre_flat")
PROBES = ("rand_probe", "pre_probe")
COMPARISONS = (("pre_diff", "rand_diff", "pretrained - random init, differential LR"),
               ("pre_flat", "rand_flat", "pretrained - random init, uniform LR"),
               ("pre_diff", "pre_flat", "differential - uniform LR, pretrained"),
               ("rand_diff", "rand_flat", "differential - uniform LR, random init"),
               ("pre_probe", "rand_probe", "pretrained - random encoder, frozen probe"))
MAP = "mAP"


def moderate_3d(result: dict) -> dict:
    """{class: 3D AP (R40, moderate)} of an OpenPCDet KITTI-metric result dict."""
    suffix = "_3d/moderate_R40"
    return {k[:-len(suffix)]: float(v) for k, v in result.items() if k.endswith(suffix)}


def kitti_config(path: Path, data: Path, depth: float, voxel: float):
    """``path`` on the set at ``data``: x in [0, depth], y in +-depth/2, z in [-3, 1], voxels
    ``voxel`` x ``voxel`` x 0.1 m (SECOND's 41 height levels)."""
    from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
    cfg = cfg_from_yaml_file(path)
    index = [p.NAME for p in cfg.DATA_CONFIG.DATA_PROCESSOR].index("transform_points_to_voxels")
    cfg_from_list(["DATA_CONFIG.POINT_CLOUD_RANGE", f"[0, {-depth / 2}, -3, {depth}, {depth / 2}, 1]",
                   f"DATA_CONFIG.DATA_PROCESSOR.{index}.VOXEL_SIZE", f"[{voxel}, {voxel}, 0.1]"], cfg)
    cfg.DATA_CONFIG.DATA_PATH = str(data)
    return cfg


def synthetic_kitti(tmp: Path, frames: int, depth: float) -> Path:
    """A KITTI-layout set whose objects all lie inside the detection range."""
    from pcdet_ext.openpcdet.datasets import create_infos, synthetic, synthetic_writer
    spec = synthetic.SceneSpec(fov_deg=70.0, max_range=depth - 2.0)
    raw = synthetic_writer.write_kitti(tmp / "kitti", num_frames=frames, seed=11, val_fraction=0.25, spec=spec)
    return create_infos.create_kitti(raw, workers=1)


def pretrain(args, data: Path):
    """Phase 1 and its random-encoder control at the same budget; their held-out masked-occupancy AP;
    the pretrained weights (BatchNorm re-estimated on unmasked scans) converted for fine-tuning."""
    from pcdet_ext.engine.convert import convert_pretrain
    from pcdet_ext.engine.recipes.occupancy_validation import masked_occupancy_ap
    from pcdet_ext.engine.startup import builders
    cfg = kitti_config(PRETRAIN_CFG, data, args.depth, args.voxel)
    (ds, loader, _), (_, eval_loader, _) = builders.build_loaders(cfg, data, batch_size=args.batch_size,
                                                                   workers=args.workers)
    model, loss = train_pretraining(cfg, ds, loader, args.pretrain_iters, desc="Phase 1")
    control, control_loss = train_pretraining(cfg, ds, loader, args.pretrain_iters, freeze_encoder=True,
                                              desc="random-encoder control")
    ap = masked_occupancy_ap({"pretrained": model, "random encoder": control}, eval_loader, grow_visible=False)
    model.recalibrate_batchnorm(loader, 16)
    gate = {"pretrained": {**ap["pretrained"], "loss": loss}, "random encoder": {**ap["random encoder"],
                                                                                 "loss": control_loss}}
    return convert_pretrain(model.state_dict())[0], gate


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


def finetune(args, cfg, weights, arm: str, seed: int) -> dict:
    """One arm on this seed's labelled subset: build, load ``weights`` for ``pre_*`` arms, train, score."""
    from pcdet_ext.engine.evaluation import evaluate_model
    from pcdet_ext.engine.loop.runner import train_steps
    from pcdet_ext.engine.optimization import build_optimizer, build_scheduler
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import mean_moderate_ap
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.openpcdet.datasets.label_fraction import keep_label_fraction
    (train_set, train_loader, _), (test_set, test_loader, _) = builders.build_loaders(
        cfg, Path(cfg.DATA_CONFIG.DATA_PATH), batch_size=args.batch_size, workers=args.workers)
    kept = keep_label_fraction(train_set, args.label_fraction, seed)
    torch.manual_seed(seed)
    model = builders.build_model(cfg, train_set)
    loaded = None
    if arm.startswith("pre_"):
        own = model.state_dict()
        take = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(take, strict=False)
        loaded = {n for n, _ in model.named_parameters() if n in take}
    optim = cfg.OPTIMIZATION
    if arm.endswith("_probe"):
        if arm == "rand_probe":  # the random encoder's statistics from unmasked scans too, as the pretrained one's
            model.recalibrate_batchnorm(train_loader, 16)
        for p in model.backbone_3d.parameters():
            p.requires_grad_(False)
        for m in model.backbone_3d.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.momentum = 0.0  # statistics frozen too
    if not arm.endswith("_diff"):
        optim = EasyDict(dict(optim, DIFFERENTIAL_LR=False))
    opt = build_optimizer(model, optim, loaded)
    sched, _ = build_scheduler(opt, args.finetune_iters, 1, -1, optim)
    train_steps(model, builders.one_pass_loader(train_loader, args.finetune_iters), opt, steps=args.finetune_iters,
                scheduler=sched)  # a few labelled frames: the workers start once, not every few steps
    model.eval()
    losses = []
    _, _, result = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES,
                                  on_batch=lambda batch: losses.append(held_out_loss(model, batch)))
    bev = [v for k, v in result.items() if k.endswith("_bev/moderate_R40")]
    return {MAP: mean_moderate_ap(result), "BEV mAP": float(sum(bev) / len(bev)), **moderate_3d(result),
            "held-out loss": statistics.mean(losses), "labelled frames": len(kept)}


def summarise(runs: dict, metrics) -> dict:
    """``runs``: {fraction: {seed: {arm: {metric: value}}}} -> per fraction, each arm's mean and spread
    and each comparison's paired difference, for every metric."""
    from pcdet_ext.utils.paired import paired_difference
    out = {}
    for fraction, by_seed in runs.items():
        seeds = sorted(by_seed)
        arms = [a for a in (*ARMS, *PROBES) if all(a in by_seed[s] for s in seeds)]
        rows = {a: {m: (statistics.mean(by_seed[s][a][m] for s in seeds),
                        statistics.stdev([by_seed[s][a][m] for s in seeds]) if len(seeds) > 1 else 0.0)
                    for m in metrics} for a in arms}
        diffs = {title: {m: paired_difference([by_seed[s][t][m] for s in seeds], [by_seed[s][c][m] for s in seeds])
                         for m in metrics}
                 for t, c, title in COMPARISONS if t in arms and c in arms}
        out[fraction] = {"seeds": seeds, "arms": rows, "paired": diffs}
    return out


def write_outputs(out: Path, summary: dict, runs: dict, meta: dict, metrics) -> str:
    """results.json, table.md, study.png under ``out``; returns the table."""
    from pcdet_ext.utils.checkpoint import write_json
    lines = []
    for fraction, s in summary.items():
        lines += [f"### {float(fraction) * 100:g} % labels, seeds {', '.join(map(str, s['seeds']))}", "",
                  "| arm | " + " | ".join(f"{m} (mean +- sd)" for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        lines += [f"| {arm} | " + " | ".join(f"{mu:.2f} +- {sd:.2f}" for mu, sd in row.values()) + " |"
                  for arm, row in s["arms"].items()]
        lines += ["", "| paired difference (95 % t interval) | " + " | ".join(metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        lines += [f"| {title} | " + " | ".join(str(d) for d in row.values()) + " |"
                  for title, row in s["paired"].items()]
        lines.append("")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    write_json({"meta": meta, "runs": runs, "summary": {
        f: {"seeds": s["seeds"], "arms": {a: {m: {"mean": mu, "sd": sd} for m, (mu, sd) in r.items()}
                                          for a, r in s["arms"].items()},
            "paired": {t: {m: d.as_dict() for m, d in r.items()} for t, r in s["paired"].items()}}
        for f, s in summary.items()}}, out / "results.json")
    plot(out / "study.png", summary, meta)
    return table


def plot(path: Path, summary: dict, meta: dict) -> None:
    """mAP paired differences with their intervals, one group per label fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    y, labels = 0, []
    for fraction, s in summary.items():
        for title, row in s["paired"].items():
            d = row[MAP]
            lo, hi = (max(d.low, d.mean - 100), min(d.high, d.mean + 100))  # one seed: no interval
            ax.errorbar([d.mean], [y], xerr=[[d.mean - lo], [hi - d.mean]], fmt="o", capsize=4)
            ax.plot(d.diffs, [y] * len(d.diffs), "x", color="grey")
            labels.append(f"{float(fraction) * 100:g} %: {title}")
            y += 1
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("paired difference in mAP (3D, R40, moderate); x: per seed")
    ax.set_title(meta.get("title", "pretraining study"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_cpu(args) -> None:
    pcdet_ext.import_pcdet()
    t0 = time.time()
    arms = (*ARMS, *(PROBES if args.probe else ()))
    runs = {str(args.label_fraction): {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_kitti(Path(tmp), args.frames, args.depth)
        weights, gate = pretrain(args, data)
        ap, control = gate["pretrained"]["occ_ap"], gate["random encoder"]["occ_ap"]
        print(f"held-out masked-occupancy AP: pretrained {ap:.3f} | random-encoder control {control:.3f} "
              f"({args.pretrain_iters} iterations each)", file=sys.stderr)
        cfg = kitti_config(FINETUNE_CFG, data, args.depth, args.voxel)
        for seed in args.seeds:
            runs[str(args.label_fraction)][seed] = {}
            for arm in arms:
                score = finetune(args, cfg, weights, arm, seed)
                runs[str(args.label_fraction)][seed][arm] = score
                print(f"seed {seed} {arm:<10} mAP {score[MAP]:6.2f}  BEV mAP {score['BEV mAP']:6.2f}  held-out loss "
                      f"{score['held-out loss']:.3f}  ({time.time() - t0:.0f} s)", file=sys.stderr)
    labelled = runs[str(args.label_fraction)][args.seeds[0]][arms[0]]["labelled frames"]
    meta = {"data": f"synthetic KITTI layout, {args.frames} frames (25 % held out)", "frames": args.frames,
            "labelled_frames": labelled, "pretrain_iters": args.pretrain_iters,
            "finetune_iters": args.finetune_iters, "batch_size": args.batch_size, "voxel": args.voxel,
            "depth": args.depth, "occupancy_gate": gate, "pretraining_passes_control": ap > control,
            "minutes": (time.time() - t0) / 60,
            "title": f"SECOND, {labelled} labelled frames, {args.finetune_iters} fine-tune iterations, "
                     f"{len(args.seeds)} seeds (CPU)"}
    metrics = (MAP, "BEV mAP", "held-out loss")
    table = write_outputs(Path(args.out), summarise(runs, metrics), runs, meta, metrics)
    print(f"Phase 1 {args.pretrain_iters} iterations on {args.frames * 3 // 4} unlabelled frames: held-out masked-"
          f"occupancy AP {ap:.3f} vs random-encoder control {control:.3f}"
          + ("" if ap > control else " -- pretraining did NOT pass its control; the fine-tuning arms test a "
             "backbone that learned nothing the decoder could not") + f"; {meta['minutes']:.1f} min")
    print(table)
    print(f"written: {args.out}/results.json, table.md, study.png")


def read_runs(runs_dir: Path, fractions, seeds) -> dict:
    """{fraction: {seed: {arm: {mAP, <class>...}}}} from each run's last evaluation; every missing run
    is named at once."""
    import json

    from pcdet_ext.engine.recipes.progressive_rq.evaluate import mean_moderate_ap
    runs, missing = {}, []
    for f in fractions:  # as the run tags spell them (``pre_diff_1.0_0``)
        runs[f] = {}
        for s in seeds:
            runs[f][s] = {}
            for arm in ARMS:
                evals = runs_dir / f"{arm}_{f}_{s}" / "eval" / "eval_with_train"
                found = sorted(evals.glob("epoch_*/result.json"), key=lambda p: int(p.parent.name.split("_")[1]))
                if not found:
                    missing.append(str(evals / "epoch_*" / "result.json"))
                    continue
                result = json.loads(found[-1].read_text())
                per_class = moderate_3d(result)
                if not per_class:
                    raise SystemExit(f"{found[-1]}: no '<class>_3d/moderate_R40' entries (a KITTI-metric evaluation?)")
                runs[f][s][arm] = {MAP: mean_moderate_ap(result), **per_class}
    if missing:
        raise SystemExit("missing runs (train them as docs/pretraining.md says, or pass the --fractions / --seeds "
                         "you ran):\n  " + "\n  ".join(missing))
    return runs


def cmd_paired(args) -> None:
    runs = read_runs(Path(args.runs_dir), args.fractions, args.seeds)
    first = runs[args.fractions[0]][args.seeds[0]][ARMS[0]]
    metrics = tuple(first)
    meta = {"runs_dir": args.runs_dir, "fractions": args.fractions, "seeds": args.seeds,
            "title": f"{Path(args.runs_dir).name}, {len(args.seeds)} seeds"}
    print(write_outputs(Path(args.out), summarise(runs, metrics), runs, meta, metrics))
    print(f"written: {args.out}/results.json, table.md, study.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cpu = sub.add_parser("cpu", help="run the CPU study")
    cpu.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cpu.add_argument("--frames", type=int, default=96, help="synthetic frames (25 %% held out)")
    cpu.add_argument("--label_fraction", type=float, default=0.1, help="of the training frames, labelled")
    cpu.add_argument("--pretrain_iters", type=int, default=300)
    cpu.add_argument("--finetune_iters", type=int, default=300)
    cpu.add_argument("--batch_size", type=int, default=2)
    cpu.add_argument("--depth", type=float, default=38.4, help="metres ahead (x range [0, depth], y +-depth/2)")
    cpu.add_argument("--voxel", type=float, default=0.2, help="x/y voxel size, metres")
    cpu.add_argument("--probe", action="store_true", help="also the frozen-encoder probes of both inits")
    cpu.add_argument("--workers", type=int, default=4, help="DataLoader workers (OpenPCDet's default)")
    cpu.add_argument("--out", default=str(REPO / "output/pretraining_study/cpu"))
    paired = sub.add_parser("paired", help="paired differences of the GPU study's runs")
    paired.add_argument("--runs_dir", required=True, help="output/<cfg path>: holds <arm>_<F>_<S>/ run folders")
    paired.add_argument("--fractions", nargs="+", default=["0.05", "0.2", "1.0"],
                        help="as spelled in the run tags")
    paired.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    paired.add_argument("--out", default=str(REPO / "output/pretraining_study/paired"))
    args = p.parse_args()
    if args.cmd == "cpu":
        if not 0 < args.label_fraction <= 1:
            p.error(f"--label_fraction {args.label_fraction}: expected 0 < fraction <= 1")
        cmd_cpu(args)
    else:
        for f in args.fractions:
            try:
                ok = 0 < float(f) <= 1
            except ValueError:
                ok = False
            if not ok:
                p.error(f"--fractions {f}: expected numbers 0 < fraction <= 1, spelled as in the run tags")
        cmd_paired(args)


if __name__ == "__main__":
    main()
