"""Evaluate every trained (codebooks, entries) cell; write CSV, JSON and the rate/accuracy plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from pcdet_ext.engine.recipes.progressive_rq.evaluate import MAP_DEFINITION, check_cell, run_eval, trained_cells
from pcdet_ext.algorithms.rate import dense_float32_kb

COLUMNS = ["num_codebooks", "num_embeddings", "rate_lambda", "mAP", "kb_per_frame_measured", "kb_per_frame_fixed", "kb_per_frame_entropy",
           "code_bits_fixed", "code_bits_entropy", "occupancy_bits_fixed", "occupancy_bits_entropy",
           "pillars_per_frame", "frames"]


def sweep(model, dataset, loader, class_names, schedule: List[int], out_dir: Path, log,
          cells: Optional[Sequence[Sequence[int]]] = None, checkpoint: Optional[Path] = None,
          bitstream=None, lambdas: Sequence[float] = (), selected_on: Optional[str] = None) -> Dict:
    """The uncompressed reference and every trained cell (or the given ``[n, k]`` cells, each checked
    against what the checkpoint trained) of one model, ``checkpoint`` (named in the summary and the
    table) -> CSV, JSON, plot; returns the summary. With ``bitstream`` (the checkpoint's fitted models)
    each cell also has its measured serialised frame length; otherwise only the estimates. Each
    ``lambdas`` value > 0 adds the last cell coded rate-aware at that lambda (a rate/accuracy curve of
    one model, no retraining; needs ``bitstream``). ``selected_on``: which frames chose the checkpoint
    (named in the summary beside the frames reported on)."""
    if any(lam < 0 for lam in lambdas):
        raise ValueError(f"rate lambdas must be >= 0, got {list(lambdas)}")
    if any(lam > 0 for lam in lambdas) and bitstream is None:
        raise ValueError("rate lambdas need the checkpoint's bitstream models (split_infer.py --fit_models)")
    todo = trained_cells(model.quantizer, schedule) if cells is None else [tuple(c) for c in cells]
    for n, k in todo if cells is not None else []:
        warning = check_cell(model.quantizer, n, k, "evaluation.test_combinations codebooks",
                             "evaluation.test_combinations entries")
        if warning:
            log.warning(warning)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = run_eval(model, dataset, loader, class_names)  # bottleneck bypassed
    rows = []
    runs = [(n, k, 0.0) for n, k in todo] + [(*todo[-1], float(lam)) for lam in lambdas if lam > 0 and todo]
    for n, k, lam in runs:
        res = run_eval(model, dataset, loader, class_names, n, k, bitstream=bitstream, rate_lambda=lam)
        rows.append({c: res.get(c) for c in COLUMNS})
        log.info("(%d, %3d)%s: mAP %6.2f  %s%7.2f KB/frame fixed-length, %7.2f KB/frame entropy (estimates)", n, k,
                 f" lambda {lam:g}" if lam else "", res["mAP"],
                 f"{res['kb_per_frame_measured']:7.2f} KB/frame measured, " if bitstream else "",
                 res["kb_per_frame_fixed"], res["kb_per_frame_entropy"])
    grid = dataset.grid_size
    summary = {"checkpoint": str(checkpoint) if checkpoint else None,
               "reported_on": f"{getattr(dataset, 'split', 'val')} split, {len(dataset)} frames",
               "selected_on": selected_on, "uncompressed_mAP": reference["mAP"],
               "uncompressed_kb_per_frame": dense_float32_kb(int(grid[1]), int(grid[0]), model.quantizer.dim),
               "cells": rows}
    write_outputs(out_dir, "sweep", COLUMNS, rows, summary, plot)
    return summary


def write_outputs(out_dir: Path, stem: str, columns: Sequence[str], rows: List[Dict], summary: Dict,
                  plot_fn: Callable[[Dict, Path], object]) -> None:
    """``<stem>.csv`` (the rows), ``<stem>.json`` (the summary) and ``<stem>.png`` (``plot_fn``) in ``out_dir``."""
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot_fn(summary, out_dir / f"{stem}.png")


def format_table(summary: Dict) -> str:
    """Cells with their measured KB/frame (when the checkpoint has bitstream models) and the two
    estimates (fixed-length codes, empirical entropy)."""
    lines = [f"{'codebooks':>9} {'entries':>7} {'lambda':>7} {'mAP %':>7} {'KB/frame':>9} {'KB/frame':>9} {'KB/frame':>9}",
             f"{'':>9} {'':>7} {'':>7} {'':>7} {'measured':>9} {'fixed*':>9} {'entropy*':>9}"]
    for r in summary["cells"]:
        measured = f"{r['kb_per_frame_measured']:9.2f}" if r.get("kb_per_frame_measured") is not None else f"{'-':>9}"
        lam = f"{r['rate_lambda']:7g}" if r.get("rate_lambda") else f"{'-':>7}"
        lines.append(f"{r['num_codebooks']:>9} {r['num_embeddings']:>7} {lam} {r['mAP']:7.2f} {measured} "
                     f"{r['kb_per_frame_fixed']:9.2f} {r['kb_per_frame_entropy']:9.2f}")
    lines.append("* estimates" + ("" if any(r.get("kb_per_frame_measured") is not None for r in summary["cells"]) else
                                  "; measured needs bitstream models in the checkpoint (split_infer.py --fit_models)"))
    lines.append(f"{'uncompressed':>17} {summary['uncompressed_mAP']:7.2f} "
                 f"{summary['uncompressed_kb_per_frame']:9.1f} (float32 BEV pseudo-image)")
    lines.append(f"mAP %: {MAP_DEFINITION}, on the {summary.get('reported_on')}")
    if summary.get("checkpoint"):
        lines.append(f"every cell from one model: {summary['checkpoint']}")
    lines.append(f"reported on: {summary.get('reported_on')}; the checkpoint was selected on: "
                 f"{summary.get('selected_on') or 'not recorded'}")
    return "\n".join(lines)


def plot(summary: Dict, path: Path) -> Path:
    """mAP vs KB per frame (fixed-length and entropy), one line per codebook count, the rate-aware
    lambda curve (measured bytes); the uncompressed model as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain = [r for r in summary["cells"] if not r.get("rate_lambda")]
    curve = [r for r in summary["cells"] if r.get("rate_lambda")]
    depths = sorted({r["num_codebooks"] for r in plain})
    for n in depths:
        rows = sorted((r for r in plain if r["num_codebooks"] == n), key=lambda r: r["num_embeddings"])
        line, = ax.plot([r["kb_per_frame_fixed"] for r in rows], [r["mAP"] for r in rows], "o:",
                        label=f"{n} codebook{'s' if n > 1 else ''} (fixed-length estimate)")
        ax.plot([r["kb_per_frame_entropy"] for r in rows], [r["mAP"] for r in rows], "x--", color=line.get_color(),
                alpha=0.6, label=f"{n} codebook{'s' if n > 1 else ''} (entropy estimate)")
        if all(r.get("kb_per_frame_measured") is not None for r in rows):
            ax.plot([r["kb_per_frame_measured"] for r in rows], [r["mAP"] for r in rows], "s-", color=line.get_color(),
                    linewidth=2, label=f"{n} codebook{'s' if n > 1 else ''} (measured bytes)")
        for j, r in enumerate(rows):  # entries per cell; depths and neighbours offset apart
            ax.annotate(f"k={r['num_embeddings']}", (r["kb_per_frame_fixed"], r["mAP"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4 + 9 * (depths.index(n) % 2) - 18 * (j % 2)),
                        color=line.get_color())
    if curve:
        last = next(r for r in reversed(plain) if (r["num_codebooks"], r["num_embeddings"]) ==
                    (curve[0]["num_codebooks"], curve[0]["num_embeddings"]))
        pts = [last] + sorted(curve, key=lambda r: r["rate_lambda"])
        lams = ", ".join(f"{r['rate_lambda'] or 0:g}" for r in pts)
        ax.plot([r["kb_per_frame_measured"] for r in pts], [r["mAP"] for r in pts], "^-", color="k",
                label=f"({last['num_codebooks']}, {last['num_embeddings']}) rate-aware, lambda {lams}")
    ax.axhline(summary["uncompressed_mAP"], color="k", linestyle=":",
               label=f"uncompressed ({summary['uncompressed_kb_per_frame'] / 1024:.1f} MB/frame)")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 2, 5, 10, 20: not 2x10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.1g}"[0] in "25" else ""))
    ax.set_xlabel("KB per frame")
    ax.set_ylabel("mAP (3D, moderate, R40)")
    ax.set_title("PointPillarRQ: accuracy vs rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
