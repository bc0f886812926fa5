"""Export the vehicle side of a trained PointPillarRQ as an edge bundle for ``python -m pcdet_ext.edge``.

    python tools/export_edge.py --ckpt progressive_rq_logs/split1_ALL/checkpoints/global_best_bitstream.pth \\
        --out edge_bundle/

The checkpoint must carry the bitstream models (tools/split_infer.py --fit_models writes them). The
bundle: the PillarVFE (BatchNorm folded) and the quantizer at each codebook size as ONNX, and
edge_bundle.json (voxelisation, the (n, k) cells it may send, bitstream models, model id, file hashes).
Copy the folder to the device; there ``pip install`` the edge distribution (docs/split_inference.md).
"""
import argparse
import sys

from pcdet_ext.config import ConfigError
from pcdet_ext.deploy import runtime
from pcdet_ext.deploy.export import export_bundle
from pcdet_ext.edge.bundle import EdgeBundle
from pcdet_ext.engine.startup.args import add_set_argument
from pcdet_ext.utils.checkpoint import CheckpointError
from pcdet_ext.utils.console import quiet_known_warnings


def main(argv=None) -> int:
    quiet_known_warnings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", default=None, help="OpenPCDet model config (default: the one stored in --ckpt)")
    p.add_argument("--ckpt", required=True, help="PointPillarRQ checkpoint with bitstream models")
    p.add_argument("--out", required=True, help="bundle folder (created; its bundle files are replaced)")
    add_set_argument(p, default=[])
    args = p.parse_args(argv)
    try:
        model, dataset, cfg = runtime.load_split_model(args.cfg_file, args.set_cfgs, ckpt=args.ckpt)
        side = runtime.ServerRuntime.from_checkpoint(model, dataset, args.ckpt)
        out = export_bundle(model, cfg.DATA_CONFIG, side.models, side.model_id, args.out)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bundle = EdgeBundle.load(out)
    print(f"edge bundle -> {out}: model id {bundle.model_id.hex()}, {'dense' if bundle.dense else 'sparse'}, "
          f"cells {', '.join(map(str, bundle.cells))}")
    return 0


if __name__ == "__main__":  # python -m pcdet_ext.cli.export_edge
    sys.exit(main())
