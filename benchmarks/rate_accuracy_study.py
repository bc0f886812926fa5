"""Accuracy per byte sent: every way of splitting the same PointPillars detector, on the same held-out
frames, as measured KB/frame (bytes actually produced) vs mAP.

Methods:
- RQ fixed-length (estimate: ceil(log2 k) bits per code + 1 bit per BEV cell of occupancy);
- RQ context-coded (the bitstream the edge sends) at every trained (codebooks, entries) cell;
- RQ rate-aware at ``--lambdas`` (the deepest cell, codes chosen by distortion + lambda x bits);
- at ``--rd_lambdas``: the rate-aware choice with its bitstream models refitted on its own codes (no
  training), and the codebooks rate-distortion trained under that choice (``--rd_rounds`` x
  ``--rd_steps``); the JSON's ``bytes_saved_vs_rate_aware`` compares both with the rate-aware curve at
  equal mAP;
- at ``--gate_weights``: a learned keep/drop of pillars (``algorithms.pillar_gate``) trained on the
  detection loss + weight x KB/frame kept, the dropped pillars neither coded nor in the occupancy
  (nearest codes, the checkpoint's models);
- scalar-quantized pillar features at ``--scalar_bits``, entropy-coded (per-channel static models
  fitted on the train frames; same occupancy coding as RQ);
- the raw point cloud compressed with Draco at ``--draco_bits`` quantization bits (points inside the
  point-cloud range, intensity 8 bits), decoded and fed to the *uncompressed* detector;
- reference lines: the uncompressed detector, and the literature's raw point-cloud codec anchors
  (~6 bits/point for no loss, ~2 bits/point with a retrained detector) at this data's points/frame.

CPU default (2 cores: 32 min for the detector, 8 min for the RQ run, 22 min for the study; see
docs/split_inference.md for the figures):
a synthetic KITTI-layout set of 192 frames, a PointPillars trained 2000 iterations and 3 codebooks x
[16, 64] (``tools/demo_split_rq.py`` steps 1-4 with
those flags, cached under ``--out``), reported on its val split; RQ stage checkpoints are selected on a
held-out part of train (``dataset.selection: train_holdout``), never on the frames reported. The demo's
small detector: ``--iters 300 --num_frames 64 --n_codebook 2`` (8 min).
KITTI on GPUs: train the RQ run from a model-zoo PointPillars (``tools/train_eval_rq.py``, experiment
``model.pretrained_weight``), fit its bitstream models (``tools/split_infer.py --fit_models``), then
``--config <experiment.yaml> --rq_ckpt <ckpt>_bitstream.pth`` evaluates it here (no training).

    python benchmarks/rate_accuracy_study.py [--out output/rate_study] [--iters 2000] [--num_frames 192]

Writes ``<out>/study/rate_accuracy.{csv,json,png}``. Needs ``pip install DracoPy`` for the Draco curve.
"""
import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pcdet_ext.cli import demo_split_rq
from pcdet_ext.deploy.sweep import write_outputs

REFIT, RD, KEEP_DROP = "RQ rate-aware, models refitted", "RQ rate-distortion trained", "RQ + learned pillar keep/drop"
COLUMNS = ["method", "setting", "kb_per_frame", "mAP", "bits_per_point"]
ANCHORS = {"point-cloud codec, no loss (~6 bits/point)": 6.0,
           "point-cloud codec + retrained detector (~2 bits/point)": 2.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_split_rq.add_arguments(parser, Path("output/rate_study"))
    # a detector worth compressing (the demo's 300 x 64: 18 mAP), 3 codebooks: the (3, 64) operating point
    parser.set_defaults(iters=2000, num_frames=192, n_codebook=3)
    parser.add_argument("--lambdas", default="0.003,0.01,0.03,0.1", help="rate-aware lambdas at the deepest trained cell")
    parser.add_argument("--rd_lambdas", default="0.01,0.03,0.1",
                        help="rate-distortion training (and its refit-only control) at the deepest cell ('' skips)")
    parser.add_argument("--rd_rounds", type=int, default=2, help="rounds of (training, models refitted)")
    parser.add_argument("--rd_steps", type=int, default=72, help="training iterations per round")
    parser.add_argument("--rd_lr", type=float, default=5e-4, help="Adam learning rate of the codebooks")
    parser.add_argument("--gate_weights", default="0.005,0.01,0.03,0.1,0.3",
                        help="learned pillar keep/drop at the deepest cell: detection loss + WEIGHT x KB/frame kept")
    parser.add_argument("--gate_steps", type=int, default=144, help="training iterations of each pillar gate")
    parser.add_argument("--gate_lr", type=float, default=0.02, help="Adam learning rate of the pillar gate")
    parser.add_argument("--scalar_bits", default="8,4,2")
    parser.add_argument("--draco_bits", default="6,7,8,10,12,14", help="Draco position quantization bits ('' skips)")
    parser.add_argument("--fit_frames", type=int, default=32, help="train frames the scalar coder is fitted on")
    parser.add_argument("--config", type=Path, help="an existing RQ run instead of training one: its experiment config "
                        "(tools/train_eval_rq.py), with --rq_ckpt")
    parser.add_argument("--rq_ckpt", type=Path, help="its checkpoint with bitstream models (split_infer.py --fit_models)")
    args = parser.parse_args(argv)
    if (args.config is None) != (args.rq_ckpt is None):
        parser.error("--config and --rq_ckpt go together (an existing RQ run); give both or neither")
    return args


def floats(text: str, flag: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or not all(v > 0 for v in values):
        raise SystemExit(f"{flag} {text!r}: expected comma-separated numbers > 0")
    return values


def ints(text: str, flag: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated integers")


def load(config: Path, bitstream: Path, log):
    """The RQ model with its checkpoint and bitstream models, the val loader, the train loader and the train
    frames through a test-mode (non-augmented) loader."""
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    from pcdet_ext.engine.recipes.progressive_rq.measured import stored_models
    from pcdet_ext.openpcdet.datasets.holdout import infos_attr
    from pcdet_ext.utils.checkpoint import load_checkpoint
    exp, pcdet_set, _ = experiment.load_experiment(config, [], {("training", "mode"): "eval"})
    cfg = experiment.build_model_cfg(exp, pcdet_set)
    model, train, val, _ = experiment.build(exp, cfg, False, log)
    state = load_checkpoint(bitstream)
    model.load_state_dict(state["model_state"])
    fit = experiment.train_frames_loader(exp, cfg, getattr(train[0], infos_attr(train[0])), log)
    return exp, model, val, train, fit, stored_models(state), state, experiment.class_names(cfg)


def rq_rows(model, val, names, exp, bitstream_path, models, state, lambdas, out, log):
    from pcdet_ext.deploy.sweep import sweep
    from pcdet_ext.engine.recipes.progressive_rq import experiment
    summary = sweep(model, val[0], val[1], names, list(exp.progressive_learning.embedding_schedule), out / "rq_sweep",
                    log, checkpoint=bitstream_path, bitstream=models, lambdas=lambdas,
                    selected_on=experiment.describe_selection(state.get("config")))
    rows = []
    for r in summary["cells"]:
        cell = f"({r['num_codebooks']}, {r['num_embeddings']})"
        if r["rate_lambda"]:
            rows.append(("RQ rate-aware", f"{cell} lambda {r['rate_lambda']:g}", r["kb_per_frame_measured"], r["mAP"]))
        else:
            rows.append(("RQ fixed-length (estimate)", cell, r["kb_per_frame_fixed"], r["mAP"]))
            rows.append(("RQ context-coded", cell, r["kb_per_frame_measured"], r["mAP"]))
    return summary, rows


def rd_rows(model, state, exp, cell, train, fit, frames, val, names, models, lambdas, args, log):
    """At ``cell`` (n, k), per lambda: the rate-aware choice with its models refitted on the codes it makes
    (no training: the control), and the codebooks rate-distortion trained (``--rd_rounds`` x
    ``--rd_steps``), each from the study's checkpoint, coded under its own refitted models."""
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import run_eval
    from pcdet_ext.deploy.rate_distortion import rate_distortion_train, refit_rate_aware
    sizes, (n, k) = list(exp.progressive_learning.embedding_schedule), cell
    rows = []

    def row(method: str, lam: float, refitted) -> None:
        res = run_eval(model, val[0], val[1], names, n, k, bitstream=refitted, rate_lambda=lam)
        rows.append((method, f"({n}, {k}) lambda {lam:g}", res["kb_per_frame_measured"], res["mAP"]))

    for lam in lambdas:
        model.load_state_dict(state["model_state"])
        row(REFIT, lam, refit_rate_aware(model, fit[0], frames, models, lam, sizes, args.rd_rounds))
        row(RD, lam, rate_distortion_train(model, train[1], fit[0], frames, models, n, k, lam, sizes,
                                           args.rd_rounds, args.rd_steps, args.rd_lr, log))
    model.load_state_dict(state["model_state"])
    return rows


def keep_drop_rows(model, state, cell, train, fit, frames, val, names, models, weights, args, cells):
    """At ``cell`` (n, k), per rate weight: a :class:`PillarGate` trained (``--gate_steps``) on the
    detection loss + weight x KB per frame kept, the dropped pillars neither coded nor scattered; the share
    kept against the sweep's ``cells``."""
    from pcdet_ext.algorithms.pillar_gate import PillarGate
    from pcdet_ext.deploy import keep_drop
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import operating_point, run_eval
    model.load_state_dict(state["model_state"])
    q, (n, k) = model.quantizer, cell
    with operating_point(q, n, k):
        bits = keep_drop.code_bits(models, k, keep_drop.occupancy_bits_per_pillar(model, fit[0], frames, models, k))
    every = next(r["pillars_per_frame"] for r in cells if (r["num_codebooks"], r["num_embeddings"], r["rate_lambda"])
                 == (n, k, 0.0))  # the sweep's row of that cell: every pillar sent
    rows = []
    for weight in weights:
        torch.manual_seed(args.seed)
        gate = PillarGate(q.dim)
        with operating_point(q, n, k):
            keep_drop.train_gate(model, gate, train[1], bits, weight, args.gate_steps, args.gate_lr)
        with keep_drop.gated(model, gate, bits):
            res = run_eval(model, val[0], val[1], names, n, k, bitstream=models)
        rows.append((KEEP_DROP, f"({n}, {k}) weight {weight:g}, {100 * res['pillars_per_frame'] / every:.0f} % of pillars",
                     res["kb_per_frame_measured"], res["mAP"]))
    return rows


def bytes_saved(rows, method: str, reference: str, cell: str) -> list:
    """Per row of ``method``: the bytes the ``reference`` curve (the post-hoc rate-aware choice with ``cell``
    coded without the rate term; its Pareto front, piecewise linear in mAP) needs for the same mAP, and the
    share saved. Above the front's best mAP the reference is its best point (it never gets there: the
    share is a lower bound, ``reference_reaches`` False); below its lowest, None."""
    points = sorted((ap, kb) for m, s, kb, ap in rows if m == reference or (m == "RQ context-coded" and s == cell))
    front = [p for p in points if not any(q[0] >= p[0] and q[1] < p[1] for q in points)]  # mAP up, bytes up
    out = []
    for m, s, kb, ap in rows:
        if m != method:
            continue
        ref = None if not front or ap < front[0][0] else \
            front[-1][1] if ap > front[-1][0] else float(np.interp(ap, *zip(*front)))
        out.append({"setting": s, "kb_per_frame": kb, "mAP": ap, "reference_kb_at_equal_mAP": ref,
                    "reference_reaches": bool(front) and ap <= front[-1][0],
                    "bytes_saved": None if ref is None else 1 - kb / ref})
    return out


def scalar_rows(model, val, train, names, models, bits_list, fit_frames):
    from pcdet_ext.algorithms.bitstream.scalar import ScalarFeatureCoder
    from pcdet_ext.deploy.baselines import pillar_features, scalar_quantized
    from pcdet_ext.engine.evaluation import evaluate_model
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import mean_moderate_ap
    feats = pillar_features(model, train[1], fit_frames)
    rows = []
    for bits in bits_list:
        coder, sizes = ScalarFeatureCoder.fit(feats, bits), []
        with scalar_quantized(model, coder, models, sizes):
            _, _, result = evaluate_model(model, val[0], val[1], names)
        rows.append(("scalar-quantized features, entropy-coded", f"{bits} bits", np.mean(sizes) / 1024,
                     mean_moderate_ap(result)))
    return rows


def draco_rows(model, val, train_frames, names, bits_list):
    from pcdet_ext.deploy.baselines import DracoCodec, coded_points, frame_points, points_replaced
    from pcdet_ext.engine.evaluation import evaluate_model
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import bypassed, mean_moderate_ap
    points = frame_points(val[0])
    intensity_max = max(float(p[:, 3].max(initial=0)) for p in train_frames) or 1.0
    mean_points = float(np.mean([len(p) for p in points.values()]))
    rows = []
    for bits in bits_list:
        decoded, sizes = coded_points(points, DracoCodec(bits, intensity_max))
        with points_replaced(val[0], decoded), bypassed(model):
            _, _, result = evaluate_model(model, val[0], val[1], names)
        rows.append(("Draco point cloud -> uncompressed detector", f"{bits}-bit positions", np.mean(sizes) / 1024,
                     mean_moderate_ap(result)))
    return rows, mean_points


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in summary["rows"]):
        rows = sorted((r for r in summary["rows"] if r["method"] == method), key=lambda r: r["kb_per_frame"])
        if method == "RQ rate-aware":  # the curve starts at its cell coded without the rate term (lambda 0)
            cell = rows[0]["setting"].split(" lambda")[0]
            rows += [r for r in summary["rows"] if r["method"] == "RQ context-coded" and r["setting"] == cell]
        ax.plot([r["kb_per_frame"] for r in rows], [r["mAP"] for r in rows], "o-" if "estimate" not in method else "o:",
                label=method)
        for r in rows:
            text = ("l=" + r["setting"].split(" lambda ")[-1] if " lambda " in r["setting"] else
                    "w=" + r["setting"].split(" weight ")[-1] if " weight " in r["setting"] else r["setting"])
            ax.annotate(text, (r["kb_per_frame"], r["mAP"]), fontsize=6, textcoords="offset points",
                        xytext=(3, -9 if method == "RQ rate-aware" else 3))
    ax.axhline(summary["uncompressed_mAP"], color="k", linestyle=":", label="uncompressed detector")
    for name, kb in summary["anchors_kb_per_frame"].items():
        ax.axvline(kb, color="grey", linestyle="--", alpha=0.6)
        ax.annotate(name, (kb, ax.get_ylim()[0]), rotation=90, fontsize=6, color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("KB per frame (measured bytes)")
    ax.set_ylabel("mAP % (3D, moderate, R40)")
    ax.set_title(f"accuracy per byte, {summary['data']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    lambdas, rd_lambdas = floats(args.lambdas, "--lambdas"), floats(args.rd_lambdas, "--rd_lambdas")
    gate_weights = floats(args.gate_weights, "--gate_weights")
    scalar_bits, draco_bits = ints(args.scalar_bits, "--scalar_bits"), ints(args.draco_bits, "--draco_bits")
    if draco_bits:
        import DracoPy  # noqa: F401  (fail before hours of training, not after)
    torch.manual_seed(args.seed)
    start = time.time()
    config, bitstream = (args.config, args.rq_ckpt) if args.config else cached(args) or trained(args)
    trained_s = time.time() - start
    out = args.out / "study"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("rate_accuracy_study")
    exp, model, val, train_aug, train, models, state, names = load(config, bitstream, log)
    summary, rows = rq_rows(model, val, names, exp, bitstream, models, state, lambdas, args.out, log)
    from pcdet_ext.deploy.baselines import frame_points
    frames = list(frame_points(train[0]).values())  # the train frames' points, as the dataset hands them over
    deepest = next((r["num_codebooks"], r["num_embeddings"]) for r in reversed(summary["cells"]) if not r["rate_lambda"])
    rows += rd_rows(model, state, exp, deepest, train_aug, train, frames, val, names, models, rd_lambdas, args, log)
    rows += keep_drop_rows(model, state, deepest, train_aug, train, frames[:args.fit_frames], val, names, models,
                           gate_weights, args, summary["cells"])
    rows += scalar_rows(model, val, train, names, models, scalar_bits, args.fit_frames)
    drows, mean_points = draco_rows(model, val, frames, names, draco_bits) if draco_bits else ([], None)
    rows += drows
    if mean_points is None:
        mean_points = float(np.mean([len(p) for p in frame_points(val[0]).values()]))
    table = [dict(zip(COLUMNS, (m, s, float(kb), float(ap), float(kb * 8192 / mean_points)))) for m, s, kb, ap in rows]
    if args.config:
        data = f"{exp.dataset.name} set {exp.dataset.dir}, {len(val[0])} val frames"
    else:
        data = (f"synthetic {'KITTI-layout' if args.layout == 'kitti' else '4-class custom'} set, {len(val[0])} val frames "
                f"(seed {args.seed}, {args.num_frames} frames)")
    result = {"data": data,
              "detector": f"PointPillars, {args.iters} iterations on {len(train[0])} train frames "
                          "(tools/demo_pointpillars.py)" if not args.config else f"the RQ run of {args.config}",
              "rq": f"{args.n_codebook} codebooks x {args.schedule} entries, {args.stage_epochs} epochs per stage"
                    if not args.config else str(args.rq_ckpt),
              "selected_on": summary["selected_on"], "reported_on": summary["reported_on"],
              "uncompressed_mAP": summary["uncompressed_mAP"],
              "uncompressed_kb_per_frame": summary["uncompressed_kb_per_frame"],
              "mean_points_per_frame": mean_points,
              "anchors_kb_per_frame": {k: bits * mean_points / 8192 for k, bits in ANCHORS.items()},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
              "seconds": {"training (0 when cached)": round(trained_s), "study": round(time.time() - start - trained_s)},
              "rows": table}
    cell = next((s.split(" lambda")[0] for m, s, _, _ in rows if m == RD), None)
    result["bytes_saved_vs_rate_aware"] = {m: bytes_saved(rows, m, "RQ rate-aware", cell) for m in (REFIT, RD, KEEP_DROP)
                                           } if cell else {}
    write_outputs(out, "rate_accuracy", COLUMNS, table, result, plot)
    print(f"{'method':<44} {'setting':<22} {'KB/frame':>9} {'bits/pt':>8} {'mAP %':>7}")
    for r in table:
        print(f"{r['method']:<44} {r['setting']:<22} {r['kb_per_frame']:9.2f} {r['bits_per_point']:8.2f} {r['mAP']:7.2f}")
    print(f"uncompressed detector: mAP {result['uncompressed_mAP']:.2f} % ({result['uncompressed_kb_per_frame']:.0f} KB/frame "
          f"float32 BEV); {mean_points:.0f} points/frame in range; anchors: "
          + ", ".join(f"{k} = {v:.1f} KB" for k, v in result["anchors_kb_per_frame"].items()))
    print(f"{result['data']}; {result['detector']}; reported on {result['reported_on']}, RQ selected on "
          f"{result['selected_on']}; {result['machine']}; {result['seconds']} s")
    for method, points in result["bytes_saved_vs_rate_aware"].items():
        for p in points:
            ref = p["reference_kb_at_equal_mAP"]
            print(f"{method} {p['setting']}: {p['kb_per_frame']:.3f} KB at mAP {p['mAP']:.2f}; the rate-aware choice "
                  + ("reaches no mAP that low" if ref is None else
                     f"needs {ref:.3f} KB there: {100 * p['bytes_saved']:+.1f} % saved" if p["reference_reaches"] else
                     f"never reaches it (its best point: {ref:.3f} KB): >= {100 * p['bytes_saved']:+.1f} % saved"))
    print(f"wrote {out / 'rate_accuracy.csv'}, .json, .png")
    return 0


TRAINING_FLAGS = ("layout", "num_frames", "iters", "batch_size", "lr", "seed", "n_codebook", "schedule", "stage_epochs",
                  "warmup_epochs")


def trained(args):
    """Detector, RQ run and bitstream models trained under ``--out`` (its flags recorded for :func:`cached`)."""
    config, bitstream = demo_split_rq.train(args)
    (args.out / "study_training.json").write_text(json.dumps({"flags": {k: getattr(args, k) for k in TRAINING_FLAGS},
                                                               "bitstream": str(bitstream)}))
    return config, bitstream


def cached(args):
    """(config, RQ checkpoint with bitstream models) of an earlier run under ``--out`` with the same
    training flags, or None; other flags there are refused (name another --out)."""
    stamp = args.out / "study_training.json"
    if not stamp.is_file():
        return None
    record, now = json.loads(stamp.read_text()), {k: getattr(args, k) for k in TRAINING_FLAGS}
    before = record["flags"]
    if before != now:
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        raise SystemExit(f"{args.out} holds a run trained with other flags ({changed}: then, now): give another --out")
    if not Path(record["bitstream"]).is_file():
        raise SystemExit(f"{stamp} names {record['bitstream']}, which is gone: remove {args.out} and rerun")
    return args.out / "split_demo.yaml", Path(record["bitstream"])


if __name__ == "__main__":
    sys.exit(main())
