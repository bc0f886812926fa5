"""The lean edge: encode point files with an edge bundle, save and/or send the frames.

    python -m pcdet_ext.edge --bundle edge_bundle/ --input scan.bin
    python -m pcdet_ext.edge --bundle edge_bundle/ --input scans/ --out frames/ --num_codebooks 3 --num_embeddings 64
    python -m pcdet_ext.edge --bundle edge_bundle/ --input incoming/ --watch --remote server:18890

Per frame: pillars, points cut by the caps (as OpenPCDet cuts them), bytes, and the time of each part
(voxelise, encoder, quantize, code). ``--out`` writes <scan name>.rqf per scan (tools/split_infer.py
--save_frames writes the same names); ``--watch`` keeps encoding files as they arrive in the folder
(each once unmodified for --settle_s; a bad file is reported and skipped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np

from pcdet_ext.edge.bundle import FRAME_SUFFIX, BundleError, EdgeBundle
from pcdet_ext.edge.auth import KeyFileError
from pcdet_ext.edge.runtime import TIMING, LeanEdge, PointFileError, read_scan
from pcdet_ext.edge.transport import TransportError, add_client_arguments, client_from_args

SCAN_SUFFIXES = (".bin", ".npy")


def _scans(source: Path, watch: bool, poll_s: float, settle_s: float, idle_exit_s: float) -> Iterator[Path]:
    """The scan files of ``source`` (a file, or a folder in name order; hidden names, a writer's
    temporary files, skipped); with ``watch`` new ones as they arrive, each once unmodified for
    ``settle_s``, until ``idle_exit_s`` without a new file (0: never)."""
    if source.is_file() or not source.exists():
        yield source
        return
    seen, idle_since = set(), time.monotonic()
    while True:
        fresh = False
        for path in sorted(p for p in source.iterdir()
                           if p.suffix in SCAN_SUFFIXES and not p.name.startswith(".") and p not in seen):
            if not watch or time.time() - path.stat().st_mtime >= settle_s:
                seen.add(path)
                fresh = True
                yield path
        if not watch:
            return
        idle_since = time.monotonic() if fresh else idle_since
        if idle_exit_s and time.monotonic() - idle_since > idle_exit_s:
            return
        time.sleep(poll_s)


def _percentiles(rows: List[Dict[str, float]], key: str) -> str:
    values = np.array([r[key] for r in rows])
    return " / ".join(f"{np.percentile(values, q):.1f}" for q in (50, 95, 99))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdet_ext.edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="edge bundle folder (tools/export_edge.py)")
    p.add_argument("--input", required=True, help="a .bin / .npy scan or a folder of them")
    p.add_argument("--out", default=None, help="write one frame per scan here, named <scan name>.rqf")
    p.add_argument("--remote", default=None, help="host:port of tools/split_server.py: send each frame")
    add_client_arguments(p)
    p.add_argument("--num_codebooks", type=int, default=None, help="default: the deepest cell of the bundle")
    p.add_argument("--num_embeddings", type=int, default=None, help="default: the largest k at that depth")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own choice)")
    p.add_argument("--watch", action="store_true", help="keep encoding scans as they arrive in --input")
    p.add_argument("--poll_s", type=float, default=0.2)
    p.add_argument("--settle_s", type=float, default=1.0,
                   help="with --watch: a scan is read once unmodified this long (a writer that renames a finished "
                        "hidden file into the folder is read at once)")
    p.add_argument("--idle_exit_s", type=float, default=0.0, help="with --watch: stop after this long without a scan")
    p.add_argument("--json", default=None, help="write per-frame rows and the summary here")
    args = p.parse_args(argv)
    try:
        bundle = EdgeBundle.load(args.bundle)
        edge = LeanEdge(bundle, args.num_codebooks, args.num_embeddings, threads=args.threads)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = None
    if args.remote:
        try:
            client = client_from_args(args, args.remote)
        except (ValueError, KeyFileError, TransportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    print(f"bundle {bundle.root} (model {bundle.model_id.hex()}), cell ({edge.n}, {edge.k})")
    print(f"{'scan':>18} {'pillars':>7} {'capped':>7} {'bytes':>7} {'voxelise':>8} {'encoder':>8} {'quantize':>8} "
          f"{'code':>6} {'edge ms':>8}{' boxes' if client else ''}")
    rows, refused = [], 0
    for path in _scans(Path(args.input), args.watch, args.poll_s, args.settle_s, args.idle_exit_s):
        try:
            data, info = edge.encode(read_scan(path, bundle.voxels.file_columns))
        except PointFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.watch:  # a watcher keeps serving the scans that follow
                continue
            return 2
        if info["nonfinite_points"]:
            print(f"{path.name}: {info['nonfinite_points']} points with NaN/inf values dropped", file=sys.stderr)
        if out:
            (out / (path.stem + FRAME_SUFFIX)).write_bytes(data)
        boxes = ""
        if client is not None:
            try:
                boxes = f" {len(json.loads(client.request(data))['boxes']):>5}"
            except TransportError as exc:
                refused += 1
                boxes = f" {exc}"
        rows.append({"scan": path.name, **info})
        print(f"{path.name:>18} {info['pillars']:>7} {info['dropped_points']:>7} {info['bytes']:>7} {info['voxelise_ms']:8.1f} "
              f"{info['encoder_ms']:8.1f} {info['quantize_ms']:8.1f} {info['code_ms']:6.1f} {info['edge_ms']:8.1f}{boxes}")
        if info["dropped_pillars"]:
            print(f"{path.name}: {info['dropped_pillars']} pillars beyond the cap of {bundle.voxels.max_voxels} "
                  "dropped (as OpenPCDet drops them)")
    if client is not None:
        client.close()
    if not rows:
        print(f"error: no {' / '.join(SCAN_SUFFIXES)} scans in {args.input}", file=sys.stderr)
        return 2
    summary = {part: _percentiles(rows, part) for part in TIMING}
    print(f"{len(rows)} frames, mean {np.mean([r['bytes'] for r in rows]):.0f} B; ms p50 / p95 / p99: "
          + ", ".join(f"{part[:-3]} {value}" for part, value in summary.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": rows, "summary": summary}, indent=2))
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
