"""Edge latency per frame and per part, and the lean edge against the PyTorch EdgeRuntime.

On the device (Raspberry Pi 4, Jetson; needs only the pcdet_ext_edge install, no torch):

    python benchmarks/bench_edge.py --bundle edge_bundle/ --input scans/ --csv edge_latency.csv

prints p50 / p95 / p99 ms of voxelise, encoder, quantize, code and the whole edge, and writes one CSV row
per frame (after --warmup frames). On a development machine, the comparison (each side in its own
process, so that each one's peak memory is its own):

    python benchmarks/bench_edge.py --compare [--ckpt RQ_CKPT_WITH_MODELS]

runs both edges on the 11 kitti_mini scans and the 40 raw scans (../shared/data) at 1 and 2 threads
and prints lean / PyTorch ratios of the whole edge and of each part, and peak RSS. Without --ckpt it
builds a full-grid KITTI PointPillarRQ (5 x 256) whose quantizer is fitted to 4 raw scans' pillar
features (speed does not depend on the weights). Timings from emulation (QEMU) say nothing: ARM
timings need ARM hardware.
"""
import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pcdet_ext.edge.runtime import TIMING

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
SETS = {"kitti_mini": SHARED / "kitti_mini/training/velodyne", "kitti_raw": SHARED / "kitti_raw_2011_09_26/velodyne"}


def scans(folder):
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix in (".bin", ".npy"))
    if not paths:
        raise SystemExit(f"error: no .bin / .npy scans in {folder}")
    return paths


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lean_rows(args):
    from pcdet_ext.edge import EdgeBundle, LeanEdge, read_scan
    bundle = EdgeBundle.load(args.bundle)
    edge = LeanEdge(bundle, args.num_codebooks, args.num_embeddings, threads=args.threads)
    paths = scans(args.input)
    for path in paths[:args.warmup]:
        edge.encode(read_scan(path, bundle.voxels.file_columns))
    rows = []
    for path in paths:
        points = read_scan(path, bundle.voxels.file_columns)
        _, info = edge.encode(points)
        rows.append({"scan": path.name, "points": len(points), **{k: info[k] for k in ("pillars", "bytes", *TIMING)}})
    return rows


def torch_rows(args):
    """The PyTorch edge, timed by part: OpenPCDet's prepare_data (voxelise), PillarVFE, quantizer, coder."""
    import torch

    from pcdet_ext.algorithms.bitstream import encode_frame
    from pcdet_ext.deploy import runtime
    from pcdet_ext.edge import read_scan
    torch.set_num_threads(args.threads or 1)
    model, dataset, _ = runtime.load_split_model(ckpt=args.torch_ckpt)
    server = runtime.ServerRuntime.from_checkpoint(model, dataset, args.torch_ckpt)
    q = model.quantizer
    n = args.num_codebooks or q.trained_depth
    k = args.num_embeddings or int(q.trained_size[:n].min())
    q.set_active(n, k)
    paths = scans(args.input)
    rows = []
    with torch.no_grad():
        for i, path in enumerate(paths[:args.warmup] + paths):
            points = read_scan(path)
            t0 = time.perf_counter()
            batch = runtime._batch(dataset, points)
            t1 = time.perf_counter()
            feats = model.vfe(batch)["pillar_features"]
            t2 = time.perf_counter()
            codes = q.encode(feats).numpy()
            t3 = time.perf_counter()
            data = encode_frame(runtime.batch_cells(batch, server.geo.width), codes, k, server.models, server.model_id)
            t4 = time.perf_counter()
            if i >= args.warmup:
                ms = [(b - a) * 1e3 for a, b in zip((t0, t1, t2, t3), (t1, t2, t3, t4))]
                rows.append({"scan": path.name, "points": len(points), "pillars": len(codes), "bytes": len(data),
                             **dict(zip(TIMING, ms + [sum(ms)]))})
    return rows


def summary(rows):
    return {part: [float(np.percentile([r[part] for r in rows], q)) for q in (50, 95, 99)] for part in TIMING}


def child(args) -> None:
    rows = torch_rows(args) if args.torch_ckpt else lean_rows(args)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    stats = summary(rows)
    if args.json_line:
        print(json.dumps({"summary": stats, "peak_mib": peak_mib(), "bytes": [r["bytes"] for r in rows]}))
        return
    print(f"{len(rows)} frames from {args.input}, {args.threads or 'default'} threads; ms p50 / p95 / p99:")
    for part, (p50, p95, p99) in stats.items():
        print(f"  {part[:-3]:>9}: {p50:8.1f} {p95:8.1f} {p99:8.1f}")
    print(f"  peak RSS {peak_mib():.0f} MiB" + (f"; per-frame rows -> {args.csv}" if args.csv else ""))


def prepared_checkpoint(tmp: Path) -> Path:
    """A full-grid KITTI PointPillarRQ 5 x 256 with bitstream models (quantizer fitted to 4 raw scans)."""
    import torch

    from pcdet_ext.deploy import runtime
    from pcdet_ext.edge import read_scan
    from pcdet_ext.engine.recipes.progressive_rq.measured import STATE_KEY
    from pcdet_ext.utils.checkpoint import atomic_save, plain
    torch.manual_seed(0)
    model, dataset, cfg = runtime.load_split_model("cfgs/kitti_models/pointpillar_rq.yaml")
    fit = [read_scan(p) for p in scans(SETS["kitti_raw"])[:4]]
    runtime.fit_quantizer_to_frames(model, dataset, fit, [16, 64, 256], steps=5)
    models = runtime.fit_probability_models(model, dataset, fit, [16, 64, 256])
    atomic_save({"model_state": model.state_dict(), STATE_KEY: models.to_state(), "pcdet_cfg": plain(cfg)},
                tmp / "rq_bitstream.pth")
    return tmp / "rq_bitstream.pth"


def run_child(flags):
    out = subprocess.run([sys.executable, __file__, "--json_line", *flags], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_edge_"))
    ckpt = Path(args.ckpt) if args.ckpt else prepared_checkpoint(tmp)
    export = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools/export_edge.py"),
                             "--ckpt", str(ckpt), "--out", str(tmp / "bundle")], capture_output=True, text=True)
    if export.returncode:
        raise SystemExit(export.stderr[-3000:])
    cell = ["--num_codebooks", str(args.num_codebooks or 3), "--num_embeddings", str(args.num_embeddings or 64)]
    print(f"lean edge (numpy/numba + onnxruntime) vs PyTorch EdgeRuntime (OpenPCDet prepare_data + PillarVFE), "
          f"cell ({cell[1]}, {cell[3]}), median ms per frame; ratio = lean / PyTorch")
    print(f"{'scans':>10} {'thr':>3} {'side':>7} " + " ".join(f"{p[:-3]:>9}" for p in TIMING) + f" {'peak MiB':>8}")
    for name, folder in SETS.items():
        for threads in (1, 2):
            common = ["--input", str(folder), "--threads", str(threads), "--warmup", str(args.warmup), *cell]
            lean = run_child(["--bundle", str(tmp / "bundle"), *common])
            ref = run_child(["--torch_ckpt", str(ckpt), *common])
            same = sum(a == b for a, b in zip(lean["bytes"], ref["bytes"]))
            for side, res in (("lean", lean), ("pytorch", ref)):
                print(f"{name:>10} {threads:>3} {side:>7} " + " ".join(f"{res['summary'][p][0]:9.1f}" for p in TIMING)
                      + f" {res['peak_mib']:8.0f}")
            ratios = [lean["summary"][p][0] / max(ref["summary"][p][0], 1e-9) for p in TIMING]
            print(f"{name:>10} {threads:>3} {'ratio':>7} " + " ".join(f"{r:9.2f}" for r in ratios)
                  + f" {lean['peak_mib'] / ref['peak_mib']:8.2f}   ({same}/{len(lean['bytes'])} frames byte-identical)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="edge bundle (tools/export_edge.py): time the lean edge")
    p.add_argument("--input", help="folder of .bin / .npy scans")
    p.add_argument("--csv", default=None, help="per-frame rows")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime / torch threads")
    p.add_argument("--num_codebooks", type=int, default=None)
    p.add_argument("--num_embeddings", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="frames encoded first and not timed (numba, onnxruntime)")
    p.add_argument("--compare", action="store_true", help="lean vs PyTorch edge on the shared scans")
    p.add_argument("--ckpt", default=None, help="with --compare: RQ checkpoint with bitstream models")
    p.add_argument("--torch_ckpt", default=None, help=argparse.SUPPRESS)  # a --compare child: the PyTorch side
    p.add_argument("--json_line", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compare:
        compare(args)
    elif args.input and (args.bundle or args.torch_ckpt):
        child(args)
    else:
        p.error("give --bundle DIR --input DIR (lean edge) or --compare")


if __name__ == "__main__":
    main()
