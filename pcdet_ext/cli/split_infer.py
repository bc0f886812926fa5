"""Split inference over a dataset split or a folder of frames: real bytes, edge and server times.

    python tools/split_infer.py --cfg_file cfgs/kitti_models/pointpillar_rq.yaml --ckpt global_best.pth \\
        --data_path data/kitti --split val --num_codebooks 3 --num_embeddings 64 [--json out.json]
    python tools/split_infer.py ... --frames_dir /path/to/bins           # .bin / .npy frames
    python tools/split_infer.py ... --fit_models --fit_split train       # learn the bitstream models first
    python tools/split_infer.py ... --fit_models --lambda 0.03           # ... fitted to rate-aware codes
    python tools/split_infer.py ... --remote 127.0.0.1:18890             # decode on tools/split_server.py

Per frame: bytes (occupancy + codes), the whole edge's ms (point processing + PillarVFE + quantize +
encode) beside its quantize+encode part, server decode ms, boxes. Summary: median/mean/p95 bytes,
KB/frame, ratios against the float32 dense pseudo-image and float16 sparse pillars.
``--save_frames DIR`` writes each frame as DIR/<scan name>.rqf, the names ``python -m pcdet_ext.edge
--out`` writes, so ``cmp`` compares the two edges.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np


from pcdet_ext.algorithms.bitstream import read_header
from pcdet_ext.deploy import runtime
from pcdet_ext.deploy.rate_distortion import refit_rate_aware
from pcdet_ext.edge.bundle import FRAME_SUFFIX
from pcdet_ext.edge.auth import KeyFileError
from pcdet_ext.edge.transport import TransportError, add_client_arguments, client_from_args
from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.datasets.validation import DatasetFormatError
from pcdet_ext.utils.checkpoint import CheckpointError, load_checkpoint
from pcdet_ext.engine.startup.args import add_set_argument
from pcdet_ext.utils.console import quiet_known_warnings


def frame_paths(args, dataset, split):
    if args.frames_dir:
        paths = sorted(p for p in Path(args.frames_dir).iterdir() if p.suffix in (".bin", ".npy"))
    else:
        ids = (Path(args.data_path) / "ImageSets" / f"{split}.txt").read_text().split()
        kitti = (Path(args.data_path) / "training" / "velodyne").is_dir()
        paths = [Path(args.data_path) / ("training/velodyne" if kitti else "points") / f"{i}.{'bin' if kitti else 'npy'}"
                 for i in ids]
    if not paths:
        raise SystemExit("no frames found")
    return paths


def frame_reader(args, cfg, num_features: int):
    """``path -> points`` as the detector sees them: a KITTI-layout ``--data_path`` under a config with
    ``FOV_POINTS_ONLY`` is cropped to the camera's field of view, as OpenPCDet's KittiDataset crops it for
    training and evaluation (so the bytes are those of the frames the mAP is measured on)."""
    fov = bool(args.data_path and (Path(args.data_path) / "training" / "velodyne").is_dir()
               and cfg.DATA_CONFIG.get("FOV_POINTS_ONLY", False))
    if fov:
        print("frames cropped to the camera's field of view (DATA_CONFIG.FOV_POINTS_ONLY), as in training")
    return lambda path: (runtime.kitti_fov_points(runtime.read_points(path, num_features), path) if fov
                         else runtime.read_points(path, num_features))


def main(argv=None) -> int:
    try:
        return run(argv)
    except (DatasetFormatError, CheckpointError) as exc:  # a frame that is not a point cloud, a checkpoint
        # without bitstream models: one line naming the file
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    quiet_known_warnings()  # OpenPCDet's anchor generator warns about torch.meshgrid on every run
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", default=None, help="OpenPCDet model config (default: the one stored in --ckpt)")
    p.add_argument("--ckpt", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data_path")
    src.add_argument("--frames_dir")
    p.add_argument("--split", default="val")
    p.add_argument("--num_codebooks", type=int, default=None, help="default: every trained codebook")
    p.add_argument("--num_embeddings", type=int, default=None, help="default: the trained size")
    p.add_argument("--fit_models", action="store_true", help="learn the bitstream models from --fit_split")
    p.add_argument("--fit_split", default="train")
    p.add_argument("--fit_frames", type=int, default=200)
    p.add_argument("--save_ckpt", default=None, help="where --fit_models writes (default: <ckpt>_bitstream.pth)")
    p.add_argument("--fit_rounds", type=int, default=2,
                   help="--fit_models with --lambda: refit the models this many times on the codes the rate-aware "
                        "choice makes under the previous fit (fewer bytes at that lambda than models of nearest codes)")
    p.add_argument("--lambda", dest="rate_lambda", type=float, default=0.0,
                   help="rate-aware encoding: choose codes by distortion + LAMBDA x bits under the stored models "
                        "(distortion in units of the frame's mean squared feature norm; 0: nearest codes)")
    p.add_argument("--remote", default=None, help="host:port of tools/split_server.py")
    add_client_arguments(p)
    p.add_argument("--json", default=None, help="write per-frame results and the summary here")
    p.add_argument("--save_frames", default=None, help="write each frame to this folder as <scan name>.rqf")
    add_set_argument(p, default=[])
    args = p.parse_args(argv)
    if not args.rate_lambda >= 0:  # also NaN
        print(f"error: --lambda: expected a number >= 0, got {args.rate_lambda}", file=sys.stderr)
        return 2
    if args.fit_rounds < 1:
        print(f"error: --fit_rounds: expected an integer >= 1, got {args.fit_rounds}", file=sys.stderr)
        return 2
    try:
        model, dataset, cfg = runtime.load_split_model(args.cfg_file, args.set_cfgs, ckpt=args.ckpt)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ckpt = Path(args.ckpt)
    read = frame_reader(args, cfg, dataset.point_feature_encoder.num_point_features)
    if args.fit_models:
        if not args.data_path:
            raise SystemExit("--fit_models needs --data_path (its --fit_split frames)")
        model.load_state_dict(load_checkpoint(ckpt)["model_state"])
        schedule = model.rq_cfg.EMBEDDING_SCHEDULE
        frames = [read(f) for f in frame_paths(args, dataset, args.fit_split)[:args.fit_frames]]
        models = runtime.fit_probability_models(model, dataset, frames, schedule)
        if args.rate_lambda > 0:
            models = refit_rate_aware(model, dataset, frames, models, args.rate_lambda, schedule, args.fit_rounds)
        ckpt_out = Path(args.save_ckpt) if args.save_ckpt else ckpt.with_name(ckpt.stem + "_bitstream.pth")
        runtime.save_with_models(ckpt, models, ckpt_out)
        print(f"bitstream models fitted on {len(frames)} {args.fit_split} frames"
              + (f", {args.fit_rounds} rounds on the codes chosen at lambda {args.rate_lambda:g}" if args.rate_lambda > 0
                 else "") + f" -> {ckpt_out}")
        ckpt = ckpt_out
    q = model.quantizer
    server = runtime.ServerRuntime.from_checkpoint(model, dataset, ckpt)
    n = args.num_codebooks or q.trained_depth
    k = args.num_embeddings or int(q.trained_size[:n].min())
    edge = runtime.EdgeRuntime(model, dataset, server.models, n, k, rate_lambda=args.rate_lambda)
    client = None
    if args.remote:
        try:
            client = client_from_args(args, args.remote)
        except (ValueError, KeyFileError, TransportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    rows = []
    save = Path(args.save_frames) if args.save_frames else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    print(f"{'frame':>16} {'bytes':>8} {'occ':>7} {'codes':>7} {'pillars':>7} {'edge ms':>8} {'q+enc ms':>8} "
          f"{'server ms':>9} {'boxes':>5}")
    for path in frame_paths(args, dataset, args.split):
        data, edge_t = edge.encode(read(path))
        if save:
            (save / (path.stem + FRAME_SUFFIX)).write_bytes(data)
        hdr = read_header(data)
        if client is not None:
            try:
                reply = json.loads(client.request(data))
            except TransportError as exc:
                print(f"error: {path.name}: {exc}", file=sys.stderr)
                return 1
            boxes, server_ms = len(reply["boxes"]), reply["decode_ms"] + reply["tail_ms"]
        else:
            pred, server_t = server.decode(data)
            boxes, server_ms = len(pred["pred_boxes"]), server_t["decode_ms"] + server_t["tail_ms"]
        row = {"frame": path.name, "bytes": len(data), "occupancy_bytes": 4 * hdr["occ_words"],
               "code_bytes": 4 * hdr["code_words"], "pillars": edge_t["pillars"],
               "edge_ms": edge_t["edge_ms"], "quantize_encode_ms": edge_t["quantize_encode_ms"],
               "head_ms": edge_t["head_ms"], "server_ms": server_ms,
               "boxes": boxes}
        rows.append(row)
        print(f"{row['frame']:>16} {row['bytes']:>8} {row['occupancy_bytes']:>7} {row['code_bytes']:>7} "
              f"{row['pillars']:>7} {row['edge_ms']:8.1f} {row['quantize_encode_ms']:8.1f} {row['server_ms']:9.1f} "
              f"{row['boxes']:>5}")
    if client is not None:
        client.close()
    sizes = [r["bytes"] for r in rows]
    h, w = server.geo.height, server.geo.width
    c = q.dim
    dense32 = h * w * c * 4
    sparse16 = statistics.mean(r["pillars"] * (c * 2 + 4) for r in rows)  # fp16 features + int16 (y, x)
    summary = {"num_codebooks": n, "num_embeddings": k, "rate_lambda": args.rate_lambda, "frames": len(rows),
               "median_bytes": statistics.median(sizes), "mean_bytes": statistics.mean(sizes),
               "p95_bytes": float(np.percentile(sizes, 95)), "kb_per_frame": statistics.mean(sizes) / 1024,
               "ratio_vs_float32_dense": dense32 / statistics.mean(sizes),
               "ratio_vs_float16_sparse": sparse16 / statistics.mean(sizes),
               "median_edge_ms": statistics.median(r["edge_ms"] for r in rows),
               "median_quantize_encode_ms": statistics.median(r["quantize_encode_ms"] for r in rows),
               "median_server_ms": statistics.median(r["server_ms"] for r in rows)}
    print(f"({n}, {k}){f' lambda {args.rate_lambda:g}' if args.rate_lambda else ''}: median {summary['median_bytes']:.0f} B, mean {summary['mean_bytes']:.0f} B, "
          f"p95 {summary['p95_bytes']:.0f} B = {summary['kb_per_frame']:.2f} KB/frame; "
          f"{summary['ratio_vs_float32_dense']:.0f}x smaller than float32 dense ({dense32 / 1024:.0f} KB), "
          f"{summary['ratio_vs_float16_sparse']:.1f}x smaller than float16 sparse pillars; "
          f"edge {summary['median_edge_ms']:.1f} ms (quantize+encode {summary['median_quantize_encode_ms']:.1f}), "
          f"server {summary['median_server_ms']:.1f} ms (median)")
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": rows, "summary": summary}, indent=2))
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.split_infer
    sys.exit(main())
